//! The building blocks of the presets: second-order filters, one-pole smoothers, a
//! wavetable oscillator and the conversion to 16-bit PCM. All in `f64`, all state
//! explicit, so the same input gives the same bits.

use std::f64::consts::{PI, TAU};

/// A biquad in transposed direct form II (RBJ cookbook coefficients).
#[derive(Debug, Clone)]
pub struct Biquad {
    b0: f64,
    b1: f64,
    b2: f64,
    a1: f64,
    a2: f64,
    z1: f64,
    z2: f64,
}

/// Q of a second-order Butterworth section.
pub const BUTTERWORTH_Q: f64 = std::f64::consts::FRAC_1_SQRT_2;

impl Biquad {
    fn from_raw(b: [f64; 3], a: [f64; 3]) -> Biquad {
        Biquad {
            b0: b[0] / a[0],
            b1: b[1] / a[0],
            b2: b[2] / a[0],
            a1: a[1] / a[0],
            a2: a[2] / a[0],
            z1: 0.0,
            z2: 0.0,
        }
    }

    pub fn lowpass(fs: f64, f0: f64, q: f64) -> Biquad {
        let w = TAU * f0 / fs;
        let (sin, cos) = w.sin_cos();
        let alpha = sin / (2.0 * q);
        let b1 = 1.0 - cos;
        Biquad::from_raw(
            [b1 / 2.0, b1, b1 / 2.0],
            [1.0 + alpha, -2.0 * cos, 1.0 - alpha],
        )
    }

    pub fn highpass(fs: f64, f0: f64, q: f64) -> Biquad {
        let w = TAU * f0 / fs;
        let (sin, cos) = w.sin_cos();
        let alpha = sin / (2.0 * q);
        let b1 = -(1.0 + cos);
        Biquad::from_raw(
            [-b1 / 2.0, b1, -b1 / 2.0],
            [1.0 + alpha, -2.0 * cos, 1.0 - alpha],
        )
    }

    #[inline]
    pub fn process(&mut self, x: f64) -> f64 {
        let y = self.b0 * x + self.z1;
        self.z1 = self.b1 * x - self.a1 * y + self.z2;
        self.z2 = self.b2 * x - self.a2 * y;
        y
    }

    /// Puts the filter in the state it would have after a constant input `x` forever,
    /// so a signal's offset does not start it with a step; returns that steady output.
    pub fn settle(&mut self, x: f64) -> f64 {
        let gain = (self.b0 + self.b1 + self.b2) / (1.0 + self.a1 + self.a2);
        let y = gain * x;
        self.z2 = self.b2 * x - self.a2 * y;
        self.z1 = y - self.b0 * x;
        y
    }
}

/// A chain of biquads applied in order.
#[derive(Debug, Clone, Default)]
pub struct Chain(pub Vec<Biquad>);

impl Chain {
    #[inline]
    pub fn process(&mut self, x: f64) -> f64 {
        self.0.iter_mut().fold(x, |v, f| f.process(v))
    }

    pub fn settle(&mut self, x: f64) -> f64 {
        self.0.iter_mut().fold(x, |v, f| f.settle(v))
    }
}

/// `y += a (x - y)`: a first-order low-pass with time constant `tau` seconds.
#[derive(Debug, Clone)]
pub struct OnePole {
    a: f64,
    pub y: f64,
}

impl OnePole {
    pub fn new(fs: f64, tau: f64) -> OnePole {
        OnePole {
            a: 1.0 - (-1.0 / (tau * fs)).exp(),
            y: 0.0,
        }
    }

    #[inline]
    pub fn process(&mut self, x: f64) -> f64 {
        self.y += self.a * (x - self.y);
        self.y
    }
}

/// An envelope follower that rises fast and falls slowly: the level a gain control
/// divides by, so a loud onset is caught at once and quiet passages recover gently.
#[derive(Debug, Clone)]
pub struct Envelope {
    attack: f64,
    release: f64,
    pub level: f64,
}

impl Envelope {
    pub fn new(fs: f64, attack_s: f64, release_s: f64) -> Envelope {
        Envelope {
            attack: 1.0 - (-1.0 / (attack_s * fs)).exp(),
            release: 1.0 - (-1.0 / (release_s * fs)).exp(),
            level: 0.0,
        }
    }

    #[inline]
    pub fn process(&mut self, x: f64) -> f64 {
        let x = x.abs();
        let a = if x > self.level {
            self.attack
        } else {
            self.release
        };
        self.level += a * (x - self.level);
        self.level
    }
}

/// One period of a waveform, read with linear interpolation.
#[derive(Debug, Clone)]
pub struct Wavetable {
    /// `SIZE + 1` entries; the last repeats the first so reads never wrap.
    table: Vec<f64>,
}

const TABLE_SIZE: usize = 4096;

impl Wavetable {
    /// A sum of harmonics `1..=amplitudes.len()` with the given amplitudes, normalised
    /// to a peak of 1.
    pub fn harmonics(amplitudes: &[f64]) -> Wavetable {
        let mut table: Vec<f64> = (0..=TABLE_SIZE)
            .map(|i| {
                let x = TAU * i as f64 / TABLE_SIZE as f64;
                amplitudes
                    .iter()
                    .enumerate()
                    .map(|(h, a)| a * ((h + 1) as f64 * x).sin())
                    .sum()
            })
            .collect();
        let peak = table.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        if peak > 0.0 {
            table.iter_mut().for_each(|v| *v /= peak);
        }
        table[TABLE_SIZE] = table[0];
        Wavetable { table }
    }

    /// The waveform at `phase` in `[0, 1)`.
    #[inline]
    pub fn at(&self, phase: f64) -> f64 {
        let x = phase * TABLE_SIZE as f64;
        let i = (x as usize).min(TABLE_SIZE - 1);
        let t = x - i as f64;
        self.table[i] + (self.table[i + 1] - self.table[i]) * t
    }
}

/// Equal-power stereo gains for `pan` in `[0, 1]` (0 left, 1 right).
pub fn pan_gains(pan: f64) -> (f64, f64) {
    let theta = pan.clamp(0.0, 1.0) * PI / 2.0;
    (theta.cos(), theta.sin())
}

/// A sample in `[-1, 1]` (soft-limited beyond) as 16-bit PCM.
#[inline]
pub fn to_pcm(x: f64) -> i16 {
    let limited = if x.abs() <= 0.5 {
        x
    } else {
        // Above half scale, bend smoothly towards full scale instead of clipping.
        x.signum() * (0.5 + 0.5 * ((x.abs() - 0.5) / 0.5).tanh())
    };
    (limited * 32767.0).round() as i16
}

/// Catmull-Rom interpolation between `p1` and `p2` at `t` in `[0, 1]`.
#[inline]
pub fn cubic(p0: f64, p1: f64, p2: f64, p3: f64, t: f64) -> f64 {
    let a = -0.5 * p0 + 1.5 * p1 - 1.5 * p2 + 0.5 * p3;
    let b = p0 - 2.5 * p1 + 2.0 * p2 - 0.5 * p3;
    let c = -0.5 * p0 + 0.5 * p2;
    ((a * t + b) * t + c) * t + p1
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::FRAC_1_SQRT_2;

    fn tone_gain(mut f: Biquad, fs: f64, freq: f64) -> f64 {
        let n = (fs * 20.0) as usize;
        let mut peak = 0.0f64;
        for i in 0..n {
            let y = f.process((TAU * freq * i as f64 / fs).sin());
            if i > n / 2 {
                peak = peak.max(y.abs());
            }
        }
        peak
    }

    #[test]
    fn butterworth_sections_pass_and_stop_where_they_should() {
        let fs = 256.0;
        let lp = Biquad::lowpass(fs, 40.0, BUTTERWORTH_Q);
        assert!((tone_gain(lp.clone(), fs, 5.0) - 1.0).abs() < 0.01);
        assert!((tone_gain(lp.clone(), fs, 40.0) - FRAC_1_SQRT_2).abs() < 0.01);
        assert!(tone_gain(lp, fs, 120.0) < 0.05);
        let hp = Biquad::highpass(fs, 0.5, BUTTERWORTH_Q);
        assert!((tone_gain(hp.clone(), fs, 10.0) - 1.0).abs() < 0.01);
        assert!(tone_gain(hp, fs, 0.05) < 0.02);
    }
    #[test]
    fn a_settled_filter_does_not_ring_on_a_constant() {
        let mut chain = Chain(vec![
            Biquad::highpass(128.0, 0.5, BUTTERWORTH_Q),
            Biquad::lowpass(128.0, 40.0, BUTTERWORTH_Q),
        ]);
        assert!(chain.settle(-3000.0).abs() < 1e-9);
        for _ in 0..100 {
            assert!(chain.process(-3000.0).abs() < 1e-6);
        }
    }

    #[test]
    fn wavetables_are_periodic_and_normalised() {
        let w = Wavetable::harmonics(&[1.0, 0.5, 0.25]);
        assert!((w.at(0.0) - w.at(0.999_999_9)).abs() < 1e-3);
        let peak = (0..10_000)
            .map(|i| w.at(i as f64 / 10_000.0).abs())
            .fold(0.0, f64::max);
        assert!((peak - 1.0).abs() < 1e-3);
        let sine = Wavetable::harmonics(&[1.0]);
        assert!((sine.at(0.25) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn pcm_is_linear_below_half_scale_and_never_wraps() {
        assert_eq!(to_pcm(0.25), 8192);
        assert_eq!(to_pcm(-0.25), -8192);
        assert_eq!(to_pcm(50.0), 32767);
        assert_eq!(to_pcm(-50.0), -32767);
        let a = to_pcm(0.6);
        let b = to_pcm(0.7);
        assert!(a > 16384 && b > a && b < 32767);
    }

    #[test]
    fn envelopes_rise_fast_and_fall_slowly() {
        let mut e = Envelope::new(100.0, 0.01, 1.0);
        for _ in 0..10 {
            e.process(1.0);
        }
        assert!(e.level > 0.99);
        for _ in 0..10 {
            e.process(0.0);
        }
        assert!(e.level > 0.85);
    }
}
