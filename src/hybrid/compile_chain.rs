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
use crate::fhe::{
    gain_within_noise, table_input_variance, table_lookup, ChainProgram, ChainStage, Encoding,
    LayerPlan, Precision, MAX_TABLE_GAIN,
};
use crate::model::chain::{ChainModule, Shortcut};
use crate::model::{ConvGeometry, LinearKind, LinearModule};
use crate::quant::{
    integer_matmul, AffineQuantizer, Granularity, InputQuantization, OutputDequantizer, QuantError,
    QuantizedWeights, WeightScheme,
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

/// `Σ_i |w_ji| · max|code| + added_j` for output `j` (`added_j` the largest code a shortcut adds
/// to it): no input the quantizer admits exceeds it.
fn guaranteed_bound_row(w: &QuantizedWeights, j: usize, max_code: i64, added: &[i64]) -> f64 {
    (w.row(j).iter().map(|&c| (c as i64).abs()).sum::<i64>() * max_code
        + added.get(j).copied().unwrap_or(0)) as f64
}

/// The largest [`guaranteed_bound_row`] over the outputs.
fn guaranteed_bound(w: &QuantizedWeights, max_code: i64, added: &[i64]) -> f64 {
    (0..w.out_features)
        .map(|j| guaranteed_bound_row(w, j, max_code, added))
        .fold(0.0, f64::max)
}

fn max_centred(q: &AffineQuantizer) -> i64 {
    let top = (1i64 << q.bits) - 1;
    (q.zero_point as i64).max(top - q.zero_point as i64)
}

/// A dense weight (`out × in`, row-major) as every module quantizes it: per output channel,
/// symmetric.
pub(super) fn per_channel_weights(
    w: &[f32],
    out: usize,
    inp: usize,
    bits: u32,
) -> Result<QuantizedWeights, QuantError> {
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

/// Weights, bias and output channels of a module's first layer.
type FirstLayer = (Vec<f32>, Option<Vec<f32>>, usize);

/// The first layer's weights and bias, with a residual block's shortcut appended as extra
/// output channels: its value at each output pixel is read at the first convolution's centre
/// tap (the identity as a one-hot row, a 1×1 projection as its weights there), so the server
/// computes it from the same request and carries it through its own tables to the add.
fn first_with_shortcut(name: &str, chain: &ChainModule) -> Result<FirstLayer, HybridError> {
    let first = &chain.layers[0];
    let Some(shortcut) = &chain.shortcut else {
        return Ok((first.weight.clone(), first.bias.clone(), first.out_features));
    };
    let (LinearKind::Conv(g), Some(last)) = (&first.kind, chain.layers.last()) else {
        return Err(HybridError::Unsupported(format!(
            "`{name}`: a residual shortcut needs a convolution first"
        )));
    };
    let [kh, kw] = g.kernel;
    let tap = |c: usize| (c * kh + g.pads[0]) * kw + g.pads[1];
    let features = g.features();
    let extra = last.out_features;
    let mut weight = first.weight.clone();
    let mut shortcut_bias = vec![0f32; extra];
    for j in 0..extra {
        let mut row = vec![0f32; features];
        match shortcut {
            Shortcut::Identity => row[tap(j)] = 1.0,
            Shortcut::Projection(p) => {
                for c in 0..g.in_channels {
                    row[tap(c)] = p.weight[j * g.in_channels + c];
                }
                shortcut_bias[j] = p.bias.as_ref().map_or(0.0, |b| b[j]);
            }
        }
        weight.extend(row);
    }
    let mut bias = first
        .bias
        .clone()
        .unwrap_or_else(|| vec![0.0; first.out_features]);
    bias.extend(shortcut_bias);
    Ok((weight, Some(bias), first.out_features + extra))
}

pub(super) fn compile_chain(
    name: &str,
    m: &LinearModule,
    chain: &ChainModule,
    input: AffineQuantizer,
    samples: &[f32],
    map: Option<[usize; 2]>,
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
    let map = if chain.convolves() {
        Some(map.ok_or_else(|| {
            HybridError::Unsupported(format!(
                "`{name}` convolves its hidden map: calibrate it on images (no map size was seen)"
            ))
        })?)
    } else {
        None
    };
    let first = &chain.layers[0];
    let (first_weight, first_bias, first_out) = first_with_shortcut(name, chain)?;
    let shortcut_channels = first_out - first.out_features;
    let w1 = per_channel_weights(&first_weight, first_out, first.in_features, bits)?;
    let mut plan1 = LayerPlan::new(
        name,
        Precision::Exact,
        first.in_features,
        first_out,
        bits,
        bits,
    )?;
    plan1.encodings = vec![Encoding::Row];
    let q = InputQuantization::Static(input).quantize(samples, first.in_features)?;
    let rows = q.rows;
    if let Some([h, w]) = map {
        if !rows.is_multiple_of(h * w) {
            return Err(HybridError::Unsupported(format!(
                "`{name}`: {rows} calibration rows are not whole {h}×{w} maps"
            )));
        }
    }
    let mut acc = integer_matmul(&q, &w1);
    let mut width = first_out;
    let mut weights = w1.clone();
    let mut scale = input.scale;
    let mut max_code = max_centred(&input);
    // Per output channel, the largest code a shortcut adds to the accumulator being built.
    let mut added: Vec<i64> = Vec::new();
    let mut bias = first_bias;
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
                let g = guaranteed_bound(&weights, max_code, &added);
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
        // Channels past `main` carry a residual shortcut (first table only): no activation, and
        // their codes are in the next layer's accumulator units.
        let main = if k == 0 {
            width - shortcut_channels
        } else {
            width
        };
        // Per-channel gains fill the window the widest channel sets. A shortcut channel's sum
        // spans a small part of it (one input against a convolution's dozens): its gain comes
        // from its guaranteed bound, so it never wraps. A main channel's comes from its
        // calibrated range × 1.25, as the window's own does (past it, a value wraps as the
        // widest channel's would past the window); one that never moved keeps gain 1. Gains
        // are capped where their noise would reach the stated failure bound.
        let gains: Vec<u32> = {
            let limit = ((1i64 << (p - 1)) as f64 - 0.5) * 2f64.powi(s as i32);
            let cap = gain_within_noise(table_input_variance(&plan1, stages.last()), p);
            let mut seen = vec![0i64; width];
            for (g, a) in acc.iter().enumerate() {
                seen[g % width] = seen[g % width].max(a.abs());
            }
            let gains: Vec<u32> = (0..width)
                .map(|j| {
                    let guaranteed = guaranteed_bound_row(&weights, j, max_code, &added);
                    let bound = if j >= main {
                        guaranteed
                    } else if seen[j] == 0 {
                        return 1;
                    } else {
                        guaranteed.min(seen[j] as f64 * WINDOW_HEADROOM)
                    };
                    // Strictly inside: `gain · bound == limit` would round to the window's edge.
                    let fits = (limit / bound.max(1.0)).ceil() as u32 - 1;
                    fits.clamp(1, cap.min(MAX_TABLE_GAIN))
                })
                .collect();
            if gains.iter().all(|&g| g == 1) {
                Vec::new()
            } else {
                gains
            }
        };
        let gain = |j: usize| gains.get(j).map_or(1.0, |&g| g as f64);
        // Hidden values as the table will see them (rounded), before and through the activation.
        let pre = |j: usize, rounded: i64| -> f64 {
            scale as f64 * weights.scale(j) as f64 * (rounded as f64 * 2f64.powi(s as i32))
                / gain(j)
                + bias.as_ref().map_or(0.0, |b| b[j] as f64)
        };
        let value = |j: usize, rounded: i64| act.apply(pre(j, rounded));
        let ideal: Vec<f32> = acc
            .iter()
            .enumerate()
            .filter(|(g, _)| g % width < main)
            .map(|(g, &a)| {
                let a = a * gain(g % width) as i64;
                let r = if s == 0 { a } else { (a + (1 << (s - 1))) >> s };
                value(g % width, r) as f32
            })
            .collect();
        let hidden = AffineQuantizer::calibrate(&ideal, bits)?;
        let next = chain.layers.get(k + 1);
        let next_weights = next
            .map(|n| per_channel_weights(&n.weight, n.out_features, n.in_features, bits))
            .transpose()?;
        let size = 1usize << p;
        let shortcut_code = |o: usize, v: f64| -> i32 {
            let unit =
                hidden.scale as f64 * next_weights.as_ref().map_or(1.0, |w| w.scale(o) as f64);
            (v / unit)
                .round()
                .clamp(-((1u64 << 30) as f64), (1u64 << 30) as f64) as i32
        };
        let codes: Vec<i32> = (0..width)
            .flat_map(|j| (0..size).map(move |i| (j, i as i64 - (size as i64 / 2))))
            .map(|(j, r)| {
                if j < main {
                    hidden.centred_code(value(j, r) as f32)
                } else {
                    shortcut_code(j - main, pre(j, r))
                }
            })
            .collect();
        added = (main..width)
            .map(|j| {
                codes[j * size..(j + 1) * size]
                    .iter()
                    .map(|&c| (c as i64).abs())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for (g, a) in acc.iter_mut().enumerate() {
            let j = g % width;
            *a = table_lookup(*a * gain(j) as i64, j, p, window_bits, &codes);
        }
        stages.push(ChainStage::Table {
            channels: width,
            rounding_bits: p,
            window_bits,
            output_delta_log: 0,
            codes,
            gains,
        });
        pending_table = Some(stages.len() - 1);
        scale = hidden.scale;
        max_code = max_centred(&hidden);
        k += 1;
        let (Some(next), Some(next_weights)) = (next, next_weights) else {
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
        };
        weights = next_weights;
        let wcodes: Vec<u8> = weights.codes.iter().map(|&c| c as u8).collect();
        let stage = match (&next.kind, map) {
            (LinearKind::Conv(g), Some([height, map_w])) => ChainStage::Conv {
                height,
                width: map_w,
                in_channels: g.in_channels,
                kernel: g.kernel,
                pads: [g.pads[0], g.pads[1]],
                out_channels: next.out_features,
                residual: main < width,
                weight_bits: bits,
                codes: wcodes,
            },
            _ => ChainStage::Linear {
                in_features: next.in_features,
                out_features: next.out_features,
                weight_bits: bits,
                codes: wcodes,
            },
        };
        acc = stage.forward(&acc, rows, width);
        stages.push(stage);
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
    let reference = chain_float(chain, samples, first.in_features, map)?;
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
        map: program.map_pixels().and(map),
        backward_of: None,
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

/// The float module on row-major `rows × in` inputs (calibration and the `torch` mode); `map` is
/// the `[height, width]` of the first layer's output when later layers convolve it.
pub(crate) fn chain_float(
    chain: &ChainModule,
    x: &[f32],
    cols: usize,
    map: Option<[usize; 2]>,
) -> Result<Vec<f32>, HybridError> {
    let rows = x.len() / cols.max(1);
    let mut values: Vec<f32> = x.to_vec();
    let mut width = cols;
    let last = chain.layers.len() - 1;
    for (k, (layer, act)) in chain.layers.iter().zip(&chain.activations).enumerate() {
        let inputs = match (&layer.kind, k) {
            (LinearKind::Conv(g), 1..) => {
                let [h, w] = map.ok_or_else(|| {
                    HybridError::Unsupported(format!(
                        "`{}` convolves its hidden map: it takes images",
                        layer.path
                    ))
                })?;
                gather_map(&values, rows, width, [h, w], g)?
            }
            _ => std::mem::take(&mut values),
        };
        let features = inputs.len() / rows.max(1);
        let mut next = vec![0f32; rows * layer.out_features];
        for r in 0..rows {
            let xr = &inputs[r * features..(r + 1) * features];
            for j in 0..layer.out_features {
                let w = &layer.weight[j * features..(j + 1) * features];
                let mut y: f32 = xr.iter().zip(w).map(|(a, b)| a * b).sum();
                y += layer.bias.as_ref().map_or(0.0, |b| b[j]);
                if k == last {
                    y += shortcut_float(chain, &x[r * cols..(r + 1) * cols], j);
                }
                next[r * layer.out_features + j] = match act {
                    Some(a) => a.apply(y as f64) as f32,
                    None => y,
                };
            }
        }
        values = next;
        width = layer.out_features;
    }
    Ok(values)
}

/// A residual block's shortcut for output channel `j` of the pixel whose first-layer input row
/// (im2col) is `row`: read at the first convolution's centre tap.
fn shortcut_float(chain: &ChainModule, row: &[f32], j: usize) -> f32 {
    let (Some(shortcut), LinearKind::Conv(g)) = (&chain.shortcut, &chain.layers[0].kind) else {
        return 0.0;
    };
    let [kh, kw] = g.kernel;
    let tap = |c: usize| row[(c * kh + g.pads[0]) * kw + g.pads[1]];
    match shortcut {
        Shortcut::Identity => tap(j),
        Shortcut::Projection(p) => {
            (0..g.in_channels)
                .map(|c| p.weight[j * g.in_channels + c] * tap(c))
                .sum::<f32>()
                + p.bias.as_ref().map_or(0.0, |b| b[j])
        }
    }
}

/// im2col of a stride-1, size-keeping convolution over `rows` pixels (whole `map`s, `width`
/// channels each, row-major): one row of `C·kh·kw` values per pixel, zero past the map's edge.
fn gather_map(
    values: &[f32],
    rows: usize,
    width: usize,
    [h, w]: [usize; 2],
    g: &ConvGeometry,
) -> Result<Vec<f32>, HybridError> {
    let pixels = h * w;
    if pixels == 0 || !rows.is_multiple_of(pixels) || g.in_channels > width {
        return Err(HybridError::Unsupported(format!(
            "{rows} rows of {width} channels are not whole {h}×{w} maps of {} channels",
            g.in_channels
        )));
    }
    let [kh, kw] = g.kernel;
    let features = g.features();
    let mut out = vec![0f32; rows * features];
    for r in 0..rows {
        let (image, p) = (r / pixels, r % pixels);
        let (y, x) = ((p / w) as isize, (p % w) as isize);
        let dst = &mut out[r * features..(r + 1) * features];
        for c in 0..g.in_channels {
            for ky in 0..kh {
                let yy = y + ky as isize - g.pads[0] as isize;
                if yy < 0 || yy >= h as isize {
                    continue;
                }
                for kx in 0..kw {
                    let xx = x + kx as isize - g.pads[1] as isize;
                    if xx < 0 || xx >= w as isize {
                        continue;
                    }
                    let src = image * pixels + yy as usize * w + xx as usize;
                    dst[(c * kh + ky) * kw + kx] = values[src * width + c];
                }
            }
        }
    }
    Ok(out)
}
