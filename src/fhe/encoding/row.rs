//! Server side of an encrypted linear layer: clear weights × encrypted rows.
//!
//! For output `j` of row `r`, weight row `j` is laid out per chunk as the reversed polynomial
//! `W_{j,c}(X) = Σ_i w_{j,cN+i} · X^(N−1−i)`, so the product with the input GLWE puts
//! `Σ_i v_i·w_{j,i}·Δ` in coefficient `N−1`. Sample extraction of that coefficient gives an LWE
//! under the input key whose mask is the reversed product mask and whose body is a plain
//! integer dot product of the input bodies with the weights. The weights are transformed to the
//! Fourier domain once, in [`FourierLinearLayer::new`].

use rayon::prelude::*;
use tfhe::core_crypto::prelude::new_seeder;

use super::{body_dot, EncryptedOutputs, EncryptedRows, FourierLinearLayer, Scheme};
use crate::fhe::bitpack::{pack_top_bits, packed_len, BitPacker};
use crate::fhe::fourier::{mul_add, FourierContext};
use crate::fhe::keys::ClientKey;
use crate::fhe::packing::{decompose_row, pack, FourierPackingKey, PackInput, BLOCK};
use crate::fhe::params::{packing_params, Encoding, LayerPlan, Precision, INPUT_GLWE};
use crate::fhe::pbs::BIG_LWE_LEN;
use crate::fhe::seeded::{decrypt_all, encrypt, masks_fourier, Limbs};
use crate::fhe::session_key::SessionKey;
use crate::fhe::FheError;

/// Default working-memory budget of one evaluation (digit buffers), as `worker.max_job_bytes`.
pub const DEFAULT_JOB_BYTES: usize = 256 << 20;

/// Bytes of digit buffer one output value needs while its group is packed: the `n_in · L`
/// decomposed mask digits (`i16`) of its extracted LWE.
pub fn digit_bytes_per_output(precision: Precision) -> usize {
    let params = packing_params(precision);
    INPUT_GLWE.lwe_dimension() * params.level_count * std::mem::size_of::<i16>()
}

/// Outputs evaluated together under a budget of `max_job_bytes`: whole packs (`N` outputs, the
/// unit the packing keyswitch works in), at least one.
pub fn outputs_per_group(precision: Precision, max_job_bytes: usize) -> usize {
    let n_out = packing_params(precision).output.polynomial_size;
    let packs = (max_job_bytes / (digit_bytes_per_output(precision) * n_out)).max(1);
    packs * n_out
}

/// The `[j][chunk][N]` split Fourier polynomials of a layer's reversed weight rows (see the
/// module comment), parallel.
pub(super) fn weights(plan: &LayerPlan, codes: &[i8]) -> Vec<f64> {
    let (out, cols) = (plan.out_features, plan.in_features);
    let n = INPUT_GLWE.polynomial_size;
    let chunks = plan.chunks();
    let mut weights_f = vec![0f64; out * chunks * n];
    weights_f
        .par_chunks_mut(chunks * n)
        .zip(codes.par_chunks(cols))
        .for_each_init(
            || (FourierContext::new(n), vec![0u64; n]),
            |(ctx, poly), (dst, row)| {
                for (c, slot) in dst.chunks_exact_mut(n).enumerate() {
                    poly.fill(0);
                    let part = &row[c * n..cols.min((c + 1) * n)];
                    for (i, &w) in part.iter().enumerate() {
                        poly[n - 1 - i] = w as i64 as u64;
                    }
                    ctx.forward_integer(poly, slot);
                }
            },
        );
    weights_f
}

/// The row encoding (the module comment).
pub(super) struct Row;

impl Scheme for Row {
    fn encrypt(
        &self,
        key: &ClientKey,
        plan: &LayerPlan,
        values: &[i32],
        rows: usize,
    ) -> EncryptedRows {
        let cols = plan.in_features;
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
        let bodies = &encrypt(&key.input, INPUT_GLWE, &plain, seed);
        let sent = (0..rows)
            .flat_map(|r| (0..cols).map(move |i| bodies[(r * chunks + i / n) * n + i % n]));
        let mut packed = Vec::with_capacity(packed_len(rows * cols, plan.input_body_bits));
        pack_top_bits(sent, plan.input_body_bits, &mut packed);
        EncryptedRows {
            rows: rows as u32,
            in_features: cols as u32,
            body_bits: plan.input_body_bits as u8,
            seed: seed.to_le_bytes().to_vec(),
            bodies: packed,
            encoding: Encoding::Row,
        }
    }

    /// Outputs are evaluated in groups of whole packs (see [`outputs_per_group`]); each group
    /// streams the packing key once. Beyond the budget the job holds its request, the input
    /// masks in the Fourier domain (8 bytes per input value) and its packed result.
    fn evaluate(
        &self,
        layer: &FourierLinearLayer,
        key: &SessionKey,
        input: &EncryptedRows,
        max_job_bytes: usize,
    ) -> Result<EncryptedOutputs, FheError> {
        let key = &key.packing;
        let plan = &layer.plan;
        let rows = input.rows as usize;
        let out = plan.out_features;
        let bodies = layer.input_bodies(input);
        let masks_f = input_masks(input.seed(), rows * plan.chunks());

        let params = key.params;
        let n_out = params.output.polynomial_size;
        let mask_len = params.output.lwe_dimension();
        let total = rows * out;
        let group = outputs_per_group(plan.precision, max_job_bytes);
        let mut masks = Vec::with_capacity(packed_len(
            total.div_ceil(n_out) * mask_len,
            plan.output_mask_bits,
        ));
        let mut out_bodies = Vec::with_capacity(packed_len(total, plan.output_body_bits));
        let mut mask_packer = BitPacker::new(plan.output_mask_bits, &mut masks);
        let mut body_packer = BitPacker::new(plan.output_body_bits, &mut out_bodies);
        let mut digits = Vec::new();
        for first in (0..total).step_by(group) {
            let outputs = first..total.min(first + group);
            let glwes =
                layer.evaluate_group(key, rows, &masks_f, &bodies, outputs.clone(), &mut digits);
            for (p, glwe) in glwes.iter().enumerate() {
                let count = n_out.min(outputs.end - outputs.start - p * n_out);
                push_pack(glwe, mask_len, count, &mut mask_packer, &mut body_packer);
            }
        }
        mask_packer.finish();
        body_packer.finish();
        Ok(EncryptedOutputs::of_plan(
            plan,
            rows,
            Encoding::Row,
            masks,
            out_bodies,
        ))
    }

    fn packs(&self, precision: Precision, rows: usize, out: usize) -> usize {
        (rows * out).div_ceil(packing_params(precision).output.polynomial_size)
    }

    /// Output `(r, j)` is value `g = j·rows + r` on the wire (column-major): pack `g / N`,
    /// coefficient `g % N`.
    fn phases(
        &self,
        key: &ClientKey,
        outputs: &EncryptedOutputs,
        masks: Vec<u64>,
        bodies: Vec<u64>,
    ) -> Vec<u64> {
        let shape = packing_params(outputs.precision).output;
        let (k, n) = (shape.glwe_dimension, shape.polynomial_size);
        let total = outputs.values();
        let (mut masks, mut bodies) = (masks.into_iter(), bodies.into_iter());
        let packs = total.div_ceil(n);
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
        let phases = decrypt_all(key.output_key(outputs.precision), k, n, &glwes);
        let rows = outputs.rows as usize;
        let out = outputs.out_features as usize;
        (0..total)
            .map(|g| phases[(g % out) * rows + g / out])
            .collect()
    }
}

impl FourierLinearLayer {
    /// Products, sample extraction and packing of `outputs` (global indices `g = j·rows + r`,
    /// column-major: consecutive outputs share a weight row, so each Fourier weight polynomial is
    /// read once per group however many rows there are). `digits` is reused between groups.
    fn evaluate_group(
        &self,
        key: &FourierPackingKey,
        rows: usize,
        masks_f: &[f64],
        bodies: &[u64],
        outputs: std::ops::Range<usize>,
        digits: &mut Vec<i16>,
    ) -> Vec<Vec<u64>> {
        let plan = &self.plan;
        let (n, chunks, cols) = (INPUT_GLWE.polynomial_size, plan.chunks(), plan.in_features);
        let params = key.params;
        let (levels, n_in) = (params.level_count, INPUT_GLWE.lwe_dimension());
        let n_out = params.output.polynomial_size;
        debug_assert_eq!(n_out % BLOCK, 0, "blocks never straddle packs");
        debug_assert_eq!(outputs.start % n_out, 0, "groups hold whole packs");
        let count = outputs.end - outputs.start;
        let block_len = n_in * levels * BLOCK;
        digits.clear();
        digits.resize(count.div_ceil(BLOCK) * block_len, 0);
        let mut lwe_bodies = vec![0u64; count];
        digits
            .par_chunks_mut(block_len)
            .zip(lwe_bodies.par_chunks_mut(BLOCK))
            .enumerate()
            .for_each_init(
                || BlockScratch::new(n, levels),
                |scratch, (block, (digits, block_bodies))| {
                    for (i, body_slot) in block_bodies.iter_mut().enumerate() {
                        let g = outputs.start + block * BLOCK + i;
                        let (j, r) = (g / rows, g % rows);
                        scratch.acc.fill(0.0);
                        for c in 0..chunks {
                            mul_add(
                                &mut scratch.acc,
                                &masks_f[(r * chunks + c) * n..(r * chunks + c + 1) * n],
                                &self.weights_f[(j * chunks + c) * n..(j * chunks + c + 1) * n],
                            );
                        }
                        scratch
                            .ctx
                            .backward_torus(&scratch.acc, &mut scratch.product);
                        // Extracted mask coefficient t is product coefficient N−1−t.
                        scratch.product.reverse();
                        decompose_row(
                            &scratch.product,
                            params.base_log,
                            levels,
                            &mut scratch.local[i * levels * n..(i + 1) * levels * n],
                        );
                        *body_slot = body_dot(
                            &bodies[r * cols..(r + 1) * cols],
                            &self.codes[j * cols..(j + 1) * cols],
                            plan.input_body_bits,
                        );
                    }
                    transpose_block(&scratch.local, digits, block_bodies.len(), levels * n);
                },
            );
        let packs: Vec<PackInput<'_>> = lwe_bodies
            .chunks(n_out)
            .enumerate()
            .map(|(p, bodies)| PackInput {
                bodies,
                first_block: p * n_out / BLOCK,
            })
            .collect();
        pack(key, digits, &packs)
    }
}

/// A row request's masks, regenerated from its seed and transformed: `[ciphertext][N]`.
fn input_masks(seed: u128, count: usize) -> Vec<f64> {
    let (n, k) = (INPUT_GLWE.polynomial_size, INPUT_GLWE.glwe_dimension);
    masks_fourier(count, k, n, count, |_| seed, Limbs::One)
}

impl FourierLinearLayer {
    /// Products and sample extraction only: one LWE under the input key per output value
    /// (`BIG_LWE_LEN` coefficients each, row-major `rows × out`), for a bootstrap to read.
    /// Row-encoded requests only (checked by the caller).
    pub(in crate::fhe) fn extract_lwes(&self, input: &EncryptedRows) -> Vec<u64> {
        let plan = &self.plan;
        let rows = input.rows as usize;
        let (n, chunks, cols, out) = (
            INPUT_GLWE.polynomial_size,
            plan.chunks(),
            plan.in_features,
            plan.out_features,
        );
        let bodies = self.input_bodies(input);
        let masks_f = input_masks(input.seed(), rows * chunks);
        let len = BIG_LWE_LEN;
        let mut lwes = vec![0u64; rows * out * len];
        lwes.par_chunks_mut(len).enumerate().for_each_init(
            || (FourierContext::new(n), vec![0f64; n], vec![0u64; n]),
            |(ctx, acc, product), (g, lwe)| {
                let (r, j) = (g / out, g % out);
                acc.fill(0.0);
                for c in 0..chunks {
                    mul_add(
                        acc,
                        &masks_f[(r * chunks + c) * n..(r * chunks + c + 1) * n],
                        &self.weights_f[(j * chunks + c) * n..(j * chunks + c + 1) * n],
                    );
                }
                ctx.backward_torus(acc, product);
                // Extracted mask coefficient t is product coefficient N−1−t.
                for (dst, &p) in lwe[..n].iter_mut().zip(product.iter().rev()) {
                    *dst = p;
                }
                lwe[n] = body_dot(
                    &bodies[r * cols..(r + 1) * cols],
                    &self.codes[j * cols..(j + 1) * cols],
                    plan.input_body_bits,
                );
            },
        );
        lwes
    }
}

/// Pack LWEs under the input key (`BIG_LWE_LEN` coefficients each, row-major `rows × out` as
/// `plan` counts them) into the row encoding's response, as [`FourierLinearLayer::evaluate`]
/// packs its extracted products.
pub(in crate::fhe) fn pack_lwes(
    key: &FourierPackingKey,
    plan: &LayerPlan,
    rows: usize,
    lwes: &[u64],
) -> EncryptedOutputs {
    let out = plan.out_features;
    let params = key.params;
    let (levels, n_in) = (params.level_count, INPUT_GLWE.lwe_dimension());
    let n_out = params.output.polynomial_size;
    let mask_len = params.output.lwe_dimension();
    let total = rows * out;
    let block_len = n_in * levels * BLOCK;
    let mut masks = Vec::with_capacity(packed_len(
        total.div_ceil(n_out) * mask_len,
        plan.output_mask_bits,
    ));
    let mut out_bodies = Vec::with_capacity(packed_len(total, plan.output_body_bits));
    let mut mask_packer = BitPacker::new(plan.output_mask_bits, &mut masks);
    let mut body_packer = BitPacker::new(plan.output_body_bits, &mut out_bodies);
    // One pack at a time bounds the digit buffer (`N` outputs × n_in × L digits).
    for first in (0..total).step_by(n_out) {
        let count = n_out.min(total - first);
        let mut digits = vec![0i16; count.div_ceil(BLOCK) * block_len];
        let mut bodies = vec![0u64; count];
        digits
            .par_chunks_mut(block_len)
            .zip(bodies.par_chunks_mut(BLOCK))
            .enumerate()
            .for_each_init(
                || vec![0i16; BLOCK * levels * n_in],
                |local, (block, (digits, block_bodies))| {
                    for (i, body) in block_bodies.iter_mut().enumerate() {
                        // Column-major on the wire: output g is (j = g / rows, r = g % rows).
                        let g = first + block * BLOCK + i;
                        let (j, r) = (g / rows, g % rows);
                        let lwe =
                            &lwes[(r * out + j) * BIG_LWE_LEN..(r * out + j + 1) * BIG_LWE_LEN];
                        decompose_row(
                            &lwe[..n_in],
                            params.base_log,
                            levels,
                            &mut local[i * levels * n_in..(i + 1) * levels * n_in],
                        );
                        *body = lwe[n_in];
                    }
                    transpose_block(local, digits, block_bodies.len(), levels * n_in);
                },
            );
        let glwes = pack(
            key,
            &digits,
            &[PackInput {
                bodies: &bodies,
                first_block: 0,
            }],
        );
        for glwe in &glwes {
            push_pack(glwe, mask_len, count, &mut mask_packer, &mut body_packer);
        }
    }
    mask_packer.finish();
    body_packer.finish();
    EncryptedOutputs::of_plan(plan, rows, Encoding::Row, masks, out_bodies)
}

/// One packed GLWE onto the wire: its `mask_len` mask coefficients, then the first `count`
/// body coefficients (the values it holds).
fn push_pack(
    glwe: &[u64],
    mask_len: usize,
    count: usize,
    masks: &mut BitPacker<'_>,
    bodies: &mut BitPacker<'_>,
) {
    glwe[..mask_len].iter().for_each(|&c| masks.push(c));
    glwe[mask_len..mask_len + count]
        .iter()
        .for_each(|&c| bodies.push(c));
}

/// Per-task buffers of the product phase.
struct BlockScratch {
    ctx: FourierContext,
    acc: Vec<f64>,
    product: Vec<u64>,
    /// `[i][l][t]` digits of the block's outputs before transposition.
    local: Vec<i16>,
}

impl BlockScratch {
    fn new(n: usize, levels: usize) -> Self {
        Self {
            ctx: FourierContext::new(n),
            acc: vec![0f64; n],
            product: vec![0u64; n],
            local: vec![0i16; BLOCK * levels * n],
        }
    }
}

/// `[i][c]` → `[c][i]` for `count` outputs and `width = L·N` digit columns, in 64-column tiles so
/// that the strided writes stay in L1.
fn transpose_block(local: &[i16], digits: &mut [i16], count: usize, width: usize) {
    const TILE: usize = 64;
    for c0 in (0..width).step_by(TILE) {
        for i in 0..count {
            let row = &local[i * width + c0..i * width + c0 + TILE];
            for (dc, &v) in row.iter().enumerate() {
                digits[(c0 + dc) * BLOCK + i] = v;
            }
        }
    }
}
