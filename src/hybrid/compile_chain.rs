//! Compiling a non-linear module: quantize every layer, choose each hidden accumulator's rounding
//! window from calibration, and build the lookup tables (requantise + activation + the next
//! layer's input quantisation) the server bootstraps through.
//!
//! Every choice is made on the integer simulation of the calibration rows, stage by stage, so the
//! hidden quantizers are calibrated on exactly the values the encrypted module will produce.

use super::spec::{ClientSpec, ServerModule, PROTOCOL_VERSION};
use super::{CompileOptions, HybridError};
use crate::fhe::params::{accumulator_bits, top_bits_for_error, Z_EXACT};
use crate::fhe::pbs::{bootstrap_output_variance, MAX_ROUNDING_BITS, PBS_PARAMS};
use crate::fhe::{table_lookup, ChainProgram, ChainStage, Encoding, LayerPlan, Precision};
use crate::model::chain::ChainModule;
use crate::model::LinearModule;
use crate::quant::{
    integer_matmul, AffineQuantizer, Granularity, InputQuantization, OutputDequantizer, QuantError,
    QuantizedRows, QuantizedWeights, WeightScheme,
};

/// What compile decided for a non-linear module (printed by `hyfhe compile`).
#[derive(Clone, Debug)]
pub struct ChainReport {
    pub activations: Vec<String>,
    /// Per table stage: the window's width and the rounding step in accumulator units.
    pub windows: Vec<(u32, u64)>,
    pub rounding_bits: u32,
    pub bootstraps_per_row: usize,
    /// `log2` of the probability that a row has a bootstrap two steps off.
    pub failure_log2: f64,
    /// Expected fraction of hidden values one step from the simulation.
    pub neighbour_rate: f64,
    /// Largest float error of the simulation against the float module on the calibration rows.
    pub calibration_max_error: f32,
}

/// Smallest shift `s` such that `|acc| ≤ bound` rounds into `[−2^(bits−1), 2^(bits−1))`.
fn window_shift(bound: f64, bits: u32) -> u32 {
    let top = 2f64.powi(bits as i32 - 1) - 0.5;
    let mut s = 0;
    while bound / 2f64.powi(s as i32) >= top && s < 60 {
        s += 1;
    }
    s
}

/// Largest `Σ_i |w_ji| · max|code|` over the rows: no input the quantizer admits exceeds it.
fn guaranteed_bound(w: &QuantizedWeights, max_code: i64) -> f64 {
    (0..w.out_features)
        .map(|j| w.row(j).iter().map(|&c| (c as i64).abs()).sum::<i64>() * max_code)
        .max()
        .unwrap_or(0) as f64
}

fn max_centred(q: &AffineQuantizer) -> i64 {
    let top = (1i64 << q.bits) - 1;
    (q.zero_point as i64).max(top - q.zero_point as i64)
}

fn quantize(w: &[f32], out: usize, inp: usize, bits: u32) -> Result<QuantizedWeights, QuantError> {
    QuantizedWeights::quantize(
        w,
        out,
        inp,
        bits,
        Granularity::PerChannel,
        WeightScheme::Symmetric,
    )
}

/// How far past the largest calibration accumulator a window reaches (past it, a value wraps).
const WINDOW_HEADROOM: f64 = 1.25;

pub(super) fn compile_chain(
    name: &str,
    m: &LinearModule,
    chain: &ChainModule,
    input: AffineQuantizer,
    samples: &[f32],
    options: &CompileOptions,
) -> Result<(ClientSpec, ServerModule, ChainReport), HybridError> {
    let bits = options.n_bits;
    let p = options.rounding_bits;
    if !(2..=MAX_ROUNDING_BITS).contains(&p) {
        return Err(HybridError::Unsupported(format!(
            "rounding bits must be in 2..={MAX_ROUNDING_BITS}, got {p}"
        )));
    }
    if bits > 8 {
        return Err(HybridError::Unsupported(format!(
            "`{name}` has activations inside: n_bits at most 8 (weights), got {bits}"
        )));
    }
    let first = &chain.layers[0];
    let w1 = quantize(&first.weight, first.out_features, first.in_features, bits)?;
    let mut plan1 = LayerPlan::new(
        name,
        Precision::Exact,
        first.in_features,
        first.out_features,
        bits,
        bits,
    )?;
    plan1.encodings = vec![Encoding::Row];
    let q = InputQuantization::Static(input).quantize(samples, first.in_features)?;
    let rows = q.rows;
    let mut acc = integer_matmul(&q, &w1);
    let mut width = first.out_features;
    let mut weights = w1.clone();
    let mut scale = input.scale;
    let mut max_code = max_centred(&input);
    let mut bias = first.bias.clone();
    let mut stages: Vec<ChainStage> = Vec::new();
    let mut windows = Vec::new();
    let mut names = Vec::new();
    // The window of the accumulator being built; set when the layer after a table is known.
    let mut first_window = None;
    let mut pending_table: Option<usize> = None;
    let output_plan;
    let dequantizer;
    let mut k = 0;
    loop {
        let layer = &chain.layers[k];
        let act = chain.activations[k].as_ref();
        let window_bits = match act {
            Some(_) => {
                let m_cal = acc.iter().map(|a| a.abs()).max().unwrap_or(1).max(1) as f64;
                let g = guaranteed_bound(&weights, max_code);
                let s = window_shift(m_cal * WINDOW_HEADROOM, p).min(window_shift(g, p));
                s + p + 1
            }
            None => accumulator_bits(bits, bits, layer.in_features),
        };
        if window_bits > 62 {
            return Err(HybridError::Unsupported(format!(
                "`{name}` layer {k}: a {window_bits}-bit accumulator window does not fit"
            )));
        }
        match pending_table.take() {
            Some(t) => {
                if let ChainStage::Table {
                    output_delta_log, ..
                } = &mut stages[t]
                {
                    *output_delta_log = 64 - window_bits;
                }
            }
            None => first_window = Some(window_bits),
        }
        let Some(act) = act else {
            // The module ends with this linear layer: the client decodes its accumulators.
            let mut plan = LayerPlan::new(
                name,
                Precision::Exact,
                layer.in_features,
                layer.out_features,
                bits,
                bits,
            )?;
            plan.encodings = vec![Encoding::Row];
            add_bootstrap_noise(&mut plan, &weights);
            output_plan = plan;
            dequantizer = OutputDequantizer {
                out_features: layer.out_features,
                scales: weights.scales.clone(),
                zero_points: vec![0],
                bias: bias.clone(),
                input_scale: Some(scale),
            };
            break;
        };
        names.push(act.name.clone());
        let s = window_bits - p - 1;
        windows.push((window_bits, 1u64 << s));
        // Hidden values as the table will see them (rounded), through the activation.
        let value = |j: usize, rounded: i64| -> f64 {
            let x = scale as f64 * weights.scale(j) as f64 * (rounded as f64 * 2f64.powi(s as i32))
                + bias.as_ref().map_or(0.0, |b| b[j] as f64);
            act.apply(x)
        };
        let ideal: Vec<f32> = acc
            .iter()
            .enumerate()
            .map(|(g, &a)| {
                let r = if s == 0 { a } else { (a + (1 << (s - 1))) >> s };
                value(g % width, r) as f32
            })
            .collect();
        let hidden = AffineQuantizer::calibrate(&ideal, bits)?;
        let size = 1usize << p;
        let codes: Vec<i32> = (0..width)
            .flat_map(|j| (0..size).map(move |i| (j, i as i64 - (size as i64 / 2))))
            .map(|(j, r)| hidden.centred_code(value(j, r) as f32))
            .collect();
        for (g, a) in acc.iter_mut().enumerate() {
            *a = table_lookup(*a, g % width, p, window_bits, &codes);
        }
        stages.push(ChainStage::Table {
            channels: width,
            rounding_bits: p,
            window_bits,
            output_delta_log: 0,
            codes,
        });
        pending_table = Some(stages.len() - 1);
        scale = hidden.scale;
        max_code = max_centred(&hidden);
        k += 1;
        if k == chain.layers.len() {
            // The module ends with this activation: the client decodes its codes.
            let mut plan = LayerPlan::new(name, Precision::Exact, 1, width, bits, 2)?;
            plan.encodings = vec![Encoding::Row];
            if let Some(ChainStage::Table {
                output_delta_log, ..
            }) = stages.last_mut()
            {
                *output_delta_log = 64 - plan.acc_bits;
            }
            output_plan = plan;
            dequantizer = OutputDequantizer {
                out_features: width,
                scales: vec![1.0],
                zero_points: vec![0],
                bias: None,
                input_scale: Some(hidden.scale),
            };
            break;
        }
        let next = &chain.layers[k];
        weights = quantize(&next.weight, next.out_features, next.in_features, bits)?;
        let codes_rows = QuantizedRows {
            rows,
            cols: width,
            values: acc.iter().map(|&c| c as i32).collect(),
            quantizers: vec![hidden; rows],
        };
        acc = integer_matmul(&codes_rows, &weights);
        stages.push(ChainStage::Linear {
            in_features: next.in_features,
            out_features: next.out_features,
            weight_bits: bits,
            codes: weights.codes.iter().map(|&c| c as u8).collect(),
        });
        width = next.out_features;
        bias = next.bias.clone();
    }
    plan1.acc_bits = first_window.expect("the first layer has a window");
    let program = ChainProgram {
        stages,
        output: output_plan.clone(),
    };
    program
        .check(&plan1)
        .map_err(|e| HybridError::Unsupported(format!("`{name}`: {e}")))?;
    // The float error of the simulation on the calibration rows (reported, not a gate).
    let simulated = dequantizer.apply(&program.simulate(&integer_matmul(&q, &w1), rows), &q)?;
    let reference = chain_float(chain, samples, first.in_features);
    let calibration_max_error = simulated
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    let report = ChainReport {
        activations: names,
        windows,
        rounding_bits: p,
        bootstraps_per_row: program.bootstraps_per_row(),
        failure_log2: program.failure_log2(&plan1),
        neighbour_rate: program.neighbour_rate(&plan1),
        calibration_max_error,
    };
    let spec = ClientSpec {
        protocol_version: PROTOCOL_VERSION,
        module: name.to_string(),
        kind: m.kind,
        in_features: m.in_features,
        out_features: m.out_features,
        input: InputQuantization::Static(input),
        plan: plan1.clone(),
        dequantizer,
        output_plan: Some(output_plan),
        chain_width: Some(program.max_width(&plan1)),
    };
    let server = ServerModule {
        protocol_version: PROTOCOL_VERSION,
        module: name.to_string(),
        plan: plan1,
        weights: w1,
        client_spec_sha256: spec.sha256(),
        chain: Some(program),
    };
    Ok((spec, server, report))
}

/// The last linear layer reads bootstrapped values: their noise times its weights joins the
/// plan's (which only knows fresh encryptions), and sets how many top bits decode exactly.
fn add_bootstrap_noise(plan: &mut LayerPlan, weights: &QuantizedWeights) {
    let norm2 = weights.max_row_square_norm() as f64;
    let var = 2f64.powf(2.0 * plan.noise_std_log2) + norm2 * bootstrap_output_variance(&PBS_PARAMS);
    let std = var.sqrt();
    plan.noise_std_log2 = std.log2();
    let delta = 2f64.powi(64 - plan.acc_bits as i32);
    plan.predicted_exact_top_bits = top_bits_for_error(plan.acc_bits, Z_EXACT * std / delta);
}

/// The float module on row-major `rows × in` inputs (calibration and the `torch` mode).
pub(crate) fn chain_float(chain: &ChainModule, x: &[f32], cols: usize) -> Vec<f32> {
    let mut values: Vec<f32> = x.to_vec();
    let mut width = cols;
    for (layer, act) in chain.layers.iter().zip(&chain.activations) {
        let rows = values.len() / width;
        let mut next = vec![0f32; rows * layer.out_features];
        for r in 0..rows {
            let xr = &values[r * width..(r + 1) * width];
            for j in 0..layer.out_features {
                let w = &layer.weight[j * width..(j + 1) * width];
                let mut y: f32 = xr.iter().zip(w).map(|(a, b)| a * b).sum();
                y += layer.bias.as_ref().map_or(0.0, |b| b[j]);
                next[r * layer.out_features + j] = match act {
                    Some(a) => a.apply(y as f64) as f32,
                    None => y,
                };
            }
        }
        values = next;
        width = layer.out_features;
    }
    values
}
