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

use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};

/// Version of the feature definitions; every feature record names it.
pub const ALGORITHM_VERSION: &str = "albi-features/1.0.0";

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

/// Computes [`WindowFeatures`] for windows of a fixed length and sample rate.
pub struct FeatureEngine {
    fs: f64,
    window: usize,
    nperseg: usize,
    hop: usize,
    segments: usize,
    /// Periodic Hann window, `h_j = 0.5 - 0.5 cos(2πj/N)`.
    hann: Vec<f64>,
    /// `1 / (fs Σ h²)`: density scaling.
    scale: f64,
    freqs: Vec<f64>,
    /// ln P per bin of the total band, for the window being computed.
    ln_psd: Vec<f64>,
    /// ln f per bin (0 for DC, which the fit skips).
    ln_freqs: Vec<f64>,
    fft: Arc<dyn RealToComplex<f64>>,
    segment: Vec<f64>,
    spectrum: Vec<Complex<f64>>,
    scratch: Vec<Complex<f64>>,
    /// Inclusive bin ranges (empty ranges have `lo > hi`).
    bands: [(usize, usize); 5],
    total: (usize, usize),
    alpha: (usize, usize),
    aperiodic: (usize, usize),
    line_50: Option<(usize, usize, usize)>,
    line_60: Option<(usize, usize, usize)>,
    median: Vec<f64>,
}

impl std::fmt::Debug for FeatureEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureEngine")
            .field("fs", &self.fs)
            .field("window", &self.window)
            .field("nperseg", &self.nperseg)
            .field("segments", &self.segments)
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

fn trapezoid(psd: &[f64], freqs: &[f64], (lo, hi): (usize, usize)) -> f64 {
    if lo >= hi {
        return 0.0;
    }
    (lo..hi)
        .map(|m| (freqs[m + 1] - freqs[m]) * (psd[m] + psd[m + 1]) / 2.0)
        .sum()
}

/// Sum with four independent accumulators: breaks the add-latency chain (the result
/// differs from a sequential sum only by rounding, ~1e-16 relative).
#[inline]
fn sum4(x: &[f64]) -> f64 {
    let mut acc = [0.0; 4];
    let chunks = x.chunks_exact(4);
    let tail: f64 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..4 {
            acc[l] += c[l];
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// Population variances (two-pass: means first, then squared deviations) of `x`, its
/// first difference and its second difference, in two passes over `x` in all.
fn hjorth_variances(x: &[f64]) -> (f64, f64, f64) {
    let n = x.len();
    let mean = sum4(x) / n as f64;
    // The means of the differences telescope.
    let mean_d1 = (x[n - 1] - x[0]) / (n - 1) as f64;
    let mean_d2 = ((x[n - 1] - x[n - 2]) - (x[1] - x[0])) / (n - 2) as f64;
    let (mut v0, mut v1, mut v2) = ([0.0; 4], [0.0; 4], [0.0; 4]);
    // Four lanes at a time over fixed-size views, so the loop has no bounds checks and
    // vectorises; the last (n - 2) % 4 positions go through the same code one by one.
    let body = n - 2;
    let mut i = 0;
    while i + 4 <= body {
        let w: &[f64; 6] = x[i..i + 6].try_into().expect("six samples");
        for l in 0..4 {
            let d1 = w[l + 1] - w[l];
            let d2 = (w[l + 2] - w[l + 1]) - d1;
            let (e0, e1, e2) = (w[l] - mean, d1 - mean_d1, d2 - mean_d2);
            v0[l] += e0 * e0;
            v1[l] += e1 * e1;
            v2[l] += e2 * e2;
        }
        i += 4;
    }
    for j in i..body {
        let d1 = x[j + 1] - x[j];
        let d2 = (x[j + 2] - x[j + 1]) - d1;
        let (e0, e1, e2) = (x[j] - mean, d1 - mean_d1, d2 - mean_d2);
        v0[0] += e0 * e0;
        v1[0] += e1 * e1;
        v2[0] += e2 * e2;
    }
    let e0a = x[n - 2] - mean;
    let e0b = x[n - 1] - mean;
    let e1 = (x[n - 1] - x[n - 2]) - mean_d1;
    let fold = |v: [f64; 4]| (v[0] + v[1]) + (v[2] + v[3]);
    (
        (fold(v0) + e0a * e0a + e0b * e0b) / n as f64,
        (fold(v1) + e1 * e1) / (n - 1) as f64,
        fold(v2) / (n - 2) as f64,
    )
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
        let hann: Vec<f64> = (0..nperseg)
            .map(|j| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * j as f64 / nperseg as f64).cos())
            .collect();
        let scale = 1.0 / (fs * hann.iter().map(|h| h * h).sum::<f64>());
        // As numpy.fft.rfftfreq(nperseg, 1/fs) computes them.
        let step = 1.0 / (nperseg as f64 * (1.0 / fs));
        let freqs: Vec<f64> = (0..=nperseg / 2).map(|k| k as f64 * step).collect();
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(nperseg);
        let bands = BANDS.map(|(_, lo, hi)| bin_range(&freqs, lo, hi));
        let nyquist = freqs.len() - 1;
        let line = |f0: f64| {
            let k = freqs.iter().position(|&f| f == f0)?;
            (k < nyquist).then(|| {
                let (lo, hi) = bin_range(&freqs, f0 - LINE_NOISE_SPAN_HZ, f0 + LINE_NOISE_SPAN_HZ);
                (k, lo.max(1), hi)
            })
        };
        Ok(FeatureEngine {
            fs,
            window: window_samples,
            nperseg,
            hop,
            segments,
            hann,
            scale,
            segment: fft.make_input_vec(),
            spectrum: fft.make_output_vec(),
            scratch: fft.make_scratch_vec(),
            bands,
            total: bin_range(&freqs, TOTAL.0, TOTAL.1),
            alpha: bin_range(&freqs, ALPHA_PEAK.0, ALPHA_PEAK.1),
            aperiodic: bin_range(&freqs, APERIODIC_FIT.0, APERIODIC_FIT.1),
            line_50: line(50.0),
            line_60: line(60.0),
            median: Vec::with_capacity(freqs.len()),
            ln_psd: Vec::with_capacity(freqs.len()),
            ln_freqs: freqs
                .iter()
                .map(|&f| if f > 0.0 { f.ln() } else { 0.0 })
                .collect(),
            freqs,
            fft,
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
        if let Some(index) = x.iter().position(|v| !v.is_finite()) {
            return Err(SignalError::NonFinite { index });
        }
        self.welch(x, &mut out.psd);
        let psd = &out.psd;
        let freqs = &self.freqs;

        let (activity, d1, d2) = hjorth_variances(x);
        out.flat = activity == 0.0;
        out.clipped_fraction = clipped_fraction(x);
        for (b, range) in self.bands.iter().enumerate() {
            out.abs[b] = Some(trapezoid(psd, freqs, *range));
        }
        let total = trapezoid(psd, freqs, self.total);
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
        self.ln_psd.clear();
        self.ln_psd.resize(psd.len(), 0.0);
        let band = lo..=hi.min(psd.len() - 1);
        for (ln, &p) in self.ln_psd[band.clone()].iter_mut().zip(&psd[band]) {
            *ln = if p > 0.0 { p.ln() } else { 0.0 };
        }
        out.spectral_entropy = defined.then(|| {
            // With p = P/S: -sum p ln p = ln S - (sum P ln P) / S (0 ln 0 = 0).
            let sum = sum4(&psd[lo..=hi]);
            let plnp: f64 = (lo..=hi).map(|k| psd[k] * self.ln_psd[k]).sum();
            (sum.ln() - plnp / sum) / ((hi - lo + 1) as f64).ln()
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
            aperiodic_slope(psd, &self.ln_psd, &self.ln_freqs, self.aperiodic)
        } else {
            None
        };
        out.line_noise_50hz = self
            .line_50
            .and_then(|l| line_ratio(psd, l, &mut self.median));
        out.line_noise_60hz = self
            .line_60
            .and_then(|l| line_ratio(psd, l, &mut self.median));
        Ok(())
    }

    /// Welch PSD of `x` into `psd` (resized to the bin count; no allocation once sized).
    fn welch(&mut self, x: &[f64], psd: &mut Vec<f64>) {
        let bins = self.spectrum.len();
        psd.clear();
        psd.resize(bins, 0.0);
        for s in 0..self.segments {
            let seg = &x[s * self.hop..s * self.hop + self.nperseg];
            let mean = sum4(seg) / self.nperseg as f64;
            for ((out, &v), &h) in self.segment.iter_mut().zip(seg).zip(&self.hann) {
                *out = (v - mean) * h;
            }
            self.fft
                .process_with_scratch(&mut self.segment, &mut self.spectrum, &mut self.scratch)
                .expect("buffers are sized by the plan");
            for (p, z) in psd.iter_mut().zip(&self.spectrum) {
                *p += z.norm_sqr();
            }
        }
        let even = self.nperseg % 2 == 0;
        let factor = self.scale / self.segments as f64;
        let last = bins - 1;
        for (k, p) in psd.iter_mut().enumerate() {
            // One-sided: every bin but DC (and Nyquist for even lengths) counts twice.
            let doubled = k > 0 && !(even && k == last);
            *p *= if doubled { 2.0 * factor } else { factor };
        }
    }
}

fn clipped_fraction(x: &[f64]) -> f64 {
    // Inputs are finite (checked), so plain comparisons suffice and vectorise.
    let (mut min, mut max) = (x[0], x[0]);
    for &v in x {
        min = if v < min { v } else { min };
        max = if v > max { v } else { max };
    }
    if min == max {
        return 1.0;
    }
    // A railed or clipping channel sits on a plateau at its extreme; a healthy one
    // touches an extreme and leaves (even a periodic one, which touches it repeatedly).
    let plateau: usize = x
        .windows(2)
        .map(|w| usize::from((w[1] == w[0]) & ((w[1] == min) | (w[1] == max))))
        .sum();
    plateau as f64 / x.len() as f64
}

/// Least-squares slope of log PSD over log f (the slope is the same in any base), over
/// the positive bins of `range`; `ln_freqs` holds ln f per bin.
fn aperiodic_slope(
    psd: &[f64],
    ln_psd: &[f64],
    ln_freqs: &[f64],
    (lo, hi): (usize, usize),
) -> Option<f64> {
    let (mut n, mut sx, mut sy, mut sxx, mut sxy) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for k in lo..=hi.min(psd.len() - 1) {
        if psd[k] > 0.0 && k > 0 {
            let (x, y) = (ln_freqs[k], ln_psd[k]);
            n += 1.0;
            sx += x;
            sy += y;
            sxx += x * x;
            sxy += x * y;
        }
    }
    let denominator = n * sxx - sx * sx;
    (n >= 3.0 && denominator > 0.0).then(|| (n * sxy - sx * sy) / denominator)
}

/// PSD at the line frequency over the median of its neighbourhood (itself excluded).
fn line_ratio(psd: &[f64], (k, lo, hi): (usize, usize, usize), buf: &mut Vec<f64>) -> Option<f64> {
    buf.clear();
    buf.extend(
        (lo..=hi)
            .filter(|&i| i != k && i < psd.len())
            .map(|i| psd[i]),
    );
    if buf.is_empty() {
        return None;
    }
    let len = buf.len();
    let mid = len / 2;
    let (below, upper, _) = buf.select_nth_unstable_by(mid, f64::total_cmp);
    let upper = *upper;
    let median = if len % 2 == 0 {
        // The lower middle is the largest of the half below.
        let lower = below.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lower + upper) / 2.0
    } else {
        upper
    };
    (median > 0.0).then(|| psd[k] / median)
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
        assert_eq!(e.bands[0], (1, 4));
        assert_eq!(e.total, (1, 45));
        let e = FeatureEngine::new(256.0, 512).unwrap();
        assert_eq!((e.nperseg, e.hop, e.segments), (256, 128, 3));
        assert_eq!(e.freqs().len(), 129);
        assert_eq!(e.resolution_hz(), 1.0);
        assert_eq!(e.line_60.map(|l| l.0), Some(60));
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
