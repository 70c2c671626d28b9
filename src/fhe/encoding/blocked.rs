//! The blocked encoding: many rows per ciphertext, so that the cost per row falls with the rows.
//!
//! # Layout
//!
//! With `N = 2048`, a block size `R_c` (rows per ciphertext) and `F = N/R_c` features per
//! ciphertext, input ciphertext `(b, g)` encrypts rows `b·R_c..` and features `g·F..` as
//! `Σ_{r,f} v_{b·R_c+r, g·F+f} · Δ · X^(r·F + f)`. Only the bodies of real values travel.
//!
//! # Products
//!
//! Output `j`'s weight polynomial for group `g` is `P_{j,g} = Σ_f w_{j,g·F+f} · X^(−f)`, so that
//! coefficient `r·F` of `Σ_g ct_{b,g} · P_{j,g}` is `Σ_i v_{r,i} w_{j,i}·Δ`: one product yields the
//! outputs of all `R_c` rows at once, at the multiples of `F`. (The other coefficients hold
//! partial sums; they never leave the server.) Masks are multiplied in the Fourier domain
//! (weights transformed once per request, shared by every batch of rows); bodies are an exact
//! integer matrix product, as in the row encoding.
//!
//! # Packing without extraction
//!
//! Write the product mask `A = Σ_{u<F} X^u A_u(X^F)` and the input key likewise. At the multiples
//! of `F` the phase is `B_0 − A_0·S_0 − Σ_{u≥1} Y·A_u·S_{F−u}` with `Y = X^F`: a GLWE of the
//! subring `Z[Y]/(Y^(R_c)+1)` with `F` mask polynomials `M_0 = A_0, M_u = Y·A_u` under the key
//! `σ_0 = S_0, σ_u = S_{F−u}`, obtained by renaming coefficients (no noise added). `F` such
//! ciphertexts (outputs `j_0..j_{F−1}`) are packed into one GLWE of the output key at once:
//!
//! ```text
//! packed = (0, Σ_m X^m B_{j_m}(X^F)) − Σ_{u,l} D_{u,l} · K_{u,l},
//! D_{u,l}(X) = Σ_m X^m · digit_l(M_{j_m,u})(X^F),   K_{u,l} = GLWE(σ_u(X^F) · q/B^(l+1))
//! ```
//!
//! so `N` output values cost `F·L` FFTs and `F·L·(k+1)·limbs` multiply-adds, against `n_in·L`
//! FFTs for the row encoding's LWE packing: `N/F = R_c` times fewer. The key has `F·L` entries
//! (6 MiB seeded for `R_c = 16`). Output `(row, j)` sits in pack `(j / F, row / R_c)`,
//! coefficient `(row mod R_c)·F + j mod F`.

use rayon::prelude::*;
use sha2::{Digest, Sha256};
use tfhe::core_crypto::prelude::new_seeder;

use super::{EncryptedOutputs, EncryptedRows, FourierLinearLayer, Scheme};
use crate::fhe::bitpack::{pack_top_bits, packed_len, BitPacker};
use crate::fhe::fourier::{mul_add, mul_add_bins, BinTile, FourierContext};
use crate::fhe::keys::ClientKey;
use crate::fhe::packing::{decompose_row, negated_key_sum, FourierEntries, FourierPackingKey};
use crate::fhe::params::{
    packing_params, Encoding, LayerPlan, PackingParams, Precision, INPUT_GLWE,
};
use crate::fhe::seeded::{decrypt_all, encrypt_runs, masks_fourier, Limbs};
use crate::fhe::session_key::SessionKey;
use crate::fhe::FheError;

/// Input ciphertexts per mask seed: each run of this many is encrypted (client) and regenerated
/// (server) by one task, from a seed derived from the request's seed.
pub const CIPHERTEXTS_PER_SEED: usize = 16;

/// The seed of run `index` of a request whose seed is `seed`.
fn run_seed(seed: u128, index: usize) -> u128 {
    let digest = Sha256::new()
        .chain_update(b"hyfhe blocked mask run")
        .chain_update(seed.to_le_bytes())
        .chain_update((index as u64).to_le_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    u128::from_le_bytes(bytes)
}

/// How a blocked request of `rows × in → out` is cut.
#[derive(Clone, Copy, Debug)]
pub struct BlockLayout {
    /// Rows per ciphertext (`R_c`).
    pub block: usize,
    /// Features per ciphertext and outputs per pack (`F = N / R_c`).
    pub width: usize,
    /// Input ciphertexts per batch of rows (`⌈in / F⌉`).
    pub groups: usize,
    /// Batches of `R_c` rows (`⌈rows / R_c⌉`).
    pub batches: usize,
    /// Output groups of `F` (`⌈out / F⌉`); packs are `out_groups × batches`.
    pub out_groups: usize,
    pub rows: usize,
    pub in_features: usize,
    pub out_features: usize,
}

impl BlockLayout {
    pub fn new(block: usize, rows: usize, in_features: usize, out_features: usize) -> Self {
        let width = INPUT_GLWE.polynomial_size / block;
        Self {
            block,
            width,
            groups: in_features.div_ceil(width),
            batches: rows.div_ceil(block),
            out_groups: out_features.div_ceil(width),
            rows,
            in_features,
            out_features,
        }
    }

    pub fn ciphertexts(&self) -> usize {
        self.batches * self.groups
    }

    pub fn packs(&self) -> usize {
        self.out_groups * self.batches
    }

    /// Rows of batch `b` and outputs of group `jg` that exist (the last of each may be partial).
    fn valid(&self, jg: usize, b: usize) -> (usize, usize) {
        (
            self.block.min(self.rows - b * self.block),
            self.width.min(self.out_features - jg * self.width),
        )
    }
}

impl ClientKey {
    /// Encrypt `rows` rows of centred input codes in blocks of `block` rows (parallel over runs
    /// of [`CIPHERTEXTS_PER_SEED`] ciphertexts). Bodies travel row-major, as in the row encoding.
    pub(super) fn encrypt_blocked(
        &self,
        plan: &LayerPlan,
        values: &[i32],
        rows: usize,
        block: usize,
        encoding: Encoding,
    ) -> EncryptedRows {
        let n = INPUT_GLWE.polynomial_size;
        let cols = plan.in_features;
        let lay = BlockLayout::new(block, rows, cols, plan.out_features);
        let delta_log = plan.delta_log();
        let seed = new_seeder().seed().0;
        let mut plain = vec![0u64; lay.ciphertexts() * n];
        plain.par_chunks_mut(n).enumerate().for_each(|(ct, poly)| {
            let (b, g) = (ct / lay.groups, ct % lay.groups);
            for r in 0..lay.block.min(rows.saturating_sub(b * block)) {
                let row = &values[(b * block + r) * cols..(b * block + r + 1) * cols];
                let first = g * lay.width;
                for (f, &v) in row[first..cols.min(first + lay.width)].iter().enumerate() {
                    poly[r * lay.width + f] = (v as i64 as u64) << delta_log;
                }
            }
        });
        let bodies = encrypt_runs(
            &self.input,
            INPUT_GLWE,
            &plain,
            CIPHERTEXTS_PER_SEED,
            |run| run_seed(seed, run),
        );
        drop(plain);
        let sent = (0..rows).flat_map(|r| {
            let (b, p) = (r / block, r % block);
            let bodies = &bodies;
            (0..cols).map(move |i| {
                let (g, f) = (i / lay.width, i % lay.width);
                bodies[(b * lay.groups + g) * n + p * lay.width + f]
            })
        });
        let mut packed = Vec::with_capacity(packed_len(rows * cols, plan.input_body_bits));
        pack_top_bits(sent, plan.input_body_bits, &mut packed);
        EncryptedRows {
            rows: rows as u32,
            in_features: cols as u32,
            body_bits: plan.input_body_bits as u8,
            seed: seed.to_le_bytes().to_vec(),
            bodies: packed,
            encoding,
        }
    }
}

/// Regenerate the masks of `count` blocked input ciphertexts and transform them: `[ct][N]`.
pub(super) fn blocked_masks(seed: u128, count: usize) -> Vec<f64> {
    let (n, k) = (INPUT_GLWE.polynomial_size, INPUT_GLWE.glwe_dimension);
    masks_fourier(
        count,
        k,
        n,
        CIPHERTEXTS_PER_SEED,
        |run| run_seed(seed, run),
        Limbs::One,
    )
}

/// The blocked encoding with `block` rows per ciphertext (the module comment).
pub(super) struct Blocked {
    pub block: usize,
}

impl Scheme for Blocked {
    fn encrypt(
        &self,
        key: &ClientKey,
        plan: &LayerPlan,
        values: &[i32],
        rows: usize,
    ) -> EncryptedRows {
        let encoding = Encoding::Blocked {
            rows: self.block as u32,
        };
        key.encrypt_blocked(plan, values, rows, self.block, encoding)
    }

    fn evaluate(
        &self,
        layer: &FourierLinearLayer,
        key: &SessionKey,
        input: &EncryptedRows,
        max_job_bytes: usize,
    ) -> Result<EncryptedOutputs, FheError> {
        layer.evaluate_blocked(&key.packing, input, self.block, max_job_bytes)
    }

    fn packs(&self, _: Precision, rows: usize, out: usize) -> usize {
        // `max(1)`: an unvalidated response's block size may be 0 (validate refuses it).
        BlockLayout::new(self.block.max(1), rows, 1, out).packs()
    }

    fn phases(
        &self,
        key: &ClientKey,
        outputs: &EncryptedOutputs,
        masks: Vec<u64>,
        bodies: Vec<u64>,
    ) -> Vec<u64> {
        let shape = packing_params(outputs.precision).output;
        let (k, n) = (shape.glwe_dimension, shape.polynomial_size);
        let output_key = key.output_key(outputs.precision);
        let decrypt = |glwes: &[u64]| decrypt_all(output_key, k, n, glwes);
        blocked_phases(
            outputs,
            self.block,
            &mut masks.into_iter(),
            &mut bodies.into_iter(),
            &decrypt,
            k,
        )
    }
}

/// Frequency bins per tile of the product phase (512 bytes of each split polynomial).
const BIN_TILE: usize = 64;
/// Padding between the scratch polynomials of the product phase (f64s; 320 bytes).
const POLY_PAD: usize = 40;
/// Outputs one product task computes together (each input mask tile is loaded once for all).
const CHUNK_OUTPUTS: usize = 16;

/// Per-task buffers of the product phase.
struct ProductScratch {
    ctx: FourierContext,
    weights_f: Vec<f64>,
    poly: Vec<u64>,
    acc: Vec<f64>,
    product: Vec<u64>,
    small: Vec<u64>,
}

impl FourierLinearLayer {
    /// Evaluate a blocked request (checked against the plan by the caller).
    pub(super) fn evaluate_blocked(
        &self,
        key: &FourierPackingKey,
        input: &EncryptedRows,
        block: usize,
        max_job_bytes: usize,
    ) -> Result<EncryptedOutputs, FheError> {
        let plan = &self.plan;
        let entries = key.block(block).ok_or_else(|| {
            FheError::ParameterMismatch(format!(
                "the session's evaluation key has no packing key for blocks of {block} rows \
                 (it serves {:?}); send row-encoded requests or upload a key made by this build",
                key.block_sizes()
            ))
        })?;
        let (rows, cols, out) = (input.rows as usize, plan.in_features, plan.out_features);
        let lay = BlockLayout::new(block, rows, cols, out);
        let params = key.params;
        let n = INPUT_GLWE.polynomial_size;
        let levels = params.level_count;

        let bodies = self.input_bodies(input);
        let out_bodies = self.body_products(&bodies, rows);
        drop(bodies);
        let masks_f = blocked_masks(input.seed(), lay.ciphertexts());

        let mask_len = params.output.lwe_dimension();
        let mut masks =
            Vec::with_capacity(packed_len(lay.packs() * mask_len, plan.output_mask_bits));
        let mut sent_bodies = Vec::with_capacity(packed_len(rows * out, plan.output_body_bits));
        let mut mask_packer = BitPacker::new(plan.output_mask_bits, &mut masks);
        let mut body_packer = BitPacker::new(plan.output_body_bits, &mut sent_bodies);

        // Working memory, bounded by `max_job_bytes` whatever the row count: per output group and
        // batch, the digits of its F outputs, its finished pack and the product accumulators of
        // its outputs. Steps take as many output groups as fit with every batch; when not even
        // one does, the batches are taken a slice at a time (the weights are then transformed
        // once per slice).
        let glwe_len = (params.output.glwe_dimension + 1) * n;
        let per_pack = lay.width
            * (levels * n * std::mem::size_of::<i16>() + n * std::mem::size_of::<f64>())
            + glwe_len * std::mem::size_of::<u64>();
        let budget_packs = (max_job_bytes / per_pack).max(1);
        let groups_per_step = (budget_packs / lay.batches).max(1);
        let batches_per_step = budget_packs.clamp(1, lay.batches);
        for first in (0..lay.out_groups).step_by(groups_per_step) {
            let jgs = first..lay.out_groups.min(first + groups_per_step);
            let js = jgs.start * lay.width..out.min(jgs.end * lay.width);
            // finished[(jg − first)·batches + b]: packs leave in (group, batch) order.
            let mut finished: Vec<Vec<u64>> = Vec::with_capacity(jgs.len() * lay.batches);
            let mut slices = Vec::new();
            for b0 in (0..lay.batches).step_by(batches_per_step) {
                let bs = b0..lay.batches.min(b0 + batches_per_step);
                let digits: Vec<Vec<i16>> = js
                    .clone()
                    .step_by(CHUNK_OUTPUTS)
                    .collect::<Vec<_>>()
                    .into_par_iter()
                    .map_init(
                        || ProductScratch {
                            ctx: FourierContext::new(n),
                            weights_f: Vec::new(),
                            poly: vec![0u64; n],
                            acc: Vec::new(),
                            product: vec![0u64; n],
                            small: vec![0u64; n],
                        },
                        |scratch, j0| {
                            let chunk = j0..js.end.min(j0 + CHUNK_OUTPUTS);
                            self.chunk_digits(chunk, bs.clone(), &lay, &masks_f, params, scratch)
                        },
                    )
                    .flatten_iter()
                    .collect();
                let packs: Vec<(usize, usize)> = jgs
                    .clone()
                    .flat_map(|jg| bs.clone().map(move |b| (jg, b)))
                    .collect();
                let glwes = pack_blocks(entries, params, &lay, &digits, js.start, bs.start, &packs);
                slices.push((bs, glwes));
            }
            for jg in jgs.clone() {
                for (bs, glwes) in &mut slices {
                    let at = (jg - jgs.start) * bs.len();
                    finished.extend(glwes[at..at + bs.len()].iter_mut().map(std::mem::take));
                }
            }
            for (mut glwe, (jg, b)) in finished.into_iter().zip(
                jgs.clone()
                    .flat_map(|jg| (0..lay.batches).map(move |b| (jg, b))),
            ) {
                let (valid_rows, valid_outs) = lay.valid(jg, b);
                let (mask, body) = glwe.split_at_mut(mask_len);
                for p in 0..valid_rows {
                    let row = b * block + p;
                    for m in 0..valid_outs {
                        let c = &mut body[p * lay.width + m];
                        *c = c.wrapping_add(out_bodies[row * out + jg * lay.width + m]);
                    }
                }
                mask.iter().for_each(|&c| mask_packer.push(c));
                for p in 0..valid_rows {
                    body[p * lay.width..p * lay.width + valid_outs]
                        .iter()
                        .for_each(|&c| body_packer.push(c));
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
            sent_bodies,
        ))
    }

    /// Outputs `js` over every batch: products, reinterpretation in the subring and
    /// decomposition, for the batches `bs`. Returns, per output, `[batch − bs.start][level][u][p]`
    /// digits (`u < F` mask
    /// polynomial, `p < R_c` coefficient).
    ///
    /// Per frequency bin the products are a small complex matrix product (batches × groups) ·
    /// (groups × outputs); it runs in tiles of [`BIN_TILE`] bins so that the masks, weights and
    /// accumulators of a tile stay in L1/L2 while every input mask is read once per chunk.
    fn chunk_digits(
        &self,
        js: std::ops::Range<usize>,
        bs: std::ops::Range<usize>,
        lay: &BlockLayout,
        masks_f: &[f64],
        params: PackingParams,
        s: &mut ProductScratch,
    ) -> Vec<Vec<i16>> {
        let n = INPUT_GLWE.polynomial_size;
        let (cols, f, block) = (lay.in_features, lay.width, lay.block);
        let (groups, batches) = (lay.groups, bs.len());
        let count = js.len();
        // Polynomials of the scratch buffers are `stride` apart, not `n`: at a multiple of 4 KiB
        // every tile would map to the same cache sets.
        let stride = n + POLY_PAD;
        s.weights_f.resize(count * stride, 0.0);
        s.acc.clear();
        s.acc.resize(count * batches * stride, 0.0);
        // Group by group: the chunk's weight polynomials of group g are transformed (P_{j,g} =
        // w_0 − Σ_{f≥1} w_f X^(N−f), since X^(−f) = −X^(N−f)) and used at once, so only
        // `count` of them are ever held and each input mask is read once per chunk.
        for g in 0..groups {
            for (c, j) in js.clone().enumerate() {
                let row = &self.codes[j * cols..(j + 1) * cols];
                s.poly.fill(0);
                let part = &row[g * f..cols.min((g + 1) * f)];
                s.poly[0] = part[0] as i64 as u64;
                for (k, &w) in part.iter().enumerate().skip(1) {
                    s.poly[n - k] = (-(w as i64)) as u64;
                }
                s.ctx
                    .forward_integer(&s.poly, &mut s.weights_f[c * stride..c * stride + n]);
            }
            for b in 0..batches {
                let ct = (bs.start + b) * groups + g;
                let a = &masks_f[ct * n..(ct + 1) * n];
                let tile = BinTile {
                    n,
                    count,
                    acc_stride: batches * stride,
                    w_stride: stride,
                };
                for t0 in (0..n / 2).step_by(BIN_TILE) {
                    let bins = t0..(t0 + BIN_TILE).min(n / 2);
                    mul_add_bins(tile, &mut s.acc[b * stride..], a, &s.weights_f, bins);
                }
            }
        }
        let levels = params.level_count;
        (0..count)
            .map(|c| {
                let mut digits = vec![0i16; batches * levels * n];
                for b in 0..batches {
                    let acc = &s.acc[(c * batches + b) * stride..][..n];
                    s.ctx.backward_torus(acc, &mut s.product);
                    // M_0[p] = A[p·F];  M_u[p] = (Y·A_u)[p] = A[(p−1)·F + u], and −A[(R_c−1)·F + u]
                    // at p = 0.
                    for p in 0..block {
                        s.small[p] = s.product[p * f];
                    }
                    for u in 1..f {
                        let dst = &mut s.small[u * block..(u + 1) * block];
                        dst[0] = s.product[(block - 1) * f + u].wrapping_neg();
                        for (p, slot) in dst.iter_mut().enumerate().skip(1) {
                            *slot = s.product[(p - 1) * f + u];
                        }
                    }
                    decompose_row(
                        &s.small,
                        params.base_log,
                        levels,
                        &mut digits[b * levels * n..(b + 1) * levels * n],
                    );
                }
                digits
            })
            .collect()
    }

    /// `Σ_i b_{r,i}·w_{j,i}` for every row and output, exact, scaled back to the torus (`rows ×
    /// out`, row-major). Bodies are split in two halves so that every partial sum is an integer
    /// below 2^53 and the f64 matrix products (ndarray's blocked kernels) are exact.
    pub(super) fn body_products(&self, bodies: &[u64], rows: usize) -> Vec<u64> {
        use ndarray::{Array2, ArrayView2};
        let plan = &self.plan;
        let (cols, out, bits) = (plan.in_features, plan.out_features, plan.input_body_bits);
        let half = bits.div_ceil(2);
        let mask = (1u64 << half) - 1;
        let mut x = Array2::<f64>::zeros((2 * rows, cols));
        for (r, row) in bodies.chunks_exact(cols).enumerate() {
            for (i, &b) in row.iter().enumerate() {
                x[[r, i]] = (b & mask) as f64;
                x[[rows + r, i]] = (b >> half) as f64;
            }
        }
        // Each task converts its own slice of weight rows: no f64 copy of the layer is kept.
        let step = out.div_ceil(4 * rayon::current_num_threads()).max(64);
        let parts: Vec<(usize, Array2<f64>)> = (0..out)
            .step_by(step)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|j0| {
                let j1 = out.min(j0 + step);
                let w = ArrayView2::from_shape((j1 - j0, cols), &self.codes[j0 * cols..j1 * cols])
                    .expect("rows of codes")
                    .mapv(|c| c as f64);
                (j0, x.dot(&w.t()))
            })
            .collect();
        let mut y = vec![0u64; rows * out];
        for (j0, part) in parts {
            for r in 0..rows {
                for (dj, (&lo, &hi)) in part.row(r).iter().zip(part.row(rows + r)).enumerate() {
                    let sum = (lo as i64 as u64).wrapping_add((hi as i64 as u64) << half);
                    y[r * out + j0 + dj] = sum << (64 - bits);
                }
            }
        }
        y
    }
}

/// Bytes of block key one task may stream per pack it packs: tasks take enough packs that the key
/// (which need not fit a cache) is read about this much per pack, and never more packs than
/// [`MAX_PACKS_PER_TASK`] (their accumulators should stay in L2).
const KEY_BYTES_PER_PACK: usize = 4 << 20;
const MAX_PACKS_PER_TASK: usize = 16;

/// `−Σ_{u,l} D_{u,l} · K_{u,l}` of every pack in `packs` (`(output group, batch)` pairs), as
/// GLWEs without their bodies. Each task packs a few packs against the whole key.
fn pack_blocks(
    entries: &FourierEntries,
    params: PackingParams,
    lay: &BlockLayout,
    digits: &[Vec<i16>],
    first_output: usize,
    first_batch: usize,
    packs: &[(usize, usize)],
) -> Vec<Vec<u64>> {
    let n = INPUT_GLWE.polynomial_size;
    let (levels, polys, limbs) = (
        params.level_count,
        params.output.glwe_dimension + 1,
        params.fourier_limbs,
    );
    let (f, block) = (lay.width, lay.block);
    let acc_len = limbs * polys * n;
    let key_bytes = f * levels * acc_len * std::mem::size_of::<f64>();
    let per_task = key_bytes
        .div_ceil(KEY_BYTES_PER_PACK)
        .clamp(1, MAX_PACKS_PER_TASK);
    packs
        .par_chunks(per_task)
        .flat_map_iter(|chunk| {
            let mut ctx = FourierContext::new(n);
            let mut d = vec![0u64; n];
            let mut d_f = vec![0f64; n];
            let mut sums = vec![0f64; chunk.len() * acc_len];
            for u in 0..f {
                for l in 0..levels {
                    let k_entry = entries.entry(u, l);
                    for (pi, &(jg, b)) in chunk.iter().enumerate() {
                        let (_, valid_outs) = lay.valid(jg, b);
                        d.fill(0);
                        for m in 0..valid_outs {
                            let j = jg * f + m - first_output;
                            let local = b - first_batch;
                            let src = &digits[j][(local * levels + l) * n + u * block..][..block];
                            for (p, &digit) in src.iter().enumerate() {
                                d[p * f + m] = digit as i64 as u64;
                            }
                        }
                        ctx.forward_integer(&d, &mut d_f);
                        let acc = &mut sums[pi * acc_len..(pi + 1) * acc_len];
                        for (acc_poly, key_poly) in
                            acc.chunks_exact_mut(n).zip(k_entry.chunks_exact(n))
                        {
                            mul_add(acc_poly, &d_f, key_poly);
                        }
                    }
                }
            }
            let mut poly = vec![0u64; n];
            sums.chunks_exact(acc_len)
                .map(|acc| negated_key_sum(params, acc, &mut ctx, &mut poly))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Client side: phases of a blocked (or slot) response, row-major `rows × out`. `decrypt` turns
/// every pack's GLWE (`(k+1)·N` coefficients) into its `N` phases at once.
pub(super) fn blocked_phases(
    outputs: &EncryptedOutputs,
    block: usize,
    masks: &mut impl Iterator<Item = u64>,
    bodies: &mut impl Iterator<Item = u64>,
    decrypt: &dyn Fn(&[u64]) -> Vec<u64>,
    k: usize,
) -> Vec<u64> {
    let n = INPUT_GLWE.polynomial_size;
    let (rows, out) = (outputs.rows as usize, outputs.out_features as usize);
    let lay = BlockLayout::new(block, rows, 1, out);
    let packs: Vec<(usize, usize)> = (0..lay.out_groups)
        .flat_map(|jg| (0..lay.batches).map(move |b| (jg, b)))
        .collect();
    let mut glwes = vec![0u64; packs.len() * (k + 1) * n];
    for (glwe, &(jg, b)) in glwes.chunks_exact_mut((k + 1) * n).zip(&packs) {
        for (slot, m) in glwe[..k * n].iter_mut().zip(&mut *masks) {
            *slot = m;
        }
        let (valid_rows, valid_outs) = lay.valid(jg, b);
        let body = &mut glwe[k * n..];
        for p in 0..valid_rows {
            for (slot, v) in body[p * lay.width..p * lay.width + valid_outs]
                .iter_mut()
                .zip(&mut *bodies)
            {
                *slot = v;
            }
        }
    }
    let plain = decrypt(&glwes);
    let mut phases = vec![0u64; rows * out];
    for (pack, &(jg, b)) in plain.chunks_exact(n).zip(&packs) {
        let (valid_rows, valid_outs) = lay.valid(jg, b);
        for p in 0..valid_rows {
            for m in 0..valid_outs {
                phases[(b * block + p) * out + jg * lay.width + m] = pack[p * lay.width + m];
            }
        }
    }
    phases
}
