//! Encrypted outputs: the layer's `rows × out` accumulators packed into few GLWE ciphertexts under
//! the precision's output key, modulus-switched and bit-packed.
//!
//! Output `(r, j)` has index `g = j·rows + r` (column-major, so the server reads each weight row
//! once per call) and sits in pack `g / N_out`, coefficient `g % N_out`. Each pack sends its
//! full mask (`k_out·N_out` values of `mask_bits`) and only the body coefficients that hold
//! outputs (`body_bits` each).

use serde::{Deserialize, Serialize};
use tfhe::core_crypto::prelude::{
    decrypt_glwe_ciphertext, CiphertextModulus, GlweCiphertext, PlaintextList, PolynomialSize,
};

use super::bitpack::{packed_len, unpack_top_bits};
use super::codec::{CodecError, Wire};
use super::encrypted_rows::MAX_ROWS;
use super::keys::ClientKey;
use super::blocked::{blocked_phases, BlockLayout};
use super::params::{packing_params, Encoding, LayerPlan, Precision, BLOCK_ROWS, MAX_OUT_FEATURES};
use super::FheError;

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
    pub fn values(&self) -> usize {
        self.rows as usize * self.out_features as usize
    }

    pub fn packs(&self) -> usize {
        let n = packing_params(self.precision).output.polynomial_size;
        match self.encoding {
            Encoding::Row => self.values().div_ceil(n),
            Encoding::Blocked { rows } => {
                BlockLayout::new(rows as usize, self.rows as usize, 1, self.out_features as usize)
                    .packs()
            }
        }
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
        let shape = packing_params(self.precision).output;
        let want_masks = packed_len(self.packs() * shape.lwe_dimension(), self.mask_bits as u32);
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

impl ClientKey {
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
        let shape = packing_params(plan.precision).output;
        let (k, n) = (shape.glwe_dimension, shape.polynomial_size);
        let total = outputs.values();
        let mut masks = unpack_top_bits(
            &outputs.masks,
            outputs.packs() * k * n,
            plan.output_mask_bits,
        );
        let mut bodies = unpack_top_bits(&outputs.bodies, total, plan.output_body_bits);
        let key = self.output_key(plan.precision);
        if let Encoding::Blocked { rows: block } = outputs.encoding {
            let mut plain = PlaintextList::new(0u64, tfhe::core_crypto::prelude::PlaintextCount(n));
            let mut decrypt = |glwe: &[u64]| {
                let ct = GlweCiphertext::from_container(
                    glwe,
                    PolynomialSize(n),
                    CiphertextModulus::new_native(),
                );
                decrypt_glwe_ciphertext(key, &ct, &mut plain);
                plain.as_ref().to_vec()
            };
            return Ok(blocked_phases(
                outputs,
                block as usize,
                &mut masks,
                &mut bodies,
                &mut decrypt,
                k,
            ));
        }
        let mut phases = Vec::with_capacity(total);
        let mut glwe = vec![0u64; (k + 1) * n];
        let mut plain = PlaintextList::new(0u64, tfhe::core_crypto::prelude::PlaintextCount(n));
        for p in 0..outputs.packs() {
            let count = n.min(total - p * n);
            for (slot, m) in glwe[..k * n].iter_mut().zip(&mut masks) {
                *slot = m;
            }
            let body = &mut glwe[k * n..];
            body.fill(0);
            for (slot, b) in body[..count].iter_mut().zip(&mut bodies) {
                *slot = b;
            }
            let ct = GlweCiphertext::from_container(
                &glwe[..],
                PolynomialSize(n),
                CiphertextModulus::new_native(),
            );
            decrypt_glwe_ciphertext(key, &ct, &mut plain);
            phases.extend_from_slice(&plain.as_ref()[..count]);
        }
        // Column-major on the wire, row-major for the caller.
        let rows = outputs.rows as usize;
        let out = outputs.out_features as usize;
        Ok((0..total)
            .map(|k| phases[(k % out) * rows + k / out])
            .collect())
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

/// Signed rounding of a phase to the nearest multiple of `2^delta_log`.
pub fn decode(phase: u64, delta_log: u32) -> i64 {
    let rounded = phase.wrapping_add(1u64 << (delta_log - 1));
    (rounded as i64) >> delta_log
}
