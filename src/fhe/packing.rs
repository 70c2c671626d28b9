//! LWE → GLWE packing keyswitch, formulated as polynomial products in the Fourier domain.
//!
//! The textbook packing keyswitch of `n_pack` LWEs (dimension `n_in`) costs
//! `n_in · L · (k+1) · N` multiply-adds *per packed value*. Transposed, it is a sum of polynomial
//! products: with `D_{t,l}(X) = Σ_i digit_l(a_{i,t}) · X^i` (the level-`l` digits of mask
//! coefficient `t` of every packed LWE `i`) and `K_{t,l}` the GLWE encryption of
//! `s_t · q/B^(l+1)`,
//!
//! ```text
//! packed = (0, Σ_i b_i X^i) − Σ_{t,l} D_{t,l} · K_{t,l}
//! ```
//!
//! `K` is transformed once per session ([`FourierPackingKey`]); a call costs `n_in·L` forward
//! FFTs of `D` and `n_in·L·(k+1)` Fourier multiply-adds per pack, plus `(k+1)·limbs` inverse FFTs.
//! Several packs (rows, or outputs beyond `N`) share each pass over the key, which is the
//! memory-bound part.
//!
//! **Precision.** An f64 product of a 14-bit digit polynomial with a 64-bit key polynomial,
//! summed over `n_in·L` terms, is off by about 2^36: too much for exact results. In exact
//! precision each key polynomial is split as `K = hi·2^42 + lo` (`lo` signed, 42 bits). The `hi`
//! products are integers below 2^50, computed with absolute error < 2^41 after scaling, so
//! rounding their sum to the nearest multiple of 2^42 recovers them *exactly*; the `lo` products
//! carry an error of about 2^15, far below the noise.

use rayon::prelude::*;

use super::fourier::{mul_add, FourierContext};
use super::params::{PackingParams, Precision, INPUT_GLWE, LIMB_SPLIT};

/// Outputs per transposition block: the digit store is laid out `[block][l][t][BLOCK]` so that
/// each block is built by one task and each `D_{t,l}` is gathered from contiguous runs.
pub const BLOCK: usize = 64;

/// A session's LWE → GLWE packing keys (row and blocked encodings), in the Fourier domain. Part
/// of its [`SessionKey`](super::SessionKey); a lean session's are empty.
pub struct FourierPackingKey {
    pub precision: Precision,
    pub params: PackingParams,
    /// The row key: one entry per input-key coefficient.
    pub(super) row: FourierEntries,
    /// The blocked encoding's keys, by rows per ciphertext.
    pub(super) blocks: Vec<(usize, FourierEntries)>,
}

/// Key entries in the Fourier domain: `[entry][l][limb][poly][N]` split polynomials.
pub struct FourierEntries {
    levels: usize,
    entry_len: usize,
    data: Vec<f64>,
}

impl FourierEntries {
    /// Regenerate the masks of `seeds.len() / 16` entries and transform every key polynomial
    /// (parallel).
    pub(super) fn new(params: PackingParams, seeds: &[u8], bodies: &[u8]) -> Self {
        let out = params.output;
        let (n, polys, levels) = (
            out.polynomial_size,
            out.glwe_dimension + 1,
            params.level_count,
        );
        let entry_len = params.fourier_limbs * polys * n;
        let per_t = levels * entry_len;
        let entries = seeds.len() / 16;
        let mut data = vec![0f64; entries * per_t];
        let body_bytes = levels * n * 8;
        data.par_chunks_mut(per_t).enumerate().for_each_init(
            || FourierContext::new(n),
            |ctx, (t, slot)| {
                let bodies: Vec<u64> = bodies[t * body_bytes..(t + 1) * body_bytes]
                    .chunks_exact(8)
                    .map(|b| u64::from_le_bytes(b.try_into().expect("8-byte chunk")))
                    .collect();
                let mut seed = [0u8; 16];
                seed.copy_from_slice(&seeds[t * 16..(t + 1) * 16]);
                let coefficients =
                    super::seeded::decompress(bodies, u128::from_le_bytes(seed), polys - 1, n);
                let mut limb = vec![0u64; n];
                for l in 0..levels {
                    for p in 0..polys {
                        let poly = &coefficients[(l * polys + p) * n..(l * polys + p + 1) * n];
                        let base = l * entry_len;
                        if params.fourier_limbs == 1 {
                            ctx.forward_torus(poly, &mut slot[base + p * n..base + (p + 1) * n]);
                        } else {
                            for (dst, &c) in limb.iter_mut().zip(poly) {
                                *dst = c.wrapping_sub(low_limb(c));
                            }
                            ctx.forward_torus(&limb, &mut slot[base + p * n..base + (p + 1) * n]);
                            for (dst, &c) in limb.iter_mut().zip(poly) {
                                *dst = low_limb(c);
                            }
                            let lo = base + polys * n;
                            ctx.forward_torus(&limb, &mut slot[lo + p * n..lo + (p + 1) * n]);
                        }
                    }
                }
            },
        );
        Self {
            levels,
            entry_len,
            data,
        }
    }

    /// Level `l` of entry `t`: `limbs × polys` split Fourier polynomials.
    pub fn entry(&self, t: usize, l: usize) -> &[f64] {
        let start = (t * self.levels + l) * self.entry_len;
        &self.data[start..start + self.entry_len]
    }

    pub(super) fn size_bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<f64>()
    }
}

impl FourierPackingKey {
    /// Memory held by the transformed keys.
    pub fn size_bytes(&self) -> usize {
        self.row.size_bytes()
            + self
                .blocks
                .iter()
                .map(|(_, e)| e.size_bytes())
                .sum::<usize>()
    }

    fn entry(&self, t: usize, l: usize) -> &[f64] {
        self.row.entry(t, l)
    }

    /// The block key for `rows` rows per ciphertext, if the session uploaded one.
    pub fn block(&self, rows: usize) -> Option<&FourierEntries> {
        self.blocks.iter().find(|(r, _)| *r == rows).map(|(_, e)| e)
    }

    /// Block sizes this key serves.
    pub fn block_sizes(&self) -> Vec<usize> {
        self.blocks.iter().map(|(r, _)| *r).collect()
    }
}

/// Hint the CPU to bring `data` into L2 (no effect on other targets).
#[inline]
pub(super) fn prefetch(data: &[f64]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(8) {
        // SAFETY: prefetching is a hint; the address is inside a live slice.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Signed low `LIMB_SPLIT` bits of `c`, as a two's complement `u64`.
fn low_limb(c: u64) -> u64 {
    let shift = 64 - LIMB_SPLIT;
    (((c << shift) as i64) >> shift) as u64
}

/// Balanced base-`2^base_log` digits of every value of `values`, each rounded to its top
/// `base_log·levels` bits: `out[l·n + t]` is level `l` of `values[t]`, level 0 the most
/// significant (weight `q/B`). Digits lie in `[−B/2, B/2)`.
pub fn decompose_row(values: &[u64], base_log: u32, levels: usize, out: &mut [i16]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports the feature the function is compiled for.
            unsafe { decompose_row_avx2(values, base_log, levels, out) };
            return;
        }
    }
    decompose_row_portable(values, base_log, levels, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn decompose_row_avx2(values: &[u64], base_log: u32, levels: usize, out: &mut [i16]) {
    decompose_row_portable(values, base_log, levels, out)
}

#[inline(always)]
fn decompose_row_portable(values: &[u64], base_log: u32, levels: usize, out: &mut [i16]) {
    let n = values.len();
    let shift = 64 - base_log * levels as u32;
    let base = 1u64 << base_log;
    let half = base >> 1;
    let mut carry: Vec<u64> = values
        .iter()
        .map(|&a| (a >> shift) + ((a >> (shift - 1)) & 1))
        .collect();
    for l in (0..levels).rev() {
        for (slot, v) in out[l * n..(l + 1) * n].iter_mut().zip(carry.iter_mut()) {
            let d = *v & (base - 1);
            let up = (d >= half) as u64;
            *slot = (d as i64 - (up << base_log) as i64) as i16;
            *v = (*v >> base_log) + up;
        }
    }
}

/// One pack's inputs: its LWE bodies (`count` of them, in coefficient order). Its digits live in
/// the shared `[block][t][l][BLOCK]` store, blocks `first_block..first_block + count/BLOCK`.
pub struct PackInput<'a> {
    pub bodies: &'a [u64],
    pub first_block: usize,
}

/// Pack every pack's LWEs into one GLWE each (`(k+1)·N` coefficients, masks first).
pub fn pack(key: &FourierPackingKey, digits: &[i16], packs: &[PackInput<'_>]) -> Vec<Vec<u64>> {
    let p = key.params;
    let (n, polys, levels, limbs) = (
        p.output.polynomial_size,
        p.output.glwe_dimension + 1,
        p.level_count,
        p.fourier_limbs,
    );
    let n_in = INPUT_GLWE.lwe_dimension();
    let block_len = n_in * levels * BLOCK;
    let acc_len = limbs * polys * n;
    let min_len = (n_in / (8 * rayon::current_num_threads())).max(16);

    struct State {
        sums: Vec<f64>,
        ctx: FourierContext,
        d: Vec<u64>,
        d_f: Vec<f64>,
    }
    let sums = (0..n_in)
        .into_par_iter()
        .with_min_len(min_len)
        .fold(
            || State {
                sums: vec![0f64; packs.len() * acc_len],
                ctx: FourierContext::new(n),
                d: vec![0u64; n],
                d_f: vec![0f64; n],
            },
            |mut st, t| {
                for l in 0..levels {
                    let k_entry = key.entry(t, l);
                    // The pass is bound by streaming the key from memory: start pulling the next
                    // entry into L2 now, so that it arrives while this entry's FFTs run.
                    if l + 1 < levels {
                        prefetch(key.entry(t, l + 1));
                    } else if t + 1 < n_in {
                        prefetch(key.entry(t + 1, 0));
                    }
                    for (pi, pack) in packs.iter().enumerate() {
                        let blocks = pack.bodies.len().div_ceil(BLOCK);
                        st.d.fill(0);
                        for b in 0..blocks {
                            let src = (pack.first_block + b) * block_len + (l * n_in + t) * BLOCK;
                            let run = BLOCK.min(pack.bodies.len() - b * BLOCK);
                            for (dst, &digit) in st.d[b * BLOCK..b * BLOCK + run]
                                .iter_mut()
                                .zip(&digits[src..src + run])
                            {
                                *dst = digit as i64 as u64;
                            }
                        }
                        st.ctx.forward_integer(&st.d, &mut st.d_f);
                        let acc = &mut st.sums[pi * acc_len..(pi + 1) * acc_len];
                        for (acc_poly, key_poly) in
                            acc.chunks_exact_mut(n).zip(k_entry.chunks_exact(n))
                        {
                            mul_add(acc_poly, &st.d_f, key_poly);
                        }
                    }
                }
                st
            },
        )
        .map(|st| st.sums)
        .reduce_with(|mut a, b| {
            a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
            a
        })
        .expect("n_in > 0");

    let mut ctx = FourierContext::new(n);
    let mut poly = vec![0u64; n];
    packs
        .iter()
        .enumerate()
        .map(|(pi, pack)| {
            let mut glwe = negated_key_sum(
                p,
                &sums[pi * acc_len..(pi + 1) * acc_len],
                &mut ctx,
                &mut poly,
            );
            // packed = (0, Σ b_i X^i) − Σ D·K
            let body = &mut glwe[(polys - 1) * n..];
            for (c, &b) in body.iter_mut().zip(pack.bodies) {
                *c = c.wrapping_add(b);
            }
            glwe
        })
        .collect()
}

/// `−Σ D·K` as a GLWE (`(k+1)·N` coefficients, masks first) from its Fourier-domain sums
/// `[limb][poly][N]`. With two limbs the `hi` limb's sum is an exact multiple of `2^LIMB_SPLIT`
/// up to the f64 error, so it is rounded to one (see the module comment).
pub(super) fn negated_key_sum(
    p: PackingParams,
    acc: &[f64],
    ctx: &mut FourierContext,
    poly: &mut [u64],
) -> Vec<u64> {
    let mut glwe = vec![0u64; (p.output.glwe_dimension + 1) * p.output.polynomial_size];
    sub_key_sum(p, acc, ctx, poly, &mut glwe);
    glwe
}

/// `glwe −= Σ` of [`negated_key_sum`], in place: what a keyswitch adds to a ciphertext, without
/// allocating (the automorphism packing runs it once per merge).
pub(super) fn sub_key_sum(
    p: PackingParams,
    acc: &[f64],
    ctx: &mut FourierContext,
    poly: &mut [u64],
    glwe: &mut [u64],
) {
    let (n, polys, limbs) = (
        p.output.polynomial_size,
        p.output.glwe_dimension + 1,
        p.fourier_limbs,
    );
    let hi_round = 1u64 << (LIMB_SPLIT - 1);
    let hi_mask = !((1u64 << LIMB_SPLIT) - 1);
    for limb in 0..limbs {
        for q in 0..polys {
            let f = &acc[(limb * polys + q) * n..(limb * polys + q + 1) * n];
            ctx.backward_torus(f, poly);
            let dst = &mut glwe[q * n..(q + 1) * n];
            if limbs == 2 && limb == 0 {
                for (d, &v) in dst.iter_mut().zip(poly.iter()) {
                    *d = d.wrapping_sub(v.wrapping_add(hi_round) & hi_mask);
                }
            } else {
                for (d, &v) in dst.iter_mut().zip(poly.iter()) {
                    *d = d.wrapping_sub(v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decomposition_recomposes_to_the_rounded_value() {
        let values = [
            0u64,
            1,
            u64::MAX,
            1 << 63,
            0x0123_4567_89AB_CDEF,
            0xFFFF_F000_0000_0000,
        ];
        let mut digits = vec![0i16; 3 * values.len()];
        decompose_row(&values, 14, 3, &mut digits);
        for (t, &a) in values.iter().enumerate() {
            let d: Vec<i16> = (0..3).map(|l| digits[l * values.len() + t]).collect();
            let back = d.iter().enumerate().fold(0u64, |acc, (l, &x)| {
                acc.wrapping_add((x as i64 as u64).wrapping_mul(1u64 << (64 - 14 * (l + 1))))
            });
            let err = a.wrapping_sub(back) as i64;
            assert!(err.unsigned_abs() <= 1 << 21, "{a:#x}: {d:?} err {err}");
            assert!(d
                .iter()
                .all(|&x| (-(1 << 13)..(1 << 13)).contains(&(x as i32))));
        }
    }

    #[test]
    fn low_limb_and_high_limb_recompose() {
        for &c in &[
            0u64,
            u64::MAX,
            1 << 41,
            (1 << 41) - 1,
            0xDEAD_BEEF_0123_4567,
        ] {
            let lo = low_limb(c);
            let hi = c.wrapping_sub(lo);
            assert_eq!(hi & ((1 << LIMB_SPLIT) - 1), 0);
            assert_eq!(hi.wrapping_add(lo), c);
        }
    }
}
