//! A response: the layer's `rows × out` accumulators packed into few GLWE ciphertexts,
//! modulus-switched and bit-packed. Each pack sends its full mask (`mask_len` values of
//! `mask_bits`) and only the body coefficients that hold outputs (`body_bits` each); which pack
//! and coefficient holds output `(r, j)` is its encoding's layout.

use serde::{Deserialize, Serialize};

use super::{scheme, MAX_ROWS};
use crate::fhe::bitpack::packed_len;
use crate::fhe::codec::{CodecError, Wire};
use crate::fhe::params::{
    Encoding, LayerPlan, Precision, AUTO_OUTPUTS, BLOCK_ROWS, MAX_OUT_FEATURES,
};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EncryptedOutputs {
    pub precision: Precision,
    pub rows: u32,
    pub out_features: u32,
    pub mask_bits: u8,
    pub body_bits: u8,
    #[serde(with = "serde_bytes")]
    pub masks: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub bodies: Vec<u8>,
    /// The request's encoding, which fixes where each output sits (see `blocked.rs`).
    #[serde(default)]
    pub encoding: Encoding,
}

impl EncryptedOutputs {
    /// The response of `plan`'s layer to `rows` rows in `encoding`, from its bit-packed masks and
    /// bodies (what every engine returns).
    pub(super) fn of_plan(
        plan: &LayerPlan,
        rows: usize,
        encoding: Encoding,
        masks: Vec<u8>,
        bodies: Vec<u8>,
    ) -> Self {
        Self {
            precision: plan.precision,
            rows: rows as u32,
            out_features: plan.out_features as u32,
            mask_bits: plan.output_mask_bits as u8,
            body_bits: plan.output_body_bits as u8,
            masks,
            bodies,
            encoding,
        }
    }

    pub fn values(&self) -> usize {
        self.rows as usize * self.out_features as usize
    }

    pub fn packs(&self) -> usize {
        scheme(self.encoding).packs(
            self.precision,
            self.rows as usize,
            self.out_features as usize,
        )
    }

    /// Mask coefficients per output ciphertext: the output key's, or the input key's for slot
    /// outputs (they are never keyswitched).
    pub fn mask_len(&self) -> usize {
        scheme(self.encoding).mask_len(self.precision)
    }

    pub fn wire_len(&self) -> usize {
        self.masks.len() + self.bodies.len()
    }
}

impl Wire for EncryptedOutputs {
    const KIND: u8 = 3;
    const NAME: &'static str = "encrypted outputs";
    const VERSION: u16 = 1;

    fn validate(&self) -> Result<(), CodecError> {
        let (rows, out) = (self.rows as usize, self.out_features as usize);
        if !(1..=MAX_ROWS).contains(&rows) || !(1..=MAX_OUT_FEATURES).contains(&out) {
            return Err(CodecError::invalid::<Self>(format!(
                "shape {rows}×{out} outside 1..={MAX_ROWS} × 1..={MAX_OUT_FEATURES}"
            )));
        }
        if !(1..=64).contains(&self.mask_bits) || !(1..=64).contains(&self.body_bits) {
            return Err(CodecError::invalid::<Self>(format!(
                "widths of {}/{} bits",
                self.mask_bits, self.body_bits
            )));
        }
        if let Encoding::Blocked { rows } = self.encoding {
            if !BLOCK_ROWS.contains(&rows) {
                return Err(CodecError::invalid::<Self>(format!(
                    "blocks of {rows} rows (this build offers {BLOCK_ROWS:?})"
                )));
            }
        }
        if let Encoding::Auto { outputs } = self.encoding {
            if !AUTO_OUTPUTS.contains(&outputs) || self.precision != Precision::Exact {
                return Err(CodecError::invalid::<Self>(format!(
                    "automorphism outputs of {outputs} per product at {} precision",
                    self.precision
                )));
            }
        }
        let want_masks = packed_len(self.packs() * self.mask_len(), self.mask_bits as u32);
        let want_bodies = packed_len(self.values(), self.body_bits as u32);
        if self.masks.len() != want_masks || self.bodies.len() != want_bodies {
            return Err(CodecError::invalid::<Self>(format!(
                "expected {want_masks} mask and {want_bodies} body bytes, got {} and {}",
                self.masks.len(),
                self.bodies.len()
            )));
        }
        Ok(())
    }
}

/// Signed rounding of a phase to the nearest multiple of `2^delta_log`.
pub fn decode(phase: u64, delta_log: u32) -> i64 {
    let rounded = phase.wrapping_add(1u64 << (delta_log - 1));
    (rounded as i64) >> delta_log
}
