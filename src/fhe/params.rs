//! Parameter sets and the noise budget of the encrypted linear layer.
//!
//! # Where the parameters come from
//!
//! * **Input GLWE** (`k = 1, N = 2048, TUniform(17)`, binary key): the GLWE part of tfhe's published
//!   `V1_8_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128` (128-bit security).
//! * **Exact output GLWE** (`k = 2, N = 2048, TUniform(3)`, binary key): tfhe's published
//!   `V1_0_PARAM_MESSAGE_4_CARRY_4_KS_PBS_GAUSSIAN_2M128` uses `k = 1, N = 4096` with a Gaussian of
//!   standard deviation `2.17e-19 · 2^64 ≈ 4.0`; TUniform(3) has standard deviation
//!   `√((2^7 + 1)/6) ≈ 4.64`, i.e. at least as much noise, and we use the same dimension
//!   `k·N = 4096`. Security is modelled on `k·N`, as tfhe's own parameter curves do, so the
//!   `k = 2, N = 2048` shape keeps the 128-bit level while letting every polynomial in the engine share
//!   one FFT size.
//! * **Compact output GLWE**: the same published set as the input (`k = 1, N = 2048,
//!   TUniform(17)`).
//!
//! # Noise budget (all variances in units of the 64-bit torus, `q = 2^64`)
//!
//! An output coefficient decrypts to `acc·Δ + e` with `Δ = 2^(64 − acc_bits)`; the result is exact
//! when `|e| < Δ/2`. With `s_in` the input key (`n_in = k_in·N_in` binary coefficients, about half
//! of them ones) and `‖w‖²` the worst-case squared norm of a weight row (`in · 2^(2(w_bits − 1))`):
//!
//! | source | variance |
//! |---|---|
//! | input encryption | `‖w‖² · V(TUniform(17))` |
//! | input body modulus switch to `b_in` bits | `‖w‖² · 2^(2(64 − b_in)) / 12` |
//! | f64 FFT error of the mask product | `n_in/2 · ‖w‖² · (c · 2^11)²` |
//! | packing: decomposition rounding | `n_in/2 · 2^(2(64 − β·L)) / 12` |
//! | packing: key noise | `n_in · L · n_pack · (2^(2β) + 2)/12 · V(key noise)` |
//! | packing: f64 FFT error (per limb) | `(c · 2^−53 · rms(K_limb) · rms(digit) · √(n_in·L·n_pack))² · (k_out·N_out/2 + 1)` |
//! | output modulus switch | `2^(2(64 − b_body))/12 + k_out·N_out/2 · 2^(2(64 − b_mask))/12` |
//!
//! where `V(TUniform(b)) = (2^(2b+1) + 1)/6`, `β` is the packing decomposition base log, `L` its
//! level count and `n_pack ≤ N_out` the number of values packed in one output GLWE (the model uses
//! `N_out`, the worst case). A layer is planned **exact** only if `Z_EXACT · σ < Δ/2` with
//! `Z_EXACT = 8` (a Gaussian tail of about 2^−49.6 per value); otherwise it is refused when it is
//! compiled. `tests/noise.rs` measures the real noise against this bound.
//!
//! # The blocked encoding is bounded by the same model
//!
//! A blocked request (see `blocked.rs`) puts `R_c` rows × `F = N/R_c` features in each input
//! GLWE and reinterprets each product as a GLWE of the subring `Z[X^F]` with `F` mask
//! polynomials of `R_c` coefficients; its packing sums `F·L` digit polynomials of `N`
//! coefficients against `F·L` key entries. Term by term against the table above:
//! input noise, body switch and product FFT error are the same (the same `in` inputs weighted by
//! the same weight row, the same `n_in = k·N` mask coefficients under the same key); the
//! reinterpretation adds nothing (it only renames coefficients); the decomposition rounding has
//! the same `n_in` mask coefficients; the key-noise and packing-FFT terms have `F·L·N` terms
//! instead of `n_in·L·N` with `F ≤ N/2 < n_in`, so they are smaller. The row model therefore
//! bounds both encodings, and one [`LayerPlan`] (one set of wire widths) serves both;
//! `tests/integration/noise.rs` measures blocked requests against it too.
//!
//! The slot encoding (one feature over `N` rows per input GLWE, outputs `Σ_i w_ji · ct_i` under
//! the input key, computed as one f64 matrix product in the Fourier domain) has no packing at all:
//! its noise is the input, body-switch and product terms of the row model, and an output modulus
//! switch over `k_in·N/2 = 1024` mask coefficients instead of `k_out·N_out/2 = 2048`. Every term
//! is at most the row model's, so the plan's widths are safe for it too.

use serde::{Deserialize, Serialize};

/// Output precision of a layer, chosen at compile time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Every accumulator bit survives: decryption equals the integer simulation bit for bit.
    Exact,
    /// Harder modulus switching: fewer bytes on the wire, only the top bits exact.
    Compact,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Exact => "exact",
            Precision::Compact => "compact",
        })
    }
}

/// Shape and noise of a GLWE secret key / ciphertext family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlweShape {
    pub glwe_dimension: usize,
    pub polynomial_size: usize,
    /// Encryption noise is `TUniform(noise_bound_log2)`: uniform on `[−2^b, 2^b]`, half weight at
    /// the ends.
    pub noise_bound_log2: u32,
}

impl GlweShape {
    pub const fn lwe_dimension(&self) -> usize {
        self.glwe_dimension * self.polynomial_size
    }

    pub fn noise_variance(&self) -> f64 {
        tuniform_variance(self.noise_bound_log2)
    }
}

pub fn tuniform_variance(bound_log2: u32) -> f64 {
    (2f64.powi(2 * bound_log2 as i32 + 1) + 1.0) / 6.0
}

/// The input GLWE family (client encryption of activation rows).
pub const INPUT_GLWE: GlweShape = GlweShape {
    glwe_dimension: 1,
    polynomial_size: 2048,
    noise_bound_log2: 17,
};

/// Parameters of the LWE → GLWE packing keyswitch for one precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackingParams {
    pub output: GlweShape,
    pub base_log: u32,
    pub level_count: usize,
    /// 1: the Fourier key holds the 64-bit key polynomials as they are; 2: split as
    /// `hi·2^LIMB_SPLIT + lo` so that f64 products stay exact enough (see `packing.rs`).
    pub fourier_limbs: usize,
    /// Bits kept of each input body coefficient on the wire.
    pub input_body_bits: u32,
}

/// Where the two-limb split cuts a key coefficient (`lo` keeps this many low bits, signed).
pub const LIMB_SPLIT: u32 = 42;

pub const fn packing_params(precision: Precision) -> PackingParams {
    match precision {
        Precision::Exact => PackingParams {
            output: GlweShape {
                glwe_dimension: 2,
                polynomial_size: 2048,
                noise_bound_log2: 3,
            },
            base_log: 14,
            level_count: 3,
            fourier_limbs: 2,
            input_body_bits: 44,
        },
        Precision::Compact => PackingParams {
            output: GlweShape {
                glwe_dimension: 1,
                polynomial_size: 2048,
                noise_bound_log2: 17,
            },
            base_log: 12,
            level_count: 3,
            fourier_limbs: 1,
            input_body_bits: 39,
        },
    }
}

/// Parameters of the automorphism keyswitch (`automorph.rs`): the exact output GLWE (the packing
/// runs under it), base `2^15`, 3 levels, two-limb Fourier keys. The decomposition keeps 45 bits
/// of each mask coefficient: its rounding and the key noise are about equal (σ ≈ 2^22.7 and
/// 2^22.2 per keyswitch), and the tree multiplies them by `N/m/√3` (see [`auto_noise_variance`]):
/// 2^30.2 at `m = 8`, under the product FFT's 2^31.8 at 768 inputs, so every layer the planner
/// gives `auto` keeps its `m` (inputs of 2057–3245 features at 8 bits need one more input body
/// bit than with `β = 12`; plans compiled before are checked at load, [`LayerPlan::check_auto`]).
/// `β = 12, L = 4` (2^3 less noise) costs a quarter more per keyswitch (8 forward FFTs and 48
/// multiply-adds against 6 and 36); `β = 16, L = 3` has the same cost and more key noise.
pub const fn auto_params() -> PackingParams {
    PackingParams {
        output: packing_params(Precision::Exact).output,
        base_log: 15,
        level_count: 3,
        fourier_limbs: 2,
        input_body_bits: packing_params(Precision::Exact).input_body_bits,
    }
}

/// Widest layer the automorphism encoding accepts: keeps the split products' `hi` limb exact.
pub const MAX_AUTO_IN: usize = 4096;

/// Input body bits a layer may add over its row plan to admit the automorphism encoding.
pub const AUTO_EXTRA_BODY_BITS: u32 = 4;

/// Outputs per leaf the automorphism encoding offers (`m`: input chunks of `N/m` features, one
/// product per `m` outputs).
pub const AUTO_OUTPUTS: [u32; 5] = [1, 2, 4, 8, 16];

/// How a request lays its rows out in ciphertexts; chosen per request by [`Encoding::choose`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Encoding {
    /// One row per input GLWE (its features in the coefficients); every output value is extracted
    /// and packed by the LWE packing key. Cheapest for a few rows.
    #[default]
    Row,
    /// `rows` rows × `N/rows` features per input GLWE; each product holds `rows` outputs, packed
    /// `N/rows` outputs at a time by a small per-layout key. Cheapest for tens to hundreds of rows.
    Blocked { rows: u32 },
    /// One row per input GLWE under the exact output key, `N/outputs` features each; one product
    /// holds `outputs` values and products are packed by ring automorphisms with the session's
    /// small automorphism keys (`automorph.rs`, `auto.rs`). Exact precision only.
    Auto { outputs: u32 },
    /// `N` rows of one feature per input GLWE (a column): output `j` is `Σ_i w_ji · ct_i`, a
    /// clear-integer combination already packed `N` rows to a ciphertext under the input key, with
    /// no packing key at all. Cheapest for about a thousand rows and more.
    Slot,
}

/// Which packing keys a session's evaluation key carries, chosen by the client when it opens the
/// session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KeyProfile {
    /// The row key, the block keys and (exact precision) the automorphism keys: every encoding.
    /// About 107 MiB uploaded and 650 MiB in the worker per session.
    #[default]
    Full,
    /// The automorphism keys alone (exact precision; none at compact precision): `auto` and
    /// `slot` requests only, which need no LWE packing key. About 1 MiB uploaded and 6 MiB in
    /// the worker: for single-row traffic (decoding, one-sample requests) and many tenants per
    /// worker. Linear modules only; tens to hundreds of rows cost more than with the full key.
    Lean,
}

impl std::fmt::Display for KeyProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyProfile::Full => "full",
            KeyProfile::Lean => "lean",
        })
    }
}

impl std::str::FromStr for KeyProfile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(KeyProfile::Full),
            "lean" => Ok(KeyProfile::Lean),
            _ => Err(format!("unknown key profile `{s}` (full or lean)")),
        }
    }
}

/// Row-block sizes this build offers: each needs its own small packing key in the session's
/// evaluation key (`N/rows · L` GLWEs).
pub const BLOCK_ROWS: [u32; 4] = [16, 32, 64, 128];

impl std::fmt::Display for Encoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Encoding::Row => f.write_str("row"),
            Encoding::Blocked { rows } => write!(f, "blocked{rows}"),
            Encoding::Slot => f.write_str("slot"),
            Encoding::Auto { outputs } => write!(f, "auto{outputs}"),
        }
    }
}

impl std::str::FromStr for Encoding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let offered = || {
            std::iter::once("row".to_string())
                .chain(BLOCK_ROWS.iter().map(|r| format!("blocked{r}")))
                .chain(std::iter::once("slot".to_string()))
                .chain(AUTO_OUTPUTS.iter().map(|m| format!("auto{m}")))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match s {
            "row" => return Ok(Encoding::Row),
            "slot" => return Ok(Encoding::Slot),
            _ => {}
        }
        if let Some(m) = s.strip_prefix("auto") {
            return m
                .parse::<u32>()
                .ok()
                .filter(|m| AUTO_OUTPUTS.contains(m))
                .map(|outputs| Encoding::Auto { outputs })
                .ok_or_else(|| {
                    format!("unknown encoding `{s}` (this build offers {})", offered())
                });
        }
        s.strip_prefix("blocked")
            .and_then(|r| r.parse::<u32>().ok())
            .filter(|r| BLOCK_ROWS.contains(r))
            .map(|rows| Encoding::Blocked { rows })
            .ok_or_else(|| format!("unknown encoding `{s}` (this build offers {})", offered()))
    }
}

impl Encoding {
    /// Rows per input ciphertext.
    pub fn rows_per_ciphertext(&self) -> usize {
        match self {
            Encoding::Row | Encoding::Auto { .. } => 1,
            Encoding::Blocked { rows } => *rows as usize,
            Encoding::Slot => INPUT_GLWE.polynomial_size,
        }
    }

    /// Body coefficients a request of `rows × in_features` sends: one per value, except that an
    /// automorphism request with `m` outputs per product sends `m` per value (the server's
    /// product meets every input's coefficient in each of the `m` blocks of its GLWE; see
    /// `auto.rs`).
    pub fn input_bodies(&self, rows: usize, in_features: usize) -> usize {
        match self {
            Encoding::Auto { outputs } => rows * *outputs as usize * in_features,
            _ => rows * in_features,
        }
    }

    /// Every encoding this build offers besides the automorphism ones (one per layer, chosen in
    /// [`LayerPlan::new`]).
    pub fn all() -> Vec<Encoding> {
        std::iter::once(Encoding::Row)
            .chain(BLOCK_ROWS.iter().map(|&rows| Encoding::Blocked { rows }))
            .chain(std::iter::once(Encoding::Slot))
            .collect()
    }

    /// The planner: among the offered encodings whose output costs at most
    /// [`MAX_PLANNED_OUTPUT_BYTES`] per value for `rows` rows (a nearly empty slot or block
    /// ciphertext sends a whole mask for a few values), the cheapest by a cost model in units of
    /// one size-`N` FFT (see [`Encoding::predicted_cost`]).
    pub fn choose(plan: &LayerPlan, rows: usize) -> Encoding {
        Self::choose_for(plan, rows, KeyProfile::Full).unwrap_or_default()
    }

    /// Whether a session whose key has `profile` serves requests in this encoding: the lean key
    /// has no LWE packing keys (row, blocked), and automorphism keys at exact precision only.
    pub fn served_by(&self, profile: KeyProfile) -> bool {
        match profile {
            KeyProfile::Full => true,
            KeyProfile::Lean => matches!(self, Encoding::Slot | Encoding::Auto { .. }),
        }
    }

    /// [`Encoding::choose`] among the encodings a `profile` key serves; `None` when it serves
    /// none the plan offers (a plan written before the slot encoding existed, under a lean key).
    pub fn choose_for(plan: &LayerPlan, rows: usize, profile: KeyProfile) -> Option<Encoding> {
        let rows = rows.max(1);
        let offered = || {
            plan.encodings
                .iter()
                .copied()
                .filter(|e| e.served_by(profile))
        };
        let small =
            |e: &Encoding| plan.output_bytes_per_value_as(*e, rows) <= MAX_PLANNED_OUTPUT_BYTES;
        let cost = |a: &Encoding, b: &Encoding| {
            a.predicted_cost(plan, rows)
                .total_cmp(&b.predicted_cost(plan, rows))
        };
        if !offered().any(|e| small(&e)) {
            // Few values per ciphertext whatever the encoding: the wire dominates, and the cost
            // decides between encodings that send the same (row and auto send one pack alike).
            return offered().min_by(|a, b| {
                plan.output_bytes_per_value_as(*a, rows)
                    .total_cmp(&plan.output_bytes_per_value_as(*b, rows))
                    .then(cost(a, b))
            });
        }
        offered().filter(small).min_by(cost)
    }

    /// Predicted evaluation time of `rows` rows in milliseconds on two threads of the reference
    /// machine (x86-64, AVX2; see BENCHMARKS.md). The model counts each encoding's operations
    /// and weighs them by coefficients fitted to `hyfhe bench linear --encoding ...` over 41
    /// (encoding, shape, rows) points, where it is within ±20 % of the measurements except for
    /// blocked16 at 500+ rows (underestimated by 25-30 %, a range where it is never the choice).
    /// Only the ranking matters to [`Encoding::choose`].
    pub fn predicted_cost(&self, plan: &LayerPlan, rows: usize) -> f64 {
        // ms per: size-N FFT, Fourier multiply-add, product inverse FFT + decomposition,
        // f64 FMA of the slot product, exact body multiply-accumulate, and the row key's stream.
        const FFT: f64 = 2.2e-3;
        const MUL_ADD: f64 = 6.4e-4;
        const PRODUCT: f64 = 4.6e-2;
        const GEMM_FMA: f64 = 7.5e-8;
        const BODY_MAC: f64 = 8.8e-8;
        const ROW_KEY_STREAM: f64 = 4.4;
        let n = INPUT_GLWE.polynomial_size as f64;
        let (inputs, outputs) = (plan.in_features as f64, plan.out_features as f64);
        let p = plan.packing();
        let levels = p.level_count as f64;
        let key_polys = ((p.output.glwe_dimension + 1) * p.fourier_limbs) as f64;
        let rows = rows as f64;
        let values = rows * outputs;
        match self {
            Encoding::Row => {
                let packs = (values / n).ceil();
                let n_in = INPUT_GLWE.lwe_dimension() as f64;
                let ffts = packs * n_in * levels;
                ffts * FFT
                    + (ffts * key_polys + values * (inputs / n).ceil()) * MUL_ADD
                    + values * PRODUCT
                    + values * inputs * BODY_MAC
                    + ROW_KEY_STREAM
            }
            Encoding::Slot => {
                let batches = (rows / n).ceil();
                batches * inputs * FFT
                    + batches * outputs * 0.2 * PRODUCT
                    + batches * outputs * inputs * n * GEMM_FMA
                    + 2.0 * values * inputs * BODY_MAC
            }
            Encoding::Auto { outputs: m } => {
                // ms per automorphism keyswitch (k·L forward and (k+1)·limbs inverse FFTs,
                // k·L·(k+1)·limbs multiply-adds, decomposition and the automorphism itself) and
                // per leaf product and chunk, measured with `hyfhe bench linear --encoding auto8`
                // at (1, 768, 2304) on two threads (2026-12-07).
                const KEYSWITCH: f64 = 0.113;
                const LEAF: f64 = 0.02;
                const LEAF_CHUNK: f64 = 0.015;
                let m = *m as f64;
                let chunks = auto_chunks(m as u32, plan.in_features) as f64;
                let leaves = rows * (outputs / m).ceil();
                let packs = (leaves / (n / m)).ceil();
                // One keyswitch per leaf (the tree has leaves − 1 merges per pack) plus the trace.
                let keyswitches = leaves + packs * (n / m).log2();
                keyswitches * KEYSWITCH + leaves * (LEAF + chunks * LEAF_CHUNK)
            }
            Encoding::Blocked { rows: block } => {
                let f = n / *block as f64;
                let groups = (inputs / f).ceil();
                let batches = (rows / *block as f64).ceil();
                let pack_ffts = batches * (outputs / f).ceil() * f * levels;
                (outputs * groups + pack_ffts) * FFT
                    + (batches * outputs * groups + pack_ffts * key_polys) * MUL_ADD
                    + batches * outputs * PRODUCT
                    + 2.0 * values * inputs * BODY_MAC
            }
        }
    }
}

/// Input GLWEs per row of an automorphism request with `m` outputs per product (`N/m` features
/// each).
pub fn auto_chunks(m: u32, in_features: usize) -> usize {
    in_features.div_ceil(INPUT_GLWE.polynomial_size / m as usize)
}

/// The planner avoids encodings whose output costs more than this per value (see
/// [`Encoding::choose`]); full packs cost about 13 (row, blocked) or 8-10 (slot).
pub const MAX_PLANNED_OUTPUT_BYTES: f64 = 24.0;

/// Standard deviations a layer must stay below for exactness.
pub const Z_EXACT: f64 = 8.0;
/// Compact layers are refused below this many predicted exact top bits: they would be useless.
pub const MIN_COMPACT_TOP_BITS: u32 = 8;
/// Output bits of a compact layer (mask, body): under 7 bytes per output value at a full pack.
const COMPACT_OUTPUT_BITS: (u32, u32) = (28, 27);
/// Empirical constants of the f64 FFT error terms (error ≈ factor · 2^−53 · rms(result)),
/// set so that the model bounds what `tests/integration/noise.rs` measures: the product term
/// matches a direct measurement at 4 (2^25.35 per coefficient for full-scale weights, modelled
/// 2^25.5); the one-limb packing term needed about 15 for the compact key to be bounded, 24 keeps
/// a margin.
const FFT_ERROR_FACTOR: f64 = 4.0;
const PACKING_FFT_ERROR_FACTOR: f64 = 24.0;
/// Variance margin on the whole model. Before it, the exact worst-case layer (2048×2048, full-scale
/// weights and inputs) was predicted at σ = 2^32.86 and measured at 2^32.77–2^32.87 across fresh
/// keys: the model was a mean, not a bound, and CI caught a key where it fell 0.01 bit short.
/// 1.5 (+0.29 bit of σ) makes it a bound with room for the key-to-key spread (about 0.1 bit).
const MODEL_VARIANCE_MARGIN: f64 = 1.5;

/// What a layer's encrypted evaluation looks like: fixed at compile time, shared by client and
/// server (it is part of the client spec).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerPlan {
    pub precision: Precision,
    pub in_features: usize,
    pub out_features: usize,
    pub input_bits: u32,
    pub weight_bits: u32,
    /// Width of the signed accumulator `Σ v·w`.
    pub acc_bits: u32,
    pub input_body_bits: u32,
    pub output_mask_bits: u32,
    pub output_body_bits: u32,
    /// log2 of the predicted noise standard deviation before decryption.
    pub noise_std_log2: f64,
    /// Predicted number of leading accumulator bits that are always right (`acc_bits` when exact).
    pub predicted_exact_top_bits: u32,
    /// Encodings the server accepts for this layer; the client picks one per request with
    /// [`Encoding::choose`]. Specs written before encodings existed accept rows only.
    #[serde(default = "row_only")]
    pub encodings: Vec<Encoding>,
}

fn row_only() -> Vec<Encoding> {
    vec![Encoding::Row]
}

/// Why a layer cannot be planned.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("layer `{layer}`: {what} must be in {range}, got {got}")]
    OutOfRange {
        layer: String,
        what: &'static str,
        range: &'static str,
        got: usize,
    },
    #[error(
        "layer `{layer}`: a {acc_bits}-bit accumulator ({input_bits}-bit inputs × {weight_bits}-bit \
         weights × {in_features} inputs) does not fit the noise budget of {precision} precision \
         (best predicted noise 2^{noise_std_log2:.1} vs. {needed}); use fewer bits or split the layer"
    )]
    NoiseBudget {
        layer: String,
        precision: Precision,
        acc_bits: u32,
        input_bits: u32,
        weight_bits: u32,
        in_features: usize,
        noise_std_log2: f64,
        needed: String,
    },
}

/// Largest inner dimension accepted (the accumulator and the noise grow with it).
pub const MAX_IN_FEATURES: usize = 1 << 16;
pub const MAX_OUT_FEATURES: usize = 1 << 16;

impl LayerPlan {
    /// Plan a layer: accumulator width, wire bits, and the noise check. `layer` names it in errors.
    pub fn new(
        layer: &str,
        precision: Precision,
        in_features: usize,
        out_features: usize,
        input_bits: u32,
        weight_bits: u32,
    ) -> Result<Self, PlanError> {
        let range = |what, range, got, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(PlanError::OutOfRange {
                    layer: layer.to_string(),
                    what,
                    range,
                    got,
                })
            }
        };
        range(
            "in_features",
            "1..=65536",
            in_features,
            (1..=MAX_IN_FEATURES).contains(&in_features),
        )?;
        range(
            "out_features",
            "1..=65536",
            out_features,
            (1..=MAX_OUT_FEATURES).contains(&out_features),
        )?;
        range(
            "input bits",
            "2..=16",
            input_bits as usize,
            (2..=16).contains(&input_bits),
        )?;
        range(
            "weight bits",
            "2..=8",
            weight_bits as usize,
            (2..=8).contains(&weight_bits),
        )?;

        let acc_bits = accumulator_bits(input_bits, weight_bits, in_features);
        let max_w = 2f64.powi(weight_bits as i32 - 1);
        let w_norm2 = in_features as f64 * max_w * max_w;
        let model = NoiseModel { precision, w_norm2 };
        let delta = 2f64.powi(64 - acc_bits as i32);
        let refuse = |best: f64, needed: String| PlanError::NoiseBudget {
            layer: layer.to_string(),
            precision,
            acc_bits,
            input_bits,
            weight_bits,
            in_features,
            noise_std_log2: best.log2(),
            needed,
        };
        let params = packing_params(precision);
        let (input_body_bits, mask_bits, body_bits, std) = match precision {
            Precision::Exact => {
                // Smallest wire sizes whose predicted noise keeps every bit: inputs first (they
                // are the larger share of traffic for most shapes), then the output mask.
                let limit = delta / 2.0 / Z_EXACT;
                let mut best = f64::INFINITY;
                let mut found = None;
                'search: for b_in in params.input_body_bits..=56 {
                    for mask in 24..=64u32 {
                        let body = mask.saturating_sub(4).max(acc_bits + 1).min(64);
                        let std = model.std(b_in, mask, body);
                        best = best.min(std);
                        if std < limit {
                            found = Some((b_in, mask, body, std));
                            break 'search;
                        }
                    }
                }
                found.ok_or_else(|| refuse(best, format!("2^{:.1}", limit.log2())))?
            }
            Precision::Compact => {
                let (mask, body) = COMPACT_OUTPUT_BITS;
                let std = model.std(params.input_body_bits, mask, body);
                (params.input_body_bits, mask, body, std)
            }
        };
        let predicted_exact_top_bits = top_bits_for_error(acc_bits, Z_EXACT * std / delta);
        let mut encodings = Encoding::all();
        let mut input_body_bits = input_body_bits;
        let mut std = std;
        if let Some((m, b_in)) =
            model.auto_outputs(in_features, input_body_bits, mask_bits, body_bits, delta)
        {
            encodings.push(Encoding::Auto { outputs: m });
            if b_in != input_body_bits {
                input_body_bits = b_in;
                std = model.std(b_in, mask_bits, body_bits);
            }
        }
        if precision == Precision::Compact && predicted_exact_top_bits < MIN_COMPACT_TOP_BITS {
            return Err(refuse(
                std,
                format!("at least {MIN_COMPACT_TOP_BITS} exact top bits"),
            ));
        }
        Ok(Self {
            precision,
            in_features,
            out_features,
            input_bits,
            weight_bits,
            acc_bits,
            input_body_bits,
            output_mask_bits: mask_bits,
            output_body_bits: body_bits,
            noise_std_log2: std.log2(),
            predicted_exact_top_bits,
            encodings,
        })
    }

    /// log2 of the predicted noise standard deviation of a request in `encoding`: the row model
    /// for every encoding it bounds, the automorphism model ([`auto_noise_variance`]) for
    /// automorphism requests.
    pub fn noise_std_log2_as(&self, encoding: Encoding) -> f64 {
        match encoding {
            Encoding::Auto { outputs } => self
                .auto_variance(outputs, self.auto_split_for(outputs))
                .sqrt()
                .log2(),
            _ => self.noise_std_log2,
        }
    }

    fn auto_variance(&self, m: u32, split: bool) -> f64 {
        let max_w = 2f64.powi(self.weight_bits as i32 - 1);
        auto_noise_variance(
            self.in_features as f64 * max_w * max_w,
            m,
            self.input_body_bits,
            self.output_mask_bits,
            self.output_body_bits,
            split,
        )
    }

    fn auto_split_for(&self, m: u32) -> bool {
        let limit = 2f64.powi(self.delta_log() as i32) / 2.0 / Z_EXACT;
        self.auto_variance(m, false).sqrt() >= limit
    }

    /// Whether this layer's automorphism products split each mask coefficient in two limbs (only
    /// where the plain products' FFT error does not fit the noise budget; see
    /// [`auto_noise_variance`]). Client and server derive it from the plan alike.
    pub fn auto_split(&self) -> bool {
        match self.auto_encoding() {
            Some(Encoding::Auto { outputs }) => self.auto_split_for(outputs),
            _ => false,
        }
    }

    /// A stored plan's automorphism encoding still fits this build's noise model with the plan's
    /// own wire widths (plans are compiled once and loaded by later builds: one compiled before
    /// the keyswitch parameters changed may not). `Err` names the layer's fix.
    pub fn check_auto(&self) -> Result<(), String> {
        let Some(Encoding::Auto { outputs }) = self.auto_encoding() else {
            return Ok(());
        };
        let limit = 2f64.powi(self.delta_log() as i32) / 2.0 / Z_EXACT;
        // Split products have the smaller variance: if they do not fit, nothing does.
        let std = self.auto_variance(outputs, true).sqrt();
        if self.precision == Precision::Exact && std < limit {
            return Ok(());
        }
        Err(format!(
            "its plan offers auto{outputs} requests with {}-bit input bodies, whose noise \
             (2^{:.2}) this build's automorphism keys no longer keep under 2^{:.2}: recompile \
             the model with this version",
            self.input_body_bits,
            std.log2(),
            limit.log2()
        ))
    }

    /// The automorphism encoding this layer offers, if any.
    pub fn auto_encoding(&self) -> Option<Encoding> {
        self.encodings
            .iter()
            .copied()
            .find(|e| matches!(e, Encoding::Auto { .. }))
    }

    pub fn packing(&self) -> PackingParams {
        packing_params(self.precision)
    }

    /// `log2 Δ`: where the accumulator's lowest bit sits in a 64-bit ciphertext coefficient.
    pub fn delta_log(&self) -> u32 {
        64 - self.acc_bits
    }

    /// Number of input GLWE ciphertexts per row (inner dimension chunks of `N`).
    pub fn chunks(&self) -> usize {
        self.in_features.div_ceil(INPUT_GLWE.polynomial_size)
    }

    /// Bytes per input value on the wire (bodies only; one 16-byte seed per request).
    pub fn input_bytes_per_value(&self) -> f64 {
        self.input_body_bits as f64 / 8.0
    }

    /// Bytes per output value on the wire for `rows` rows in the row encoding (masks amortised
    /// over each pack).
    pub fn output_bytes_per_value(&self, rows: usize) -> f64 {
        self.output_bytes_per_value_as(Encoding::Row, rows)
    }

    /// Bytes per output value on the wire for `rows` rows in `encoding`.
    pub fn output_bytes_per_value_as(&self, encoding: Encoding, rows: usize) -> f64 {
        let out = packing_params(self.precision).output;
        let total = rows * self.out_features;
        let n = INPUT_GLWE.polynomial_size;
        let (packs, mask_len) = match encoding {
            Encoding::Row => (total.div_ceil(out.polynomial_size), out.lwe_dimension()),
            Encoding::Blocked { rows: block } => {
                let width = n / block as usize;
                (
                    rows.div_ceil(block as usize) * self.out_features.div_ceil(width),
                    out.lwe_dimension(),
                )
            }
            Encoding::Slot => (
                rows.div_ceil(n) * self.out_features,
                INPUT_GLWE.lwe_dimension(),
            ),
            Encoding::Auto { outputs } => {
                let m = outputs as usize;
                (
                    (rows * self.out_features.div_ceil(m)).div_ceil(n / m),
                    out.lwe_dimension(),
                )
            }
        };
        let bits = packs * mask_len * self.output_mask_bits as usize
            + total * self.output_body_bits as usize;
        bits as f64 / 8.0 / total as f64
    }
}

/// Signed width of `Σ v·w` for `|v| ≤ 2^input_bits − 1`, `|w| ≤ 2^(weight_bits − 1)`.
pub fn accumulator_bits(input_bits: u32, weight_bits: u32, in_features: usize) -> u32 {
    let max_abs = ((1u128 << input_bits) - 1) * (1u128 << (weight_bits - 1)) * in_features as u128;
    128 - max_abs.leading_zeros() + 1
}

/// Leading accumulator bits guaranteed right when the error is at most `err` accumulator units.
pub fn top_bits_for_error(acc_bits: u32, err: f64) -> u32 {
    let err = err.round() as u64;
    acc_bits.saturating_sub(64 - err.leading_zeros())
}

struct NoiseModel {
    precision: Precision,
    w_norm2: f64,
}

impl NoiseModel {
    /// The automorphism encoding's outputs per product for this layer and the input body width
    /// it needs, if any fits (exact precision only): the largest `m` whose requests send at most
    /// `max(2N, 8·in)` bodies per row (`m` per input) and whose noise keeps every bit with the
    /// row plan's body width or up to [`AUTO_EXTRA_BODY_BITS`] more (a wider body shrinks the
    /// row model's noise too, so the plan stays valid for every encoding).
    fn auto_outputs(
        &self,
        in_features: usize,
        input_body_bits: u32,
        mask_bits: u32,
        body_bits: u32,
        delta: f64,
    ) -> Option<(u32, u32)> {
        if self.precision != Precision::Exact {
            return None;
        }
        let n = INPUT_GLWE.polynomial_size;
        let limit = delta / 2.0 / Z_EXACT;
        AUTO_OUTPUTS.iter().rev().copied().find_map(|m| {
            if m as usize * in_features > (2 * n).max(8 * in_features) {
                return None;
            }
            if in_features > MAX_AUTO_IN {
                return None;
            }
            [false, true].into_iter().find_map(|split| {
                (input_body_bits..=(input_body_bits + AUTO_EXTRA_BODY_BITS).min(56)).find_map(
                    |b_in| {
                        let v =
                            auto_noise_variance(self.w_norm2, m, b_in, mask_bits, body_bits, split);
                        (v.sqrt() < limit).then_some((m, b_in))
                    },
                )
            })
        })
    }

    fn std(&self, input_body_bits: u32, mask_bits: u32, body_bits: u32) -> f64 {
        let p = packing_params(self.precision);
        let n_in = INPUT_GLWE.lwe_dimension() as f64;
        let out = p.output;
        let n_pack = out.polynomial_size as f64;
        let levels = p.level_count as f64;
        let pow2 = |e: f64| 2f64.powf(e);

        let input = self.w_norm2
            * (INPUT_GLWE.noise_variance() + pow2(2.0 * (64 - input_body_bits) as f64) / 12.0);
        let product_fft = n_in / 2.0 * self.w_norm2 * (FFT_ERROR_FACTOR * pow2(11.0)).powi(2);
        let rounding = n_in / 2.0 * pow2(2.0 * (64.0 - (p.base_log as f64 * levels))) / 12.0;
        let digit_variance = (pow2(2.0 * p.base_log as f64) + 2.0) / 12.0;
        let key = n_in * levels * n_pack * digit_variance * out.noise_variance();
        let limb_rms = if p.fourier_limbs == 2 {
            pow2(LIMB_SPLIT as f64) / 12f64.sqrt()
        } else {
            pow2(64.0) / 12f64.sqrt()
        };
        let mask_weight = out.lwe_dimension() as f64 / 2.0;
        let packing_fft = (PACKING_FFT_ERROR_FACTOR
            * pow2(-53.0)
            * limb_rms
            * digit_variance.sqrt()
            * (n_in * levels * n_pack).sqrt())
        .powi(2)
            * (mask_weight + 1.0);
        let modswitch = pow2(2.0 * (64 - body_bits) as f64) / 12.0
            + mask_weight * pow2(2.0 * (64 - mask_bits) as f64) / 12.0;
        (MODEL_VARIANCE_MARGIN * (input + product_fft + rounding + key + packing_fft + modswitch))
            .sqrt()
    }
}

/// Noise variance of an automorphism-encoded output (`m` values per product, worst-case weight
/// rows of squared norm `w_norm2`), term by term, with [`MODEL_VARIANCE_MARGIN`] and
/// [`AUTO_VARIANCE_MARGIN`]:
///
/// | source | variance |
/// |---|---|
/// | input encryption (TUniform(3)) and body switch to `b_in` bits | `m·‖w‖² · (V(TUniform(3)) + 2^(2(64 − b_in))/12)` |
/// | f64 FFT error of the `k = 2` mask products | `k·N/2 · m·‖w‖² · (c · 2^11)²`, or `(c · 2^−21)²` split |
/// | switch of each product to `q·m/N` | `(N/m)²/12 · (1 + k·N/2)` |
/// | one keyswitch: decomposition rounding | `k·N/2 · 2^(2(64 − β·L))/12` |
/// | one keyswitch: key noise | `k·N · L · (2^(2β) + 2)/12 · V(TUniform(3))` |
/// | one keyswitch: f64 FFT error of the low limb | `(c' · 2^−53 · 2^42/√12 · rms(digit) · √(k·N·L))² · (k·N/2 + 1)` |
/// | the tree and trace, over the keyswitches | `((N/m)² − 1)/3 ×` one keyswitch |
/// | output modulus switch | as the row model |
///
/// Split products (`split`, chosen by [`LayerPlan::auto_split`] where the plain ones do not fit)
/// cut each mask coefficient as `hi·2^32 + lo` like the client's decryption does, at twice the
/// product's multiply-adds and inverse FFTs: the `hi` products are multiples of 2^32 computed with
/// an error below 2^31 (`c·2^11·‖W‖` of rms at most 2^27.5, with `‖W‖² = m·in·2^14 ≤ 2^29` for
/// `in ≤` [`MAX_AUTO_IN`], `m ≤ 8` there), so they round
/// exactly, and the product term becomes negligible.
///
/// Why `m·‖w‖²`: a product polynomial carries the weights of all `m` outputs, and every input
/// body coefficient (each input GLWE sends all `N`) meets one of them at each output. Why
/// `((N/m)² − 1)/3`: the outputs sit at coefficients every automorphism after the tree's first
/// level fixes, so noise added at step `j` of the `T = log2(N/m)` steps is summed with itself
/// `2^(T−j)` times (variance `×4^(T−j)`), and `Σ_j 4^(T−j) = (4^T − 1)/3`. This is where the
/// "~11 bits" of the automorphism packing go: `√((N/m)²/3) ≈ 2^10.2` for `m = 1`, `2^8.2` at
/// `m = 4`. The packing runs under the output key because its key noise, TUniform(3), is what
/// makes the keyswitch term small; under the input key (TUniform(17)) the key term alone would be
/// `2^28` times larger in variance.
pub fn auto_noise_variance(
    w_norm2: f64,
    m: u32,
    input_body_bits: u32,
    mask_bits: u32,
    body_bits: u32,
    split: bool,
) -> f64 {
    let a = auto_params();
    let out = a.output;
    let n = out.polynomial_size as f64;
    let kn = out.lwe_dimension() as f64;
    let m = m as f64;
    let pow2 = |e: f64| 2f64.powf(e);
    let w = m * w_norm2;
    let input = w * (out.noise_variance() + pow2(2.0 * (64 - input_body_bits) as f64) / 12.0);
    // Split products: the `hi` limb's products are rounded to exact multiples of 2^32, the `lo`
    // limb's carry the f64 error of 32-bit values (`2^32 · 2^−53 = 2^−21`) instead of 64-bit ones.
    let product_scale = if split { pow2(-21.0) } else { pow2(11.0) };
    let product_fft = kn / 2.0 * w * (FFT_ERROR_FACTOR * product_scale).powi(2);
    let switch = (n / m).powi(2) / 12.0 * (1.0 + kn / 2.0);
    let levels = a.level_count as f64;
    let rounding = kn / 2.0 * pow2(2.0 * (64.0 - a.base_log as f64 * levels)) / 12.0;
    let digit_variance = (pow2(2.0 * a.base_log as f64) + 2.0) / 12.0;
    let key = kn * levels * digit_variance * out.noise_variance();
    let fft = (PACKING_FFT_ERROR_FACTOR * pow2(-53.0) * pow2(LIMB_SPLIT as f64) / 12f64.sqrt()
        * digit_variance.sqrt()
        * (kn * levels).sqrt())
    .powi(2)
        * (kn / 2.0 + 1.0);
    let tree = ((n / m).powi(2) - 1.0) / 3.0 * (rounding + key + fft);
    let modswitch = pow2(2.0 * (64 - body_bits) as f64) / 12.0
        + kn / 2.0 * pow2(2.0 * (64 - mask_bits) as f64) / 12.0;
    AUTO_VARIANCE_MARGIN * MODEL_VARIANCE_MARGIN * (input + product_fft + switch + tree + modswitch)
}

/// Extra variance margin of the automorphism model: with the row model's margin alone, the
/// measured σ came within 0.15 bit of it (auto16, 1×64→8192, full-scale weights and inputs),
/// too close for the key-to-key spread; ×2 (+0.5 bit of σ) keeps it a bound.
const AUTO_VARIANCE_MARGIN: f64 = 2.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulator_of_8_bit_by_8_bit_by_2048_is_27_bits() {
        assert_eq!(accumulator_bits(8, 8, 2048), 27);
        assert_eq!(accumulator_bits(8, 8, 1), 16);
    }

    #[test]
    fn exact_plan_for_2048_square_fits_the_wire_targets() {
        let plan = LayerPlan::new("fc", Precision::Exact, 2048, 2048, 8, 8).unwrap();
        assert!(plan.input_bytes_per_value() <= 6.0, "{plan:?}");
        assert!(plan.output_bytes_per_value(1) <= 14.0, "{plan:?}");
        assert_eq!(plan.predicted_exact_top_bits, plan.acc_bits);
    }

    #[test]
    fn compact_plan_for_2048_square_fits_the_wire_targets() {
        let plan = LayerPlan::new("fc", Precision::Compact, 2048, 2048, 8, 8).unwrap();
        assert!(plan.input_bytes_per_value() <= 5.0, "{plan:?}");
        assert!(plan.output_bytes_per_value(1) <= 7.0, "{plan:?}");
        assert!(plan.predicted_exact_top_bits > 12, "{plan:?}");
    }

    #[test]
    fn a_layer_whose_accumulator_cannot_fit_is_refused_with_its_name() {
        let err = LayerPlan::new("encoder.huge", Precision::Exact, 65536, 8, 16, 8).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("encoder.huge") && msg.contains("noise budget"),
            "{msg}"
        );
    }
}
