//! A non-linear remote module: linear layers separated by table lookups, evaluated end to end
//! under encryption (the hidden values never leave the server in a form its client can decrypt).
//!
//! The client's request is the first layer's row-encoded input, exactly as for a single linear
//! layer. The server
//! 1. multiplies and sample-extracts: one LWE per hidden accumulator under the input key, its
//!    accumulator placed so that the layer's *rounding window* fills the top of the torus;
//! 2. bootstraps each one (`pbs.rs`) through its channel's table: round to the window's top
//!    `rounding_bits` bits, requantise, activate, quantise for the next layer — the result is the
//!    next layer's input code, again an LWE under the input key;
//! 3. multiplies those LWEs by the next layer's clear weight codes (an integer combination of
//!    ciphertexts: no packing, no key), and repeats;
//! 4. packs the last stage's LWEs with the session's packing key into the usual response.
//!
//! [`ChainProgram::simulate`] is the same computation on clear integers with round-to-nearest.
//! The bootstrap rounds approximately (see `pbs.rs`): a hidden value can come out one rounding
//! step away from the simulation when its accumulator sits within the noise of a rounding
//! boundary; two steps away has the probability [`ChainProgram::failure_log2`] states.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tfhe::core_crypto::prelude::GlweCiphertextOwned;

use super::encoding::{pack_lwes, EncryptedOutputs, EncryptedRows, FourierLinearLayer};
use super::params::{Encoding, LayerPlan, Precision};
use super::pbs::{
    bootstrap_input_std, bootstrap_output_variance, failure_log2, lookup_table, neighbour_rate,
    BIG_LWE_LEN, MAX_ROUNDING_BITS, PBS_PARAMS, WINDOW_OFFSET,
};
use super::session_key::SessionKey;
use super::FheError;

/// One stage after the module's first linear layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ChainStage {
    /// A bootstrap per value: round the accumulator (signed, in a window of `window_bits`) to
    /// its top `rounding_bits`, then channel `j`'s table gives the output code, placed at
    /// `2^output_delta_log`.
    Table {
        channels: usize,
        rounding_bits: u32,
        window_bits: u32,
        output_delta_log: u32,
        /// `channels × 2^rounding_bits` signed output codes, entry `i` for rounded input
        /// `i − 2^(rounding_bits − 1)`.
        codes: Vec<i32>,
        /// Per channel, an integer the accumulator is multiplied by before rounding (empty: all
        /// 1). A channel whose range is a small part of the shared window (a residual shortcut
        /// computed beside a convolution's sums) would otherwise keep only a bit or two of its
        /// value; scaling the LWE by `g` costs `g×` its noise, which the noise model counts.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        gains: Vec<u32>,
    },
    /// `y_j = Σ_i w_ji · x_i` on the previous stage's codes.
    Linear {
        in_features: usize,
        out_features: usize,
        weight_bits: u32,
        #[serde(with = "serde_bytes")]
        codes: Vec<u8>,
    },
    /// A stride-1 convolution that keeps its map's size, on rows that are the pixels of
    /// `height × width` maps, image after image:
    /// `y[p][j] = Σ_{c,ky,kx} w_j,(c,ky,kx) · x[p + (ky − pads[0], kx − pads[1])][c]`, reading the
    /// previous stage's first `in_channels` values of each pixel (zero past the map's edge), plus
    /// `x[p][in_channels + j]` when `residual` (a shortcut the first layer computed as extra
    /// channels, already scaled by its tables to add with weight 1).
    Conv {
        height: usize,
        width: usize,
        in_channels: usize,
        kernel: [usize; 2],
        /// Top and left padding (bottom and right are `kernel − 1 −` these: the map keeps its size).
        pads: [usize; 2],
        out_channels: usize,
        residual: bool,
        weight_bits: u32,
        /// `out_channels × in_channels·kh·kw`, in the order of a flattened Conv weight.
        #[serde(with = "serde_bytes")]
        codes: Vec<u8>,
    },
}

/// Largest gain a table may apply: its noise grows with it, and the window must still hold the
/// scaled range (checked at compile time against the channel's guaranteed bound).
pub const MAX_TABLE_GAIN: u32 = 1 << 12;

/// What a table gain may cost: each bootstrap stays two steps off with probability at most
/// 2^-60, so a row of up to a million bootstraps stays under 2^-40.
const GAIN_FAILURE_LOG2: f64 = -60.0;

/// The noise variance a table stage reads: the first layer's products (`previous` `None`), or
/// the previous weighted stage's combination of bootstrapped values.
pub fn table_input_variance(first: &LayerPlan, previous: Option<&ChainStage>) -> f64 {
    match previous {
        Some(stage) => stage.max_square_norm() * bootstrap_output_variance(&PBS_PARAMS),
        None => 2f64.powf(2.0 * first.noise_std_log2),
    }
}

/// The largest gain (at most [`MAX_TABLE_GAIN`]) a table reading `rounding_bits` may apply to
/// values of noise variance `input_variance` within [`GAIN_FAILURE_LOG2`] per bootstrap; 1 when
/// none does.
pub fn gain_within_noise(input_variance: f64, rounding_bits: u32) -> u32 {
    let ok = |g: u32| {
        let std = bootstrap_input_std(&PBS_PARAMS, input_variance * (g as f64).powi(2));
        failure_log2(rounding_bits, std) <= GAIN_FAILURE_LOG2
    };
    let (mut lo, mut hi) = (1u32, MAX_TABLE_GAIN);
    if ok(hi) {
        return hi;
    }
    // ok(lo) or lo == 1; !ok(hi).
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if ok(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Largest channel count, map side or kernel side a stage may declare: far above any real layer,
/// low enough that products of a few of them cannot overflow.
const MAX_STAGE_DIM: usize = 1 << 16;

impl ChainStage {
    /// Table stage: the factor channel `j`'s accumulator is scaled by before rounding.
    fn gain(&self, j: usize) -> i64 {
        match self {
            ChainStage::Table { gains, .. } => gains.get(j).map_or(1, |&g| g as i64),
            _ => 1,
        }
    }

    fn max_gain(&self) -> f64 {
        match self {
            ChainStage::Table { gains, .. } => gains.iter().copied().max().unwrap_or(1) as f64,
            _ => 1.0,
        }
    }

    fn width(&self) -> usize {
        match self {
            ChainStage::Table { channels, .. } => *channels,
            ChainStage::Linear { out_features, .. } => *out_features,
            ChainStage::Conv { out_channels, .. } => *out_channels,
        }
    }

    fn weight(&self, j: usize, i: usize) -> i64 {
        match self {
            ChainStage::Linear {
                in_features, codes, ..
            } => codes[j * in_features + i] as i8 as i64,
            ChainStage::Conv {
                in_channels,
                kernel,
                codes,
                ..
            } => codes[j * in_channels * kernel[0] * kernel[1] + i] as i8 as i64,
            ChainStage::Table { .. } => 0,
        }
    }

    /// Largest `Σ_i w_ji²` over the outputs (a shortcut adds with weight 1).
    fn max_square_norm(&self) -> f64 {
        let (out, inputs, residual) = match self {
            ChainStage::Linear {
                in_features,
                out_features,
                ..
            } => (*out_features, *in_features, false),
            ChainStage::Conv {
                in_channels,
                kernel,
                out_channels,
                residual,
                ..
            } => (
                *out_channels,
                in_channels * kernel[0] * kernel[1],
                *residual,
            ),
            ChainStage::Table { .. } => return 0.0,
        };
        (0..out)
            .map(|j| {
                (0..inputs)
                    .map(|i| (self.weight(j, i) as f64).powi(2))
                    .sum::<f64>()
                    + if residual { 1.0 } else { 0.0 }
            })
            .fold(0.0, f64::max)
    }

    /// Pixels per image of a convolution stage (its rows come in whole maps of this many).
    pub fn map_pixels(&self) -> Option<usize> {
        match self {
            ChainStage::Conv { height, width, .. } => Some(height * width),
            _ => None,
        }
    }

    /// For every output value `(row, j)` of a weighted stage over `rows × width` inputs, the
    /// `(input index, weight)` terms it sums: what both the clear simulation and the encrypted
    /// combination run, so they cannot disagree on the gather.
    fn for_each_term(&self, row: usize, j: usize, width: usize, mut f: impl FnMut(usize, i64)) {
        match self {
            ChainStage::Linear { .. } => {
                for i in 0..width {
                    f(row * width + i, self.weight(j, i));
                }
            }
            ChainStage::Conv {
                height,
                width: map_w,
                in_channels,
                kernel: [kh, kw],
                pads: [pt, pl],
                residual,
                ..
            } => {
                let pixels = height * map_w;
                let (image, p) = (row / pixels, row % pixels);
                let (y, x) = ((p / map_w) as isize, (p % map_w) as isize);
                for c in 0..*in_channels {
                    for ky in 0..*kh {
                        let yy = y + ky as isize - *pt as isize;
                        if yy < 0 || yy >= *height as isize {
                            continue;
                        }
                        for kx in 0..*kw {
                            let xx = x + kx as isize - *pl as isize;
                            if xx < 0 || xx >= *map_w as isize {
                                continue;
                            }
                            let src = image * pixels + yy as usize * map_w + xx as usize;
                            f(src * width + c, self.weight(j, (c * kh + ky) * kw + kx));
                        }
                    }
                }
                if *residual {
                    f(row * width + in_channels + j, 1);
                }
            }
            ChainStage::Table { .. } => {}
        }
    }

    /// This weighted stage on clear codes (`rows × width`, row-major).
    pub fn forward(&self, values: &[i64], rows: usize, width: usize) -> Vec<i64> {
        let out = self.width();
        (0..rows * out)
            .map(|g| {
                let mut sum = 0i64;
                self.for_each_term(g / out, g % out, width, |i, w| {
                    sum = sum.wrapping_add(w.wrapping_mul(values[i]))
                });
                sum
            })
            .collect()
    }
}

/// What a non-linear module computes after its first linear layer, and how its result is
/// returned.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChainProgram {
    /// The first layer's accumulator window (its plan's `acc_bits` equals it).
    pub stages: Vec<ChainStage>,
    /// How the last stage's values are packed and decoded (its `acc_bits` is their width).
    pub output: LayerPlan,
}

/// Rows of a non-linear module whose widest stage is `width` values that fit `max_job_bytes` of
/// working memory: each row holds two LWE sets of that width (a stage's input and output). The
/// coordinator publishes this per module, so clients split by it before the worker refuses.
pub fn chain_rows_within(width: usize, max_job_bytes: usize) -> usize {
    (max_job_bytes / (2 * width.max(1) * BIG_LWE_LEN * 8)).max(1)
}

/// `rows` rounded down to whole maps of `pixels`: 0 when not even one map fits, which the
/// server refuses by name rather than exceeding its memory budget for one request.
pub fn whole_maps(rows: usize, pixels: Option<usize>) -> usize {
    match pixels {
        Some(p) if p > 0 => (rows / p) * p,
        _ => rows,
    }
}

impl ChainProgram {
    /// Shapes and ranges agree (a decoded server module is checked with this).
    pub fn check(&self, first: &LayerPlan) -> Result<(), String> {
        let mut width = first.out_features;
        let mut window = first.acc_bits;
        if !matches!(self.stages.first(), Some(ChainStage::Table { .. })) {
            return Err("a non-linear module starts with a table after its first layer".into());
        }
        for (k, stage) in self.stages.iter().enumerate() {
            match stage {
                ChainStage::Table {
                    channels,
                    rounding_bits,
                    window_bits,
                    output_delta_log,
                    codes,
                    gains,
                } => {
                    let bits = *rounding_bits;
                    if !(1..=MAX_STAGE_DIM).contains(channels) {
                        return Err(format!("stage {k}: a table of {channels} channels"));
                    }
                    if !(gains.is_empty() || gains.len() == *channels)
                        || gains.iter().any(|g| !(1..=MAX_TABLE_GAIN).contains(g))
                    {
                        return Err(format!(
                            "stage {k}: {} gains for {channels} channels (each in 1..={MAX_TABLE_GAIN})",
                            gains.len()
                        ));
                    }
                    if *channels != width
                        || !(1..=MAX_ROUNDING_BITS).contains(&bits)
                        || *window_bits != window
                        || *window_bits < bits + 1
                        || *window_bits > 62
                        || !(2..=62).contains(output_delta_log)
                        || codes.len() != channels << bits
                    {
                        return Err(format!(
                            "stage {k}: table of {channels} channels × 2^{bits} ({} codes), \
                             window {window_bits} bits (expected {window}), output at 2^{output_delta_log}, \
                             after {width} values",
                            codes.len()
                        ));
                    }
                    window = 64 - output_delta_log;
                    if matches!(self.stages.get(k + 1), Some(ChainStage::Table { .. })) {
                        return Err(format!("stage {k}: two tables in a row"));
                    }
                }
                ChainStage::Linear {
                    in_features,
                    out_features,
                    weight_bits,
                    codes,
                } => {
                    if *in_features != width
                        || !(1..=MAX_STAGE_DIM).contains(out_features)
                        || !(2..=8).contains(weight_bits)
                        || Some(codes.len()) != in_features.checked_mul(*out_features)
                    {
                        return Err(format!(
                            "stage {k}: {out_features}×{in_features} linear layer with {} codes after {width} values",
                            codes.len()
                        ));
                    }
                    width = *out_features;
                }
                ChainStage::Conv {
                    height,
                    width: map_w,
                    in_channels,
                    kernel,
                    pads,
                    out_channels,
                    residual,
                    weight_bits,
                    codes,
                } => {
                    // Sizes come from a decoded (untrusted) module: bounded before any product
                    // of them is formed, so none wraps.
                    let sane = |v: usize| (1..=MAX_STAGE_DIM).contains(&v);
                    let sized = [
                        *height,
                        *map_w,
                        *in_channels,
                        *out_channels,
                        kernel[0],
                        kernel[1],
                    ]
                    .into_iter()
                    .all(sane);
                    let expected =
                        in_channels.saturating_add(if *residual { *out_channels } else { 0 });
                    if !sized
                        || expected != width
                        || kernel[0] > *height
                        || kernel[1] > *map_w
                        || pads[0] >= kernel[0]
                        || pads[1] >= kernel[1]
                        || !(2..=8).contains(weight_bits)
                        || Some(codes.len())
                            != out_channels
                                .checked_mul(*in_channels)
                                .and_then(|v| v.checked_mul(kernel[0] * kernel[1]))
                    {
                        return Err(format!(
                            "stage {k}: {out_channels}×{in_channels}×{kernel:?} convolution (pads {pads:?}, \
                             residual {residual}) with {} codes after {width} values",
                            codes.len()
                        ));
                    }
                    let first_map = self.stages.iter().find_map(|s| match s {
                        ChainStage::Conv { height, width, .. } => Some((*height, *width)),
                        _ => None,
                    });
                    if first_map.is_some_and(|m| m != (*height, *map_w)) {
                        return Err(format!(
                            "stage {k}: a {height}×{map_w} map where an earlier stage had another"
                        ));
                    }
                    width = *out_channels;
                }
            }
        }
        if self.output.out_features != width || self.output.acc_bits != window {
            return Err(format!(
                "output plan of {} values × {} bits, the chain ends with {width} × {window}",
                self.output.out_features, self.output.acc_bits
            ));
        }
        if self.output.precision != Precision::Exact {
            return Err("a non-linear module's output uses exact precision".into());
        }
        Ok(())
    }

    /// Pixels per image when the module holds a convolution after its first layer: requests then
    /// carry whole images (`rows` a multiple of it), `None` for a dense chain.
    pub fn map_pixels(&self) -> Option<usize> {
        self.stages.iter().find_map(ChainStage::map_pixels)
    }

    /// Number of bootstraps per row.
    pub fn bootstraps_per_row(&self) -> usize {
        self.stages
            .iter()
            .filter(|s| matches!(s, ChainStage::Table { .. }))
            .map(ChainStage::width)
            .sum()
    }

    /// Widest stage (what one row's LWEs take in memory).
    pub fn max_width(&self, first: &LayerPlan) -> usize {
        self.stages
            .iter()
            .map(ChainStage::width)
            .chain([first.out_features])
            .max()
            .unwrap_or(0)
    }

    /// Rows one request may hold under a working-memory budget.
    pub fn max_rows(&self, first: &LayerPlan, max_job_bytes: usize) -> usize {
        whole_maps(
            chain_rows_within(self.max_width(first), max_job_bytes),
            self.map_pixels(),
        )
    }

    /// Standard deviation of the phase each bootstrap reads, worst stage first.
    pub fn bootstrap_std(&self, first: &LayerPlan) -> f64 {
        // The first layer's products carry the row model's noise; later layers the previous
        // bootstrap's output weighted by their codes.
        // A table's gain multiplies the noise of what it reads.
        let mut input = 2f64.powf(2.0 * first.noise_std_log2);
        let mut worst = 0f64;
        for stage in &self.stages {
            match stage {
                ChainStage::Linear { .. } | ChainStage::Conv { .. } => {
                    input = stage.max_square_norm() * bootstrap_output_variance(&PBS_PARAMS);
                }
                ChainStage::Table { .. } => {
                    let v = input * stage.max_gain().powi(2);
                    worst = worst.max(bootstrap_input_std(&PBS_PARAMS, v));
                }
            }
        }
        worst
    }

    /// `log2` of the probability that some bootstrap of one row lands two or more rounding steps
    /// from round-to-nearest (union bound over the row's bootstraps).
    pub fn failure_log2(&self, first: &LayerPlan) -> f64 {
        let std = self.bootstrap_std(first);
        let per = self
            .stages
            .iter()
            .filter_map(|s| match s {
                ChainStage::Table { rounding_bits, .. } => Some(*rounding_bits),
                _ => None,
            })
            .map(|b| failure_log2(b, std))
            .fold(f64::NEG_INFINITY, f64::max);
        per + (self.bootstraps_per_row().max(1) as f64).log2()
    }

    /// Expected fraction of hidden values one step from the simulation (the rounding's spread).
    pub fn neighbour_rate(&self, first: &LayerPlan) -> f64 {
        let std = self.bootstrap_std(first);
        self.stages
            .iter()
            .filter_map(|s| match s {
                ChainStage::Table { rounding_bits, .. } => {
                    Some(neighbour_rate(*rounding_bits, std))
                }
                _ => None,
            })
            .fold(0.0, f64::max)
    }

    /// The clear computation the encrypted one approximates: first-layer accumulators
    /// (row-major `rows × first.out_features`) → the values the client decodes (row-major).
    pub fn simulate(&self, first_acc: &[i64], rows: usize) -> Vec<i64> {
        let mut values = first_acc.to_vec();
        let mut width = first_acc.len() / rows.max(1);
        for stage in &self.stages {
            match stage {
                ChainStage::Table {
                    channels,
                    rounding_bits,
                    window_bits,
                    codes,
                    ..
                } => {
                    for (g, v) in values.iter_mut().enumerate() {
                        let j = g % channels;
                        let scaled = v.wrapping_mul(stage.gain(j));
                        *v = table_lookup(scaled, j, *rounding_bits, *window_bits, codes);
                    }
                }
                ChainStage::Linear { .. } | ChainStage::Conv { .. } => {
                    values = stage.forward(&values, rows, width);
                    width = stage.width();
                }
            }
        }
        values
    }
}

/// What one bootstrap computes on a clear accumulator: round-to-nearest of `acc / 2^s`
/// (`s = window_bits − rounding_bits − 1`), moved into `[0, 2^bits)`, looked up; past the window
/// it wraps negacyclically as the encrypted table does (entry `i + 2^bits` is `−table[i]`).
pub fn table_lookup(acc: i64, channel: usize, bits: u32, window_bits: u32, codes: &[i32]) -> i64 {
    let s = window_bits - bits - 1;
    let rounded = if s == 0 {
        acc
    } else {
        (acc + (1i64 << (s - 1))) >> s
    };
    let index = (rounded + (1i64 << (bits - 1))).rem_euclid(1i64 << (bits + 1)) as usize;
    let size = 1usize << bits;
    let table = &codes[channel * size..(channel + 1) * size];
    if index < size {
        table[index] as i64
    } else {
        -(table[index - size] as i64)
    }
}

/// A non-linear module ready to evaluate: its first layer in the Fourier domain and one lookup
/// table per channel of every table stage.
pub struct EncryptedChain {
    first: FourierLinearLayer,
    program: ChainProgram,
    luts: Vec<Vec<GlweCiphertextOwned<u64>>>,
}

impl EncryptedChain {
    pub fn new(first: FourierLinearLayer, program: ChainProgram) -> Result<Self, FheError> {
        program
            .check(first.plan())
            .map_err(|e| FheError::Shape(format!("non-linear module: {e}")))?;
        let luts = program
            .stages
            .iter()
            .filter_map(|s| match s {
                ChainStage::Table {
                    channels,
                    rounding_bits,
                    output_delta_log,
                    codes,
                    ..
                } => Some(
                    codes
                        .chunks_exact(1 << rounding_bits)
                        .take(*channels)
                        .map(|table| {
                            let torus: Vec<u64> = table
                                .iter()
                                .map(|&c| (c as i64 as u64).wrapping_shl(*output_delta_log))
                                .collect();
                            lookup_table(*rounding_bits, &torus)
                        })
                        .collect(),
                ),
                ChainStage::Linear { .. } | ChainStage::Conv { .. } => None,
            })
            .collect();
        Ok(Self {
            first,
            program,
            luts,
        })
    }

    /// The plan the client encrypts with (the first layer's).
    pub fn plan(&self) -> &LayerPlan {
        self.first.plan()
    }

    pub fn program(&self) -> &ChainProgram {
        &self.program
    }

    /// Evaluate with at most about `max_job_bytes` of ciphertexts in flight.
    pub fn evaluate_within(
        &self,
        key: &SessionKey,
        input: &EncryptedRows,
        max_job_bytes: usize,
    ) -> Result<EncryptedOutputs, FheError> {
        let plan = self.first.plan();
        self.first.check_request(key, input)?;
        if input.encoding != Encoding::Row {
            return Err(FheError::ParameterMismatch(format!(
                "a non-linear module takes row-encoded requests, not {}",
                input.encoding
            )));
        }
        let pbs = key.bootstrap.as_ref().ok_or_else(|| {
            FheError::ParameterMismatch(
                "the session uploaded no bootstrap key; this module has activations inside".into(),
            )
        })?;
        let rows = input.rows as usize;
        let limit = self.program.max_rows(plan, max_job_bytes);
        if limit == 0 {
            return Err(FheError::Shape(format!(
                "one {}-pixel map of this module ({} values per pixel at its widest) needs more \
                 working memory than the {max_job_bytes}-byte job budget: raise worker.max_job_bytes",
                self.program.map_pixels().unwrap_or(0),
                self.program.max_width(plan)
            )));
        }
        if rows > limit {
            return Err(FheError::Shape(format!(
                "{rows} rows exceed this module's {limit} rows per request (its widest stage has {} values per row)",
                self.program.max_width(plan)
            )));
        }
        if let Some(pixels) = self.program.map_pixels() {
            if !rows.is_multiple_of(pixels) {
                return Err(FheError::Shape(format!(
                    "{rows} rows are not whole images: this module convolves maps of {pixels} pixels, \
                     so a request carries a multiple of {pixels} rows"
                )));
            }
        }
        let mut lwes = self.first.extract_lwes(input);
        let mut width = plan.out_features;
        let mut tables = self.luts.iter();
        for stage in &self.program.stages {
            match stage {
                ChainStage::Table {
                    channels, gains, ..
                } => {
                    let luts = tables.next().expect("one table set per table stage");
                    let channels = *channels;
                    if !gains.is_empty() {
                        lwes.par_chunks_mut(BIG_LWE_LEN)
                            .enumerate()
                            .for_each(|(g, lwe)| {
                                let gain = gains[g % channels] as u64;
                                lwe.iter_mut().for_each(|c| *c = c.wrapping_mul(gain));
                            });
                    }
                    pbs.bootstrap_all(&mut lwes, WINDOW_OFFSET, luts, |g| g % channels);
                }
                ChainStage::Linear { .. } | ChainStage::Conv { .. } => {
                    lwes = combine(stage, &lwes, rows, width);
                    width = stage.width();
                }
            }
        }
        Ok(pack_lwes(&key.packing, &self.program.output, rows, &lwes))
    }
}

/// A weighted stage on whole LWE ciphertexts (wrapping integer arithmetic): each output is the
/// integer combination [`ChainStage::for_each_term`] lists, as in the clear simulation.
fn combine(stage: &ChainStage, lwes: &[u64], rows: usize, width: usize) -> Vec<u64> {
    let out = stage.width();
    let mut next = vec![0u64; rows * out * BIG_LWE_LEN];
    next.par_chunks_mut(BIG_LWE_LEN)
        .enumerate()
        .for_each(|(g, dst)| {
            stage.for_each_term(g / out, g % out, width, |i, w| {
                if w == 0 {
                    return;
                }
                let w = w as u64;
                let src = &lwes[i * BIG_LWE_LEN..(i + 1) * BIG_LWE_LEN];
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = d.wrapping_add(s.wrapping_mul(w));
                }
            });
        });
    next
}

/// What a server evaluates for one remote module: a linear layer, or a chain with activations.
pub enum ModuleProgram {
    Linear(FourierLinearLayer),
    Chain(EncryptedChain),
}

impl ModuleProgram {
    /// The first layer's weights in the Fourier domain, and the chain after it if there is one.
    pub fn new(
        plan: LayerPlan,
        codes: &[i8],
        chain: Option<&ChainProgram>,
    ) -> Result<Self, FheError> {
        let first = FourierLinearLayer::new(plan, codes)?;
        Ok(match chain {
            None => Self::Linear(first),
            Some(program) => Self::Chain(EncryptedChain::new(first, program.clone())?),
        })
    }

    /// The plan requests are encrypted with.
    pub fn plan(&self) -> &LayerPlan {
        match self {
            Self::Linear(l) => l.plan(),
            Self::Chain(c) => c.plan(),
        }
    }

    /// Whether the session needs bootstrapping keys for it.
    pub fn needs_bootstrap(&self) -> bool {
        matches!(self, Self::Chain(_))
    }

    pub fn evaluate_within(
        &self,
        key: &SessionKey,
        input: &EncryptedRows,
        max_job_bytes: usize,
    ) -> Result<EncryptedOutputs, FheError> {
        match self {
            Self::Linear(l) => l.evaluate_within(key, input, max_job_bytes),
            Self::Chain(c) => c.evaluate_within(key, input, max_job_bytes),
        }
    }

    pub fn evaluate(
        &self,
        key: &SessionKey,
        input: &EncryptedRows,
    ) -> Result<EncryptedOutputs, FheError> {
        self.evaluate_within(key, input, super::encoding::DEFAULT_JOB_BYTES)
    }

    /// Rows one request may carry under `max_job_bytes`: a linear module splits any row count
    /// into groups itself; a chain holds every hidden value of its request.
    pub fn max_rows(&self, max_job_bytes: usize) -> usize {
        match self {
            Self::Linear(_) => super::MAX_ROWS,
            Self::Chain(c) => c.program.max_rows(c.first.plan(), max_job_bytes),
        }
    }
}
