//! Features of one channel over one window of EEG, exactly as defined in
//! `shared/data/README.md` (and computed there with numpy/scipy):
//!
//! - Welch PSD: 1-second Hann segments (periodic window), 50 % overlap, each segment's
//!   mean removed, density scaling, one-sided, averaged over the segments;
//! - absolute band powers (trapezoid over the band's bins, both edges inclusive) and
//!   relative ones (over the 0.5–45 Hz total);
//! - peak alpha frequency (largest PSD bin in 8–13 Hz, lowest on a tie);
//! - spectral entropy over the 0.5–45 Hz bins, normalised by ln(bin count);
//! - Hjorth activity, mobility (per sample) and complexity;
//!
//! plus signal quality (flat line, clipping, 50/60 Hz line noise) and the aperiodic
//! 1/f exponent. Everything scales with the sample rate: segments are one second long,
//! so bins are 1 Hz apart at any rate.
//!
//! [`FeatureEngine`] plans its FFT and allocates every buffer when it is built;
//! [`FeatureEngine::compute`] then allocates nothing. Pure: no I/O, no runtime.

use std::sync::Arc;

use rustfft::num_complex::Complex;
use rustfft::{Fft, FftPlanner};

#[cfg(target_arch = "x86_64")]
mod avx2;
mod kernels;

use kernels::Simd;

/// Version of the feature definitions; every feature record names it.
/// (1.0.1: the same definitions as 1.0.0, computed in a different summation order and
/// with a vectorised logarithm, so values can differ from 1.0.0 in the last bits.)
pub const ALGORITHM_VERSION: &str = "albi-features/1.0.1";

/// The five bands, `[lo, hi]` Hz with both edges inclusive.
pub const BANDS: [(&str, f64, f64); 5] = [
    ("delta", 0.5, 4.0),
    ("theta", 4.0, 8.0),
    ("alpha", 8.0, 13.0),
    ("beta", 13.0, 30.0),
    ("gamma", 30.0, 45.0),
];
/// The total band of relative powers and spectral entropy.
pub const TOTAL: (f64, f64) = (0.5, 45.0);
/// Where the peak alpha frequency is looked for.
pub const ALPHA_PEAK: (f64, f64) = (8.0, 13.0);
/// Frequencies over which the aperiodic (1/f) exponent is fitted.
/// (Inside [`TOTAL`]: the fit reuses the logarithms of the total band's bins.)
pub const APERIODIC_FIT: (f64, f64) = (2.0, 40.0);
/// Half-width of the neighbourhood a line-noise peak is compared with.
const LINE_NOISE_SPAN_HZ: f64 = 10.0;

/// Why an engine cannot be built or a window not computed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SignalError {
    #[error("sample rate {0} Hz is not usable: it must be a whole number from 16 to 16384")]
    SampleRate(f64),
    #[error("a window of {window} samples is shorter than one {segment}-sample Welch segment")]
    WindowTooShort { window: usize, segment: usize },
    #[error("expected a window of {expected} samples, got {got}")]
    WindowLength { expected: usize, got: usize },
    #[error("sample {index} is not a finite number")]
    NonFinite { index: usize },
}

/// The features of one channel-window. Values undefined for the window (e.g. relative
/// powers of a flat line) are `None`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WindowFeatures {
    /// PSD from 0 Hz to Nyquist, unit²/Hz.
    pub psd: Vec<f64>,
    /// Absolute power of each of [`BANDS`], unit².
    pub abs: [Option<f64>; 5],
    pub total_abs: Option<f64>,
    /// `abs / total_abs` per band.
    pub rel: [Option<f64>; 5],
    pub peak_alpha_hz: Option<f64>,
    pub peak_alpha_psd: Option<f64>,
    pub spectral_entropy: Option<f64>,
    pub hjorth_activity: Option<f64>,
    pub hjorth_mobility: Option<f64>,
    pub hjorth_complexity: Option<f64>,
    /// Slope of log10 PSD over log10 frequency in [`APERIODIC_FIT`].
    pub aperiodic_exponent: Option<f64>,
    /// The window's variance is zero.
    pub flat: bool,
    /// Samples at the window's minimum or maximum that repeat the sample before them,
    /// over the window length (1 for a flat line): a railed or clipping channel sits
    /// on a plateau at its extremes.
    pub clipped_fraction: f64,
    /// PSD at 50 Hz over the median of the bins within 10 Hz of it (50 Hz excluded).
    pub line_noise_50hz: Option<f64>,
    /// The same at 60 Hz.
    pub line_noise_60hz: Option<f64>,
}

/// How a segment's spectrum is taken.
enum Transform {
    /// Even lengths N: a complex FFT of N/2 over the sample pairs, then the split into
    /// the real signal's spectrum; `cos` and `sin` hold cos(2πk/N) and -sin(2πk/N) for
    /// k = 0..=N/4, each value twice.
    Paired { cos: Vec<f64>, sin: Vec<f64> },
    /// Odd lengths: a complex FFT of N over the samples.
    Full,
}

/// Trapezoid weights of a band's bins: `Σ w_k P_k` is `numpy.trapezoid` over the band.
#[derive(Debug, Clone)]
struct Band {
    first: usize,
    weights: Vec<f64>,
}

impl Band {
    /// The band over the inclusive bin range `(lo, hi)` (empty when `lo > hi`; a
    /// single bin has no area).
    fn new(freqs: &[f64], (lo, hi): (usize, usize)) -> Band {
        let weights = (lo..=hi)
            .map(|k| {
                let below = if k > lo { freqs[k] - freqs[k - 1] } else { 0.0 };
                let above = if k < hi { freqs[k + 1] - freqs[k] } else { 0.0 };
                (below + above) / 2.0
            })
            .collect();
        Band { first: lo, weights }
    }

    #[inline(always)]
    fn power(&self, simd: Simd, psd: &[f64]) -> f64 {
        simd.dot(
            &self.weights,
            &psd[self.first..self.first + self.weights.len()],
        )
    }
}

/// A line-noise frequency's bin, its neighbourhood's bins and the network that sorts
/// the neighbourhood.
#[derive(Debug, Clone)]
struct Line {
    bin: usize,
    lo: usize,
    hi: usize,
    network: Vec<(u8, u8)>,
}

impl Line {
    /// Bins in the neighbourhood, the line's own excluded.
    fn len(&self) -> usize {
        self.hi - self.lo
    }

    fn neighbours<'a>(&self, psd: &'a [f64]) -> impl Iterator<Item = f64> + 'a {
        psd[self.lo..self.bin]
            .iter()
            .chain(&psd[self.bin + 1..=self.hi])
            .copied()
    }

    /// PSD at the line frequency over the median of its neighbourhood.
    fn ratio(&self, psd: &[f64], median: f64) -> Option<f64> {
        (self.len() > 0 && median > 0.0).then(|| psd[self.bin] / median)
    }

    /// The neighbourhood as 20 values with the same median, for
    /// [`kernels::median_pair_20`]: itself when it has 20 bins (1 Hz bins from 140 Hz
    /// up), or padded with as many -∞ below as +∞ above when it has fewer by an even
    /// count (the 60 Hz line at 128 Hz has 14); `None` otherwise.
    #[inline(always)]
    fn twenty(&self, psd: &[f64]) -> Option<[f64; 20]> {
        let n = self.len();
        if n == 0 || n > 20 || (20 - n) % 2 != 0 {
            return None;
        }
        let (below, above) = (&psd[self.lo..self.bin], &psd[self.bin + 1..=self.hi]);
        let pad = (20 - n) / 2;
        let mut v = [f64::INFINITY; 20];
        v[..pad].fill(f64::NEG_INFINITY);
        // Element by element: a copy of a run-time length would be a call to memmove.
        for (slot, &x) in v[pad..].iter_mut().zip(below) {
            *slot = x;
        }
        for (slot, &x) in v[pad + below.len()..].iter_mut().zip(above) {
            *slot = x;
        }
        Some(v)
    }

    fn ratio_alone(&self, psd: &[f64]) -> Option<f64> {
        let neighbours = || self.neighbours(psd);
        let (median, _) = match self.twenty(psd) {
            Some(v) => kernels::median_pair_20(&v, &v),
            None => kernels::median_pair(neighbours(), neighbours(), self.len(), &self.network),
        };
        self.ratio(psd, median)
    }
}

/// Computes [`WindowFeatures`] for windows of a fixed length and sample rate.
pub struct FeatureEngine {
    fs: f64,
    window: usize,
    nperseg: usize,
    hop: usize,
    segments: usize,
    /// Periodic Hann window, `h_j = 0.5 - 0.5 cos(2πj/N)`.
    hann: Vec<f64>,
    /// Per PSD bin, what the summed |X|² are multiplied by: the density scaling
    /// `1 / (fs Σ h²)`, over the segment count, doubled for a one-sided spectrum.
    bin_scale: Vec<f64>,
    freqs: Vec<f64>,
    /// ln P per bin of the total band, for the window being computed.
    ln_psd: Vec<f64>,
    /// ln f per bin (0 for DC, which the fit skips).
    ln_freqs: Vec<f64>,
    /// Σ ln f and Σ (ln f)² over the fit's bins, for windows whose PSD is positive there.
    fit_sums: (f64, f64),
    fft: Arc<dyn Fft<f64>>,
    transform: Transform,
    buffer: Vec<Complex<f64>>,
    scratch: Vec<Complex<f64>>,
    bands: [Band; 5],
    /// Inclusive bin ranges (empty ranges have `lo > hi`).
    total: (usize, usize),
    total_band: Band,
    /// ln of the total band's bin count, which normalises the spectral entropy.
    ln_total_bins: f64,
    alpha: (usize, usize),
    aperiodic: (usize, usize),
    line_50: Option<Line>,
    line_60: Option<Line>,
    /// Both lines exist and their neighbourhoods are sorted by the same network (one
    /// pass sorts both).
    lines_share_network: bool,
    /// Which versions of the hot loops run (AVX2 where the CPU has it).
    simd: Simd,
}

impl std::fmt::Debug for FeatureEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureEngine")
            .field("fs", &self.fs)
            .field("window", &self.window)
            .field("nperseg", &self.nperseg)
            .field("segments", &self.segments)
            .field("avx2", &self.simd.avx2())
            .finish()
    }
}

/// Bins `k` with `lo <= f_k <= hi`, as an inclusive index range.
fn bin_range(freqs: &[f64], lo: f64, hi: f64) -> (usize, usize) {
    let first = freqs.iter().position(|&f| f >= lo);
    let last = freqs.iter().rposition(|&f| f <= hi);
    match (first, last) {
        (Some(a), Some(b)) if a <= b => (a, b),
        _ => (1, 0),
    }
}

impl FeatureEngine {
    /// An engine for windows of `window_samples` samples at `fs` Hz.
    pub fn new(fs: f64, window_samples: usize) -> Result<FeatureEngine, SignalError> {
        if !(fs.is_finite() && fs.fract() == 0.0 && (16.0..=16384.0).contains(&fs)) {
            return Err(SignalError::SampleRate(fs));
        }
        let nperseg = fs as usize;
        if window_samples < nperseg {
            return Err(SignalError::WindowTooShort {
                window: window_samples,
                segment: nperseg,
            });
        }
        let hop = nperseg - nperseg / 2;
        let segments = (window_samples - nperseg) / hop + 1;
        let tau = 2.0 * std::f64::consts::PI;
        let hann: Vec<f64> = (0..nperseg)
            .map(|j| 0.5 - 0.5 * (tau * j as f64 / nperseg as f64).cos())
            .collect();
        let scale = 1.0 / (fs * hann.iter().map(|h| h * h).sum::<f64>());
        let even = nperseg % 2 == 0;
        // The paired split leaves out two factors ½ of the spectrum, so 4 |X|² is summed.
        let unscaled = if even { 4.0 } else { 1.0 };
        let factor = scale / (segments as f64 * unscaled);
        let last = nperseg / 2;
        let bin_scale = (0..=last)
            .map(|k| {
                // One-sided: every bin but DC (and Nyquist for even lengths) counts twice.
                let doubled = k > 0 && !(even && k == last);
                if doubled {
                    2.0 * factor
                } else {
                    factor
                }
            })
            .collect();
        // As numpy.fft.rfftfreq(nperseg, 1/fs) computes them.
        let step = 1.0 / (nperseg as f64 * (1.0 / fs));
        let freqs: Vec<f64> = (0..=nperseg / 2).map(|k| k as f64 * step).collect();
        let mut planner = FftPlanner::<f64>::new();
        let (fft, transform) = if nperseg % 2 == 0 {
            let angle = |k: usize| tau * k as f64 / nperseg as f64;
            let quarter = nperseg / 4;
            (
                planner.plan_fft_forward(nperseg / 2),
                Transform::Paired {
                    // Each value twice: the AVX2 split loads two bins' twiddles at once.
                    cos: (0..=quarter).flat_map(|k| [angle(k).cos(); 2]).collect(),
                    sin: (0..=quarter).flat_map(|k| [-angle(k).sin(); 2]).collect(),
                },
            )
        } else {
            (planner.plan_fft_forward(nperseg), Transform::Full)
        };
        let nyquist = freqs.len() - 1;
        let line = |f0: f64| {
            let bin = freqs.iter().position(|&f| f == f0)?;
            (bin < nyquist).then(|| {
                let (lo, hi) = bin_range(&freqs, f0 - LINE_NOISE_SPAN_HZ, f0 + LINE_NOISE_SPAN_HZ);
                let lo = lo.max(1);
                Line {
                    bin,
                    lo,
                    hi,
                    network: kernels::median_network(hi - lo),
                }
            })
        };
        let total = bin_range(&freqs, TOTAL.0, TOTAL.1);
        let aperiodic = bin_range(&freqs, APERIODIC_FIT.0, APERIODIC_FIT.1);
        let ln_freqs: Vec<f64> = freqs
            .iter()
            .map(|&f| if f > 0.0 { f.ln() } else { 0.0 })
            .collect();
        let fit = &ln_freqs[aperiodic.0.max(1)..=aperiodic.1];
        let (line_50, line_60) = (line(50.0), line(60.0));
        let lines_share_network = matches!(
            (&line_50, &line_60),
            (Some(a), Some(b)) if a.network == b.network
        );
        Ok(FeatureEngine {
            fs,
            window: window_samples,
            nperseg,
            hop,
            segments,
            hann,
            bin_scale,
            buffer: vec![Complex::default(); segments * fft.len()],
            scratch: vec![Complex::default(); fft.get_inplace_scratch_len()],
            bands: BANDS.map(|(_, lo, hi)| Band::new(&freqs, bin_range(&freqs, lo, hi))),
            total,
            total_band: Band::new(&freqs, total),
            ln_total_bins: ((total.1 + 1).saturating_sub(total.0) as f64).ln(),
            alpha: bin_range(&freqs, ALPHA_PEAK.0, ALPHA_PEAK.1),
            aperiodic,
            fit_sums: (fit.iter().sum(), fit.iter().map(|x| x * x).sum()),
            line_50,
            line_60,
            lines_share_network,
            ln_psd: vec![0.0; freqs.len()],
            ln_freqs,
            freqs,
            fft,
            transform,
            simd: Simd::detect(),
        })
    }

    pub fn sample_rate(&self) -> f64 {
        self.fs
    }

    pub fn window_samples(&self) -> usize {
        self.window
    }

    /// Frequency of each PSD bin.
    pub fn freqs(&self) -> &[f64] {
        &self.freqs
    }

    /// Frequency step between PSD bins.
    pub fn resolution_hz(&self) -> f64 {
        self.freqs[1] - self.freqs[0]
    }

    /// Computes every feature of `x` into `out` (whose buffers are reused).
    pub fn compute(&mut self, x: &[f64], out: &mut WindowFeatures) -> Result<(), SignalError> {
        if x.len() != self.window {
            return Err(SignalError::WindowLength {
                expected: self.window,
                got: x.len(),
            });
        }
        let simd = self.simd;
        let n = x.len();
        let (sum, min, max) = simd.sum_min_max(x);
        // Any NaN or infinity makes the sum non-finite, so the exact search only runs
        // then (finite samples can overflow the sum too: the search finds nothing).
        if !sum.is_finite() {
            if let Some(index) = x.iter().position(|v| !v.is_finite()) {
                return Err(SignalError::NonFinite { index });
            }
        }
        let deviations = simd.deviations(x, sum / n as f64, min, max);
        let activity = deviations.x / n as f64;
        let d1 = deviations.d1 / (n - 1) as f64;
        let d2 = deviations.d2 / (n - 2) as f64;
        out.flat = activity == 0.0;
        out.clipped_fraction = if min == max {
            1.0
        } else {
            deviations.plateau as f64 / n as f64
        };

        self.welch(x, &mut out.psd);
        let psd = &out.psd;
        let freqs = &self.freqs;
        for (abs, band) in out.abs.iter_mut().zip(&self.bands) {
            *abs = Some(band.power(simd, psd));
        }
        let total = self.total_band.power(simd, psd);
        out.total_abs = Some(total);
        let defined = !out.flat && total > 0.0;
        for b in 0..5 {
            out.rel[b] = out.abs[b].filter(|_| defined).map(|a| a / total);
        }

        // Peak alpha: the first maximum (strictly greater replaces).
        let (lo, hi) = self.alpha;
        let mut peak = None::<usize>;
        for k in lo..=hi.min(psd.len() - 1) {
            if peak.is_none_or(|p| psd[k] > psd[p]) {
                peak = Some(k);
            }
        }
        let peak = peak.filter(|_| defined);
        out.peak_alpha_hz = peak.map(|k| freqs[k]);
        out.peak_alpha_psd = peak.map(|k| psd[k]);

        // ln P once per bin of the total band; entropy and the 1/f fit both use it.
        let (lo, hi) = self.total;
        let band = lo..=hi.min(psd.len() - 1);
        simd.ln_positive(&psd[band.clone()], &mut self.ln_psd[band.clone()]);
        out.spectral_entropy = (defined && !band.is_empty()).then(|| {
            // With p = P/S: -sum p ln p = ln S - (sum P ln P) / S (0 ln 0 = 0).
            let sum = simd.sum(&psd[band.clone()]);
            let plnp = simd.dot(&psd[band.clone()], &self.ln_psd[band.clone()]);
            (sum.ln() - plnp / sum) / self.ln_total_bins
        });

        out.hjorth_activity = Some(activity);
        if out.flat {
            out.hjorth_mobility = None;
            out.hjorth_complexity = None;
        } else {
            let mobility = (d1 / activity).sqrt();
            out.hjorth_mobility = Some(mobility);
            out.hjorth_complexity = (d1 > 0.0).then(|| (d2 / d1).sqrt() / mobility);
        }

        out.aperiodic_exponent = if defined {
            self.aperiodic_slope(psd)
        } else {
            None
        };
        // Both lines' medians in one pass through a sorting network where possible.
        (out.line_noise_50hz, out.line_noise_60hz) = match (&self.line_50, &self.line_60) {
            (Some(a), Some(b)) => match (a.twenty(psd), b.twenty(psd)) {
                (Some(va), Some(vb)) => {
                    let (ma, mb) = kernels::median_pair_20(&va, &vb);
                    (a.ratio(psd, ma), b.ratio(psd, mb))
                }
                _ if self.lines_share_network => {
                    let (ma, mb) = kernels::median_pair(
                        a.neighbours(psd),
                        b.neighbours(psd),
                        a.len(),
                        &a.network,
                    );
                    (a.ratio(psd, ma), b.ratio(psd, mb))
                }
                _ => (a.ratio_alone(psd), b.ratio_alone(psd)),
            },
            (a, b) => (
                a.as_ref().and_then(|l| l.ratio_alone(psd)),
                b.as_ref().and_then(|l| l.ratio_alone(psd)),
            ),
        };
        Ok(())
    }

    /// Welch PSD of `x` into `psd` (resized to the bin count; no allocation once sized).
    fn welch(&mut self, x: &[f64], psd: &mut Vec<f64>) {
        let bins = self.freqs.len();
        psd.clear();
        psd.resize(bins, 0.0);
        // Every segment windowed into its part of the buffer, then one FFT call for all.
        let len = self.fft.len();
        for (s, buffer) in self.buffer.chunks_exact_mut(len).enumerate() {
            let seg = &x[s * self.hop..s * self.hop + self.nperseg];
            let mean = self.simd.sum(seg) / self.nperseg as f64;
            match self.transform {
                Transform::Paired { .. } => {
                    self.simd.window_pairs(seg, mean, &self.hann, buffer);
                }
                Transform::Full => {
                    for ((z, &v), &h) in buffer.iter_mut().zip(seg).zip(&self.hann) {
                        *z = Complex::new((v - mean) * h, 0.0);
                    }
                }
            }
        }
        self.fft
            .process_with_scratch(&mut self.buffer, &mut self.scratch);
        match &self.transform {
            Transform::Paired { cos, sin } => {
                self.simd.real_spectra(&self.buffer, len, cos, sin, psd);
            }
            Transform::Full => {
                for spectrum in self.buffer.chunks_exact(len) {
                    for (p, z) in psd.iter_mut().zip(spectrum) {
                        *p += z.norm_sqr();
                    }
                }
            }
        }
        self.simd.mul_assign(psd, &self.bin_scale);
    }

    /// Least-squares slope of log PSD over log f (the slope is the same in any base),
    /// over the positive bins of the fit's range.
    fn aperiodic_slope(&self, psd: &[f64]) -> Option<f64> {
        let (lo, hi) = self.aperiodic;
        let fit = lo.max(1)..=hi.min(psd.len() - 1);
        if fit.is_empty() {
            return None;
        }
        let (n, sx, sy, sxx, sxy) = if psd[fit.clone()].iter().all(|&p| p > 0.0) {
            // The usual case: every bin takes part, so the sums over ln f are fixed.
            let (x, y) = (&self.ln_freqs[fit.clone()], &self.ln_psd[fit.clone()]);
            let (sx, sxx) = self.fit_sums;
            (
                x.len() as f64,
                sx,
                self.simd.sum(y),
                sxx,
                self.simd.dot(x, y),
            )
        } else {
            let (mut n, mut sx, mut sy, mut sxx, mut sxy) = (0.0, 0.0, 0.0, 0.0, 0.0);
            for k in fit.filter(|&k| psd[k] > 0.0) {
                let (x, y) = (self.ln_freqs[k], self.ln_psd[k]);
                n += 1.0;
                sx += x;
                sy += y;
                sxx += x * x;
                sxy += x * y;
            }
            (n, sx, sy, sxx, sxy)
        };
        let denominator = n * sxx - sx * sx;
        (n >= 3.0 && denominator > 0.0).then(|| (n * sxy - sx * sy) / denominator)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(fs: f64, n: usize, hz: f64, amplitude: f64) -> Vec<f64> {
        (0..n)
            .map(|i| amplitude * (2.0 * std::f64::consts::PI * hz * i as f64 / fs).sin())
            .collect()
    }

    #[test]
    fn segments_follow_the_sample_rate() {
        let e = FeatureEngine::new(128.0, 256).unwrap();
        assert_eq!((e.nperseg, e.hop, e.segments), (128, 64, 3));
        assert_eq!(e.freqs().len(), 65);
        assert_eq!((e.bands[0].first, e.bands[0].weights.len()), (1, 4));
        assert_eq!(e.total, (1, 45));
        let e = FeatureEngine::new(256.0, 512).unwrap();
        assert_eq!((e.nperseg, e.hop, e.segments), (256, 128, 3));
        assert_eq!(e.freqs().len(), 129);
        assert_eq!(e.resolution_hz(), 1.0);
        assert_eq!(e.line_60.as_ref().map(|l| l.bin), Some(60));
        assert!(FeatureEngine::new(128.5, 256).is_err());
        assert!(FeatureEngine::new(128.0, 100).is_err());
    }

    #[test]
    fn sines_land_in_their_band() {
        for fs in [128.0, 256.0, 500.0] {
            let mut engine = FeatureEngine::new(fs, 2 * fs as usize).unwrap();
            let mut out = WindowFeatures::default();
            for (band, hz) in [(0, 2.0), (1, 6.0), (2, 10.0), (3, 20.0), (4, 38.0)] {
                engine
                    .compute(&sine(fs, 2 * fs as usize, hz, 10.0), &mut out)
                    .unwrap();
                let rel = out.rel.map(|r| r.unwrap());
                let best = (0..5).max_by(|&a, &b| rel[a].total_cmp(&rel[b])).unwrap();
                assert_eq!(best, band, "{hz} Hz at {fs} Hz: {rel:?}");
                assert!(rel[band] > 0.9, "{hz} Hz at {fs} Hz: {rel:?}");
            }
            engine
                .compute(&sine(fs, 2 * fs as usize, 11.0, 10.0), &mut out)
                .unwrap();
            assert_eq!(out.peak_alpha_hz, Some(11.0));
            // A pure tone has almost all power in one bin and its neighbours.
            assert!(out.spectral_entropy.unwrap() < 0.3);
            // Parseval: a sine of amplitude A has power A²/2.
            assert!(
                (out.total_abs.unwrap() - 50.0).abs() < 2.0,
                "{:?}",
                out.total_abs
            );
        }
    }

    #[test]
    fn flat_and_non_finite_windows() {
        let mut engine = FeatureEngine::new(128.0, 256).unwrap();
        let mut out = WindowFeatures::default();
        engine.compute(&[3.5; 256], &mut out).unwrap();
        assert!(out.flat);
        assert_eq!(out.clipped_fraction, 1.0);
        assert_eq!(out.hjorth_activity, Some(0.0));
        assert_eq!(out.hjorth_mobility, None);
        assert_eq!(out.rel, [None; 5]);
        assert_eq!(out.peak_alpha_hz, None);
        assert_eq!(out.spectral_entropy, None);
        assert_eq!(out.total_abs, Some(0.0));
        let mut x = sine(128.0, 256, 10.0, 1.0);
        x[17] = f64::NAN;
        assert_eq!(
            engine.compute(&x, &mut out),
            Err(SignalError::NonFinite { index: 17 })
        );
        x[17] = f64::INFINITY;
        assert!(engine.compute(&x, &mut out).is_err());
        assert!(engine.compute(&x[..255], &mut out).is_err());
    }

    #[test]
    fn quality_flags_clipping_and_line_noise() {
        let mut engine = FeatureEngine::new(256.0, 512).unwrap();
        let mut out = WindowFeatures::default();
        let clipped: Vec<f64> = sine(256.0, 512, 10.0, 10.0)
            .into_iter()
            .map(|v| v.clamp(-5.0, 5.0))
            .collect();
        engine.compute(&clipped, &mut out).unwrap();
        assert!(out.clipped_fraction > 0.5, "{}", out.clipped_fraction);
        let mut noisy = sine(256.0, 512, 10.0, 10.0);
        for (v, n) in noisy.iter_mut().zip(sine(256.0, 512, 50.0, 3.0)) {
            *v += n;
        }
        engine.compute(&noisy, &mut out).unwrap();
        assert!(
            out.line_noise_50hz.unwrap() > 100.0,
            "{:?}",
            out.line_noise_50hz
        );
        assert!(out.clipped_fraction < 0.01);
    }

    #[test]
    fn the_avx2_loops_give_the_portable_loops_bits() {
        // On a CPU without AVX2 both engines run the portable loops and this only
        // checks determinism.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for (fs, seconds) in [
            (128.0, 2.0),
            (256.0, 2.0),
            (250.0, 2.0),
            (500.0, 4.0),
            (17.0, 3.0),
        ] {
            let n = (fs * seconds) as usize;
            let mut fast = FeatureEngine::new(fs, n).unwrap();
            let mut portable = FeatureEngine::new(fs, n).unwrap();
            portable.simd = Simd::portable();
            let (mut a, mut b) = (WindowFeatures::default(), WindowFeatures::default());
            for round in 0..20 {
                let mut x: Vec<f64> = (0..n)
                    .map(|i| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        let t = i as f64 / fs;
                        40.0 * (2.0 * std::f64::consts::PI * 9.5 * t).sin()
                            + (state % 10_000) as f64 / 100.0
                            + 1e3 * f64::from(round)
                    })
                    .collect();
                if round % 5 == 4 {
                    // A railed stretch: plateaus at the extremes.
                    for v in &mut x[n / 3..n / 2] {
                        *v = 5e3;
                    }
                }
                fast.compute(&x, &mut a).unwrap();
                portable.compute(&x, &mut b).unwrap();
                let bits = |v: &[f64]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a.psd), bits(&b.psd), "{fs} Hz, round {round}");
                assert_eq!(a, b, "{fs} Hz, round {round}");
            }
        }
    }

    #[test]
    fn pink_noise_has_a_negative_exponent() {
        // Sum of sines with amplitude 1/sqrt(f): PSD ~ 1/f, slope ~ -1.
        let fs = 256.0;
        let x: Vec<f64> = (0..512)
            .map(|i| {
                (1..100)
                    .map(|f| {
                        let f = f as f64;
                        (2.0 * std::f64::consts::PI * f * i as f64 / fs + f * 1.3).sin() / f.sqrt()
                    })
                    .sum()
            })
            .collect();
        let mut engine = FeatureEngine::new(fs, 512).unwrap();
        let mut out = WindowFeatures::default();
        engine.compute(&x, &mut out).unwrap();
        let slope = out.aperiodic_exponent.unwrap();
        assert!((slope + 1.0).abs() < 0.3, "{slope}");
    }
}
