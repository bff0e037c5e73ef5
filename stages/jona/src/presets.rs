//! The synthesis presets. Each renders one session's EEG, one sample (left and right
//! mix) at a time, into interleaved stereo 16-bit PCM, keeping every filter, envelope
//! and oscillator phase between calls, so audio is continuous however the EEG arrives
//! in frames and chunks. A preset's output for given input is fixed by its version:
//! change the sound, bump the version.

use std::collections::VecDeque;

use clisonix_signal::BANDS;

use crate::dsp::{
    cubic, pan_gains, to_pcm, Biquad, Chain, Envelope, OnePole, Wavetable, BUTTERWORTH_Q,
};

/// The lowest EEG sample rate the presets render (the alpha band must fit).
pub const MIN_SAMPLE_RATE_HZ: f64 = 32.0;

/// A synthesis preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Preset {
    /// The EEG itself, band-limited to 0.5–40 Hz and played 60 times faster, so 1–40 Hz
    /// becomes 60–2400 Hz: left-hemisphere channels (and the midline) on the left,
    /// right-hemisphere channels on the right.
    Audification,
    /// Five tonal voices per hemisphere, one per EEG band: loudness follows the band's
    /// relative power, pitch and brightness its dominant frequency within the band;
    /// the left hemisphere's voices sit left, the right's right. Real time.
    ParameterMapping,
}

impl Preset {
    pub const ALL: [Preset; 2] = [Preset::Audification, Preset::ParameterMapping];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Audification => "audification",
            Preset::ParameterMapping => "parameter_mapping",
        }
    }

    /// Bumped whenever the preset's output for the same input changes.
    pub fn version(self) -> &'static str {
        match self {
            Preset::Audification => "1.0.0",
            Preset::ParameterMapping => "1.0.0",
        }
    }

    pub fn parse(name: &str) -> Option<Preset> {
        Preset::ALL.into_iter().find(|p| p.name() == name.trim())
    }

    /// How many times faster than the EEG the audio plays.
    pub fn speed(self) -> f64 {
        match self {
            Preset::Audification => AUDIFICATION_SPEED,
            Preset::ParameterMapping => 1.0,
        }
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where an electrode sits, from its 10-20/10-10 name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Left,
    Right,
    Midline,
}

/// Electrode name prefixes of the 10-20 and 10-10 systems (longest first).
const SCALP: [&str; 14] = [
    "FP", "AF", "FT", "FC", "TP", "CP", "PO", "F", "T", "C", "P", "O", "I", "N",
];

/// The side of a scalp electrode (`Fp1` left, `C4` right, `Cz` midline); `None` for
/// anything else (EOG, ECG, references such as A1/M2, unnamed channels such as `Ch3`).
/// Accepts `EEG Fp1`, `Fp1-REF` and the like.
pub fn side(label: &str) -> Option<Side> {
    let label = label.trim();
    let label = label
        .strip_prefix("EEG ")
        .or_else(|| label.strip_prefix("eeg "))
        .unwrap_or(label);
    let name = label
        .split(['-', ' ', '/', ':'])
        .next()
        .unwrap_or("")
        .to_ascii_uppercase();
    let prefix = SCALP.iter().find(|p| name.starts_with(**p))?;
    let rest = &name[prefix.len()..];
    if rest == "Z" {
        return Some(Side::Midline);
    }
    let n: u32 = rest
        .parse()
        .ok()
        .filter(|_| (1..=2).contains(&rest.len()))?;
    if n == 0 {
        return None;
    }
    Some(if n % 2 == 1 { Side::Left } else { Side::Right })
}

/// Which channels make the left and the right signal (each the mean of its channels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mix {
    pub left: Vec<usize>,
    pub right: Vec<usize>,
}

impl Mix {
    /// Left: left-hemisphere and midline electrodes; right: right-hemisphere and
    /// midline. Without named lateral electrodes both sides take every scalp
    /// electrode, and without any, every channel.
    pub fn from_labels(labels: &[String]) -> Mix {
        let sides: Vec<Option<Side>> = labels.iter().map(|l| side(l)).collect();
        let pick = |f: &dyn Fn(Side) -> bool| -> Vec<usize> {
            (0..labels.len())
                .filter(|&c| sides[c].is_some_and(f))
                .collect()
        };
        let lateral = sides
            .iter()
            .any(|s| matches!(s, Some(Side::Left | Side::Right)));
        if lateral {
            return Mix {
                left: pick(&|s| s != Side::Right),
                right: pick(&|s| s != Side::Left),
            };
        }
        let scalp = pick(&|_| true);
        let all = if scalp.is_empty() {
            (0..labels.len()).collect()
        } else {
            scalp
        };
        Mix {
            left: all.clone(),
            right: all,
        }
    }

    /// The left and right values of sample `i` of a channel-major block of `n` samples
    /// per channel.
    #[inline]
    pub fn at(&self, samples: &[f32], n: usize, i: usize) -> [f64; 2] {
        let mean = |chs: &[usize]| {
            chs.iter()
                .map(|&c| f64::from(samples[c * n + i]))
                .sum::<f64>()
                / chs.len() as f64
        };
        [mean(&self.left), mean(&self.right)]
    }
}

/// One preset's renderer for one session.
#[derive(Debug, Clone)]
pub enum Synth {
    Audification(Box<Audification>),
    ParameterMapping(Box<ParameterMapping>),
}

impl Synth {
    /// A renderer of EEG at `fs` Hz into audio at `rate` Hz.
    pub fn new(preset: Preset, fs: f64, rate: u32) -> Synth {
        match preset {
            Preset::Audification => Synth::Audification(Box::new(Audification::new(fs, rate))),
            Preset::ParameterMapping => {
                Synth::ParameterMapping(Box::new(ParameterMapping::new(fs, rate)))
            }
        }
    }

    /// Takes the next EEG sample (left, right; microvolts) and appends the audio it
    /// completes to `pcm` (interleaved stereo).
    #[inline]
    pub fn push(&mut self, x: [f64; 2], pcm: &mut Vec<i16>) {
        match self {
            Synth::Audification(s) => s.push(x, pcm),
            Synth::ParameterMapping(s) => s.push(x, pcm),
        }
    }

    /// The session ended: renders what is still pending and a short fade to silence.
    pub fn finish(&mut self, pcm: &mut Vec<i16>) {
        match self {
            Synth::Audification(s) => s.finish(pcm),
            Synth::ParameterMapping(s) => s.finish(pcm),
        }
    }
}

const AUDIFICATION_SPEED: f64 = 60.0;
/// The level the gain control aims at (mean absolute value, full scale 1).
const AUDIFICATION_LEVEL: f64 = 0.2;
/// Below this level (µV) the gain stops growing, so a quiet or flat channel stays quiet.
const AUDIFICATION_FLOOR_UV: f64 = 1.0;
const RELEASE_SECONDS: f64 = 0.05;

/// Audification: filter, gain control, then cubic resampling of the sped-up signal.
#[derive(Debug, Clone)]
pub struct Audification {
    filters: [Chain; 2],
    envelopes: [Envelope; 2],
    /// The newest few conditioned samples; `history[0]` is sample `history_start`.
    history: VecDeque<[f64; 2]>,
    history_start: i64,
    newest: i64,
    /// EEG samples per audio frame.
    step: f64,
    next_frame: u64,
    last: [f64; 2],
    rate: u32,
}

impl Audification {
    fn new(fs: f64, rate: u32) -> Audification {
        let lp = (0.45 * fs).min(40.0);
        let chain = || {
            Chain(vec![
                Biquad::highpass(fs, 0.5, BUTTERWORTH_Q),
                Biquad::lowpass(fs, lp, BUTTERWORTH_Q),
                Biquad::lowpass(fs, lp, BUTTERWORTH_Q),
            ])
        };
        let envelope = || Envelope::new(fs, 0.05, 5.0);
        Audification {
            filters: [chain(), chain()],
            envelopes: [envelope(), envelope()],
            history: VecDeque::with_capacity(8),
            history_start: 0,
            newest: -1,
            step: AUDIFICATION_SPEED * fs / f64::from(rate),
            next_frame: 0,
            last: [0.0; 2],
            rate,
        }
    }

    fn sample(&self, i: i64) -> [f64; 2] {
        let at = (i - self.history_start).clamp(0, self.history.len() as i64 - 1);
        self.history[at as usize]
    }

    fn push(&mut self, x: [f64; 2], pcm: &mut Vec<i16>) {
        if self.newest < 0 {
            for (f, x) in self.filters.iter_mut().zip(x) {
                f.settle(x);
            }
        }
        let mut z = [0.0; 2];
        for s in 0..2 {
            let y = self.filters[s].process(x[s]);
            let level = self.envelopes[s].process(y);
            z[s] = y * AUDIFICATION_LEVEL / level.max(AUDIFICATION_FLOOR_UV);
        }
        self.history.push_back(z);
        self.newest += 1;
        if self.history.len() > 6 {
            self.history.pop_front();
            self.history_start += 1;
        }
        self.render(self.newest - 2, pcm);
    }

    /// Renders every audio frame whose position is at most `until` (in EEG samples).
    fn render(&mut self, until: i64, pcm: &mut Vec<i16>) {
        loop {
            let p = self.next_frame as f64 * self.step;
            let i = p.floor() as i64;
            if i > until {
                break;
            }
            let t = p - i as f64;
            let (a, b, c, d) = (
                self.sample(i - 1),
                self.sample(i),
                self.sample(i + 1),
                self.sample(i + 2),
            );
            for s in 0..2 {
                self.last[s] = cubic(a[s], b[s], c[s], d[s], t);
                pcm.push(to_pcm(self.last[s]));
            }
            self.next_frame += 1;
        }
    }

    fn finish(&mut self, pcm: &mut Vec<i16>) {
        if self.newest >= 0 {
            self.render(self.newest, pcm);
        }
        let n = (RELEASE_SECONDS * f64::from(self.rate)).round() as usize;
        for k in 1..=n {
            let g = 1.0 - k as f64 / n as f64;
            for s in 0..2 {
                pcm.push(to_pcm(self.last[s] * g));
            }
        }
        self.last = [0.0; 2];
    }
}

/// Base pitch of each band's voice: A minor pentatonic, low bands low.
const VOICE_PITCH_HZ: [f64; 5] = [110.0, 146.83, 220.0, 329.63, 440.0];
/// How far a voice's pitch moves across its band: ± half of a fifth.
const PITCH_SPAN_SEMITONES: f64 = 7.0;
/// Stereo position of the left and right hemisphere's voices.
const PANS: [f64; 2] = [0.2, 0.8];
const MAPPING_GAIN: f64 = 0.2;
/// Band power (µV²) below which voices fade out instead of amplifying noise.
const MAPPING_GATE_UV2: f64 = 0.05;

#[derive(Debug, Clone, Copy, Default)]
struct Control {
    amp: f64,
    freq: f64,
    bright: f64,
}

#[derive(Debug, Clone)]
struct BandVoice {
    lo: f64,
    hi: f64,
    base: f64,
    filters: [Chain; 2],
    power: [OnePole; 2],
    crossings: [OnePole; 2],
    positive: [bool; 2],
    phase: [f64; 2],
    prev: [Control; 2],
    cur: [Control; 2],
}

/// Parameter mapping: per hemisphere and band, a band-pass filter, a power envelope
/// and a zero-crossing frequency estimate drive one wavetable voice.
#[derive(Debug, Clone)]
pub struct ParameterMapping {
    voices: Vec<BandVoice>,
    sine: Wavetable,
    rich: Wavetable,
    pans: [(f64, f64); 2],
    fs: f64,
    rate: f64,
    /// EEG samples taken, and audio frames written.
    taken: u64,
    written: u64,
}

impl ParameterMapping {
    fn new(fs: f64, rate: u32) -> ParameterMapping {
        let voices = BANDS
            .iter()
            .zip(VOICE_PITCH_HZ)
            .filter(|((_, _, hi), _)| *hi < 0.45 * fs)
            .map(|(&(_, lo, hi), base)| {
                let chain = || {
                    Chain(vec![
                        Biquad::highpass(fs, lo, BUTTERWORTH_Q),
                        Biquad::lowpass(fs, hi, BUTTERWORTH_Q),
                    ])
                };
                BandVoice {
                    lo,
                    hi,
                    base,
                    filters: [chain(), chain()],
                    power: [OnePole::new(fs, 0.5), OnePole::new(fs, 0.5)],
                    crossings: [OnePole::new(fs, 1.0), OnePole::new(fs, 1.0)],
                    positive: [true; 2],
                    phase: [0.0; 2],
                    prev: [Control::default(); 2],
                    cur: [Control::default(); 2],
                }
            })
            .collect();
        let rich: Vec<f64> = (1..=6).map(|h| 1.0 / f64::from(h)).collect();
        ParameterMapping {
            voices,
            sine: Wavetable::harmonics(&[1.0]),
            rich: Wavetable::harmonics(&rich),
            pans: PANS.map(pan_gains),
            fs,
            rate: f64::from(rate),
            taken: 0,
            written: 0,
        }
    }

    fn push(&mut self, x: [f64; 2], pcm: &mut Vec<i16>) {
        let first = self.taken == 0;
        for v in &mut self.voices {
            let centre = (v.lo + v.hi) / 2.0;
            for (s, &x) in x.iter().enumerate() {
                if first {
                    v.filters[s].settle(x);
                    v.crossings[s].y = centre;
                }
                let y = v.filters[s].process(x);
                v.power[s].process(y * y);
                let positive = y >= 0.0;
                let crossed = positive != v.positive[s];
                v.positive[s] = positive;
                v.crossings[s].process(if crossed { self.fs / 2.0 } else { 0.0 });
            }
        }
        for s in 0..2 {
            let total: f64 = self.voices.iter().map(|v| v.power[s].y).sum();
            let gate = total / (total + MAPPING_GATE_UV2);
            for v in &mut self.voices {
                let rel = if total > 0.0 {
                    v.power[s].y / total
                } else {
                    0.0
                };
                let pos = ((v.crossings[s].y - v.lo) / (v.hi - v.lo)).clamp(0.0, 1.0);
                v.prev[s] = v.cur[s];
                v.cur[s] = Control {
                    amp: rel.sqrt() * gate,
                    freq: v.base * ((pos - 0.5) * PITCH_SPAN_SEMITONES / 12.0).exp2(),
                    bright: pos,
                };
                if first {
                    // Start from silence at the right pitch: no click.
                    v.prev[s] = Control {
                        amp: 0.0,
                        ..v.cur[s]
                    };
                }
            }
        }
        self.taken += 1;
        let end = (self.taken as f64 * self.rate / self.fs).floor() as u64;
        let frames = end - self.written;
        self.render(frames, false, pcm);
        self.written = end;
    }

    /// Renders `frames` audio frames, moving every control from `prev` to `cur`;
    /// with `fade_out` the result ramps down to silence over them.
    fn render(&mut self, frames: u64, fade_out: bool, pcm: &mut Vec<i16>) {
        for k in 1..=frames {
            let t = k as f64 / frames as f64;
            let mut out = [0.0f64; 2];
            for v in &mut self.voices {
                for s in 0..2 {
                    let (p, c) = (v.prev[s], v.cur[s]);
                    let amp = p.amp + (c.amp - p.amp) * t;
                    let freq = p.freq + (c.freq - p.freq) * t;
                    let bright = p.bright + (c.bright - p.bright) * t;
                    let mut phase = v.phase[s] + freq / self.rate;
                    phase -= phase.floor();
                    v.phase[s] = phase;
                    let wave = self.sine.at(phase) * (1.0 - bright) + self.rich.at(phase) * bright;
                    let value = wave * amp;
                    out[0] += value * self.pans[s].0;
                    out[1] += value * self.pans[s].1;
                }
            }
            let g = MAPPING_GAIN * if fade_out { 1.0 - t } else { 1.0 };
            pcm.push(to_pcm(out[0] * g));
            pcm.push(to_pcm(out[1] * g));
        }
    }

    fn finish(&mut self, pcm: &mut Vec<i16>) {
        for v in &mut self.voices {
            v.prev = v.cur;
        }
        let n = (RELEASE_SECONDS * self.rate).round() as u64;
        self.render(n, true, pcm);
        for v in &mut self.voices {
            v.cur = [Control::default(); 2];
            v.prev = v.cur;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn electrodes_are_placed_by_their_names() {
        for (label, expected) in [
            ("Fp1", Some(Side::Left)),
            ("FPz", Some(Side::Midline)),
            ("F4", Some(Side::Right)),
            ("EEG T7-REF", Some(Side::Left)),
            ("PO8", Some(Side::Right)),
            ("Oz", Some(Side::Midline)),
            ("T10", Some(Side::Right)),
            ("EOG1", None),
            ("A1", None),
            ("M2", None),
            ("Ch3", None),
            ("ECG", None),
            ("", None),
        ] {
            assert_eq!(side(label), expected, "{label}");
        }
    }

    #[test]
    fn the_mix_puts_hemispheres_apart_and_falls_back_to_every_channel() {
        let labels: Vec<String> = ["Fz", "F3", "F4", "EOG1", "Cz", "O2"]
            .map(String::from)
            .into();
        let mix = Mix::from_labels(&labels);
        assert_eq!(mix.left, vec![0, 1, 4]);
        assert_eq!(mix.right, vec![0, 2, 4, 5]);
        let generic: Vec<String> = ["Ch1", "Ch2"].map(String::from).into();
        let mix = Mix::from_labels(&generic);
        assert_eq!(mix.left, vec![0, 1]);
        assert_eq!(mix.right, vec![0, 1]);
        let samples = [1.0f32, 2.0, 3.0, 5.0];
        assert_eq!(mix.at(&samples, 2, 1), [3.5, 3.5]);
    }

    #[test]
    fn presets_round_trip_their_names() {
        for p in Preset::ALL {
            assert_eq!(Preset::parse(p.name()), Some(p));
        }
        assert_eq!(Preset::parse("nope"), None);
    }
}
