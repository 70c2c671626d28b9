//! Thin layer over tfhe's negacyclic f64 FFT (size `N = 2048` everywhere in the engine) and the
//! multiply-accumulate kernel the products and the packing keyswitch spend their time in.
//!
//! Fourier polynomials are stored *split* (`N/2` real parts, then `N/2` imaginary parts) rather
//! than as tfhe's interleaved `c64`: the complex multiply-add then vectorises cleanly, which matters
//! because the packing keyswitch streams hundreds of MB of key through it per call.

use tfhe::core_crypto::fft_impl::fft64::math::polynomial::FourierPolynomial;
use tfhe::core_crypto::prelude::{c64, ComputationBuffers, Fft, Polynomial, PolynomialSize};

/// Per-thread FFT state: the plan (shared, cached by tfhe) and scratch memory.
pub struct FourierContext {
    fft: Fft,
    buffers: ComputationBuffers,
    tmp: Vec<c64>,
    n: usize,
}

impl FourierContext {
    pub fn new(n: usize) -> Self {
        let fft = Fft::new(PolynomialSize(n));
        let mut buffers = ComputationBuffers::new();
        let view = fft.as_view();
        let need = view
            .forward_scratch()
            .unaligned_bytes_required()
            .max(view.backward_scratch().unaligned_bytes_required());
        buffers.resize(need);
        Self {
            fft,
            buffers,
            tmp: vec![c64::new(0.0, 0.0); n / 2],
            n,
        }
    }

    /// Forward transform of a torus polynomial (coefficients read as `c / 2^64`, signed).
    pub fn forward_torus(&mut self, poly: &[u64], out: &mut [f64]) {
        let fft = self.fft.as_view();
        fft.forward_as_torus(
            FourierPolynomial {
                data: &mut self.tmp[..],
            },
            Polynomial::from_container(poly),
            self.buffers.stack(),
        );
        split(&self.tmp, out);
    }

    /// Forward transform of a small signed integer polynomial (two's complement in `u64`).
    pub fn forward_integer(&mut self, poly: &[u64], out: &mut [f64]) {
        let fft = self.fft.as_view();
        fft.forward_as_integer(
            FourierPolynomial {
                data: &mut self.tmp[..],
            },
            Polynomial::from_container(poly),
            self.buffers.stack(),
        );
        split(&self.tmp, out);
    }

    /// Inverse transform of an (integer × torus) product back to torus coefficients (mod 2^64).
    pub fn backward_torus(&mut self, fourier: &[f64], out: &mut [u64]) {
        let half = self.n / 2;
        for (i, c) in self.tmp.iter_mut().enumerate() {
            *c = c64::new(fourier[i], fourier[half + i]);
        }
        let fft = self.fft.as_view();
        // tfhe's adding variant converts back to the torus with SIMD (the plain one rounds one
        // coefficient at a time through libm, which cost as much as the transform itself).
        out.fill(0);
        fft.add_backward_as_torus(
            Polynomial::from_container(out),
            FourierPolynomial {
                data: &self.tmp[..],
            },
            self.buffers.stack(),
        );
    }
}

fn split(interleaved: &[c64], out: &mut [f64]) {
    let half = interleaved.len();
    let (re, im) = out.split_at_mut(half);
    for ((c, r), i) in interleaved.iter().zip(re).zip(im) {
        *r = c.re;
        *i = c.im;
    }
}

/// `acc += a ⊙ b` on split Fourier polynomials.
#[inline]
pub fn mul_add(acc: &mut [f64], a: &[f64], b: &[f64]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { mul_add_avx2(acc, a, b) };
            return;
        }
    }
    mul_add_portable(acc, a, b);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn mul_add_avx2(acc: &mut [f64], a: &[f64], b: &[f64]) {
    mul_add_portable(acc, a, b)
}

/// One tile of a cache-blocked product: for `c < count`,
/// `acc[c·acc_stride..][..n] += a ⊙ w[c·w_stride..][..n]` on the frequency bins `bins` only, for
/// split Fourier polynomials of length `n` (real parts at `[0, n/2)`, imaginary at `[n/2, n)`).
/// One call covers every output of a chunk, so that the tile of `a` is loaded once.
#[derive(Clone, Copy)]
pub struct BinTile {
    pub n: usize,
    pub count: usize,
    pub acc_stride: usize,
    pub w_stride: usize,
}

#[inline]
pub fn mul_add_bins(
    tile: BinTile,
    acc: &mut [f64],
    a: &[f64],
    w: &[f64],
    bins: std::ops::Range<usize>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { mul_add_bins_avx2(tile, acc, a, w, bins) };
            return;
        }
    }
    mul_add_bins_portable(tile, acc, a, w, bins);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn mul_add_bins_avx2(
    tile: BinTile,
    acc: &mut [f64],
    a: &[f64],
    w: &[f64],
    bins: std::ops::Range<usize>,
) {
    use std::arch::x86_64::*;
    let half = tile.n / 2;
    if !bins.len().is_multiple_of(4) || bins.end > half {
        return mul_add_bins_portable(tile, acc, a, w, bins);
    }
    // Every index below is < its slice's length: checked once here instead of per load.
    assert!(a.len() >= tile.n);
    if tile.count > 0 {
        let last = (tile.count - 1) * tile.acc_stride + tile.n;
        assert!(acc.len() >= last && w.len() >= (tile.count - 1) * tile.w_stride + tile.n);
    }
    let (ap, accp, wp) = (a.as_ptr(), acc.as_mut_ptr(), w.as_ptr());
    for i in bins.step_by(4) {
        // SAFETY: i + 3 < half and i + half + 3 < n, within every polynomial (asserted above).
        let ar = _mm256_loadu_pd(ap.add(i));
        let ai = _mm256_loadu_pd(ap.add(half + i));
        for c in 0..tile.count {
            let acc_re = accp.add(c * tile.acc_stride + i);
            let acc_im = accp.add(c * tile.acc_stride + half + i);
            let wr = _mm256_loadu_pd(wp.add(c * tile.w_stride + i));
            let wi = _mm256_loadu_pd(wp.add(c * tile.w_stride + half + i));
            let mut re = _mm256_loadu_pd(acc_re);
            let mut im = _mm256_loadu_pd(acc_im);
            re = _mm256_fmadd_pd(ar, wr, re);
            re = _mm256_fnmadd_pd(ai, wi, re);
            im = _mm256_fmadd_pd(ar, wi, im);
            im = _mm256_fmadd_pd(ai, wr, im);
            _mm256_storeu_pd(acc_re, re);
            _mm256_storeu_pd(acc_im, im);
        }
    }
}

#[inline(always)]
fn mul_add_bins_portable(
    tile: BinTile,
    acc: &mut [f64],
    a: &[f64],
    w: &[f64],
    bins: std::ops::Range<usize>,
) {
    let half = tile.n / 2;
    let len = bins.len();
    let a_re = &a[bins.clone()];
    let a_im = &a[half + bins.start..half + bins.end];
    for c in 0..tile.count {
        let acc = &mut acc[c * tile.acc_stride..c * tile.acc_stride + tile.n];
        let w = &w[c * tile.w_stride..c * tile.w_stride + tile.n];
        let (acc_re, acc_im) = acc.split_at_mut(half);
        let acc_re = &mut acc_re[bins.start..bins.start + len];
        let acc_im = &mut acc_im[bins.start..bins.start + len];
        let w_re = &w[bins.start..bins.start + len];
        let w_im = &w[half + bins.start..half + bins.start + len];
        for i in 0..len {
            let (ar, ai, br, bi) = (a_re[i], a_im[i], w_re[i], w_im[i]);
            acc_re[i] += ar * br - ai * bi;
            acc_im[i] += ar * bi + ai * br;
        }
    }
}

#[inline(always)]
fn mul_add_portable(acc: &mut [f64], a: &[f64], b: &[f64]) {
    let half = acc.len() / 2;
    let (acc_re, acc_im) = acc.split_at_mut(half);
    let (a_re, a_im) = a.split_at(half);
    let (b_re, b_im) = b.split_at(half);
    for i in 0..half {
        let (ar, ai, br, bi) = (a_re[i], a_im[i], b_re[i], b_im[i]);
        acc_re[i] += ar * br - ai * bi;
        acc_im[i] += ar * bi + ai * br;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Schoolbook negacyclic product, the reference for the FFT path.
    fn negacyclic(a: &[i64], b: &[u64]) -> Vec<u64> {
        let n = a.len();
        let mut out = vec![0u64; n];
        for (i, &ai) in a.iter().enumerate() {
            for (j, &bj) in b.iter().enumerate() {
                let p = bj.wrapping_mul(ai as u64);
                if i + j < n {
                    out[i + j] = out[i + j].wrapping_add(p);
                } else {
                    out[i + j - n] = out[i + j - n].wrapping_sub(p);
                }
            }
        }
        out
    }

    #[test]
    fn fft_product_of_small_integers_by_torus_is_close_to_schoolbook() {
        let n = 2048;
        let mut ctx = FourierContext::new(n);
        let a: Vec<i64> = (0..n as i64).map(|i| (i * 37 % 255) - 127).collect();
        let b: Vec<u64> = (0..n as u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i << 40))
            .collect();
        let a_u: Vec<u64> = a.iter().map(|&v| v as u64).collect();
        let (mut fa, mut fb) = (vec![0.0; n], vec![0.0; n]);
        ctx.forward_integer(&a_u, &mut fa);
        ctx.forward_torus(&b, &mut fb);
        let mut acc = vec![0.0; n];
        mul_add(&mut acc, &fa, &fb);
        let mut out = vec![0u64; n];
        ctx.backward_torus(&acc, &mut out);
        let want = negacyclic(&a, &b);
        let worst = out
            .iter()
            .zip(&want)
            .map(|(o, w)| (o.wrapping_sub(*w) as i64).unsigned_abs())
            .max()
            .unwrap();
        // 8-bit × 64-bit products of length 2048: error far below 2^30.
        assert!(
            worst < 1 << 30,
            "worst error 2^{:.1}",
            (worst as f64).log2()
        );
    }
}
