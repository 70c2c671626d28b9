//! The automorphism encoding (`Encoding::Auto { outputs: m }`): products that hold `m` outputs
//! each, packed by ring automorphisms (`automorph.rs`) with the session's small keys.
//!
//! **Request.** Row `r` is cut into chunks of `F = N/m` features; chunk `c` is one GLWE under the
//! exact output key with `v_{r, cF+i}·Δ` at coefficient `i < F`. Masks come from one seed. Of
//! the bodies, those the products read travel: in each of the `m` blocks `[bF, bF + F)` of a
//! chunk's GLWE, the first `len_c` coefficients (`len_c` the chunk's feature count), `m` bodies
//! per input value in all ([`AutoLayout::sent`]).
//!
//! **Product.** For output group `g` (outputs `gm..gm+m`), chunk `c` has the weight polynomial
//! `W_{g,c} = Σ_q Σ_{i<F} w_{gm+q, cF+i} · X^(qF − i)`, so that the product's coefficient `pF` is
//! `Σ_i v_i·w_{gm+p,i}·Δ`: a term `v_i·w_{gm+q,i'}` lands on `pF` only if `i − i' = (p − q)F`,
//! impossible for `q ≠ p` when `|i − i'| < F`. The mask products go through the FFT; the body
//! coefficients at the `m` outputs are exact integer dot products (all others are left zero: the
//! packing discards every coefficient that is not an output). Each product is switched to
//! `q·m/N` and is a leaf of the packing tree.
//!
//! **Response.** Leaf `L = g·rows + r` (column-major: consecutive leaves share a weight
//! polynomial) goes to pack `L / (N/m)`; a pack of `count` leaves puts leaf `i`'s output `p` at
//! coefficient `(p·n' + i)·N/(m·n')`, `n' = count.next_power_of_two()`. Each pack sends its
//! `k·N` mask coefficients and the body coefficients of its outputs, in coefficient order
//! ([`AutoLayout::slots`]).

use rayon::prelude::*;
use tfhe::core_crypto::prelude::new_seeder;

use super::{body_dot, EncryptedOutputs, EncryptedRows, FourierLinearLayer, Scheme};
use crate::fhe::automorph::{log2, round_down_pow2, FourierAutoKeys};
use crate::fhe::bitpack::{pack_top_bits, packed_len, unpack_top_bits, BitPacker};
use crate::fhe::fourier::{mul_add, FourierContext};
use crate::fhe::keys::ClientKey;
use crate::fhe::params::{auto_chunks, auto_params, Encoding, LayerPlan, Precision};
use crate::fhe::seeded::{decrypt_all, encrypt, masks_fourier, Limbs};
use crate::fhe::session_key::SessionKey;
use crate::fhe::FheError;

/// Where everything of an automorphism request sits.
#[derive(Clone, Copy, Debug)]
pub struct AutoLayout {
    /// Outputs per product (`m`).
    pub m: usize,
    /// Features per input GLWE (`N/m`).
    pub f: usize,
    pub chunks: usize,
    pub groups: usize,
    pub rows: usize,
    pub out: usize,
    n: usize,
}

impl AutoLayout {
    pub fn new(m: usize, rows: usize, in_features: usize, out: usize) -> Self {
        let n = auto_params().output.polynomial_size;
        Self {
            m,
            f: n / m,
            chunks: auto_chunks(m as u32, in_features),
            groups: out.div_ceil(m),
            rows,
            out,
            n,
        }
    }

    /// Positions (`ciphertext·N + coefficient`) of the input bodies on the wire, in order: row,
    /// chunk, block, feature.
    pub fn sent(&self, in_features: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.rows * self.chunks).flat_map(move |ct| {
            let len = self.f.min(in_features - (ct % self.chunks) * self.f);
            (0..self.m).flat_map(move |b| (0..len).map(move |i| ct * self.n + b * self.f + i))
        })
    }

    pub fn leaves(&self) -> usize {
        self.groups * self.rows
    }

    /// Leaves per pack (`N/m`).
    fn per_pack(&self) -> usize {
        self.n / self.m
    }

    pub fn packs(&self) -> usize {
        self.leaves().div_ceil(self.per_pack())
    }

    /// The leaves of pack `p`.
    fn pack_leaves(&self, p: usize) -> std::ops::Range<usize> {
        let first = p * self.per_pack();
        first..self.leaves().min(first + self.per_pack())
    }

    /// `(coefficient, row, output)` of every value in pack `p`, in coefficient order: the order of
    /// the bodies on the wire.
    pub fn slots(&self, p: usize) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let leaves = self.pack_leaves(p);
        let count = leaves.len();
        let padded = count.next_power_of_two();
        let stride = self.n / (self.m * padded);
        (0..self.m * padded).filter_map(move |o| {
            let (q, i) = (o / padded, o % padded);
            if i >= count {
                return None;
            }
            let leaf = leaves.start + i;
            let (g, r) = (leaf / self.rows, leaf % self.rows);
            let j = g * self.m + q;
            (j < self.out).then_some((o * stride, r, j))
        })
    }
}

/// `[g][c][N]` split Fourier weight polynomials `W_{g,c}` of a layer (see the module comment).
pub(super) fn weights(plan: &LayerPlan, codes: &[i8], m: usize) -> Vec<f64> {
    let layout = AutoLayout::new(m, 1, plan.in_features, plan.out_features);
    let (n, f, chunks, cols) = (layout.n, layout.f, layout.chunks, plan.in_features);
    let mut weights = vec![0f64; layout.groups * chunks * n];
    weights
        .par_chunks_mut(chunks * n)
        .enumerate()
        .for_each_init(
            || (FourierContext::new(n), vec![0u64; n]),
            |(ctx, poly), (g, dst)| {
                for (c, slot) in dst.chunks_exact_mut(n).enumerate() {
                    poly.fill(0);
                    for q in 0..m {
                        let j = g * m + q;
                        if j >= plan.out_features {
                            break;
                        }
                        for i in 0..f.min(cols.saturating_sub(c * f)) {
                            let w = codes[j * cols + c * f + i] as i64;
                            // X^(qF − i), negacyclic for qF < i.
                            let e = (q * f) as isize - i as isize;
                            if e >= 0 {
                                poly[e as usize] = w as u64;
                            } else {
                                poly[(e + n as isize) as usize] = w.wrapping_neg() as u64;
                            }
                        }
                    }
                    ctx.forward_integer(poly, slot);
                }
            },
        );
    weights
}

impl FourierLinearLayer {
    /// The whole packed GLWEs of an automorphism request (`(k+1)·N` coefficients each, masks
    /// first) before anything is cut for the wire: what the leak test decrypts in full.
    pub fn auto_glwes(
        &self,
        keys: &FourierAutoKeys,
        input: &EncryptedRows,
        m: usize,
    ) -> Result<(AutoLayout, Vec<Vec<u64>>), FheError> {
        let plan = &self.plan;
        let weights = match &self.auto_f {
            Some((outputs, w)) if *outputs as usize == m => w,
            _ => {
                return Err(FheError::ParameterMismatch(format!(
                    "the layer was not prepared for auto{m} requests"
                )))
            }
        };
        let rows = input.rows as usize;
        let layout = AutoLayout::new(m, rows, plan.in_features, plan.out_features);
        let shape = auto_params().output;
        let (n, kk, f, chunks) = (layout.n, shape.glwe_dimension, layout.f, layout.chunks);
        let bits = plan.input_body_bits;
        let shift = 64 - bits;
        let mut bodies = vec![0u64; rows * chunks * n];
        let sent = rows * m * plan.in_features;
        for (pos, b) in
            layout
                .sent(plan.in_features)
                .zip(unpack_top_bits(&input.bodies, sent, bits))
        {
            bodies[pos] = b >> shift;
        }
        let split = plan.auto_split();
        let limbs = 1 + split as usize;
        let masks_f = request_masks(input.seed(), rows * chunks, split);
        let switch_bits = log2(n / m) as u32;
        let cols = plan.in_features;

        let mut packs = Vec::with_capacity(layout.packs());
        for p in 0..layout.packs() {
            let leaves: Vec<Option<Vec<u64>>> = layout
                .pack_leaves(p)
                .into_par_iter()
                .map_init(
                    || (FourierContext::new(n), vec![0f64; n], vec![0u64; n]),
                    |(ctx, acc, lo), leaf| {
                        let (g, r) = (leaf / rows, leaf % rows);
                        let mut glwe = vec![0u64; (kk + 1) * n];
                        for q in 0..kk {
                            for limb in 0..limbs {
                                acc.fill(0.0);
                                for c in 0..chunks {
                                    let poly = ((r * chunks + c) * kk + q) * limbs + limb;
                                    mul_add(
                                        acc,
                                        &masks_f[poly * n..(poly + 1) * n],
                                        &weights[(g * chunks + c) * n..(g * chunks + c + 1) * n],
                                    );
                                }
                                let dst = &mut glwe[q * n..(q + 1) * n];
                                if limb == 0 {
                                    ctx.backward_torus(acc, dst);
                                } else {
                                    // The `hi` products are exact multiples of 2^32 up to the
                                    // f64 error (< 2^31): round them, then add the `lo` ones.
                                    ctx.backward_torus(acc, lo);
                                    for (d, &l) in dst.iter_mut().zip(lo.iter()) {
                                        *d = (d.wrapping_add(1 << 31) & !((1u64 << 32) - 1))
                                            .wrapping_add(l);
                                    }
                                }
                            }
                        }
                        let body = &mut glwe[kk * n..];
                        for out_p in 0..m {
                            if g * m + out_p >= plan.out_features {
                                break;
                            }
                            let mut sum = 0u64;
                            for c in 0..chunks {
                                let len = f.min(cols - c * f);
                                let chunk = &bodies[(r * chunks + c) * n..(r * chunks + c + 1) * n];
                                for q in 0..m {
                                    let j = g * m + q;
                                    if j >= plan.out_features {
                                        break;
                                    }
                                    // v_i·w_{j,i} meets body coefficient ((p − q) mod m)·F + i,
                                    // negated when it wrapped (p < q).
                                    let start = ((out_p + m - q) % m) * f;
                                    let dot = body_dot(
                                        &chunk[start..start + len],
                                        &self.codes[j * cols + c * f..j * cols + c * f + len],
                                        bits,
                                    );
                                    sum = if out_p < q {
                                        sum.wrapping_sub(dot)
                                    } else {
                                        sum.wrapping_add(dot)
                                    };
                                }
                            }
                            body[out_p * f] = sum;
                        }
                        round_down_pow2(&mut glwe, switch_bits);
                        Some(glwe)
                    },
                )
                .collect();
            packs.push(keys.pack(leaves, m));
        }
        Ok((layout, packs))
    }

    /// Evaluate an automorphism-encoded request (checked by the caller against the plan and the
    /// key's precision): [`FourierLinearLayer::auto_glwes`], then each pack's mask and output
    /// bodies onto the wire.
    pub(super) fn evaluate_auto(
        &self,
        keys: &FourierAutoKeys,
        input: &EncryptedRows,
        m: usize,
    ) -> Result<EncryptedOutputs, FheError> {
        let plan = &self.plan;
        let rows = input.rows as usize;
        let (layout, packs) = self.auto_glwes(keys, input, m)?;
        let mask_len = auto_params().output.lwe_dimension();
        let mut masks =
            Vec::with_capacity(packed_len(packs.len() * mask_len, plan.output_mask_bits));
        let mut out_bodies =
            Vec::with_capacity(packed_len(rows * layout.out, plan.output_body_bits));
        let mut mask_packer = BitPacker::new(plan.output_mask_bits, &mut masks);
        let mut body_packer = BitPacker::new(plan.output_body_bits, &mut out_bodies);
        for (p, packed) in packs.iter().enumerate() {
            packed[..mask_len].iter().for_each(|&c| mask_packer.push(c));
            for (coefficient, _, _) in layout.slots(p) {
                body_packer.push(packed[mask_len + coefficient]);
            }
        }
        mask_packer.finish();
        body_packer.finish();
        Ok(EncryptedOutputs::of_plan(
            plan,
            rows,
            Encoding::Auto { outputs: m as u32 },
            masks,
            out_bodies,
        ))
    }
}

/// Regenerate an automorphism request's masks from its seed and transform them:
/// `[ciphertext][mask polynomial][limb][N]`, with one limb, or two (`hi·2^32`, then the signed
/// `lo`) for split products.
fn request_masks(seed: u128, count: usize, split: bool) -> Vec<f64> {
    let shape = auto_params().output;
    let limbs = if split { Limbs::Split(32) } else { Limbs::One };
    masks_fourier(
        count,
        shape.glwe_dimension,
        shape.polynomial_size,
        count,
        |_| seed,
        limbs,
    )
}

/// The automorphism encoding with `m` outputs per product (the module comment).
pub(super) struct Auto {
    pub m: usize,
}

impl Scheme for Auto {
    fn encrypt(
        &self,
        key: &ClientKey,
        plan: &LayerPlan,
        values: &[i32],
        rows: usize,
    ) -> EncryptedRows {
        key.encrypt_auto(plan, values, rows, self.m)
    }

    fn evaluate(
        &self,
        layer: &FourierLinearLayer,
        key: &SessionKey,
        input: &EncryptedRows,
        _: usize,
    ) -> Result<EncryptedOutputs, FheError> {
        let keys = key.auto.as_ref().ok_or_else(|| {
            FheError::ParameterMismatch(
                "the session's key has no automorphism keys (made by an older client): send \
                 row, blocked or slot requests, or open a new session"
                    .into(),
            )
        })?;
        layer.evaluate_auto(keys, input, self.m)
    }

    fn packs(&self, _: Precision, rows: usize, out: usize) -> usize {
        // `clamp`: an unvalidated response's `m` may be 0 or past N (validate refuses both).
        let n = auto_params().output.polynomial_size;
        AutoLayout::new(self.m.clamp(1, n), rows, 1, out).packs()
    }

    fn phases(
        &self,
        key: &ClientKey,
        outputs: &EncryptedOutputs,
        masks: Vec<u64>,
        bodies: Vec<u64>,
    ) -> Vec<u64> {
        let shape = auto_params().output;
        let (k, n) = (shape.glwe_dimension, shape.polynomial_size);
        let output_key = key.output_key(outputs.precision);
        let decrypt = |glwes: &[u64]| decrypt_all(output_key, k, n, glwes);
        auto_phases(
            outputs,
            self.m,
            &mut masks.into_iter(),
            &mut bodies.into_iter(),
            &decrypt,
        )
    }
}

impl ClientKey {
    /// Encrypt `rows` rows (checked by the caller) for an automorphism request of `m` outputs per
    /// product, under the exact output key.
    pub(super) fn encrypt_auto(
        &self,
        plan: &LayerPlan,
        values: &[i32],
        rows: usize,
        m: usize,
    ) -> EncryptedRows {
        let cols = plan.in_features;
        let layout = AutoLayout::new(m, rows, cols, plan.out_features);
        let shape = auto_params().output;
        let (n, f, chunks) = (layout.n, layout.f, layout.chunks);
        let delta_log = plan.delta_log();
        let mut plain = vec![0u64; rows * chunks * n];
        for (r, row) in values.chunks_exact(cols).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                plain[(r * chunks + i / f) * n + i % f] = (v as i64 as u64) << delta_log;
            }
        }
        let seed = new_seeder().seed().0;
        let all = encrypt(self.output_key(plan.precision), shape, &plain, seed);
        let mut packed = Vec::with_capacity(packed_len(rows * m * cols, plan.input_body_bits));
        pack_top_bits(
            layout.sent(cols).map(|pos| all[pos]),
            plan.input_body_bits,
            &mut packed,
        );
        EncryptedRows {
            rows: rows as u32,
            in_features: cols as u32,
            body_bits: plan.input_body_bits as u8,
            seed: seed.to_le_bytes().to_vec(),
            bodies: packed,
            encoding: Encoding::Auto { outputs: m as u32 },
        }
    }
}

/// Phases of an automorphism response, row-major `rows × out`: each pack is rebuilt as a GLWE
/// (its mask, its output bodies at their coefficients, zero elsewhere) and decrypted.
pub(super) fn auto_phases(
    outputs: &EncryptedOutputs,
    m: usize,
    masks: &mut impl Iterator<Item = u64>,
    bodies: &mut impl Iterator<Item = u64>,
    decrypt: &dyn Fn(&[u64]) -> Vec<u64>,
) -> Vec<u64> {
    let (rows, out) = (outputs.rows as usize, outputs.out_features as usize);
    let layout = AutoLayout::new(m, rows, 1, out);
    let shape = auto_params().output;
    let (n, mask_len) = (shape.polynomial_size, shape.lwe_dimension());
    let glwe_len = mask_len + n;
    let mut glwes = vec![0u64; layout.packs() * glwe_len];
    for (p, glwe) in glwes.chunks_exact_mut(glwe_len).enumerate() {
        for (slot, c) in glwe[..mask_len].iter_mut().zip(&mut *masks) {
            *slot = c;
        }
        for ((coefficient, _, _), b) in layout.slots(p).zip(&mut *bodies) {
            glwe[mask_len + coefficient] = b;
        }
    }
    let phases = decrypt(&glwes);
    let mut result = vec![0u64; rows * out];
    for p in 0..layout.packs() {
        for (coefficient, r, j) in layout.slots(p) {
            result[r * out + j] = phases[p * n + coefficient];
        }
    }
    result
}

impl ClientKey {
    /// Phases of whole GLWEs under the exact output key (`(k+1)·N` coefficients each, masks
    /// first), every coefficient: for audits of what a response carries besides its outputs.
    pub fn decrypt_exact_glwes(&self, glwes: &[Vec<u64>]) -> Vec<Vec<u64>> {
        let shape = auto_params().output;
        let (kk, n) = (shape.glwe_dimension, shape.polynomial_size);
        glwes
            .iter()
            .map(|g| decrypt_all(self.output_key(Precision::Exact), kk, n, g))
            .collect()
    }
}
