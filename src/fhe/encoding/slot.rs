//! The slot encoding: each input GLWE carries one feature over `N` rows (coefficient `r` of
//! ciphertext `(b, i)` is `v_{b·N + r, i}·Δ`), laid out as the blocked encoding with `R_c = N`,
//! `F = 1` (see `blocked.rs`).
//!
//! Output `j` of batch `b` is `Σ_i w_ji · ct_{b,i}`: a combination with clear integer scalars,
//! so its coefficient `r` decrypts to `Σ_i w_ji v_{r,i}·Δ` under the *input* key. No packing key,
//! no extraction, no decomposition: the outputs arrive packed `N` rows to a ciphertext. The masks
//! are combined in the Fourier domain, where a scalar combination of `N`-coefficient polynomials
//! is one real matrix product `(out × in) · (in × N)` per batch (ndarray's blocked f64 kernels),
//! followed by one inverse FFT per output; bodies are the exact integer product of
//! [`FourierLinearLayer::body_products`]. The noise argument is in `params.rs`.

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use super::blocked::{blocked_masks, blocked_phases, BlockLayout};
use super::{EncryptedOutputs, EncryptedRows, FourierLinearLayer, Scheme};
use crate::fhe::bitpack::{packed_len, BitPacker};
use crate::fhe::fourier::FourierContext;
use crate::fhe::keys::ClientKey;
use crate::fhe::params::{Encoding, LayerPlan, Precision, INPUT_GLWE};
use crate::fhe::seeded::decrypt_all;
use crate::fhe::session_key::SessionKey;
use crate::fhe::FheError;

/// The slot encoding (the module comment).
pub(super) struct Slot;

impl Scheme for Slot {
    fn encrypt(
        &self,
        key: &ClientKey,
        plan: &LayerPlan,
        values: &[i32],
        rows: usize,
    ) -> EncryptedRows {
        let n = INPUT_GLWE.polynomial_size;
        key.encrypt_blocked(plan, values, rows, n, Encoding::Slot)
    }

    fn evaluate(
        &self,
        layer: &FourierLinearLayer,
        _: &SessionKey,
        input: &EncryptedRows,
        max_job_bytes: usize,
    ) -> Result<EncryptedOutputs, FheError> {
        layer.evaluate_slot(input, max_job_bytes)
    }

    fn packs(&self, _: Precision, rows: usize, out: usize) -> usize {
        BlockLayout::new(INPUT_GLWE.polynomial_size, rows, 1, out).packs()
    }

    /// Slot outputs are never keyswitched: they stay under the input key.
    fn mask_len(&self, _: Precision) -> usize {
        INPUT_GLWE.lwe_dimension()
    }

    fn phases(
        &self,
        key: &ClientKey,
        outputs: &EncryptedOutputs,
        masks: Vec<u64>,
        bodies: Vec<u64>,
    ) -> Vec<u64> {
        let (k, n) = (INPUT_GLWE.glwe_dimension, INPUT_GLWE.polynomial_size);
        let decrypt = |glwes: &[u64]| decrypt_all(&key.input, k, n, glwes);
        blocked_phases(
            outputs,
            n,
            &mut masks.into_iter(),
            &mut bodies.into_iter(),
            &decrypt,
            k,
        )
    }
}

impl FourierLinearLayer {
    /// Evaluate a slot request (checked against the plan by the caller). Outputs are computed
    /// in chunks whose f64 products fit `max_job_bytes`.
    pub(super) fn evaluate_slot(
        &self,
        input: &EncryptedRows,
        max_job_bytes: usize,
    ) -> Result<EncryptedOutputs, FheError> {
        let plan = &self.plan;
        let n = INPUT_GLWE.polynomial_size;
        let (rows, cols, out) = (input.rows as usize, plan.in_features, plan.out_features);
        let lay = BlockLayout::new(n, rows, cols, out);
        let bodies = self.input_bodies(input);
        let out_bodies = self.body_products(&bodies, rows);
        drop(bodies);
        // [batch][feature][N]: each batch is an (in × N) matrix of split Fourier polynomials.
        let masks_f = blocked_masks(input.seed(), lay.ciphertexts());

        let mut masks = Vec::with_capacity(packed_len(lay.packs() * n, plan.output_mask_bits));
        let mut sent = Vec::with_capacity(packed_len(rows * out, plan.output_body_bits));
        let mut mask_packer = BitPacker::new(plan.output_mask_bits, &mut masks);
        let mut body_packer = BitPacker::new(plan.output_body_bits, &mut sent);
        // Per output: its f64 products for every batch and its coefficients.
        let per_output =
            lay.batches * n * (std::mem::size_of::<f64>() + std::mem::size_of::<u64>());
        let step = (max_job_bytes / per_output).clamp(1, out);
        for j0 in (0..out).step_by(step) {
            let j1 = out.min(j0 + step);
            let w = ArrayView2::from_shape((j1 - j0, cols), &self.codes[j0 * cols..j1 * cols])
                .expect("rows of codes")
                .mapv(|c| c as f64);
            // products[b]: (j1 − j0) × N Fourier masks of this chunk's outputs.
            let products: Vec<Array2<f64>> = (0..lay.batches)
                .map(|b| {
                    let a = ArrayView2::from_shape(
                        (cols, n),
                        &masks_f[b * cols * n..(b + 1) * cols * n],
                    )
                    .expect("in × N masks");
                    parallel_product(&w, &a)
                })
                .collect();
            let coefficients: Vec<Vec<u64>> = (j0..j1)
                .into_par_iter()
                .map_init(
                    || FourierContext::new(n),
                    |ctx, j| {
                        let mut c = vec![0u64; lay.batches * n];
                        for (b, product) in products.iter().enumerate() {
                            let row = product.row(j - j0);
                            let row = row.as_slice().expect("standard layout");
                            ctx.backward_torus(row, &mut c[b * n..(b + 1) * n]);
                        }
                        c
                    },
                )
                .collect();
            for (j, c) in (j0..j1).zip(&coefficients) {
                for b in 0..lay.batches {
                    c[b * n..(b + 1) * n]
                        .iter()
                        .for_each(|&m| mask_packer.push(m));
                    let valid = n.min(rows - b * n);
                    for r in 0..valid {
                        // Phase = body − mask·s; the combined body is Σ w·b (exact).
                        body_packer.push(out_bodies[(b * n + r) * out + j]);
                    }
                }
            }
        }
        mask_packer.finish();
        body_packer.finish();
        Ok(EncryptedOutputs::of_plan(
            plan,
            rows,
            input.encoding,
            masks,
            sent,
        ))
    }
}

/// `w · a` with the rows of `w` split across the rayon pool.
fn parallel_product(w: &Array2<f64>, a: &ArrayView2<'_, f64>) -> Array2<f64> {
    let rows = w.nrows();
    let step = rows.div_ceil(4 * rayon::current_num_threads()).max(16);
    let parts: Vec<Array2<f64>> = (0..rows)
        .step_by(step)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|r0| w.slice(ndarray::s![r0..rows.min(r0 + step), ..]).dot(a))
        .collect();
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    ndarray::concatenate(ndarray::Axis(0), &views).expect("same widths")
}
