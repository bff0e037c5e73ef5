//! The loops of [`crate::FeatureEngine::compute`], portable, and [`Simd`], which runs
//! their AVX2 twins (`crate::avx2`) instead when the CPU has AVX2.
//!
//! The portable loops keep fixed lanes of independent accumulators, exactly the lanes
//! of the AVX2 registers, and fold them in the same order, so both paths give
//! bit-identical results (a test compares them bit for bit).

use rustfft::num_complex::Complex;

/// Which versions of the loops run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Simd {
    avx2: bool,
}

impl Simd {
    /// The fastest this CPU supports.
    pub(crate) fn detect() -> Simd {
        #[cfg(target_arch = "x86_64")]
        let avx2 = std::arch::is_x86_feature_detected!("avx2");
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        Simd { avx2 }
    }

    /// The portable loops only.
    #[cfg(test)]
    pub(crate) fn portable() -> Simd {
        Simd { avx2: false }
    }

    pub(crate) fn avx2(self) -> bool {
        self.avx2
    }
}

// SAFETY (every `unsafe` block below): `avx2` is true only when the CPU reported AVX2
// (`Simd::detect`), which is all the `crate::avx2` functions require.
#[allow(unsafe_code)]
impl Simd {
    #[inline]
    pub(crate) fn sum(self, x: &[f64]) -> f64 {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            return unsafe { crate::avx2::sum(x) };
        }
        sum(x)
    }

    #[inline]
    pub(crate) fn dot(self, w: &[f64], x: &[f64]) -> f64 {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            return unsafe { crate::avx2::dot(w, x) };
        }
        dot(w, x)
    }

    #[inline]
    pub(crate) fn mul_assign(self, x: &mut [f64], by: &[f64]) {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            return unsafe { crate::avx2::mul_assign(x, by) };
        }
        mul_assign(x, by)
    }

    #[inline]
    pub(crate) fn sum_min_max(self, x: &[f64]) -> (f64, f64, f64) {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            return unsafe { crate::avx2::sum_min_max(x) };
        }
        sum_min_max(x)
    }

    #[inline]
    pub(crate) fn deviations(self, x: &[f64], mean: f64, min: f64, max: f64) -> Deviations {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            return unsafe { crate::avx2::deviations(x, mean, min, max) };
        }
        deviations(x, mean, min, max)
    }

    #[inline]
    pub(crate) fn window_pairs(self, x: &[f64], mean: f64, hann: &[f64], out: &mut [Complex<f64>]) {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            return unsafe { crate::avx2::window_pairs(x, mean, hann, out) };
        }
        window_pairs(x, mean, hann, out)
    }

    #[inline]
    pub(crate) fn ln_positive(self, x: &[f64], out: &mut [f64]) {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            return unsafe { crate::avx2::ln_positive(x, out) };
        }
        ln_positive(x, out)
    }

    /// The summed power spectra of the real segments whose sample pairs were
    /// transformed into `z` (M = `m` complex values each, one segment after another):
    /// [`accumulate_real_spectrum_from`] for each, added to `psd` (zero before).
    #[inline]
    pub(crate) fn real_spectra(
        self,
        z: &[Complex<f64>],
        m: usize,
        cos: &[f64],
        sin: &[f64],
        psd: &mut [f64],
    ) {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            return unsafe { crate::avx2::real_spectra(z, m, cos, sin, psd) };
        }
        for spectrum in z.chunks_exact(m) {
            accumulate_real_spectrum_from(1, spectrum, cos, sin, psd);
        }
    }
}

/// Folds sixteen accumulator lanes as four 4-lane registers would be: register 0
/// with 2 and 1 with 3, those two, then pairwise.
#[inline(always)]
pub(crate) fn fold16(v: [f64; 16]) -> f64 {
    let r: [f64; 8] = std::array::from_fn(|l| v[l] + v[l + 8]);
    fold4(std::array::from_fn(|l| r[l] + r[l + 4]))
}

/// Folds eight accumulator lanes as two 4-lane registers would be: their sum, then
/// pairwise.
#[inline(always)]
pub(crate) fn fold8(v: [f64; 8]) -> f64 {
    fold4(std::array::from_fn(|l| v[l] + v[l + 4]))
}

/// Folds four accumulator lanes pairwise.
#[inline(always)]
pub(crate) fn fold4(v: [f64; 4]) -> f64 {
    (v[0] + v[1]) + (v[2] + v[3])
}

/// Sums `x`: element i into lane i mod 16 while whole groups of sixteen remain (four
/// AVX2 registers: the add latency hidden), the rest in order; then [`fold16`] plus
/// the rest.
pub(crate) fn sum(x: &[f64]) -> f64 {
    let mut acc = [0.0; 16];
    let chunks = x.chunks_exact(16);
    let mut tail = 0.0;
    for &v in chunks.remainder() {
        tail += v;
    }
    for c in chunks {
        for l in 0..16 {
            acc[l] += c[l];
        }
    }
    fold16(acc) + tail
}

/// `Σ w_k x_k`: lane i mod 4 while whole groups of four remain, the rest in order.
pub(crate) fn dot(w: &[f64], x: &[f64]) -> f64 {
    let mut acc = [0.0; 4];
    let (wc, xc) = (w.chunks_exact(4), x.chunks_exact(4));
    let mut tail = 0.0;
    for (a, b) in wc.remainder().iter().zip(xc.remainder()) {
        tail += a * b;
    }
    for (a, b) in wc.zip(xc) {
        for l in 0..4 {
            acc[l] += a[l] * b[l];
        }
    }
    fold4(acc) + tail
}

/// `x_i *= by_i` (over the shorter of the two).
pub(crate) fn mul_assign(x: &mut [f64], by: &[f64]) {
    for (v, b) in x.iter_mut().zip(by) {
        *v *= b;
    }
}

/// Sum (as [`sum`]), minimum and maximum of `x` (not empty).
pub(crate) fn sum_min_max(x: &[f64]) -> (f64, f64, f64) {
    let (mut min, mut max) = (x[0], x[0]);
    for &v in x {
        min = if v < min { v } else { min };
        max = if v > max { v } else { max };
    }
    (sum(x), min, max)
}

/// What one pass over a window gives besides its mean: the summed squared deviations
/// of the samples, their first differences and their second differences, each from its
/// own mean (Hjorth's variances times their counts), and the number of samples that
/// repeat the sample before them at the window's minimum or maximum.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deviations {
    pub(crate) x: f64,
    pub(crate) d1: f64,
    pub(crate) d2: f64,
    pub(crate) plateau: usize,
}

/// [`Deviations`] of `x` (at least 3 samples) with the given mean, minimum and maximum.
/// Positions i = 0..n-2 go into lane i mod 8 while whole groups of eight remain (two
/// AVX2 registers), the rest in order.
pub(crate) fn deviations(x: &[f64], mean: f64, min: f64, max: f64) -> Deviations {
    let (mean_d1, mean_d2) = difference_means(x);
    let body = x.len() - 2;
    let (mut v0, mut v1, mut v2) = ([0.0; 8], [0.0; 8], [0.0; 8]);
    let mut repeats = false;
    let mut i = 0;
    while i + 8 <= body {
        for l in 0..8 {
            let j = i + l;
            let d1 = x[j + 1] - x[j];
            let d2 = (x[j + 2] - x[j + 1]) - d1;
            let (e0, e1, e2) = (x[j] - mean, d1 - mean_d1, d2 - mean_d2);
            v0[l] += e0 * e0;
            v1[l] += e1 * e1;
            v2[l] += e2 * e2;
            repeats |= x[j + 1] == x[j];
        }
        i += 8;
    }
    finish_deviations(
        x,
        mean,
        min,
        max,
        [fold8(v0), fold8(v1), fold8(v2)],
        repeats,
    )
}

/// The means of the first and second differences of `x` (they telescope).
#[inline(always)]
pub(crate) fn difference_means(x: &[f64]) -> (f64, f64) {
    let n = x.len();
    (
        (x[n - 1] - x[0]) / (n - 1) as f64,
        ((x[n - 1] - x[n - 2]) - (x[1] - x[0])) / (n - 2) as f64,
    )
}

/// Completes [`Deviations`] from the folded lanes of the body's whole groups of eight:
/// adds the positions past them in order and the terms past the body (the last two
/// samples, the last first difference); counts the plateau samples if the body saw a
/// sample repeat its predecessor (the pairs past the groups are checked here).
#[inline(always)]
pub(crate) fn finish_deviations(
    x: &[f64],
    mean: f64,
    min: f64,
    max: f64,
    folded: [f64; 3],
    repeats_in_body: bool,
) -> Deviations {
    let n = x.len();
    let (mean_d1, mean_d2) = difference_means(x);
    let grouped = (n - 2) / 8 * 8;
    let (mut t0, mut t1, mut t2) = (0.0, 0.0, 0.0);
    for j in grouped..n - 2 {
        let d1 = x[j + 1] - x[j];
        let d2 = (x[j + 2] - x[j + 1]) - d1;
        let (e0, e1, e2) = (x[j] - mean, d1 - mean_d1, d2 - mean_d2);
        t0 += e0 * e0;
        t1 += e1 * e1;
        t2 += e2 * e2;
    }
    let rest = [t0, t1, t2];
    let e0a = x[n - 2] - mean;
    let e0b = x[n - 1] - mean;
    let e1 = (x[n - 1] - x[n - 2]) - mean_d1;
    // Most windows never repeat a sample; those that do are counted exactly.
    let repeats = repeats_in_body || x[grouped..].windows(2).any(|w| w[1] == w[0]);
    let plateau = if repeats {
        x.windows(2)
            .filter(|w| w[1] == w[0] && (w[1] == min || w[1] == max))
            .count()
    } else {
        0
    };
    Deviations {
        x: folded[0] + rest[0] + e0a * e0a + e0b * e0b,
        d1: folded[1] + rest[1] + e1 * e1,
        d2: folded[2] + rest[2],
        plateau,
    }
}

/// `out_j = (x_j - mean) h_j`, written as the complex pairs `(out_2j, out_2j+1)` a
/// half-length complex FFT of a real signal takes.
pub(crate) fn window_pairs(x: &[f64], mean: f64, hann: &[f64], out: &mut [Complex<f64>]) {
    for ((o, x), h) in out
        .iter_mut()
        .zip(x.chunks_exact(2))
        .zip(hann.chunks_exact(2))
    {
        *o = Complex::new((x[0] - mean) * h[0], (x[1] - mean) * h[1]);
    }
}

/// Adds `|X_k|²` to `psd[k]` for the bins k = 0, `first`..=M/2 and their mirrors M-k,
/// where X is the spectrum of the real signal of length N = 2M whose sample pairs were
/// transformed into `z` (M complex values) by a complex FFT; `cos` and `sin` hold
/// `cos(2πk/N)` and `-sin(2πk/N)` at 2k and 2k + 1, for k = 0..=M/2. (The AVX2
/// `real_spectra` does bins 1..first itself and hands the rest here.)
///
/// With `A_k = (Z_k + conj Z_{M-k}) / 2`, `B_k = (Z_k - conj Z_{M-k}) / 2i` and
/// `T_k = W^k B_k` (W = e^{-2πi/N}): `X_k = A_k + T_k` and `X_{M-k} = conj(A_k - T_k)`.
/// The factors ½ are left out here, so the result is 4 |X_k|²; the caller's density
/// scale absorbs the 4.
pub(crate) fn accumulate_real_spectrum_from(
    first: usize,
    z: &[Complex<f64>],
    cos: &[f64],
    sin: &[f64],
    psd: &mut [f64],
) {
    let m = z.len();
    let half = m / 2;
    // k = 0 pairs with Z_0 itself (Z_M = Z_0): X_0 = A + B, X_M = A - B, both real.
    let Complex { re: r, im: i } = z[0];
    let (dc, nyquist) = (2.0 * (r + i), 2.0 * (r - i));
    psd[0] += dc * dc;
    psd[m] += nyquist * nyquist;
    for k in first..=half {
        let Complex { re: zr, im: zi } = z[k];
        let Complex { re: mr, im: mi } = z[m - k];
        let (ar, ai) = (zr + mr, zi - mi);
        let (br, bi) = (zi + mi, mr - zr);
        let (c, s) = (cos[2 * k], sin[2 * k]);
        let (tr, ti) = (c * br - s * bi, c * bi + s * br);
        let (pr, pi) = (ar + tr, ai + ti);
        psd[k] += pr * pr + pi * pi;
        if k != m - k {
            let (qr, qi) = (ar - tr, ai - ti);
            psd[m - k] += qr * qr + qi * qi;
        }
    }
}

/// ln 2 split in two (fdlibm's): the high part has trailing zero bits, so `e * LN2_HI`
/// is exact for any exponent e.
pub(crate) const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
pub(crate) const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);

/// `1/3, 1/5, .., 1/21`: the series of `atanh(f)/f - 1` in powers of f².
pub(crate) const LN_SERIES: [f64; 10] = [
    1.0 / 3.0,
    1.0 / 5.0,
    1.0 / 7.0,
    1.0 / 9.0,
    1.0 / 11.0,
    1.0 / 13.0,
    1.0 / 15.0,
    1.0 / 17.0,
    1.0 / 19.0,
    1.0 / 21.0,
];

/// `Σ LN_SERIES[i] u^i` by Estrin's scheme: a dependency chain of four products
/// instead of Horner's ten.
#[inline(always)]
fn ln_series(u: f64) -> f64 {
    let c = LN_SERIES;
    let (u2, p0, p1, p2, p3, p4) = (
        u * u,
        c[0] + c[1] * u,
        c[2] + c[3] * u,
        c[4] + c[5] * u,
        c[6] + c[7] * u,
        c[8] + c[9] * u,
    );
    let u4 = u2 * u2;
    let (q0, q1) = (p0 + p1 * u2, p2 + p3 * u2);
    (q0 + q1 * u4) + p4 * (u4 * u4)
}

/// Natural logarithm of a positive finite `x`, branch-free so that loops over it
/// vectorise; within 2 ulp of `f64::ln` (checked by a test).
///
/// `x = m 2^e` with m in [√½, √2); `ln m = 2 atanh(f)` with `f = (m-1)/(m+1)`,
/// |f| < 0.1716, summed as its odd series through f²¹ (the rest is below 1e-17).
#[inline(always)]
pub(crate) fn ln(x: f64) -> f64 {
    // Subnormals are scaled into the normal range first.
    let tiny = x < f64::MIN_POSITIVE;
    let x = if tiny { x * 2f64.powi(200) } else { x };
    let bits = x.to_bits();
    // Exponent field as an f64 without an integer conversion: 2^52 + field, minus 2^52.
    let field = f64::from_bits(0x4330_0000_0000_0000 | (bits >> 52)) - 4_503_599_627_370_496.0;
    let m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    let big = m > std::f64::consts::SQRT_2;
    let m = if big { m * 0.5 } else { m };
    let e = field - 1023.0 + if big { 1.0 } else { 0.0 } - if tiny { 200.0 } else { 0.0 };
    let f = (m - 1.0) / (m + 1.0);
    let f2 = f * f;
    let series = f2 * ln_series(f2);
    let two_f = f + f;
    e * LN2_HI + (two_f + (two_f * series + e * LN2_LO))
}

/// `out_k = ln x_k` where `x_k > 0`, else 0.
pub(crate) fn ln_positive(x: &[f64], out: &mut [f64]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = if v > 0.0 { ln(v) } else { 0.0 };
    }
}

/// The compare-exchange pairs of [`sorting_network`] for `n` values that the two
/// middle positions depend on: enough to find the median.
pub(crate) fn median_network(n: usize) -> Vec<(u8, u8)> {
    assert!(n <= MEDIAN_MAX, "median of at most {MEDIAN_MAX} values");
    let mut needed = [false; MEDIAN_MAX];
    if n > 0 {
        needed[(n - 1) / 2] = true;
        needed[n / 2] = true;
    }
    // Walking back from the outputs: a comparator matters if it writes a position that
    // matters, and then both its inputs matter.
    let mut kept: Vec<(u8, u8)> = sorting_network(n)
        .into_iter()
        .rev()
        .filter(|&(a, b)| {
            let (a, b) = (usize::from(a), usize::from(b));
            let keep = needed[a] || needed[b];
            if keep {
                needed[a] = true;
                needed[b] = true;
            }
            keep
        })
        .map(|(a, b)| (a as u8, b as u8))
        .collect();
    kept.reverse();
    kept
}

/// Most values [`median_network`] takes.
pub(crate) const MEDIAN_MAX: usize = 32;

/// One comparator of a network over two lanes: the smaller value to `p`, the larger
/// to `q`, in each lane.
#[inline(always)]
fn compare_exchange<const N: usize>(buf: &mut [[f64; 2]; N], p: usize, q: usize) {
    let (x, y) = (buf[p], buf[q]);
    for l in 0..2 {
        buf[p][l] = if y[l] < x[l] { y[l] } else { x[l] };
        buf[q][l] = if y[l] < x[l] { x[l] } else { y[l] };
    }
}

/// Medians of two sets of `n` values (at most [`MEDIAN_MAX`]), sorted side by side
/// by `network` from [`median_network`] for `n`: the middle value, or the mean of the
/// two middle ones. (Two lanes: one pass through the network for both line
/// frequencies; a single set is passed twice.)
#[inline]
pub(crate) fn median_pair(
    a: impl Iterator<Item = f64>,
    b: impl Iterator<Item = f64>,
    n: usize,
    network: &[(u8, u8)],
) -> (f64, f64) {
    let mut buf = [[0.0; 2]; MEDIAN_MAX];
    for (slot, (x, y)) in buf.iter_mut().zip(a.zip(b)).take(n) {
        *slot = [x, y];
    }
    for &(p, q) in network {
        // Indices below MEDIAN_MAX (32): the mask lets the compiler drop bounds checks.
        compare_exchange(&mut buf, usize::from(p) & 31, usize::from(q) & 31);
    }
    let middle = |l: usize| {
        if n % 2 == 0 {
            (buf[n / 2 - 1][l] + buf[n / 2][l]) / 2.0
        } else {
            buf[n / 2][l]
        }
    };
    (middle(0), middle(1))
}

/// [`median_network`] of 20 values, as a constant: the neighbourhood of a line
/// frequency at every sample rate from 140 Hz up (1 Hz bins, ±10 Hz, the line's own
/// bin left out). A test checks it equals `median_network(20)`.
#[rustfmt::skip]
pub(crate) const MEDIAN_NETWORK_20: [(u8, u8); 84] = [
    (0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15), (16, 17),
    (18, 19), (0, 2), (1, 3), (4, 6), (5, 7), (8, 10), (9, 11), (12, 14), (13, 15),
    (16, 18), (17, 19), (1, 2), (5, 6), (9, 10), (13, 14), (17, 18), (0, 4), (1, 5),
    (2, 6), (3, 7), (8, 12), (9, 13), (10, 14), (11, 15), (2, 4), (3, 5), (10, 12),
    (11, 13), (1, 2), (3, 4), (5, 6), (9, 10), (11, 12), (13, 14), (17, 18), (0, 8),
    (1, 9), (2, 10), (3, 11), (4, 12), (5, 13), (6, 14), (7, 15), (4, 8), (5, 9),
    (6, 10), (7, 11), (2, 4), (3, 5), (6, 8), (7, 9), (10, 12), (11, 13), (1, 2),
    (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (17, 18), (0, 16), (1, 17), (2, 18),
    (3, 19), (8, 16), (9, 17), (10, 18), (11, 19), (5, 9), (6, 10), (7, 11), (12, 16),
    (7, 9), (10, 12), (9, 10),
];

/// [`median_pair`] for 20 values each: the network is a constant, so the compiler
/// unrolls it and keeps the values in registers instead of reading and writing them
/// through memory at run-time positions. Same comparisons in the same order, so the
/// same medians.
#[inline]
pub(crate) fn median_pair_20(a: &[f64; 20], b: &[f64; 20]) -> (f64, f64) {
    let mut buf: [[f64; 2]; 20] = std::array::from_fn(|i| [a[i], b[i]]);
    for &(p, q) in &MEDIAN_NETWORK_20 {
        compare_exchange(&mut buf, usize::from(p), usize::from(q));
    }
    let middle = |l: usize| (buf[9][l] + buf[10][l]) / 2.0;
    (middle(0), middle(1))
}

/// Compare-exchange pairs that sort `n` values: Batcher's odd-even merge sort for the
/// next power of two, keeping only the pairs inside `0..n` (values past the end act as
/// +∞, which no comparator moves).
pub(crate) fn sorting_network(n: usize) -> Vec<(u16, u16)> {
    let size = n.next_power_of_two();
    let mut pairs = Vec::new();
    let mut p = 1;
    while p < size {
        let mut k = p;
        while k >= 1 {
            for j in (k % p..size - k).step_by(2 * k) {
                for i in 0..k.min(size - j - k) {
                    let (a, b) = (i + j, i + j + k);
                    if a / (2 * p) == b / (2 * p) && b < n {
                        pairs.push((a as u16, b as u16));
                    }
                }
            }
            k /= 2;
        }
        p *= 2;
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_is_within_two_ulp_of_std() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut worst = 0.0f64;
        let mut check = |x: f64| {
            let (got, want) = (ln(x), x.ln());
            let ulp = f64::EPSILON * want.abs().max(f64::MIN_POSITIVE);
            worst = worst.max((got - want).abs() / ulp);
        };
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Positive finite doubles across the whole exponent range, subnormals too.
            let x = f64::from_bits(state % 0x7FF0_0000_0000_0000);
            if x > 0.0 {
                check(x);
            }
        }
        for x in [
            1.0,
            2.0,
            0.5,
            std::f64::consts::SQRT_2,
            1e-320,
            f64::MAX,
            1.0 + 1e-12,
        ] {
            check(x);
        }
        assert_eq!(ln(1.0), 0.0);
        assert!(worst <= 2.0, "worst error {worst} ulp");
    }

    #[test]
    fn networks_sort_and_find_medians() {
        let mut state = 7u64;
        for n in 1..=MEDIAN_MAX {
            let network = sorting_network(n);
            for _ in 0..50 {
                let mut v: Vec<f64> = (0..n)
                    .map(|_| {
                        state = state
                            .wrapping_mul(6_364_136_223_846_793_005)
                            .wrapping_add(1);
                        ((state >> 33) % 17) as f64
                    })
                    .collect();
                let mut want = v.clone();
                want.sort_by(f64::total_cmp);
                let middle = if n % 2 == 0 {
                    (want[n / 2 - 1] + want[n / 2]) / 2.0
                } else {
                    want[n / 2]
                };
                let reversed = v.iter().rev().copied();
                let got = median_pair(v.iter().copied(), reversed, n, &median_network(n));
                assert_eq!(got, (middle, middle), "n = {n}");
                for &(a, b) in &network {
                    let (a, b) = (usize::from(a), usize::from(b));
                    if v[b] < v[a] {
                        v.swap(a, b);
                    }
                }
                assert_eq!(v, want, "n = {n}");
            }
        }
    }

    #[test]
    fn the_constant_network_of_20_is_the_pruned_one_and_finds_medians() {
        assert_eq!(median_network(20), MEDIAN_NETWORK_20.to_vec());
        let mut state = 11u64;
        for _ in 0..200 {
            let mut next = || {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1);
                ((state >> 33) % 23) as f64
            };
            let a: [f64; 20] = std::array::from_fn(|_| next());
            let b: [f64; 20] = std::array::from_fn(|_| next());
            let want = median_pair(
                a.iter().copied(),
                b.iter().copied(),
                20,
                &median_network(20),
            );
            assert_eq!(median_pair_20(&a, &b), want);
            // Fewer values padded evenly with -inf and +inf keep their median.
            let n = 14;
            let mut padded = [f64::INFINITY; 20];
            padded[..3].fill(f64::NEG_INFINITY);
            padded[3..17].copy_from_slice(&a[..n]);
            let want = median_pair(
                a[..n].iter().copied(),
                a[..n].iter().copied(),
                n,
                &median_network(n),
            );
            assert_eq!(median_pair_20(&padded, &padded), want);
        }
    }

    #[test]
    fn deviations_match_the_two_pass_definition() {
        let x: Vec<f64> = (0..37).map(|i| ((i * 7919) % 101) as f64 - 50.0).collect();
        let n = x.len();
        let mean = x.iter().sum::<f64>() / n as f64;
        let var = |v: &[f64]| {
            let m = v.iter().sum::<f64>() / v.len() as f64;
            v.iter().map(|a| (a - m) * (a - m)).sum::<f64>()
        };
        let d1: Vec<f64> = x.windows(2).map(|w| w[1] - w[0]).collect();
        let d2: Vec<f64> = d1.windows(2).map(|w| w[1] - w[0]).collect();
        let (_, min, max) = sum_min_max(&x);
        let got = deviations(&x, mean, min, max);
        for (got, want) in [(got.x, var(&x)), (got.d1, var(&d1)), (got.d2, var(&d2))] {
            assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
        }
        let mut railed = x.clone();
        for v in &mut railed[10..15] {
            *v = 60.0;
        }
        railed[30] = -70.0;
        railed[31] = -70.0;
        let (_, min, max) = sum_min_max(&railed);
        assert_eq!((min, max), (-70.0, 60.0));
        assert_eq!(deviations(&railed, 0.0, min, max).plateau, 4 + 1);
    }
}
