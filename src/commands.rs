//! The work behind `hyfhe inspect`, `hyfhe compile` and `hyfhe run`, kept out of the binary so it
//! is testable; the binary only parses arguments and prints.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ndarray::ArrayD;
use ndarray_npy::{ReadNpyExt, WriteNpyExt};
use serde::Serialize;

use crate::client::Client;
use crate::fhe::{ClientKey, KeyProfile, Precision};
use crate::hybrid::{
    CompileOptions, ExecuteKeys, ForwardStats, GenerateReport, HybridError, HybridModel, Mode,
    ModuleReport,
};
use crate::model::chain::Shortcut;
use crate::model::{runner, ModelError, OnnxModel, Value};
use crate::progress::Progress;
use crate::quant::min_max;

fn open_npy(path: &Path) -> Result<std::fs::File, ModelError> {
    std::fs::File::open(path).map_err(|e| ModelError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Read a `.npy` file as a tensor: f32 (f64 converted), or int64 (int32 converted) for token ids.
pub fn read_npy(path: &Path) -> Result<Value, HybridError> {
    let open = || open_npy(path);
    if let Ok(a) = ArrayD::<f32>::read_npy(open()?) {
        let values: Vec<f32> = a.iter().copied().collect();
        return Ok(runner::f32_tensor(a.shape(), &values)?);
    }
    if let Ok(a) = ArrayD::<f64>::read_npy(open()?) {
        let values: Vec<f32> = a.iter().map(|&v| v as f32).collect();
        return Ok(runner::f32_tensor(a.shape(), &values)?);
    }
    if let Ok(a) = ArrayD::<i64>::read_npy(open()?) {
        let values: Vec<i64> = a.iter().copied().collect();
        return Ok(runner::i64_tensor(a.shape(), &values)?);
    }
    match ArrayD::<i32>::read_npy(open()?) {
        Ok(a) => {
            let values: Vec<i64> = a.iter().map(|&v| v as i64).collect();
            Ok(runner::i64_tensor(a.shape(), &values)?)
        }
        Err(e) => Err(ModelError::Read {
            path: path.display().to_string(),
            reason: format!("not a float32/float64/int64/int32 .npy array: {e}"),
        }
        .into()),
    }
}

/// Read a `.npy` of integer class labels (int64 or int32).
pub fn read_labels(path: &Path) -> Result<Vec<i64>, HybridError> {
    let open = || open_npy(path);
    if let Ok(a) = ArrayD::<i64>::read_npy(open()?) {
        return Ok(a.iter().copied().collect());
    }
    ArrayD::<i32>::read_npy(open()?)
        .map(|a| a.iter().map(|&v| v as i64).collect())
        .map_err(|e| {
            ModelError::Read {
                path: path.display().to_string(),
                reason: format!("not an int64/int32 .npy array: {e}"),
            }
            .into()
        })
}

pub fn write_npy(path: &Path, value: &Value) -> Result<(), HybridError> {
    let values = runner::f32_values(value, "the output")?;
    let array = ArrayD::from_shape_vec(value.shape().to_vec(), values.to_vec())
        .expect("a tensor's shape matches its values");
    let io = |e: String| ModelError::Read {
        path: path.display().to_string(),
        reason: e,
    };
    let file = std::fs::File::create(path).map_err(|e| io(e.to_string()))?;
    array.write_npy(file).map_err(|e| io(e.to_string()))?;
    Ok(())
}

/// `hyfhe inspect MODEL`: the module tree.
pub fn inspect(model: &Path) -> Result<String, HybridError> {
    let onnx = OnnxModel::load(model)?;
    let graph = onnx.graph();
    let mut out = format!(
        "{}: {} nodes, {} initializers, inputs {:?}, outputs {:?}\n\
         module paths (named_modules() order) [ops] parameters:\n",
        model.display(),
        graph.node.len(),
        graph.initializer.len(),
        onnx.input_names(),
        graph.output.iter().map(|o| &o.name).collect::<Vec<_>>()
    );
    out.push_str(
        &onnx
            .modules()
            .render_annotated(|info| remote_verdict(&onnx, info)),
    );
    Ok(out)
}

/// Modules holding more weighted ops than this are not tried as one remote module by
/// `inspect` (a whole model or stack is never one): it points at their children instead.
const INSPECT_MAX_WEIGHTED: usize = 8;

/// Whether `info` can run remote, as `compile --remote` would decide it, or why not; `None` for
/// a module with nothing to evaluate (no Gemm, MatMul or Conv).
fn remote_verdict(onnx: &OnnxModel, info: &crate::model::ModuleInfo) -> Option<String> {
    let weighted = info
        .op_types
        .iter()
        .filter(|op| matches!(op.as_str(), "Gemm" | "MatMul" | "Conv"))
        .count();
    if weighted == 0 {
        return None;
    }
    if weighted > INSPECT_MAX_WEIGHTED {
        return Some(format!(
            "not one remote module ({weighted} weighted ops): pick its children"
        ));
    }
    let module = onnx.linear_module(&info.path).map_err(HybridError::from);
    let module = module.and_then(|m| crate::hybrid::check_learned(&info.path, &m).map(|()| m));
    Some(match module {
        Ok(m) => {
            let what = match &m.chain {
                Some(c) => format!(
                    "remote: {} layers with activations ({}){}, {}→{}",
                    c.layers.len(),
                    c.activations
                        .iter()
                        .flatten()
                        .map(|a| a.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    match &c.shortcut {
                        Some(Shortcut::Identity) => ", residual: identity",
                        Some(Shortcut::Projection(_)) => ", residual: 1×1 projection",
                        None => "",
                    },
                    m.in_features,
                    m.out_features
                ),
                None => format!("remote: linear {}→{}", m.in_features, m.out_features),
            };
            match &m.learned {
                Some(l) => format!(
                    "{what}, learned quantizers: {}-bit weights ({}), input {}",
                    l.weight.bits(),
                    if l.weight.per_tensor() {
                        "per tensor"
                    } else {
                        "per channel"
                    },
                    l.input
                        .as_ref()
                        .map_or("calibrated".to_string(), |g| format!(
                            "{}-bit grid",
                            g.bits()
                        ))
                ),
                None => what,
            }
        }
        Err(e) => format!("local only: {e}"),
    })
}

pub struct CompileRequest<'a> {
    pub model: &'a Path,
    pub remote: Vec<String>,
    pub calibration: &'a Path,
    pub out: &'a Path,
    pub options: CompileOptions,
    pub force: bool,
}

/// `hyfhe compile`: select, calibrate, compile, save the three trees.
pub fn compile(req: &CompileRequest<'_>, progress: &dyn Progress) -> Result<String, HybridError> {
    // Refuse a non-empty output directory before spending time on calibration.
    if !req.force && req.out.exists() && req.out.read_dir().is_ok_and(|mut d| d.next().is_some()) {
        return Err(crate::hybrid::ArtefactError::NotEmpty(req.out.display().to_string()).into());
    }
    let onnx = OnnxModel::load(req.model)?;
    let name = req
        .model
        .file_stem()
        .map_or("model".into(), |s| s.to_string_lossy().into_owned());
    let remote: Vec<&str> = req.remote.iter().map(String::as_str).collect();
    let mut model = HybridModel::new(&name, onnx, &remote)?;
    let calibration = read_npy(req.calibration)?;
    let samples = calibration.shape().first().copied().unwrap_or(0);
    let reports = model.compile(&calibration, &req.options, progress)?;
    model.save_and_clear_private_info(req.out, req.force)?;
    let mut out = format!(
        "compiled `{name}` ({samples} calibration samples) into {}\n",
        req.out.display()
    );
    out.push_str(&render_reports(&reports));
    out.push_str(
        "  client/  (model without the remote weights + specs)  → ship to clients\n  \
         server/  (quantized weights)                          → workers\n  \
         private/ (the full float model)                       → keep; never serve\n",
    );
    Ok(out)
}

fn render_reports(reports: &[ModuleReport]) -> String {
    let mut out = String::new();
    for r in reports {
        let input = match r.input {
            crate::quant::InputQuantization::Static(q) => {
                format!(
                    "static {}-bit scale {:.3e} zp {}",
                    q.bits, q.scale, q.zero_point
                )
            }
            crate::quant::InputQuantization::DynamicPerRow { .. } => "dynamic per row".into(),
        };
        let precision = match r.plan.precision {
            Precision::Exact => "exact".to_string(),
            Precision::Compact => format!("compact, {} top bits", r.plan.predicted_exact_top_bits),
        };
        out.push_str(&format!(
            "  {:<24} {}→{}  {}-bit weights  {}-bit acc  {precision}  input {input}\n",
            r.module, r.plan.in_features, r.plan.out_features, r.plan.weight_bits, r.plan.acc_bits
        ));
        out.push_str(&r.exposure());
        if let Some(c) = &r.chain {
            let windows: Vec<String> = c
                .windows
                .iter()
                .map(|(w, step)| format!("{w}-bit window, step {step}"))
                .collect();
            out.push_str(&format!(
                "  {:<24} activations {} · {} rounded bits ({}) · {} bootstraps/row · \
                 P(two steps off) ≤ 2^{:.0}/row · ~{:.1}% hidden values one step off · \
                 calibration max error {:.3e}\n",
                "",
                c.activations.join(", "),
                c.rounding_bits,
                windows.join("; "),
                c.bootstraps_per_row,
                c.failure_log2,
                100.0 * c.neighbour_rate,
                c.calibration_max_error
            ));
        }
    }
    out
}

pub struct RunRequest<'a> {
    pub dir: &'a Path,
    pub input: &'a Path,
    pub mode: Mode,
    pub output: Option<PathBuf>,
    pub labels: Option<PathBuf>,
    /// Also run this mode and report the difference.
    pub reference: Option<Mode>,
    /// Only the first samples of the input (and labels).
    pub first: Option<usize>,
    /// Coordinator URL and API key, for `Mode::Remote`.
    pub server: Option<(String, String)>,
    /// The packing keys of the remote session or the execute mode's in-process server.
    pub key: KeyProfile,
}

#[derive(Debug, Serialize)]
pub struct RunReport {
    pub model: String,
    pub mode: Mode,
    pub input_shape: Vec<usize>,
    pub output_shape: Vec<usize>,
    /// Keygen, evaluation keys and Fourier weights for `execute` (once per process).
    pub setup_ms: f64,
    pub total_ms: f64,
    pub stats: ForwardStats,
    pub output_min: f32,
    pub output_max: f32,
    pub output_mean: f64,
    pub accuracy: Option<f64>,
    pub reference: Option<Comparison>,
}

#[derive(Debug, Serialize)]
pub struct Comparison {
    pub mode: Mode,
    pub max_abs_diff: f32,
    pub bit_identical: bool,
    pub accuracy: Option<f64>,
}

/// `hyfhe run DIR --input X.npy --mode M`.
pub fn run(
    req: &RunRequest<'_>,
    progress: &dyn Progress,
) -> Result<(RunReport, Value), HybridError> {
    let model = HybridModel::load(req.dir)?;
    let mut x = read_npy(req.input)?;
    let mut labels = req.labels.as_deref().map(read_labels).transpose()?;
    if let Some(n) = req.first {
        let total = x.shape().first().copied().unwrap_or(0);
        if n == 0 || n > total {
            return Err(
                ModelError::Input(format!("--first {n}: the input has {total} samples")).into(),
            );
        }
        x = x.slice(0, 0, n).map_err(ModelError::tract)?;
        if let Some(l) = labels.as_mut() {
            l.truncate(n);
        }
    }
    let mut setup_ms = 0.0;
    if req.mode == Mode::Execute || req.reference == Some(Mode::Execute) {
        let t = Instant::now();
        use_key_profile(&model, req.key);
        model.local_server()?;
        setup_ms = t.elapsed().as_secs_f64() * 1e3;
    }
    // Remote: keygen and session opening count as setup, like execute's local server.
    let remote = match (
        req.mode == Mode::Remote || req.reference == Some(Mode::Remote),
        &req.server,
    ) {
        (false, _) => None,
        (true, None) => {
            return Err(HybridError::Unsupported(
                "mode remote needs --server URL and --api-key KEY".into(),
            ))
        }
        (true, Some((url, key))) => {
            let runtime =
                tokio::runtime::Runtime::new().map_err(|e| HybridError::Remote(e.to_string()))?;
            let t = Instant::now();
            let client = Client::new(url, key)?;
            let session =
                runtime.block_on(client.open_session_as(model.compiled(), req.key, progress))?;
            setup_ms += t.elapsed().as_secs_f64() * 1e3;
            Some((runtime, session))
        }
    };
    let forward = |x: Value, mode: Mode| match (&remote, mode) {
        (Some((runtime, session)), Mode::Remote) => {
            runtime.block_on(model.forward_remote(x, session))
        }
        _ => model.forward(x, mode),
    };
    let t = Instant::now();
    let (y, stats) = forward(x.clone(), req.mode)?;
    let total_ms = t.elapsed().as_secs_f64() * 1e3;
    let values = runner::f32_values(&y, "the output")?;
    let top1 = labels.as_ref().map(|l| accuracy(&y, l)).transpose()?;
    let reference = match req.reference {
        None => None,
        Some(mode) => {
            let (r, _) = forward(x.clone(), mode)?;
            let rv = runner::f32_values(&r, "the reference output")?;
            let max_abs_diff = values
                .iter()
                .zip(rv)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            Some(Comparison {
                mode,
                max_abs_diff,
                bit_identical: values
                    .iter()
                    .zip(rv)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                accuracy: labels.as_ref().map(|l| accuracy(&r, l)).transpose()?,
            })
        }
    };
    if let Some((runtime, session)) = &remote {
        // Best effort: the session would expire on its own.
        let _ = runtime.block_on(session.close());
    }
    if let Some(path) = &req.output {
        write_npy(path, &y)?;
    }
    let (output_min, output_max) = min_max(values);
    let report = RunReport {
        model: model.name().to_string(),
        mode: req.mode,
        input_shape: x.shape().to_vec(),
        output_shape: y.shape().to_vec(),
        setup_ms,
        total_ms,
        stats,
        output_min,
        output_max,
        output_mean: values.iter().map(|&v| v as f64).sum::<f64>() / values.len().max(1) as f64,
        accuracy: top1,
        reference,
    };
    Ok((report, y))
}

/// Top-1 accuracy of `[n, classes]` logits against `n` labels.
pub fn accuracy(logits: &Value, labels: &[i64]) -> Result<f64, HybridError> {
    let shape = logits.shape();
    let values = runner::f32_values(logits, "the output")?;
    if shape.len() != 2 || shape[0] != labels.len() {
        return Err(ModelError::Input(format!(
            "labels: {} labels for an output of shape {shape:?} (expected [n, classes])",
            labels.len()
        ))
        .into());
    }
    let correct = values
        .chunks_exact(shape[1])
        .zip(labels)
        .filter(|(row, &l)| {
            let best = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                );
            best.0 as i64 == l
        })
        .count();
    Ok(correct as f64 / labels.len() as f64)
}

impl RunReport {
    pub fn render(&self) -> String {
        let s = &self.stats;
        let mut out = format!(
            "{} · mode {} · input {:?} → output {:?}\n\
             output: min {:.4}  max {:.4}  mean {:.4}\n",
            self.model,
            self.mode,
            self.input_shape,
            self.output_shape,
            self.output_min,
            self.output_max,
            self.output_mean
        );
        if let Some(a) = self.accuracy {
            out.push_str(&format!("accuracy: {:.2}%\n", 100.0 * a));
        }
        out.push_str(&format!("time: {:.1} ms in all\n", self.total_ms));
        let mut line = |name: &str, ms: f64| {
            if ms > 0.0 {
                out.push_str(&format!("  {name:<14} {ms:>10.2} ms\n"));
            }
        };
        line("local ops", s.local_ms);
        line("quantize", s.quantize_ms);
        line("encrypt", s.encrypt_ms);
        line("FHE eval", s.fhe_ms);
        line("decrypt", s.decrypt_ms);
        line("dequantize", s.dequantize_ms);
        line("clear modules", s.clear_ms);
        if self.setup_ms > 0.0 {
            out.push_str(&format!(
                "  (once per process: keygen + evaluation keys + Fourier weights {:.0} ms)\n",
                self.setup_ms
            ));
        }
        if s.requests > 0 {
            out.push_str(&format!(
                "wire: {} requests, {} B up, {} B down\n",
                s.requests, s.upload_bytes, s.download_bytes
            ));
        }
        if let Some(r) = &self.reference {
            out.push_str(&format!(
                "vs {}: max |Δ| {:.3e}{}{}\n",
                r.mode,
                r.max_abs_diff,
                if r.bit_identical {
                    " (bit-identical)"
                } else {
                    ""
                },
                r.accuracy.map_or(String::new(), |a| format!(
                    ", its accuracy {:.2}%",
                    100.0 * a
                ))
            ));
        }
        out
    }
}

pub struct GenerateRequest<'a> {
    pub dir: &'a Path,
    pub prompt: &'a Path,
    pub max_new_tokens: usize,
    pub mode: Mode,
    /// Coordinator URL and API key, for `Mode::Remote`.
    pub server: Option<(String, String)>,
    /// The packing keys of the remote session or the execute mode's in-process server.
    pub key: KeyProfile,
}

/// What `hyfhe generate` prints (`--json`: this object, the report's fields inlined).
#[derive(Debug, Serialize)]
pub struct GenerateSummary {
    pub model: String,
    pub mode: Mode,
    pub remote_modules: usize,
    /// Keygen and evaluation keys (execute), or keygen and session opening (remote).
    pub setup_ms: f64,
    #[serde(flatten)]
    pub report: GenerateReport,
}

impl GenerateSummary {
    pub fn render(&self) -> String {
        let r = &self.report;
        let share = |s: &ForwardStats| {
            let local = s.local_ms;
            let total = local
                + s.quantize_ms
                + s.encrypt_ms
                + s.fhe_ms
                + s.decrypt_ms
                + s.dequantize_ms
                + s.clear_ms;
            if total > 0.0 {
                100.0 * local / total
            } else {
                0.0
            }
        };
        let steps = r.tokens.len().saturating_sub(1).max(1) as f64;
        let mut out = format!(
            "{} ({} mode, {} remote modules, {}): {} prompt tokens → {} new\n\
             tokens: {:?}\n\
             prefill   {:>9.1} ms  ({} B up, {} B down, {:.0}% local ops)\n",
            self.model,
            self.mode,
            self.remote_modules,
            if r.kv_cache {
                "KV cache: one row per module per new token"
            } else {
                "no KV cache: the sequence is re-run"
            },
            r.prompt_tokens,
            r.tokens.len(),
            r.tokens,
            r.prefill_ms,
            r.prefill.upload_bytes,
            r.prefill.download_bytes,
            share(&r.prefill),
        );
        if r.tokens.len() > 1 {
            out.push_str(&format!(
                "decode    {:>9.1} ms/token  ({:.0} B up, {:.0} B down per token, {:.1} requests \
                 per token, {:.0}% local ops)\n",
                r.decode_ms_per_token,
                r.bytes_up_per_token,
                r.bytes_down_per_token,
                r.decode.requests as f64 / steps,
                share(&r.decode),
            ));
        }
        if self.setup_ms > 0.0 {
            out.push_str(&format!(
                "  (once per process: keys {:.0} ms)\n",
                self.setup_ms
            ));
        }
        out
    }
}

/// Execute mode's in-process server gets keys of `profile` (the default is full).
fn use_key_profile(model: &HybridModel, profile: KeyProfile) {
    if profile != KeyProfile::Full {
        model.use_keys(Arc::new(ExecuteKeys::with_profile(
            ClientKey::generate(),
            profile,
        )));
    }
}

/// `hyfhe generate DIR --prompt IDS.npy --max-new-tokens N --mode M`.
pub fn generate(
    req: &GenerateRequest<'_>,
    progress: &dyn Progress,
) -> Result<GenerateSummary, HybridError> {
    let model = HybridModel::load(req.dir)?;
    let prompt = read_npy(req.prompt)?;
    let mut setup_ms = 0.0;
    let report = match (req.mode, &req.server) {
        (Mode::Remote, None) => {
            return Err(HybridError::Unsupported(
                "mode remote needs --server URL and --api-key KEY".into(),
            ))
        }
        (Mode::Remote, Some((url, key))) => {
            let runtime =
                tokio::runtime::Runtime::new().map_err(|e| HybridError::Remote(e.to_string()))?;
            let t = Instant::now();
            let client = Client::new(url, key)?;
            let session =
                runtime.block_on(client.open_session_as(model.compiled(), req.key, progress))?;
            setup_ms = t.elapsed().as_secs_f64() * 1e3;
            let report =
                runtime.block_on(model.generate_remote(prompt, req.max_new_tokens, &session));
            let _ = runtime.block_on(session.close());
            report?
        }
        (mode, _) => {
            if mode == Mode::Execute {
                let t = Instant::now();
                use_key_profile(&model, req.key);
                model.local_server()?;
                setup_ms = t.elapsed().as_secs_f64() * 1e3;
            }
            model.generate(prompt, req.max_new_tokens, mode)?
        }
    };
    Ok(GenerateSummary {
        model: model.name().to_string(),
        mode: req.mode,
        remote_modules: model.remote_modules().len(),
        setup_ms,
        report,
    })
}
