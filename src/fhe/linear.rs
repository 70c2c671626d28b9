//! Server side of an encrypted linear layer: clear weights × encrypted rows.
//!
//! For output `j` of row `r`, weight row `j` is laid out per chunk as the reversed polynomial
//! `W_{j,c}(X) = Σ_i w_{j,cN+i} · X^(N−1−i)`, so the product with the input GLWE puts
//! `Σ_i v_i·w_{j,i}·Δ` in coefficient `N−1`. Sample extraction of that coefficient gives an LWE
//! under the input key whose mask is the reversed product mask and whose body is a plain
//! integer dot product of the input bodies with the weights. The weights are transformed to the
//! Fourier domain once, in [`FourierLinearLayer::new`].

use rayon::prelude::*;

use super::bitpack::{packed_len, unpack_top_bits, BitPacker};
use super::codec::Wire;
use super::encrypted_outputs::EncryptedOutputs;
use super::encrypted_rows::EncryptedRows;
use super::fourier::{mul_add, FourierContext};
use super::packing::{decompose_row, pack, FourierPackingKey, PackInput, BLOCK};
use super::params::{packing_params, Encoding, LayerPlan, Precision, INPUT_GLWE};
use super::pbs::BIG_LWE_LEN;
use super::FheError;

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

/// A linear layer ready to evaluate: plan, weight codes and their Fourier transforms.
pub struct FourierLinearLayer {
    pub(super) plan: LayerPlan,
    pub(super) codes: Vec<i8>,
    /// `[j][chunk][N]` split Fourier polynomials of the reversed weight rows.
    weights_f: Vec<f64>,
    /// The automorphism encoding's outputs per product and weight polynomials (`auto.rs`), for
    /// plans that offer it.
    pub(super) auto_f: Option<(u32, Vec<f64>)>,
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
        let auto_f = plan.encodings.iter().find_map(|e| match e {
            Encoding::Auto { outputs } => Some((
                *outputs,
                super::auto::auto_weights(&plan, codes, *outputs as usize),
            )),
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
        key: &FourierPackingKey,
        input: &EncryptedRows,
    ) -> Result<EncryptedOutputs, FheError> {
        self.evaluate_within(key, input, DEFAULT_JOB_BYTES)
    }

    /// Evaluate with at most about `max_job_bytes` of digit buffers, whatever the row count.
    ///
    /// Outputs are evaluated in groups of whole packs (see [`outputs_per_group`]); each group
    /// streams the packing key once. Beyond the budget the job holds its request, the input
    /// masks in the Fourier domain (8 bytes per input value) and its packed result.
    pub fn evaluate_within(
        &self,
        key: &FourierPackingKey,
        input: &EncryptedRows,
        max_job_bytes: usize,
    ) -> Result<EncryptedOutputs, FheError> {
        let plan = &self.plan;
        self.check_request(key, input)?;
        match input.encoding {
            Encoding::Blocked { rows: block } => {
                return self.evaluate_blocked(key, input, block as usize, max_job_bytes)
            }
            Encoding::Slot => return self.evaluate_slot(input, max_job_bytes),
            Encoding::Auto { outputs } => {
                let keys = key.auto.as_ref().ok_or_else(|| {
                    FheError::ParameterMismatch(
                        "the session's key has no automorphism keys (made by an older client): \
                         send row, blocked or slot requests, or open a new session"
                            .into(),
                    )
                })?;
                return self.evaluate_auto(keys, input, outputs as usize);
            }
            Encoding::Row => {}
        }
        let rows = input.rows as usize;
        let (chunks, cols, out) = (plan.chunks(), plan.in_features, plan.out_features);
        // Bodies stay at their wire width (< 2^body_bits): the dot products are then exact in i64.
        let shift = 64 - plan.input_body_bits;
        let bodies: Vec<u64> = unpack_top_bits(&input.bodies, rows * cols, plan.input_body_bits)
            .map(|b| b >> shift)
            .collect();
        let masks_f = self.input_masks(input.seed(), rows * chunks);

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
                self.evaluate_group(key, rows, &masks_f, &bodies, outputs.clone(), &mut digits);
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

    /// The request and key fit this layer's plan (shape, wire widths, precision, encoding).
    pub(super) fn check_request(
        &self,
        key: &FourierPackingKey,
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

    /// Regenerate the request's masks from its seed and transform them: `[ciphertext][N]`.
    fn input_masks(&self, seed: u128, count: usize) -> Vec<f64> {
        let n = INPUT_GLWE.polynomial_size;
        let k = INPUT_GLWE.glwe_dimension;
        let coefficients = super::seeded::decompress(vec![0u64; count * n], seed, k, n);
        let mut masks_f = vec![0f64; count * n];
        masks_f.par_chunks_mut(n).enumerate().for_each_init(
            || FourierContext::new(n),
            |ctx, (i, dst)| {
                let start = i * (k + 1) * n;
                ctx.forward_torus(&coefficients[start..start + n], dst);
            },
        );
        masks_f
    }
}

impl FourierLinearLayer {
    /// Products and sample extraction only: one LWE under the input key per output value
    /// (`BIG_LWE_LEN` coefficients each, row-major `rows × out`), for a bootstrap to read.
    /// Row-encoded requests only (checked by the caller).
    pub(super) fn extract_lwes(&self, input: &EncryptedRows) -> Vec<u64> {
        let plan = &self.plan;
        let rows = input.rows as usize;
        let (n, chunks, cols, out) = (
            INPUT_GLWE.polynomial_size,
            plan.chunks(),
            plan.in_features,
            plan.out_features,
        );
        let shift = 64 - plan.input_body_bits;
        let bodies: Vec<u64> = unpack_top_bits(&input.bodies, rows * cols, plan.input_body_bits)
            .map(|b| b >> shift)
            .collect();
        let masks_f = self.input_masks(input.seed(), rows * chunks);
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
pub(super) fn pack_lwes(
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
