//! The encodings of an encrypted linear layer: where a request's values sit in ciphertexts, how
//! the server evaluates it, and where the response's outputs sit. Each encoding is one file and
//! one [`Scheme`]; everything else (the layer, the client's encryption and decryption, the wire
//! checks of a response) reaches them through [`scheme`], so adding an encoding touches this
//! file's dispatch and its own file only.
//!
//! | encoding | file | request | packing | key it needs |
//! |---|---|---|---|---|
//! | `row` | `row.rs` | one GLWE per `N` features of a row | one LWE per output, LWE → GLWE keyswitch | row key |
//! | `blocked{R}` | `blocked.rs` | `R` rows per GLWE | per-output-group GLWE keyswitch | block key for `R` |
//! | `slot` | `slot.rs` | one feature of `N` rows per GLWE | none (scalar combinations) | none |
//! | `auto{m}` | `auto.rs` | `N/m` features per GLWE, `m` outputs per product | ring automorphisms | automorphism keys |
//!
//! The wire types live here too (`request.rs`, `response.rs`): a response's length depends on
//! its encoding's layout. Nothing in this package depends on the modules that use it (`chain`,
//! the crate's serving layers), and the key and seed modules it uses do not depend on it.

mod auto;
mod blocked;
mod request;
mod response;
mod row;
mod slot;

pub use auto::AutoLayout;
pub use blocked::{BlockLayout, CIPHERTEXTS_PER_SEED};
pub use request::{EncryptedRows, MAX_ROWS};
pub use response::{decode, EncryptedOutputs};
pub(in crate::fhe) use row::pack_lwes;
pub use row::{digit_bytes_per_output, outputs_per_group, DEFAULT_JOB_BYTES};

use super::bitpack::unpack_top_bits;
use super::codec::Wire;
use super::keys::ClientKey;
use super::params::{packing_params, Encoding, LayerPlan, Precision, AUTO_OUTPUTS, BLOCK_ROWS};
use super::session_key::SessionKey;
use super::FheError;

/// What an encoding defines, on both sides of the wire.
pub(super) trait Scheme {
    /// Client: `rows` rows of centred codes (checked by the caller), encrypted for this layout.
    fn encrypt(
        &self,
        key: &ClientKey,
        plan: &LayerPlan,
        values: &[i32],
        rows: usize,
    ) -> EncryptedRows;

    /// Server: the response to a request checked against the layer and the session's key.
    fn evaluate(
        &self,
        layer: &FourierLinearLayer,
        key: &SessionKey,
        input: &EncryptedRows,
        max_job_bytes: usize,
    ) -> Result<EncryptedOutputs, FheError>;

    /// Output ciphertexts of a `rows × out` response.
    fn packs(&self, precision: Precision, rows: usize, out: usize) -> usize;

    /// Mask coefficients per output ciphertext: the output key's, unless the encoding answers
    /// under another key.
    fn mask_len(&self, precision: Precision) -> usize {
        packing_params(precision).output.lwe_dimension()
    }

    /// Client: the phases of a checked response, row-major `rows × out`, from its unpacked
    /// masks (`packs × mask_len`) and bodies (one per output, in wire order).
    fn phases(
        &self,
        key: &ClientKey,
        outputs: &EncryptedOutputs,
        masks: Vec<u64>,
        bodies: Vec<u64>,
    ) -> Vec<u64>;
}

/// The scheme of an encoding (its parameters checked where the encoding came from: the wire
/// types' `validate`, or [`ClientKey::encrypt_rows_as`]).
pub(super) fn scheme(encoding: Encoding) -> Box<dyn Scheme> {
    match encoding {
        Encoding::Row => Box::new(row::Row),
        Encoding::Blocked { rows } => Box::new(blocked::Blocked {
            block: rows as usize,
        }),
        Encoding::Slot => Box::new(slot::Slot),
        Encoding::Auto { outputs } => Box::new(auto::Auto {
            m: outputs as usize,
        }),
    }
}

/// A linear layer ready to evaluate: plan, weight codes and their Fourier transforms.
pub struct FourierLinearLayer {
    pub(super) plan: LayerPlan,
    pub(super) codes: Vec<i8>,
    /// `[j][chunk][N]` split Fourier polynomials of the reversed weight rows (`row.rs`).
    weights_f: Vec<f64>,
    /// The automorphism encoding's outputs per product and weight polynomials (`auto.rs`), for
    /// plans that offer it.
    auto_f: Option<(u32, Vec<f64>)>,
}

impl FourierLinearLayer {
    /// Check the weights against the plan and transform them (parallel, on the current rayon pool).
    pub fn new(plan: LayerPlan, codes: &[i8]) -> Result<Self, FheError> {
        let (out, cols) = (plan.out_features, plan.in_features);
        if codes.len() != out * cols {
            return Err(FheError::Shape(format!(
                "{} weight codes for a {out}×{cols} layer",
                codes.len()
            )));
        }
        let half = 1i32 << (plan.weight_bits - 1);
        if let Some(w) = codes
            .iter()
            .find(|&&w| !(-half..half).contains(&(w as i32)))
        {
            return Err(FheError::ValueOutOfRange(format!(
                "weight code {w} does not fit {} bits",
                plan.weight_bits
            )));
        }
        let weights_f = row::weights(&plan, codes);
        let auto_f = plan.encodings.iter().find_map(|e| match e {
            Encoding::Auto { outputs } => {
                Some((*outputs, auto::weights(&plan, codes, *outputs as usize)))
            }
            _ => None,
        });
        Ok(Self {
            plan,
            codes: codes.to_vec(),
            weights_f,
            auto_f,
        })
    }

    pub fn plan(&self) -> &LayerPlan {
        &self.plan
    }

    /// Evaluate on the current rayon pool (`pool.install(|| layer.evaluate(..))` bounds threads),
    /// with the default working-memory budget ([`DEFAULT_JOB_BYTES`]).
    pub fn evaluate(
        &self,
        key: &SessionKey,
        input: &EncryptedRows,
    ) -> Result<EncryptedOutputs, FheError> {
        self.evaluate_within(key, input, DEFAULT_JOB_BYTES)
    }

    /// Evaluate with at most about `max_job_bytes` of working memory (digit buffers, product
    /// accumulators), whatever the row count: each encoding cuts its work to fit.
    pub fn evaluate_within(
        &self,
        key: &SessionKey,
        input: &EncryptedRows,
        max_job_bytes: usize,
    ) -> Result<EncryptedOutputs, FheError> {
        self.check_request(key, input)?;
        scheme(input.encoding).evaluate(self, key, input, max_job_bytes)
    }

    /// The request and key fit this layer's plan (shape, wire widths, precision, encoding).
    pub(super) fn check_request(
        &self,
        key: &SessionKey,
        input: &EncryptedRows,
    ) -> Result<(), FheError> {
        let plan = &self.plan;
        input.validate()?;
        if input.in_features as usize != plan.in_features {
            return Err(FheError::Shape(format!(
                "rows have {} inputs, the layer takes {}",
                input.in_features, plan.in_features
            )));
        }
        if input.body_bits as u32 != plan.input_body_bits {
            return Err(FheError::ParameterMismatch(format!(
                "rows carry {}-bit bodies, the layer expects {}",
                input.body_bits, plan.input_body_bits
            )));
        }
        if key.precision != plan.precision {
            return Err(FheError::ParameterMismatch(format!(
                "the session's key is for {} precision, the layer is {}",
                key.precision, plan.precision
            )));
        }
        if !input.encoding.served_by(key.profile) {
            return Err(FheError::ParameterMismatch(format!(
                "the session's key is {} (automorphism keys only, no LWE packing key): {} \
                 requests need a full key; send auto or slot requests, or open a session with \
                 a full key",
                key.profile, input.encoding
            )));
        }
        if !plan.encodings.contains(&input.encoding) {
            return Err(FheError::ParameterMismatch(format!(
                "the layer accepts {:?} requests, not {}",
                plan.encodings
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>(),
                input.encoding
            )));
        }
        Ok(())
    }

    /// The request's bodies at their wire width (`< 2^body_bits`), row-major: integer dot
    /// products with the weights are then exact in `i64`.
    fn input_bodies(&self, input: &EncryptedRows) -> Vec<u64> {
        let plan = &self.plan;
        let shift = 64 - plan.input_body_bits;
        unpack_top_bits(
            &input.bodies,
            input.rows as usize * plan.in_features,
            plan.input_body_bits,
        )
        .map(|b| b >> shift)
        .collect()
    }
}

impl ClientKey {
    /// Encrypt `rows` rows of centred input codes (row-major, `plan.in_features` each) in the
    /// encoding the planner picks for that many rows ([`Encoding::choose`]).
    pub fn encrypt_rows(
        &self,
        plan: &LayerPlan,
        values: &[i32],
        rows: usize,
    ) -> Result<EncryptedRows, FheError> {
        self.encrypt_rows_as(plan, values, rows, Encoding::choose(plan, rows))
    }

    /// [`ClientKey::encrypt_rows`] in a given encoding.
    pub fn encrypt_rows_as(
        &self,
        plan: &LayerPlan,
        values: &[i32],
        rows: usize,
        encoding: Encoding,
    ) -> Result<EncryptedRows, FheError> {
        let cols = plan.in_features;
        if rows == 0 || rows > MAX_ROWS || values.len() != rows * cols {
            return Err(FheError::Shape(format!(
                "{} values for {rows} rows of {cols} inputs (1..={MAX_ROWS} rows per request)",
                values.len()
            )));
        }
        let limit = (1i64 << plan.input_bits) - 1;
        if let Some(v) = values.iter().find(|v| (**v as i64).abs() > limit) {
            return Err(FheError::ValueOutOfRange(format!(
                "input code {v} does not fit {} bits (|v| ≤ {limit})",
                plan.input_bits
            )));
        }
        match encoding {
            Encoding::Blocked { rows: block } if !BLOCK_ROWS.contains(&block) => {
                return Err(FheError::ParameterMismatch(format!(
                    "blocks of {block} rows (this build offers {BLOCK_ROWS:?})"
                )));
            }
            Encoding::Auto { outputs }
                if !AUTO_OUTPUTS.contains(&outputs) || plan.precision != Precision::Exact =>
            {
                return Err(FheError::ParameterMismatch(format!(
                    "automorphism requests of {outputs} outputs per product at {} precision \
                     (this build offers {AUTO_OUTPUTS:?}, exact precision only)",
                    plan.precision
                )));
            }
            _ => {}
        }
        Ok(scheme(encoding).encrypt(self, plan, values, rows))
    }

    /// Decrypt to the raw 64-bit phases (`acc·Δ + noise`), row-major `rows × out`.
    pub fn decrypt_phases(
        &self,
        plan: &LayerPlan,
        outputs: &EncryptedOutputs,
    ) -> Result<Vec<u64>, FheError> {
        outputs.validate()?;
        if outputs.precision != plan.precision
            || outputs.out_features as usize != plan.out_features
            || outputs.mask_bits as u32 != plan.output_mask_bits
            || outputs.body_bits as u32 != plan.output_body_bits
        {
            return Err(FheError::ParameterMismatch(format!(
                "outputs are {} precision, {} features, {}/{} bits; the layer expects {}, {}, {}/{}",
                outputs.precision,
                outputs.out_features,
                outputs.mask_bits,
                outputs.body_bits,
                plan.precision,
                plan.out_features,
                plan.output_mask_bits,
                plan.output_body_bits
            )));
        }
        let masks = unpack_top_bits(
            &outputs.masks,
            outputs.packs() * outputs.mask_len(),
            plan.output_mask_bits,
        )
        .collect();
        let bodies =
            unpack_top_bits(&outputs.bodies, outputs.values(), plan.output_body_bits).collect();
        Ok(scheme(outputs.encoding).phases(self, outputs, masks, bodies))
    }

    /// Decrypt and decode the signed accumulators `Σ v·w`, row-major `rows × out`.
    pub fn decrypt_outputs(
        &self,
        plan: &LayerPlan,
        outputs: &EncryptedOutputs,
    ) -> Result<Vec<i64>, FheError> {
        let phases = self.decrypt_phases(plan, outputs)?;
        Ok(phases
            .iter()
            .map(|&p| decode(p, plan.delta_log()))
            .collect())
    }
}

/// `Σ b_i·w_i mod 2^64`, scaled back to the torus, for bodies of `bits` bits. Up to 62 bits the
/// bodies are split in two halves of at most 31 bits so that the products vectorise as
/// 32×32→64 multiplies.
pub(super) fn body_dot(bodies: &[u64], weights: &[i8], bits: u32) -> u64 {
    if bits > 62 {
        let sum = bodies.iter().zip(weights).fold(0u64, |s, (&b, &w)| {
            s.wrapping_add(b.wrapping_mul(w as i64 as u64))
        });
        return sum << (64 - bits);
    }
    let half = bits.div_ceil(2);
    let mask = (1u64 << half) - 1;
    let (mut lo, mut hi) = (0i64, 0i64);
    for (&b, &w) in bodies.iter().zip(weights) {
        lo = lo.wrapping_add(((b & mask) as i32 as i64) * w as i64);
        hi = hi.wrapping_add(((b >> half) as i32 as i64) * w as i64);
    }
    ((hi as u64) << half).wrapping_add(lo as u64) << (64 - bits)
}
