//! The per-module compile step both fronts share: from one module's float parameters (and, for a
//! static input quantizer, its calibrated input) to its [`ClientSpec`] and [`ServerModule`].
//!
//! The ONNX front ([`super::HybridModel::compile`]) reads the parameters out of the graph and
//! calibrates by running the cut graph; the torch front (the Python package) hands over an
//! `nn.Linear`'s or `Conv2d`'s tensors and the inputs its forward hooks recorded. Whatever the
//! front, the same parameters and calibration give the same bytes.

use super::compile_chain::{compile_chain, per_channel_weights, ChainReport};
use super::spec::{ClientSpec, ServerModule, PROTOCOL_VERSION};
use super::{CompileOptions, HybridError};
use crate::fhe::LayerPlan;
use crate::model::linear::LearnedGrid;
use crate::model::{LinearKind, LinearModule};
use crate::quant::{AffineQuantizer, InputQuantization, OutputDequantizer, QuantizedWeights};

/// What compiling decided for each module (for the CLI and logs).
#[derive(Clone, Debug)]
pub struct ModuleReport {
    pub module: String,
    pub plan: LayerPlan,
    pub input: InputQuantization,
    /// For a module with activations inside.
    pub chain: Option<ChainReport>,
    /// For a backward module: the forward module it transposes.
    pub backward_of: Option<String>,
}

impl ModuleReport {
    /// What a client of this module, once served, can learn of its weights, stated per module:
    /// the operator decides what to serve and how many rows to budget from it.
    pub fn exposure(&self) -> String {
        let r = self;
        let rows = r.plan.in_features + 1;
        if let Some(forward) = &r.backward_of {
            // g·W for a g the client picks: the unit vectors read W's rows one by one, with no bias
            // to solve for. Cheaper than the forward module's in + 1 rows whenever out < in + 1.
            return format!(
                "  {:<24} warning: backward module of `{forward}` (served because the owner opted \
                 this model into training): it answers g·W for any g, so a client recovers \
                 `{forward}`'s weights, quantized per input feature, exactly from {} rows (out of \
                 `{forward}`); with the forward module's answers (quantized per output channel) \
                 they pin the float weights closer than either grid alone; its rows count \
                 against `{forward}`'s row budget (quotas.rows_per_module)\n",
                "", r.plan.in_features
            );
        }
        match &r.chain {
            None => format!(
                "  {:<24} warning: linear-only: a client choosing its inputs recovers this module's \
                 quantized weights and bias exactly from {rows} rows (in + 1); a row budget \
                 (quotas.rows_per_module) above that slows extraction, it cannot stop it\n",
                ""
            ),
            Some(c) => format!(
                "  {:<24} exposure: the hidden values stay encrypted, but the client decrypts the \
                 output's full phase and can query freely; no exact recovery from a fixed number of \
                 rows is known, yet query-based extraction of ReLU networks is a published attack \
                 class, and ~{:.1}% of hidden values round one step off on repeats, which marks \
                 pre-activations near a rounding boundary; budget rows (quotas.rows_per_module)\n",
                "",
                100.0 * c.neighbour_rate
            ),
        }
    }
}

/// One compiled module: what the client tree, the server tree and the report hold.
pub struct CompiledModule {
    pub spec: ClientSpec,
    pub server: ServerModule,
    pub report: ModuleReport,
}

/// How a module's input was seen during calibration.
pub enum Calibration<'a> {
    /// Nothing recorded: only a dynamic (per-row) input quantizer can be built.
    None,
    /// The input's range; enough for a linear module.
    Range(f32, f32),
    /// The input's range and rows (row-major, `in_features` each) for a module with activations
    /// inside, whose hidden quantizers are calibrated on the integer simulation of these rows;
    /// for a convolution, `map` is its output's `[height, width]` (rows are then whole maps).
    Rows {
        lo: f32,
        hi: f32,
        rows: &'a [f32],
        map: Option<[usize; 2]>,
    },
}

impl Calibration<'_> {
    fn range(&self) -> Option<(f32, f32)> {
        match *self {
            Calibration::None => None,
            Calibration::Range(lo, hi) | Calibration::Rows { lo, hi, .. } => Some((lo, hi)),
        }
    }
}

/// Compile the module `m` (named `name`, its `named_modules()` path) under `options`.
pub fn compile_module(
    name: &str,
    m: &LinearModule,
    calibration: &Calibration<'_>,
    options: &CompileOptions,
) -> Result<CompiledModule, HybridError> {
    let never_reached = || HybridError::Unsupported(format!("calibration never reached `{name}`"));
    if let Some(chain) = &m.chain {
        if options.dynamic_inputs {
            return Err(HybridError::Unsupported(format!(
                "`{name}` has activations inside: its input quantizer must be static \
                 (the tables fold its scale), drop --dynamic"
            )));
        }
        let Calibration::Rows { lo, hi, rows, map } = *calibration else {
            return Err(never_reached());
        };
        let input = AffineQuantizer::from_range(lo, hi, options.n_bits)?;
        let (spec, server, report) = compile_chain(name, m, chain, input, rows, map, options)?;
        let report = ModuleReport {
            module: name.to_string(),
            plan: spec.output_plan.clone().unwrap_or(spec.plan.clone()),
            input: spec.input,
            chain: Some(report),
            backward_of: None,
        };
        return Ok(CompiledModule {
            spec,
            server,
            report,
        });
    }
    if let Some(grid) = &m.learned {
        let learned = learned_from_grid(name, m, grid, calibration, options)?;
        return compile_learned(name, m, learned, options);
    }
    let weights = per_channel_weights(&m.weight, m.out_features, m.in_features, options.n_bits)?;
    let input = if options.dynamic_inputs {
        InputQuantization::DynamicPerRow {
            bits: options.n_bits,
        }
    } else {
        let (lo, hi) = calibration.range().ok_or_else(never_reached)?;
        InputQuantization::Static(AffineQuantizer::from_range(lo, hi, options.n_bits)?)
    };
    assemble(name, m, weights, input, options)
}

/// Quantizers a quantization-aware-trained layer learned (Brevitas `QuantLinear`/`QuantConv2d`,
/// or a QCDQ export): its integer weights with their scales, and its input quantizer.
pub struct LearnedQuantizers {
    pub weights: QuantizedWeights,
    pub input: AffineQuantizer,
}

/// Compile the linear module `m` with the quantizers it learned rather than ones fitted here:
/// the server holds exactly the trained integers, and the client quantizes inputs on the trained
/// grid, so the module computes what the QAT model computed. Only `m`'s kind, shape and bias are
/// used (its float weights are the learned ones dequantized, for `disable` mode's reader).
pub fn compile_learned(
    name: &str,
    m: &LinearModule,
    learned: LearnedQuantizers,
    options: &CompileOptions,
) -> Result<CompiledModule, HybridError> {
    if m.chain.is_some() {
        return Err(HybridError::Unsupported(format!(
            "`{name}` has activations inside: learned quantizers apply to a linear module"
        )));
    }
    let w = &learned.weights;
    if (w.out_features, w.in_features) != (m.out_features, m.in_features) {
        return Err(HybridError::Unsupported(format!(
            "`{name}`: learned weights are {}×{}, the module is {}×{}",
            w.out_features, w.in_features, m.out_features, m.in_features
        )));
    }
    assemble(
        name,
        m,
        learned.weights,
        InputQuantization::Static(learned.input),
        options,
    )
}

/// The quantizers a QCDQ export wrote around `m` (see `model::qdq`): its weight codes read back
/// from the dequantized weight (exactly: `w / scale` is an integer up to rounding of one
/// product), signed or unsigned codes shifted onto the engine's signed weights and unsigned
/// inputs; an input without a grid gets an `n_bits` quantizer over its calibrated range.
fn learned_from_grid(
    name: &str,
    m: &LinearModule,
    grid: &LearnedGrid,
    calibration: &Calibration<'_>,
    options: &CompileOptions,
) -> Result<LearnedQuantizers, HybridError> {
    let refuse = |reason: String| HybridError::Unsupported(format!("`{name}`: {reason}"));
    let w = &grid.weight;
    let bits = w.bits();
    if !(2..=8).contains(&bits) {
        return Err(refuse(format!(
            "its learned weights take {bits} bits (codes {}..={}); the engine multiplies by \
             2- to 8-bit weights",
            w.lo, w.hi
        )));
    }
    let (out, inp) = (m.out_features, m.in_features);
    if !(w.scale.len() == 1 || w.scale.len() == out) {
        return Err(refuse(format!(
            "{} weight scales for {out} output channels: only per-tensor or per-output-channel \
             weight quantization can be served",
            w.scale.len()
        )));
    }
    // Codes outside the engine's signed range (unsigned ones) move onto it, the zero point
    // with them: `q − zero_point`, and so every product, is unchanged.
    let half = 1i64 << (bits - 1);
    let shift = if w.lo >= -half && w.hi < half {
        0
    } else {
        w.lo + half
    };
    let mut codes = Vec::with_capacity(out * inp);
    for j in 0..out {
        let k = if w.scale.len() == 1 { 0 } else { j };
        let (s, zp) = (w.scale[k], w.zero_point[k]);
        for &v in &m.weight[j * inp..(j + 1) * inp] {
            let x = v / s;
            let q = x.round() as i64 + zp;
            if (x - x.round()).abs() > 1e-3 || !(w.lo..=w.hi).contains(&q) {
                return Err(refuse(format!(
                    "weight value {v} of output channel {j} is not on its learned grid (scale \
                     {s}, zero point {zp}, codes {}..={}): per-channel scales along an axis \
                     other than the output channels cannot be served",
                    w.lo, w.hi
                )));
            }
            codes.push((q - shift) as i8);
        }
    }
    let zero_points = w.zero_point.iter().map(|&z| (z - shift) as i32).collect();
    let weights = QuantizedWeights::from_codes(codes, out, inp, bits, w.scale.clone(), zero_points)
        .map_err(|e| refuse(e.to_string()))?;
    let input = match &grid.input {
        Some(g) => {
            let bits = g.bits();
            if bits > 16 {
                return Err(refuse(format!(
                    "its learned input grid has {bits}-bit codes ({}..={}); inputs take at most \
                     16 bits",
                    g.lo, g.hi
                )));
            }
            AffineQuantizer::new(bits, g.scale[0], (g.zero_point[0] - g.lo) as i32)
                .map_err(|e| refuse(e.to_string()))?
        }
        None => {
            let (lo, hi) = calibration.range().ok_or_else(|| {
                HybridError::Unsupported(format!("calibration never reached `{name}`"))
            })?;
            AffineQuantizer::from_range(lo, hi, options.n_bits)?
        }
    };
    Ok(LearnedQuantizers { weights, input })
}

/// Whether `m`'s learned quantizers (if any) can be served, as compiling would decide it (an
/// input without a grid is not judged here: it is calibrated).
pub fn check_learned(name: &str, m: &LinearModule) -> Result<(), HybridError> {
    match &m.learned {
        Some(grid) => learned_from_grid(
            name,
            m,
            grid,
            &Calibration::Range(0.0, 1.0),
            &CompileOptions::default(),
        )
        .map(|_| ()),
        None => Ok(()),
    }
}

/// The spec, server module and report of a linear module once its quantizers are fixed.
fn assemble(
    name: &str,
    m: &LinearModule,
    weights: QuantizedWeights,
    input: InputQuantization,
    options: &CompileOptions,
) -> Result<CompiledModule, HybridError> {
    let plan = LayerPlan::new(
        name,
        options.precision,
        m.in_features,
        m.out_features,
        input.bits(),
        weights.bits,
    )?;
    let spec = ClientSpec {
        protocol_version: PROTOCOL_VERSION,
        module: name.to_string(),
        kind: m.kind,
        in_features: m.in_features,
        out_features: m.out_features,
        input,
        plan: plan.clone(),
        dequantizer: OutputDequantizer::new(&weights, m.bias.clone()),
        output_plan: None,
        chain_width: None,
        map: None,
        backward_of: None,
    };
    let server = ServerModule {
        protocol_version: PROTOCOL_VERSION,
        module: name.to_string(),
        plan: plan.clone(),
        weights,
        client_spec_sha256: spec.sha256(),
        chain: None,
    };
    Ok(CompiledModule {
        report: ModuleReport {
            module: name.to_string(),
            plan,
            input,
            chain: None,
            backward_of: None,
        },
        spec,
        server,
    })
}

/// The backward module of the dense linear module `forward` (whose `named_modules()` path is
/// `forward_name`): its weights transposed, no bias, named `name`. Evaluated on a gradient `g`
/// (`out` values per row) it gives the input gradient `g·W` (`in` values per row).
///
/// Gradients' ranges move during training, so its input is quantized per row at run time
/// (`options.n_bits`); `Wᵀ` is quantized per output channel (per input feature of `W`) with
/// the same width, symmetric, as any weight. Exact like every linear module: simulate and
/// execute agree bit for bit.
pub fn compile_backward(
    name: &str,
    forward_name: &str,
    forward: &LinearModule,
    options: &CompileOptions,
) -> Result<CompiledModule, HybridError> {
    if forward.chain.is_some() || !matches!(forward.kind, LinearKind::Dense) {
        return Err(HybridError::Unsupported(format!(
            "`{forward_name}`: a backward module is built for dense linear modules only \
             (nn.Linear, transformers' Conv1D), not a convolution or a module with activations"
        )));
    }
    let (n_in, n_out) = (forward.in_features, forward.out_features);
    if n_in == 0 || n_out == 0 || forward.weight.len() != n_in * n_out {
        return Err(HybridError::Unsupported(format!(
            "`{forward_name}`: {} weight values for {n_out}×{n_in}",
            forward.weight.len()
        )));
    }
    let mut transposed = vec![0.0f32; n_in * n_out];
    for (o, row) in forward.weight.chunks_exact(n_in).enumerate() {
        for (i, w) in row.iter().enumerate() {
            transposed[i * n_out + o] = *w;
        }
    }
    let m = linear_from_weights(name, LinearKind::Dense, n_out, n_in, transposed, None)?;
    let weights = per_channel_weights(&m.weight, m.out_features, m.in_features, options.n_bits)?;
    let input = InputQuantization::DynamicPerRow {
        bits: options.n_bits,
    };
    let mut compiled = assemble(name, &m, weights, input, options)?;
    compiled.spec.backward_of = Some(forward_name.to_string());
    compiled.server.client_spec_sha256 = compiled.spec.sha256();
    compiled.report.backward_of = Some(forward_name.to_string());
    Ok(compiled)
}

/// A linear layer given by its tensors rather than found in a graph (the torch front):
/// `weight` is row-major `out × in` (`nn.Linear`; a `Conv2d`'s `out × C·kh·kw`, its flattened
/// weight), `bias` has `out` values.
pub fn linear_from_weights(
    name: &str,
    kind: LinearKind,
    in_features: usize,
    out_features: usize,
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
) -> Result<LinearModule, HybridError> {
    if in_features == 0 || out_features == 0 {
        return Err(HybridError::Unsupported(format!(
            "`{name}` has {out_features}×{in_features} weights: nothing to compile"
        )));
    }
    if weight.len() != in_features * out_features {
        return Err(HybridError::Unsupported(format!(
            "`{name}`: {} weight values for {out_features}×{in_features}",
            weight.len()
        )));
    }
    if let Some(b) = &bias {
        if b.len() != out_features {
            return Err(HybridError::Unsupported(format!(
                "`{name}`: {} bias values for {out_features} outputs",
                b.len()
            )));
        }
    }
    if let LinearKind::Conv(g) = kind {
        if g.features() != in_features || g.stride.contains(&0) || g.dilation.contains(&0) {
            return Err(HybridError::Unsupported(format!(
                "`{name}`: conv geometry {g:?} does not give {in_features} features per row"
            )));
        }
    }
    if let Some((i, v)) = weight
        .iter()
        .chain(bias.iter().flatten())
        .enumerate()
        .find(|(_, v)| !v.is_finite())
    {
        return Err(HybridError::Unsupported(format!(
            "`{name}`: parameter value {i} is {v}: weights must be finite"
        )));
    }
    Ok(LinearModule {
        path: name.to_string(),
        kind,
        in_features,
        out_features,
        weight,
        bias,
        input: String::new(),
        output: String::new(),
        nodes: Vec::new(),
        initializers: Vec::new(),
        chain: None,
        learned: None,
    })
}
