//! Encrypted input rows: seeded GLWE ciphertexts under the input key, of which only the
//! modulus-switched, bit-packed bodies travel.
//!
//! Row `r` is cut into `⌈in/N⌉` chunks; chunk `c` is the plaintext polynomial
//! `Σ_i v_{r, cN+i} · Δ · X^i`. Body coefficients past the chunk's last value are not sent: the
//! server multiplies them by zero weights.

use serde::{Deserialize, Serialize};
use tfhe::core_crypto::prelude::new_seeder;

use super::bitpack::{pack_top_bits, packed_len};
use super::codec::{CodecError, Wire};
use super::keys::ClientKey;
use super::params::{
    Encoding, LayerPlan, Precision, AUTO_OUTPUTS, BLOCK_ROWS, INPUT_GLWE, MAX_IN_FEATURES,
};
use super::seeded::encrypt;
use super::FheError;

/// Most rows one request may carry: bounds the masks the server regenerates per call.
pub const MAX_ROWS: usize = 4096;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EncryptedRows {
    pub rows: u32,
    pub in_features: u32,
    pub body_bits: u8,
    /// 16-byte seed of every mask in this request.
    #[serde(with = "serde_bytes")]
    pub seed: Vec<u8>,
    /// `rows × in_features` bodies of `body_bits` bits each, row-major in every encoding.
    #[serde(with = "serde_bytes")]
    pub bodies: Vec<u8>,
    /// How the rows sit in ciphertexts (requests made before encodings existed are rows).
    #[serde(default)]
    pub encoding: Encoding,
}

impl EncryptedRows {
    pub fn seed(&self) -> u128 {
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&self.seed);
        u128::from_le_bytes(bytes)
    }

    pub fn wire_len(&self) -> usize {
        self.seed.len() + self.bodies.len()
    }
}

impl Wire for EncryptedRows {
    const KIND: u8 = 2;
    const NAME: &'static str = "encrypted rows";
    const VERSION: u16 = 1;

    fn validate(&self) -> Result<(), CodecError> {
        let (rows, cols) = (self.rows as usize, self.in_features as usize);
        if !(1..=MAX_ROWS).contains(&rows) {
            return Err(CodecError::invalid::<Self>(format!(
                "{rows} rows, expected 1..={MAX_ROWS}"
            )));
        }
        if !(1..=MAX_IN_FEATURES).contains(&cols) {
            return Err(CodecError::invalid::<Self>(format!(
                "{cols} input features, expected 1..={MAX_IN_FEATURES}"
            )));
        }
        if !(1..=64).contains(&self.body_bits) {
            return Err(CodecError::invalid::<Self>(format!(
                "body width of {} bits",
                self.body_bits
            )));
        }
        if self.seed.len() != 16 {
            return Err(CodecError::invalid::<Self>(format!(
                "seed of {} bytes, expected 16",
                self.seed.len()
            )));
        }
        if let Encoding::Blocked { rows: block } = self.encoding {
            if !BLOCK_ROWS.contains(&block) {
                return Err(CodecError::invalid::<Self>(format!(
                    "blocks of {block} rows (this build offers {BLOCK_ROWS:?})"
                )));
            }
        }
        if let Encoding::Auto { outputs } = self.encoding {
            if !AUTO_OUTPUTS.contains(&outputs) {
                return Err(CodecError::invalid::<Self>(format!(
                    "{outputs} outputs per product (this build offers {AUTO_OUTPUTS:?})"
                )));
            }
        }
        let want = packed_len(
            self.encoding.input_bodies(rows, cols),
            self.body_bits as u32,
        );
        if self.bodies.len() != want {
            return Err(CodecError::invalid::<Self>(format!(
                "{} body bytes for {rows}×{cols} values of {} bits, expected {want}",
                self.bodies.len(),
                self.body_bits
            )));
        }
        Ok(())
    }
}

fn n_slot() -> usize {
    INPUT_GLWE.polynomial_size
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
        if let Encoding::Blocked { rows: block } = encoding {
            if !BLOCK_ROWS.contains(&block) {
                return Err(FheError::ParameterMismatch(format!(
                    "blocks of {block} rows (this build offers {BLOCK_ROWS:?})"
                )));
            }
            return Ok(self.encrypt_blocked(plan, values, rows, block as usize, encoding));
        }
        if encoding == Encoding::Slot {
            return Ok(self.encrypt_blocked(plan, values, rows, n_slot(), encoding));
        }
        if let Encoding::Auto { outputs } = encoding {
            if !AUTO_OUTPUTS.contains(&outputs) || plan.precision != Precision::Exact {
                return Err(FheError::ParameterMismatch(format!(
                    "automorphism requests of {outputs} outputs per product at {} precision \
                     (this build offers {AUTO_OUTPUTS:?}, exact precision only)",
                    plan.precision
                )));
            }
            return Ok(self.encrypt_auto(plan, values, rows, outputs as usize));
        }
        let n = INPUT_GLWE.polynomial_size;
        let chunks = plan.chunks();
        let delta_log = plan.delta_log();
        let mut plain = vec![0u64; rows * chunks * n];
        for (r, row) in values.chunks_exact(cols).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                let (c, k) = (i / n, i % n);
                plain[(r * chunks + c) * n + k] = (v as i64 as u64) << delta_log;
            }
        }
        let seed = new_seeder().seed().0;
        let bodies = &encrypt(&self.input, INPUT_GLWE, &plain, seed);
        let sent = (0..rows)
            .flat_map(|r| (0..cols).map(move |i| bodies[(r * chunks + i / n) * n + i % n]));
        let mut packed = Vec::with_capacity(packed_len(rows * cols, plan.input_body_bits));
        pack_top_bits(sent, plan.input_body_bits, &mut packed);
        Ok(EncryptedRows {
            rows: rows as u32,
            in_features: cols as u32,
            body_bits: plan.input_body_bits as u8,
            seed: seed.to_le_bytes().to_vec(),
            bodies: packed,
            encoding: Encoding::Row,
        })
    }
}
