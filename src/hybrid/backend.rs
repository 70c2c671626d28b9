//! What computes a remote module in each mode.
//!
//! - [`FloatBackend`]: the float layer (calibration; `torch` runs the untouched model instead).
//! - [`ClearBackend`]: quantized in the clear — `disable` multiplies dequantized values in f32,
//!   `simulate` runs the integer matmul the encrypted path must equal bit for bit.
//! - [`EncryptedBackend`]: quantize, encrypt, ask a [`Remote`], decrypt, dequantize. `execute` uses
//!   the in-process [`LocalServer`]; the serving layer implements [`Remote`] over HTTP.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use ndarray::{Array2, ArrayView2};
use tracing::Instrument;

use super::rows::{check_map, from_rows, to_rows, RowLayout};
use super::runtime::{ms_since, BoxFuture, ForwardStats, ModuleBackend};
use super::spec::{ClientSpec, ServerModule};
use super::HybridError;
use crate::fhe::{
    ClientKey, Encoding, EncryptedOutputs, EncryptedRows, KeyProfile, ModuleProgram, Precision,
    SessionKey, MAX_ROWS,
};
use crate::model::{LinearModule, Value};
use crate::quant::{integer_matmul, min_max};

/// A server that evaluates encrypted rows for a session whose client holds `client_key`.
///
/// The serving layer implements it over HTTP; [`LocalServer`] in process.
pub trait Remote: Send + Sync {
    fn client_key(&self) -> &ClientKey;
    /// Most rows of `module` one request may carry; larger inputs are split into several
    /// requests. A server publishes its limit (`max_job_values` in its model listing).
    fn max_rows(&self, _module: &str) -> usize {
        MAX_ROWS
    }
    /// Which packing keys the session holds: requests go in encodings it serves.
    fn key_profile(&self) -> KeyProfile {
        KeyProfile::Full
    }
    fn compute<'a>(
        &'a self,
        module: &'a str,
        request: EncryptedRows,
    ) -> BoxFuture<'a, Result<EncryptedOutputs, HybridError>>;
}

/// A client key with the server-side keys derived from it, built on first use and shared by every
/// [`LocalServer`] made from it (evaluation keys take seconds and hundreds of MiB).
pub struct ExecuteKeys {
    client: ClientKey,
    profile: KeyProfile,
    exact: OnceLock<SessionKey>,
    compact: OnceLock<SessionKey>,
    /// The exact key with bootstrapping keys (modules with activations inside).
    bootstrap: OnceLock<SessionKey>,
}

impl ExecuteKeys {
    pub fn new(client: ClientKey) -> Self {
        Self::with_profile(client, KeyProfile::Full)
    }

    /// Server-side keys of `profile` (a lean key: linear modules only, `auto` and `slot`).
    pub fn with_profile(client: ClientKey, profile: KeyProfile) -> Self {
        Self {
            client,
            profile,
            exact: OnceLock::new(),
            compact: OnceLock::new(),
            bootstrap: OnceLock::new(),
        }
    }

    pub fn client(&self) -> &ClientKey {
        &self.client
    }

    /// The server's exact packing key with bootstrapping keys.
    pub fn with_bootstrap(&self) -> &SessionKey {
        self.bootstrap.get_or_init(|| {
            let mut key = self.client.evaluation_key(Precision::Exact, &|_| ());
            key.bootstrap = Some(self.client.bootstrap_key());
            SessionKey::new(&key)
        })
    }

    /// The server's Fourier packing key for `precision`.
    pub fn packing(&self, precision: Precision) -> &SessionKey {
        let slot = match precision {
            Precision::Exact => &self.exact,
            Precision::Compact => &self.compact,
        };
        slot.get_or_init(|| {
            SessionKey::new(
                &self
                    .client
                    .evaluation_key_as(precision, self.profile, &|_| ()),
            )
        })
    }
}

/// Client keys and a server in one process: what `execute` mode runs on.
pub struct LocalServer {
    keys: Arc<ExecuteKeys>,
    layers: HashMap<String, ModuleProgram>,
}

impl LocalServer {
    /// Every layer's Fourier weights, and the packing keys of the precisions they use.
    pub fn new(
        keys: Arc<ExecuteKeys>,
        modules: &BTreeMap<String, ServerModule>,
    ) -> Result<Self, HybridError> {
        let layers = modules
            .iter()
            .map(|(name, m)| {
                if m.chain.is_some() && keys.profile == KeyProfile::Lean {
                    return Err(HybridError::Unsupported(format!(
                        "module `{name}` has activations inside: a lean key serves linear \
                         modules only (use the full key)"
                    )));
                }
                if m.chain.is_some() {
                    keys.with_bootstrap();
                } else {
                    keys.packing(m.plan.precision);
                }
                Ok((
                    name.clone(),
                    ModuleProgram::new(m.plan.clone(), &m.weights.codes, m.chain.as_ref())?,
                ))
            })
            .collect::<Result<_, HybridError>>()?;
        Ok(Self { keys, layers })
    }
}

impl Remote for LocalServer {
    fn client_key(&self) -> &ClientKey {
        self.keys.client()
    }

    fn max_rows(&self, module: &str) -> usize {
        self.layers
            .get(module)
            .map_or(MAX_ROWS, |l| l.max_rows(crate::fhe::DEFAULT_JOB_BYTES))
    }

    fn key_profile(&self) -> KeyProfile {
        self.keys.profile
    }

    fn compute<'a>(
        &'a self,
        module: &'a str,
        request: EncryptedRows,
    ) -> BoxFuture<'a, Result<EncryptedOutputs, HybridError>> {
        Box::pin(async move {
            let layer = self
                .layers
                .get(module)
                .ok_or_else(|| HybridError::UnknownRemote(module.to_string()))?;
            let key = if layer.needs_bootstrap() {
                self.keys.with_bootstrap()
            } else {
                self.keys.packing(layer.plan().precision)
            };
            Ok(layer.evaluate(key, &request)?)
        })
    }
}

/// Float linear layers; records each module's input range (calibration).
pub(crate) struct FloatBackend<'a> {
    pub modules: &'a HashMap<String, LinearModule>,
    pub ranges: Mutex<HashMap<String, (f32, f32)>>,
    /// Input rows of modules with activations inside (compile calibrates their hidden layers on
    /// them), at most [`MAX_CHAIN_SAMPLES`] rows each.
    pub samples: Option<Mutex<HashMap<String, ChainSamples>>>,
}

/// A non-linear module's calibration rows, and the map they tile when it convolves.
#[derive(Default)]
pub(crate) struct ChainSamples {
    pub rows: Vec<f32>,
    pub map: Option<[usize; 2]>,
}

/// Calibration rows kept per non-linear module.
const MAX_CHAIN_SAMPLES: usize = 4096;

impl ModuleBackend for FloatBackend<'_> {
    fn compute<'a>(
        &'a self,
        module: &'a str,
        input: Value,
        _stats: &'a Mutex<ForwardStats>,
    ) -> BoxFuture<'a, Result<Value, HybridError>> {
        Box::pin(async move {
            let m = self
                .modules
                .get(module)
                .ok_or_else(|| HybridError::UnknownRemote(module.to_string()))?;
            let (x, layout) = to_rows(module, &m.kind, m.in_features, &input)?;
            let (lo, hi) = min_max(&x);
            let mut ranges = self.ranges.lock().expect("ranges");
            let r = ranges.entry(module.to_string()).or_insert((lo, hi));
            *r = (r.0.min(lo), r.1.max(hi));
            drop(ranges);
            if let Some(chain) = &m.chain {
                let map = match &layout {
                    RowLayout::Conv { height, width, .. } if chain.convolves() => {
                        Some([*height, *width])
                    }
                    _ => None,
                };
                if let Some(samples) = &self.samples {
                    let mut samples = samples.lock().expect("samples");
                    let kept = samples.entry(module.to_string()).or_default();
                    if kept.rows.is_empty() {
                        kept.map = map;
                    } else if kept.map != map {
                        return Err(HybridError::Unsupported(format!(
                            "`{module}` saw calibration maps of {:?} and {map:?}: a module that \
                             convolves its hidden map is compiled for one image size",
                            kept.map
                        )));
                    }
                    // Whole maps only (a convolution gathers each pixel's neighbours).
                    let unit = map.map_or(1, |[h, w]| h * w) * m.in_features;
                    let room = (MAX_CHAIN_SAMPLES * m.in_features)
                        .saturating_sub(kept.rows.len())
                        .max(if kept.rows.is_empty() { unit } else { 0 });
                    let take = x.len().min(room / unit * unit);
                    kept.rows.extend_from_slice(&x[..take]);
                }
                let y = super::compile_chain::chain_float(chain, &x, m.in_features, map)?;
                return Ok(from_rows(&layout, m.out_features, &y)?);
            }
            let y = float_matmul(
                &x,
                m.in_features,
                &m.weight,
                m.out_features,
                m.bias.as_deref(),
            );
            Ok(from_rows(&layout, m.out_features, &y)?)
        })
    }
}

/// Quantized, in the clear (owner side: needs the server tree's weights).
pub(crate) struct ClearBackend<'a> {
    pub specs: &'a BTreeMap<String, ClientSpec>,
    pub server: &'a BTreeMap<String, ServerModule>,
    /// `simulate` (integer matmul) rather than `disable` (f32 on dequantized values).
    pub integer: bool,
}

impl ModuleBackend for ClearBackend<'_> {
    fn compute<'a>(
        &'a self,
        module: &'a str,
        input: Value,
        stats: &'a Mutex<ForwardStats>,
    ) -> BoxFuture<'a, Result<Value, HybridError>> {
        Box::pin(async move {
            let start = Instant::now();
            let (spec, server) = match (self.specs.get(module), self.server.get(module)) {
                (Some(s), Some(m)) => (s, m),
                _ => return Err(HybridError::UnknownRemote(module.to_string())),
            };
            let (x, layout) = to_rows(module, &spec.kind, spec.in_features, &input)?;
            check_map(module, spec.map, &layout)?;
            let q = spec.input.quantize(&x, spec.in_features)?;
            let y = if let Some(chain) = &server.chain {
                // Both clear modes run the integer program of a non-linear module.
                let acc = chain.simulate(&integer_matmul(&q, &server.weights), q.rows);
                spec.dequantizer.apply(&acc, &q)?
            } else if self.integer {
                let acc = integer_matmul(&q, &server.weights);
                spec.dequantizer.apply(&acc, &q)?
            } else {
                // Fake quantization: the quantized values, multiplied in floating point.
                let w = &server.weights;
                let x_hat: Vec<f32> = q
                    .values
                    .chunks_exact(spec.in_features)
                    .zip(&q.quantizers)
                    .flat_map(|(row, qz)| row.iter().map(move |&v| v as f32 * qz.scale))
                    .collect();
                let w_hat: Vec<f32> = (0..w.out_features)
                    .flat_map(|j| {
                        let (s, zp) = (w.scale(j), w.zero_point(j));
                        w.row(j).iter().map(move |&c| (c as i32 - zp) as f32 * s)
                    })
                    .collect();
                float_matmul(
                    &x_hat,
                    spec.in_features,
                    &w_hat,
                    spec.out_features,
                    spec.dequantizer.bias.as_deref(),
                )
            };
            let out = from_rows(&layout, spec.out_features, &y)?;
            stats.lock().expect("stats").clear_ms += ms_since(start);
            Ok(out)
        })
    }
}

/// Encrypted through a [`Remote`]: what `execute` and `remote` run.
pub(crate) struct EncryptedBackend<'a> {
    pub specs: &'a BTreeMap<String, ClientSpec>,
    pub remote: &'a dyn Remote,
}

impl ModuleBackend for EncryptedBackend<'_> {
    fn compute<'a>(
        &'a self,
        module: &'a str,
        input: Value,
        stats: &'a Mutex<ForwardStats>,
    ) -> BoxFuture<'a, Result<Value, HybridError>> {
        Box::pin(
            async move {
                let spec = self
                    .specs
                    .get(module)
                    .ok_or_else(|| HybridError::UnknownRemote(module.to_string()))?;
                let mut s = ForwardStats::default();
                let t = Instant::now();
                let (layout, q) = tracing::info_span!("quantize").in_scope(|| {
                    let (x, layout) = to_rows(module, &spec.kind, spec.in_features, &input)?;
                    check_map(module, spec.map, &layout)?;
                    let q = spec.input.quantize(&x, spec.in_features)?;
                    Ok::<_, HybridError>((layout, q))
                })?;
                s.quantize_ms += ms_since(t);

                let key = self.remote.client_key();
                let output_plan = spec.output_plan.as_ref().unwrap_or(&spec.plan);
                let mut acc = Vec::with_capacity(q.rows * spec.out_features);
                // Requests of at most the server's row limit: a conv over a batch easily has tens
                // of thousands of im2col rows.
                // (A non-linear module's limit of its own is in `max_rows`: the server publishes
                // it, and execute mode's local server sizes it from the same budget.)
                // A convolving module's requests carry whole maps.
                let limit = self.remote.max_rows(module).clamp(1, MAX_ROWS);
                let max_rows = crate::fhe::whole_maps(limit, spec.map_pixels());
                if max_rows == 0 {
                    return Err(HybridError::Unsupported(format!(
                        "module `{module}` takes whole maps of {} pixels, more than the server's \
                         {limit} rows per request",
                        spec.map_pixels().unwrap_or(0)
                    )));
                }
                for chunk in q.values.chunks(max_rows * spec.in_features) {
                    let rows = chunk.len() / spec.in_features;
                    let t = Instant::now();
                    let profile = self.remote.key_profile();
                    let encoding =
                        Encoding::choose_for(&spec.plan, rows, profile).ok_or_else(|| {
                            HybridError::Unsupported(format!(
                            "module `{module}` offers {:?} requests, none of which a {profile} \
                             key serves: open the session with a full key",
                            spec.plan
                                .encodings
                                .iter()
                                .map(|e| e.to_string())
                                .collect::<Vec<_>>()
                        ))
                        })?;
                    let request = tracing::info_span!("encrypt", rows, %encoding)
                        .in_scope(|| key.encrypt_rows_as(&spec.plan, chunk, rows, encoding))?;
                    s.encrypt_ms += ms_since(t);
                    s.upload_bytes += request.wire_len();
                    let t = Instant::now();
                    // The request's span is current while the call runs, so a remote `Remote` sends
                    // it as the `traceparent` of the server's spans.
                    let response = self
                        .remote
                        .compute(module, request)
                        .instrument(tracing::info_span!("request"))
                        .await?;
                    s.fhe_ms += ms_since(t);
                    s.download_bytes += response.wire_len();
                    s.requests += 1;
                    let t = Instant::now();
                    acc.extend(
                        tracing::info_span!("decrypt")
                            .in_scope(|| key.decrypt_outputs(output_plan, &response))?,
                    );
                    s.decrypt_ms += ms_since(t);
                }
                let t = Instant::now();
                let y = spec.dequantizer.apply(&acc, &q)?;
                let out = from_rows(&layout, spec.out_features, &y)?;
                s.dequantize_ms += ms_since(t);
                stats.lock().expect("stats").add(&s);
                Ok(out)
            }
            .instrument(tracing::info_span!("remote_module", module)),
        )
    }
}

/// `x · Wᵀ + b` in f32 through ndarray (rows × in, out × in).
fn float_matmul(x: &[f32], cols: usize, w: &[f32], out: usize, bias: Option<&[f32]>) -> Vec<f32> {
    let rows = x.len() / cols;
    let x = ArrayView2::from_shape((rows, cols), x).expect("rows × cols");
    let w = ArrayView2::from_shape((out, cols), w).expect("out × cols");
    let mut y: Array2<f32> = x.dot(&w.t());
    if let Some(b) = bias {
        for mut row in y.rows_mut() {
            row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
        }
    }
    y.into_raw_vec_and_offset().0
}
