//! Encrypted outputs: the layer's `rows × out` accumulators packed into few GLWE ciphertexts under
//! the precision's output key, modulus-switched and bit-packed.
//!
//! Output `(r, j)` has index `g = j·rows + r` (column-major, so the server reads each weight row
//! once per call) and sits in pack `g / N_out`, coefficient `g % N_out`. Each pack sends its
//! full mask (`k_out·N_out` values of `mask_bits`) and only the body coefficients that hold
//! outputs (`body_bits` each).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tfhe::core_crypto::prelude::GlweSecretKeyOwned;

use super::auto::{auto_phases, AutoLayout};
use super::bitpack::{packed_len, unpack_top_bits};
use super::blocked::{blocked_phases, BlockLayout};
use super::codec::{CodecError, Wire};
use super::encrypted_rows::MAX_ROWS;
use super::fourier::{mul_add, FourierContext};
use super::keys::ClientKey;
use super::params::{
    packing_params, Encoding, LayerPlan, Precision, AUTO_OUTPUTS, BLOCK_ROWS, INPUT_GLWE,
    MAX_OUT_FEATURES,
};
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
        let n = packing_params(self.precision).output.polynomial_size;
        match self.encoding {
            Encoding::Row => self.values().div_ceil(n),
            Encoding::Blocked { rows } => BlockLayout::new(
                rows as usize,
                self.rows as usize,
                1,
                self.out_features as usize,
            )
            .packs(),
            Encoding::Slot => BlockLayout::new(
                INPUT_GLWE.polynomial_size,
                self.rows as usize,
                1,
                self.out_features as usize,
            )
            .packs(),
            Encoding::Auto { outputs } => AutoLayout::new(
                outputs as usize,
                self.rows as usize,
                1,
                self.out_features as usize,
            )
            .packs(),
        }
    }

    /// Mask coefficients per output ciphertext: the output key's, or the input key's for slot
    /// outputs (they are never keyswitched).
    pub fn mask_len(&self) -> usize {
        match self.encoding {
            Encoding::Slot => INPUT_GLWE.lwe_dimension(),
            _ => packing_params(self.precision).output.lwe_dimension(),
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
            outputs.packs() * outputs.mask_len(),
            plan.output_mask_bits,
        );
        let mut bodies = unpack_top_bits(&outputs.bodies, total, plan.output_body_bits);
        let (key, block, k) = match outputs.encoding {
            Encoding::Auto { outputs: m } => {
                let key = self.output_key(plan.precision);
                let decrypt = |glwes: &[u64]| decrypt_all(key, k, n, glwes);
                let phases = auto_phases(outputs, m as usize, &mut masks, &mut bodies, &decrypt);
                return Ok(phases);
            }
            Encoding::Row => (self.output_key(plan.precision), 0, k),
            Encoding::Blocked { rows } => (self.output_key(plan.precision), rows as usize, k),
            Encoding::Slot => (&self.input, n, INPUT_GLWE.glwe_dimension),
        };
        let decrypt = |glwes: &[u64]| decrypt_all(key, k, n, glwes);
        if block > 0 {
            return Ok(blocked_phases(
                outputs,
                block,
                &mut masks,
                &mut bodies,
                &decrypt,
                k,
            ));
        }
        let packs = outputs.packs();
        let mut glwes = vec![0u64; packs * (k + 1) * n];
        for (p, glwe) in glwes.chunks_exact_mut((k + 1) * n).enumerate() {
            let count = n.min(total - p * n);
            for (slot, m) in glwe[..k * n].iter_mut().zip(&mut masks) {
                *slot = m;
            }
            for (slot, b) in glwe[k * n..k * n + count].iter_mut().zip(&mut bodies) {
                *slot = b;
            }
        }
        let phases = decrypt(&glwes);
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

/// Phases `body − ⟨mask, s⟩` of GLWEs `(k+1)·n` coefficients each (masks first), `n` per
/// ciphertext, in parallel, exactly. The mask products run through the f64 FFT with each mask
/// coefficient split as `hi·2^32 + lo` (`lo` signed): the `lo` products are below 2^43 and come
/// back exact, the `hi` products are multiples of 2^32 computed with an error near 2^17, so
/// rounding them to one is exact (the packing key's two-limb argument, `packing.rs`).
pub(super) fn decrypt_all(
    key: &GlweSecretKeyOwned<u64>,
    k: usize,
    n: usize,
    glwes: &[u64],
) -> Vec<u64> {
    const SPLIT: u32 = 32;
    let mut ctx = FourierContext::new(n);
    let key_f: Vec<Vec<f64>> = key
        .as_ref()
        .chunks_exact(n)
        .map(|s| {
            let mut f = vec![0f64; n];
            ctx.forward_integer(s, &mut f);
            f
        })
        .collect();
    assert_eq!(key_f.len(), k, "a key of k polynomials");
    let mut phases = vec![0u64; glwes.len() / (k + 1)];
    struct Scratch {
        ctx: FourierContext,
        limb: Vec<u64>,
        limb_f: Vec<f64>,
        hi: Vec<f64>,
        lo: Vec<f64>,
        product: Vec<u64>,
    }
    phases
        .par_chunks_mut(n)
        .zip(glwes.par_chunks(n * (k + 1)))
        .for_each_init(
            || Scratch {
                ctx: FourierContext::new(n),
                limb: vec![0u64; n],
                limb_f: vec![0f64; n],
                hi: vec![0f64; n],
                lo: vec![0f64; n],
                product: vec![0u64; n],
            },
            |s, (phase, glwe)| {
                s.hi.fill(0.0);
                s.lo.fill(0.0);
                for (q, key_q) in key_f.iter().enumerate() {
                    let mask = &glwe[q * n..(q + 1) * n];
                    for (dst, &c) in s.limb.iter_mut().zip(mask) {
                        *dst = c.wrapping_sub(c as u32 as i32 as i64 as u64);
                    }
                    s.ctx.forward_torus(&s.limb, &mut s.limb_f);
                    mul_add(&mut s.hi, &s.limb_f, key_q);
                    for (dst, &c) in s.limb.iter_mut().zip(mask) {
                        *dst = c as u32 as i32 as i64 as u64;
                    }
                    s.ctx.forward_torus(&s.limb, &mut s.limb_f);
                    mul_add(&mut s.lo, &s.limb_f, key_q);
                }
                s.ctx.backward_torus(&s.hi, &mut s.product);
                let round = 1u64 << (SPLIT - 1);
                let keep = !((1u64 << SPLIT) - 1);
                for (dst, &h) in phase.iter_mut().zip(s.product.iter()) {
                    *dst = h.wrapping_add(round) & keep;
                }
                s.ctx.backward_torus(&s.lo, &mut s.product);
                for ((dst, &b), &l) in phase.iter_mut().zip(&glwe[k * n..]).zip(s.product.iter()) {
                    *dst = b.wrapping_sub(dst.wrapping_add(l));
                }
            },
        );
    phases
}

/// Signed rounding of a phase to the nearest multiple of `2^delta_log`.
pub fn decode(phase: u64, delta_log: u32) -> i64 {
    let rounded = phase.wrapping_add(1u64 << (delta_log - 1));
    (rounded as i64) >> delta_log
}
