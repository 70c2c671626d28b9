//! Packing by ring automorphisms (Chen–Dai–Kim–Song, ACNS 2021), with small keys.
//!
//! The row packing key of `packing.rs` switches `n_in` LWE masks into one GLWE and weighs
//! hundreds of MiB. This module packs GLWEs instead, with `log2 N` GLWE keyswitching keys of
//! a few hundred KiB each: one per automorphism `τ_k : X ↦ X^k`, `k = 2^s + 1`, switching from
//! `τ_k(s)` back to `s`. Everything here runs under **one** key, the exact output key
//! (`k = 2, N = 2048, TUniform(3)`): under the input key (TUniform(17)) the keyswitch noise would
//! be 2^14 times larger in σ and could not survive the tree's amplification (see `params.rs`).
//!
//! **Leaves.** A leaf is a GLWE whose phase holds `m` values at the coefficients `p·N/m`
//! (`p < m`) and anything at all elsewhere. Merging two sub-packs `E`, `O` of `n/2` leaves each is
//! `(E + X^h O) + τ_{mn+1}(E − X^h O)` with `h = N/(mn)`: `τ_{mn+1}` fixes the coefficients at
//! multiples of `2h` and negates those at odd multiples of `h`, so the sum keeps (twice) `E`'s
//! values, `O`'s values shifted by `h`, and cancels what each had at the other's positions. After
//! the tree a partial trace `ct += τ_k(ct)` for the remaining `k = 2^s + 1 ≤ N + 1` zeroes every
//! coefficient that is not an output. In all, each leaf goes through `Σ_{g ∈ G} g(·)` for the
//! group `G = {k ≡ 1 mod 2m}` of `N/m` automorphisms, which fixes exactly the multiples of `N/m`:
//! every output comes out multiplied by `N/m` and every other coefficient of the phase is
//! keyswitching noise only (the leak test in `tests/integration/noise.rs` checks it).
//!
//! **The factor `N/m`.** `q = 2^64` has no inverse of `N/m`, so leaves are first switched to the
//! modulus `q·m/N` (each coefficient rounded to a multiple of `N/m` and divided by it, held as a
//! 64-bit integer): the tree's `×N/m` then lands back on the original scale and turns the
//! `q·m/N`-wraps into multiples of `q`. The rounding costs `(N/m)·(r_b − Σ r_i s_i)`, with
//! `|r| ≤ 1/2`, at each output.
//!
//! **Keyswitch.** In the Fourier domain with the two-limb key of `packing.rs`
//! ([`sub_key_sum`]): `(0, τ(b)) − Σ_{i,l} digit_l(τ(a_i)) · K_{k,i,l}`, where `K_{k,i,l}`
//! encrypts `τ_k(s_i) · q/B^(l+1)` under `s`.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::fourier::{mul_add, FourierContext};
use super::packing::{decompose_row, sub_key_sum, FourierEntries};
use super::params::{auto_params, PackingParams};

/// The automorphism keys a session uploads (exact precision), seeded: bodies only.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AutoKey {
    /// 16-byte mask seed per entry; entry `(s − 1)·k + i` is key `τ_{2^s+1}`, mask polynomial `i`.
    #[serde(with = "serde_bytes")]
    pub seeds: Vec<u8>,
    /// Little-endian `u64` bodies, `entries × levels × N`.
    #[serde(with = "serde_bytes")]
    pub bodies: Vec<u8>,
}

impl AutoKey {
    /// Key entries: `log2 N` automorphisms × `k` mask polynomials.
    pub fn entries() -> usize {
        let p = auto_params();
        log2(p.output.polynomial_size) * p.output.glwe_dimension
    }

    /// Exact payload size.
    pub fn expected_len() -> usize {
        let p = auto_params();
        Self::entries() * (16 + p.level_count * p.output.polynomial_size * 8)
    }

    pub fn wire_len(&self) -> usize {
        self.seeds.len() + self.bodies.len()
    }

    pub(super) fn check(&self) -> Result<(), String> {
        let p = auto_params();
        let entries = Self::entries();
        let per_entry = p.level_count * p.output.polynomial_size * 8;
        if self.seeds.len() != entries * 16 || self.bodies.len() != entries * per_entry {
            return Err(format!(
                "automorphism key: expected {} seed bytes and {} body bytes, got {} and {}",
                entries * 16,
                entries * per_entry,
                self.seeds.len(),
                self.bodies.len()
            ));
        }
        Ok(())
    }
}

/// `log2` of a power of two.
pub(super) fn log2(n: usize) -> usize {
    debug_assert!(n.is_power_of_two());
    n.trailing_zeros() as usize
}

/// The key polynomial of entry `e`: `τ_k(s_i)` for `k = 2^(e/kk + 1) + 1`, `i = e % kk`, where
/// `kk` is the GLWE dimension (used by key generation).
pub(super) fn entry_key_poly(e: usize, key: &[u64], n: usize, kk: usize, out: &mut [u64]) {
    let (s, i) = (e / kk + 1, e % kk);
    automorphism(&key[i * n..(i + 1) * n], (1 << s) + 1, out);
}

/// `out = τ_k(poly)`: coefficient `i` moves to `i·k mod 2N`, negated past `N` (negacyclic).
pub fn automorphism(poly: &[u64], k: usize, out: &mut [u64]) {
    let n = poly.len();
    let (mask, low) = (2 * n - 1, n - 1);
    let mut j = 0usize;
    for &c in poly {
        // Branch-free: the sign is the bit of `j` worth N.
        let negate = ((j >> low.count_ones()) & 1) as u64;
        out[j & low] = (c ^ negate.wrapping_neg()).wrapping_add(negate);
        j = (j + k) & mask;
    }
}

/// `out = X^h · poly` in `Z[X]/(X^N + 1)`, for `h < N`.
fn monomial_mul(poly: &[u64], h: usize, out: &mut [u64]) {
    let n = poly.len();
    out[h..].copy_from_slice(&poly[..n - h]);
    for (dst, &c) in out[..h].iter_mut().zip(&poly[n - h..]) {
        *dst = c.wrapping_neg();
    }
}

/// Round every coefficient to a multiple of `2^bits` and divide by it (the switch to `q/2^bits`).
pub fn round_down_pow2(glwe: &mut [u64], bits: u32) {
    if bits == 0 {
        return;
    }
    let half = 1u64 << (bits - 1);
    glwe.iter_mut()
        .for_each(|c| *c = c.wrapping_add(half) >> bits);
}

/// A session's automorphism keys in the Fourier domain (about 6 MiB at exact precision).
pub struct FourierAutoKeys {
    params: PackingParams,
    entries: FourierEntries,
}

impl FourierAutoKeys {
    /// Regenerate the masks from the seeds and transform (parallel). The key was checked by its
    /// codec ([`AutoKey::check`]).
    pub fn new(key: &AutoKey) -> Self {
        let params = auto_params();
        Self {
            params,
            entries: FourierEntries::new(params, &key.seeds, &key.bodies),
        }
    }

    pub fn size_bytes(&self) -> usize {
        self.entries.size_bytes()
    }

    fn n(&self) -> usize {
        self.params.output.polynomial_size
    }

    fn k(&self) -> usize {
        self.params.output.glwe_dimension
    }
}

/// Per-thread buffers of a keyswitch.
pub struct Scratch {
    ctx: FourierContext,
    digits: Vec<i16>,
    poly: Vec<u64>,
    poly_f: Vec<f64>,
    acc: Vec<f64>,
    tau: Vec<u64>,
    shifted: Vec<u64>,
}

impl Scratch {
    pub fn new(keys: &FourierAutoKeys) -> Self {
        let p = keys.params;
        let (n, polys) = (keys.n(), keys.k() + 1);
        Self {
            ctx: FourierContext::new(n),
            digits: vec![0; p.level_count * n],
            poly: vec![0; n],
            poly_f: vec![0.0; n],
            acc: vec![0.0; p.fourier_limbs * polys * n],
            tau: vec![0; polys * n],
            shifted: vec![0; polys * n],
        }
    }
}

impl FourierAutoKeys {
    /// `glwe += keyswitch(τ_k(t))` for `k = 2^s + 1`: adds the automorphism of `t`, switched
    /// back to the session key, to `glwe`. Both are `(k+1)·N` coefficients, masks first.
    fn add_automorphism(&self, glwe: &mut [u64], t: &[u64], s: usize, scratch: &mut Scratch) {
        let p = self.params;
        let (n, kk, levels) = (self.n(), self.k(), p.level_count);
        let galois = (1usize << s) + 1;
        for (q, dst) in scratch.tau.chunks_exact_mut(n).enumerate() {
            automorphism(&t[q * n..(q + 1) * n], galois, dst);
        }
        scratch.acc.fill(0.0);
        for i in 0..kk {
            decompose_row(
                &scratch.tau[i * n..(i + 1) * n],
                p.base_log,
                levels,
                &mut scratch.digits,
            );
            let entry = (s - 1) * kk + i;
            for l in 0..levels {
                for (dst, &d) in scratch
                    .poly
                    .iter_mut()
                    .zip(&scratch.digits[l * n..(l + 1) * n])
                {
                    *dst = d as i64 as u64;
                }
                scratch
                    .ctx
                    .forward_integer(&scratch.poly, &mut scratch.poly_f);
                for (acc, key) in scratch
                    .acc
                    .chunks_exact_mut(n)
                    .zip(self.entries.entry(entry, l).chunks_exact(n))
                {
                    mul_add(acc, &scratch.poly_f, key);
                }
            }
        }
        // (0, τ(b)) − Σ digits·K
        sub_key_sum(p, &scratch.acc, &mut scratch.ctx, &mut scratch.poly, glwe);
        for (c, &tb) in glwe[kk * n..].iter_mut().zip(&scratch.tau[kk * n..]) {
            *c = c.wrapping_add(tb);
        }
    }

    /// Merge two sub-packs of `n/2` leaves into one of `n` (leaves of `m` values each), in the
    /// sub-packs' own buffers: `E + X^h·O` in `even`'s, `E − X^h·O` in `odd`'s.
    fn merge(
        &self,
        even: Option<Vec<u64>>,
        odd: Option<Vec<u64>>,
        m: usize,
        n: usize,
        scratch: &mut Scratch,
    ) -> Option<Vec<u64>> {
        let poly_n = self.n();
        let h = poly_n / (m * n);
        let s = log2(m * n);
        let (mut sum, diff) = match (even, odd) {
            (None, None) => return None,
            (Some(e), None) => {
                let d = e.clone();
                (e, d)
            }
            (even, Some(mut o)) => {
                // X^h·O into the scratch buffer, then the sum and difference in place.
                for (src, dst) in o
                    .chunks_exact(poly_n)
                    .zip(scratch.shifted.chunks_exact_mut(poly_n))
                {
                    monomial_mul(src, h, dst);
                }
                match even {
                    Some(mut e) => {
                        for ((a, d), &x) in e.iter_mut().zip(o.iter_mut()).zip(&scratch.shifted) {
                            *d = a.wrapping_sub(x);
                            *a = a.wrapping_add(x);
                        }
                        (e, o)
                    }
                    None => {
                        for (d, &x) in o.iter_mut().zip(&scratch.shifted) {
                            *d = x.wrapping_neg();
                        }
                        (scratch.shifted.clone(), o)
                    }
                }
            }
        };
        self.add_automorphism(&mut sum, &diff, s, scratch);
        Some(sum)
    }

    /// Pack `leaves` (each a switched GLWE of `m` values at the multiples of `N/m`; `None` for
    /// padding) into one GLWE: leaf `i`'s value `p` at coefficient `(p·n' + i)·N/(m·n')`, where
    /// `n'` is the leaf count rounded up to a power of two, multiplied by `N/m`. At most `N/m`
    /// leaves. Parallel over the merges of each level.
    pub fn pack(&self, leaves: Vec<Option<Vec<u64>>>, m: usize) -> Vec<u64> {
        let poly_n = self.n();
        let padded = leaves.len().next_power_of_two();
        assert!(
            m * padded <= poly_n,
            "{} leaves of {m} values",
            leaves.len()
        );
        let mut level = leaves;
        level.resize(padded, None);
        let mut size = 1;
        while level.len() > 1 {
            size *= 2;
            let half = level.len() / 2;
            let odds = level.split_off(half);
            level = level
                .into_par_iter()
                .zip(odds)
                .map_init(
                    || Scratch::new(self),
                    |scratch, (e, o)| self.merge(e, o, m, size, scratch),
                )
                .collect();
        }
        let mut glwe = level
            .pop()
            .flatten()
            .unwrap_or_else(|| vec![0u64; (self.k() + 1) * poly_n]);
        // Partial trace over the automorphisms the tree did not use.
        let mut scratch = Scratch::new(self);
        let mut t = vec![0u64; glwe.len()];
        for s in log2(m * padded) + 1..=log2(poly_n) {
            t.copy_from_slice(&glwe);
            self.add_automorphism(&mut glwe, &t, s, &mut scratch);
        }
        glwe
    }
}
