//! AVX2 versions of the hot loops in [`crate::kernels`], chosen at run time when the
//! CPU has AVX2. Each runs exactly the IEEE operations of its portable twin in the same
//! order (the lanes of a register are the twin's accumulator lanes; no fused
//! multiply-add), so both give bit-identical results; a test holds them to that.
//!
//! Safety: every function requires AVX2 (the callers check
//! `is_x86_feature_detected!("avx2")` once, when the engine is built), and every
//! unaligned load or store stays inside the slice it reads or writes: the loops run
//! while `i + 4 <= len`.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use rustfft::num_complex::Complex;

use crate::kernels::{fold16, fold4, fold8, Deviations};

#[inline(always)]
unsafe fn lanes(v: __m256d) -> [f64; 4] {
    let mut out = [0.0; 4];
    _mm256_storeu_pd(out.as_mut_ptr(), v);
    out
}

/// Four registers of sums (lanes 0..16) over the whole groups of 16 in `x`, and how
/// many values that took.
#[inline(always)]
unsafe fn sum16(x: &[f64]) -> ([f64; 16], usize) {
    let mut acc = [_mm256_setzero_pd(); 4];
    let p = x.as_ptr();
    let mut i = 0;
    while i + 16 <= x.len() {
        for (r, a) in acc.iter_mut().enumerate() {
            *a = _mm256_add_pd(*a, _mm256_loadu_pd(p.add(i + 4 * r)));
        }
        i += 16;
    }
    let mut out = [0.0; 16];
    for (r, a) in acc.iter().enumerate() {
        _mm256_storeu_pd(out.as_mut_ptr().add(4 * r), *a);
    }
    (out, i)
}

/// [`crate::kernels::sum`].
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn sum(x: &[f64]) -> f64 {
    let (lanes, done) = sum16(x);
    let mut tail = 0.0;
    for &v in &x[done..] {
        tail += v;
    }
    fold16(lanes) + tail
}

/// [`crate::kernels::mul_assign`], four at a time.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn mul_assign(x: &mut [f64], by: &[f64]) {
    let n = x.len().min(by.len());
    let (px, pb) = (x.as_mut_ptr(), by.as_ptr());
    let mut i = 0;
    while i + 4 <= n {
        _mm256_storeu_pd(
            px.add(i),
            _mm256_mul_pd(_mm256_loadu_pd(px.add(i)), _mm256_loadu_pd(pb.add(i))),
        );
        i += 4;
    }
    crate::kernels::mul_assign(&mut x[i..n], &by[i..n]);
}

/// [`crate::kernels::sum_min_max`] in one pass: the sum's four registers (lanes as
/// [`sum`]) and four registers each of minima and maxima over every group of 16.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn sum_min_max(x: &[f64]) -> (f64, f64, f64) {
    let first = _mm256_set1_pd(x[0]);
    let mut acc = [_mm256_setzero_pd(); 4];
    let (mut lo, mut hi) = ([first; 4], [first; 4]);
    let p = x.as_ptr();
    let mut i = 0;
    while i + 16 <= x.len() {
        for r in 0..4 {
            let v = _mm256_loadu_pd(p.add(i + 4 * r));
            acc[r] = _mm256_add_pd(acc[r], v);
            lo[r] = _mm256_min_pd(lo[r], v);
            hi[r] = _mm256_max_pd(hi[r], v);
        }
        i += 16;
    }
    let mut sums = [0.0; 16];
    for (r, a) in acc.iter().enumerate() {
        _mm256_storeu_pd(sums.as_mut_ptr().add(4 * r), *a);
    }
    let (mut tail, mut min, mut max) = (0.0, x[0], x[0]);
    for &v in &x[i..] {
        tail += v;
        min = if v < min { v } else { min };
        max = if v > max { v } else { max };
    }
    let lo = lanes(_mm256_min_pd(
        _mm256_min_pd(lo[0], lo[1]),
        _mm256_min_pd(lo[2], lo[3]),
    ));
    let hi = lanes(_mm256_max_pd(
        _mm256_max_pd(hi[0], hi[1]),
        _mm256_max_pd(hi[2], hi[3]),
    ));
    for l in 0..4 {
        min = if lo[l] < min { lo[l] } else { min };
        max = if hi[l] > max { hi[l] } else { max };
    }
    (fold16(sums) + tail, min, max)
}

/// [`crate::kernels::dot`].
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn dot(w: &[f64], x: &[f64]) -> f64 {
    let n = w.len().min(x.len());
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = _mm256_setzero_pd();
    let mut i = 0;
    while i + 4 <= n {
        acc = _mm256_add_pd(
            acc,
            _mm256_mul_pd(_mm256_loadu_pd(pw.add(i)), _mm256_loadu_pd(px.add(i))),
        );
        i += 4;
    }
    let mut tail = 0.0;
    for (a, b) in w[i..n].iter().zip(&x[i..n]) {
        tail += a * b;
    }
    fold4(lanes(acc)) + tail
}

/// [`crate::kernels::deviations`]: two registers per sum (lanes 0..4 and 4..8), so
/// the additions of consecutive groups do not wait for each other.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn deviations(x: &[f64], mean: f64, min: f64, max: f64) -> Deviations {
    let (mean_d1, mean_d2) = crate::kernels::difference_means(x);
    let body = x.len() - 2;
    let (vm, vm1, vm2) = (
        _mm256_set1_pd(mean),
        _mm256_set1_pd(mean_d1),
        _mm256_set1_pd(mean_d2),
    );
    let zero = _mm256_setzero_pd();
    let (mut v0, mut v1, mut v2, mut repeats) = ([zero; 2], [zero; 2], [zero; 2], zero);
    let p = x.as_ptr();
    let mut i = 0;
    // i + 8 <= body, so the loads of i + 2 .. i + 10 stay inside x (n = body + 2).
    while i + 8 <= body {
        for r in 0..2 {
            let j = i + 4 * r;
            let a = _mm256_loadu_pd(p.add(j));
            let b = _mm256_loadu_pd(p.add(j + 1));
            let c = _mm256_loadu_pd(p.add(j + 2));
            let d1 = _mm256_sub_pd(b, a);
            let d2 = _mm256_sub_pd(_mm256_sub_pd(c, b), d1);
            let e0 = _mm256_sub_pd(a, vm);
            let e1 = _mm256_sub_pd(d1, vm1);
            let e2 = _mm256_sub_pd(d2, vm2);
            v0[r] = _mm256_add_pd(v0[r], _mm256_mul_pd(e0, e0));
            v1[r] = _mm256_add_pd(v1[r], _mm256_mul_pd(e1, e1));
            v2[r] = _mm256_add_pd(v2[r], _mm256_mul_pd(e2, e2));
            repeats = _mm256_or_pd(repeats, _mm256_cmp_pd::<_CMP_EQ_OQ>(b, a));
        }
        i += 8;
    }
    let fold = |v: [__m256d; 2]| {
        let (a, b) = (lanes(v[0]), lanes(v[1]));
        fold8(std::array::from_fn(|l| if l < 4 { a[l] } else { b[l - 4] }))
    };
    crate::kernels::finish_deviations(
        x,
        mean,
        min,
        max,
        [fold(v0), fold(v1), fold(v2)],
        _mm256_movemask_pd(repeats) != 0,
    )
}

/// [`crate::kernels::window_pairs`].
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn window_pairs(x: &[f64], mean: f64, hann: &[f64], out: &mut [Complex<f64>]) {
    let n = x.len().min(hann.len()).min(2 * out.len());
    // Complex<f64> is repr(C) { re, im }: the buffer is 2 * len consecutive f64.
    let o = out.as_mut_ptr().cast::<f64>();
    let (px, ph, vm) = (x.as_ptr(), hann.as_ptr(), _mm256_set1_pd(mean));
    let mut i = 0;
    while i + 4 <= n {
        let v = _mm256_mul_pd(
            _mm256_sub_pd(_mm256_loadu_pd(px.add(i)), vm),
            _mm256_loadu_pd(ph.add(i)),
        );
        _mm256_storeu_pd(o.add(i), v);
        i += 4;
    }
    while i < n {
        *o.add(i) = (x[i] - mean) * hann[i];
        i += 1;
    }
}

/// Every segment's [`crate::kernels::accumulate_real_spectrum_from`], added up: `z`
/// holds the segments' spectra, `m` values each. Two bins k, k+1 and their mirrors
/// M-k, M-k-1 per step, complex values interleaved in the registers; the step goes
/// through every segment and adds their four powers in one register, in segment order
/// from zero (so each bin gets the same sum, bit for bit, as the portable loop adds
/// into the PSD), then writes them to the PSD. The last bins, DC and Nyquist go
/// through the portable loop.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn real_spectra(
    z: &[Complex<f64>],
    m: usize,
    cos: &[f64],
    sin: &[f64],
    psd: &mut [f64],
) {
    let half = m / 2;
    assert!(m > 0 && z.len() % m == 0);
    assert!(psd.len() > m && cos.len() > 2 * half + 1 && sin.len() > 2 * half + 1);
    let segments = z.len() / m;
    let zp = z.as_ptr().cast::<f64>();
    // Flips the sign of the imaginary parts (conjugates two complex values).
    let conj = _mm256_set_pd(-0.0, 0.0, -0.0, 0.0);
    let mut k = 1;
    // Both k and k + 1 below half: their mirrors are distinct bins above half.
    while k + 1 < half {
        // (c_k, c_k, c_k+1, c_k+1) and the same of -sin: 2k + 4 <= 2 half.
        let c = _mm256_loadu_pd(cos.as_ptr().add(2 * k));
        let s = _mm256_loadu_pd(sin.as_ptr().add(2 * k));
        let mut sum = _mm256_setzero_pd();
        for seg in 0..segments {
            // Segment seg's Z_k, Z_k+1 and Z_{M-k-1}, Z_{M-k}: inside z, as
            // seg * m + m - k - 1 + 2 <= (seg + 1) m.
            let zs = zp.add(2 * seg * m);
            let zk = _mm256_loadu_pd(zs.add(2 * k));
            // Z_{M-k-1}, Z_{M-k}, swapped into Z_{M-k}, Z_{M-k-1}.
            let high = _mm256_loadu_pd(zs.add(2 * (m - k - 1)));
            let mirror = _mm256_permute2f128_pd::<0x01>(high, high);
            let mconj = _mm256_xor_pd(mirror, conj);
            // A = (zr + mr, zi - mi); B = (zi + mi, mr - zr) = swap(Z - conj M) with
            // the new imaginary part negated.
            let a = _mm256_add_pd(zk, mconj);
            let diff = _mm256_sub_pd(zk, mconj);
            let b = _mm256_xor_pd(_mm256_permute_pd::<0b0101>(diff), conj);
            // T = (c br - s bi, c bi + s br).
            let t = _mm256_addsub_pd(
                _mm256_mul_pd(c, b),
                _mm256_mul_pd(s, _mm256_permute_pd::<0b0101>(b)),
            );
            let (pk, qk) = (_mm256_add_pd(a, t), _mm256_sub_pd(a, t));
            // (|P_k|², |Q_k|², |P_k+1|², |Q_k+1|²).
            sum = _mm256_add_pd(
                sum,
                _mm256_hadd_pd(_mm256_mul_pd(pk, pk), _mm256_mul_pd(qk, qk)),
            );
        }
        let [p0, q0, p1, q1] = lanes(sum);
        psd[k] = p0;
        psd[m - k] = q0;
        psd[k + 1] = p1;
        psd[m - k - 1] = q1;
        k += 2;
    }
    for spectrum in z.chunks_exact(m) {
        crate::kernels::accumulate_real_spectrum_from(k, spectrum, cos, sin, psd);
    }
}

/// [`crate::kernels::ln_positive`], four at a time; the arithmetic of
/// [`crate::kernels::ln`] step for step, with selects as blends.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn ln_positive(x: &[f64], out: &mut [f64]) {
    use crate::kernels::{LN2_HI, LN2_LO};
    let n = x.len().min(out.len());
    let (px, po) = (x.as_ptr(), out.as_mut_ptr());
    let zero = _mm256_setzero_pd();
    let min_positive = _mm256_set1_pd(f64::MIN_POSITIVE);
    let scale_up = _mm256_set1_pd(2f64.powi(200));
    let magic = _mm256_set1_epi64x(0x4330_0000_0000_0000);
    let two_52 = _mm256_set1_pd(4_503_599_627_370_496.0);
    let mantissa = _mm256_set1_epi64x(0x000f_ffff_ffff_ffff);
    let one_bits = _mm256_set1_epi64x(0x3ff0_0000_0000_0000);
    let sqrt2 = _mm256_set1_pd(std::f64::consts::SQRT_2);
    let (one, half) = (_mm256_set1_pd(1.0), _mm256_set1_pd(0.5));
    let c = |v: f64| _mm256_set1_pd(v);
    let mut i = 0;
    while i + 4 <= n {
        let v = _mm256_loadu_pd(px.add(i));
        let positive = _mm256_cmp_pd::<_CMP_GT_OQ>(v, zero);
        let tiny = _mm256_cmp_pd::<_CMP_LT_OQ>(v, min_positive);
        let v = _mm256_blendv_pd(v, _mm256_mul_pd(v, scale_up), tiny);
        let bits = _mm256_castpd_si256(v);
        let field = _mm256_sub_pd(
            _mm256_castsi256_pd(_mm256_or_si256(magic, _mm256_srli_epi64::<52>(bits))),
            two_52,
        );
        let m = _mm256_castsi256_pd(_mm256_or_si256(_mm256_and_si256(bits, mantissa), one_bits));
        let big = _mm256_cmp_pd::<_CMP_GT_OQ>(m, sqrt2);
        let m = _mm256_blendv_pd(m, _mm256_mul_pd(m, half), big);
        let e = _mm256_sub_pd(
            _mm256_add_pd(_mm256_sub_pd(field, c(1023.0)), _mm256_and_pd(big, one)),
            _mm256_and_pd(tiny, c(200.0)),
        );
        let f = _mm256_div_pd(_mm256_sub_pd(m, one), _mm256_add_pd(m, one));
        let f2 = _mm256_mul_pd(f, f);
        // kernels::ln_series, lane for lane.
        let k = crate::kernels::LN_SERIES;
        let u = f2;
        let u2 = _mm256_mul_pd(u, u);
        let p = |i: usize| _mm256_add_pd(c(k[i]), _mm256_mul_pd(c(k[i + 1]), u));
        let (p0, p1, p2, p3, p4) = (p(0), p(2), p(4), p(6), p(8));
        let u4 = _mm256_mul_pd(u2, u2);
        let q0 = _mm256_add_pd(p0, _mm256_mul_pd(p1, u2));
        let q1 = _mm256_add_pd(p2, _mm256_mul_pd(p3, u2));
        let poly = _mm256_add_pd(
            _mm256_add_pd(q0, _mm256_mul_pd(q1, u4)),
            _mm256_mul_pd(p4, _mm256_mul_pd(u4, u4)),
        );
        let series = _mm256_mul_pd(u, poly);
        let two_f = _mm256_add_pd(f, f);
        let ln = _mm256_add_pd(
            _mm256_mul_pd(e, c(LN2_HI)),
            _mm256_add_pd(
                two_f,
                _mm256_add_pd(_mm256_mul_pd(two_f, series), _mm256_mul_pd(e, c(LN2_LO))),
            ),
        );
        _mm256_storeu_pd(po.add(i), _mm256_and_pd(ln, positive));
        i += 4;
    }
    crate::kernels::ln_positive(&x[i..n], &mut out[i..n]);
}
