//! Writing EDF+ (16-bit) and BDF+ (24-bit) files, continuous (`EDF+C`, `BDF+C`), with
//! annotations: how sessions leave Clisonix for other EEG tools.
//!
//! Each channel's scaling (physical minimum and maximum, as written in the header's
//! eight characters) encloses all its samples, so none is clipped, and a sample read
//! back differs from the original by at most half the channel's resolution
//! (`(physical max - physical min) / (digital max - digital min) / 2`), which
//! [`Written::max_error`] states per channel. Data records last one second when the
//! sample rate allows, shorter when a record would exceed EDF's recommended 61,440
//! bytes; the last record is padded with zeros (the annotations' `clisonix.end` marks
//! where the recording ends). A start time below the second goes into the first
//! record's time-keeping annotation, as EDF+ says.

use std::io::Write;

/// Which file format to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFormat {
    /// EDF+: 16-bit samples.
    EdfPlus,
    /// BDF+: 24-bit samples.
    BdfPlus,
}

impl WriteFormat {
    fn digital(self) -> (i32, i32) {
        match self {
            WriteFormat::EdfPlus => (-32_768, 32_767),
            WriteFormat::BdfPlus => (-8_388_608, 8_388_607),
        }
    }

    fn sample_bytes(self) -> usize {
        match self {
            WriteFormat::EdfPlus => 2,
            WriteFormat::BdfPlus => 3,
        }
    }
}

/// An annotation to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Annotation {
    /// Seconds from the recording's start.
    pub onset_s: f64,
    pub duration_s: Option<f64>,
    pub text: String,
}

/// A recording to write: equally long channels at one sample rate.
#[derive(Debug, Clone)]
pub struct Recording {
    pub format: WriteFormat,
    /// EDF+ patient subfields: code, sex, birthdate, name (each `X` when unknown;
    /// spaces become `_`).
    pub patient: [String; 4],
    /// EDF+ recording subfields after the start date: administration code,
    /// technician, equipment.
    pub recording: [String; 3],
    /// Microseconds since the Unix epoch, UTC.
    pub start_us: i64,
    pub sample_rate_hz: f64,
    /// Channel labels (at most 16 characters are kept).
    pub labels: Vec<String>,
    /// The physical unit, such as `uV`.
    pub unit: String,
    /// Physical samples, one vector per channel, all of one length.
    pub channels: Vec<Vec<f32>>,
    pub annotations: Vec<Annotation>,
}

/// What was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub bytes: u64,
    pub records: u64,
    pub record_duration_s: f64,
    pub samples_per_record: usize,
    /// Per channel: the largest difference between a sample and what a reader gets back.
    pub max_error: Vec<f64>,
    /// Per channel: the physical minimum and maximum written.
    pub physical: Vec<(f64, f64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the recording has no channels")]
    NoChannels,
    #[error("channel {0} has {1} samples, channel 0 has {2}: channels must be equally long")]
    Ragged(usize, usize, usize),
    #[error("the sample rate {0} Hz fits no data record of whole samples up to 60 s")]
    SampleRate(f64),
    #[error("channel {0} holds a sample that is not a number")]
    NotFinite(usize),
    #[error("the recording starts before 1985 or after 2084 (EDF's dates)")]
    Date,
    #[error("writing: {0}")]
    Io(#[from] std::io::Error),
}

const MAX_RECORD_BYTES: usize = 61_440;

/// The longest record of whole samples: 1 s when the rate allows and it fits, else
/// shorter (or longer, for rates such as 0.5 Hz).
fn record_layout(fs: f64, channels: usize, bytes: usize) -> Option<(f64, usize)> {
    let candidates = [
        1.0, 0.5, 0.25, 0.2, 0.125, 0.1, 0.05, 0.04, 0.025, 0.02, 0.01, 2.0, 4.0, 5.0, 8.0, 10.0,
        20.0, 30.0, 60.0,
    ];
    let whole = |d: f64| {
        let n = fs * d;
        ((n - n.round()).abs() < 1e-9 && n.round() >= 1.0).then_some(n.round() as usize)
    };
    let fits = |n: usize| n * channels * bytes <= MAX_RECORD_BYTES;
    candidates
        .iter()
        .filter_map(|&d| whole(d).map(|n| (d, n)))
        .find(|&(_, n)| fits(n))
        .or_else(|| candidates.iter().find_map(|&d| whole(d).map(|n| (d, n))))
}

/// `v` in at most 8 characters, rounded down (`up` false) or up.
fn fmt8(v: f64, up: bool) -> (String, f64) {
    for decimals in (0..=6).rev() {
        let scale = 10f64.powi(decimals);
        let r = if up {
            (v * scale).ceil() / scale
        } else {
            (v * scale).floor() / scale
        };
        let s = format!("{r:.*}", decimals as usize);
        if s.len() <= 8 {
            let back: f64 = s.parse().unwrap_or(r);
            return (s, back);
        }
    }
    // Beyond 8 digits before the point: the nearest power of ten out.
    let r = if up { 9.9e7 } else { -9.9e6 };
    (format!("{r}"), r)
}

fn field(out: &mut Vec<u8>, s: &str, width: usize) {
    let mut b: Vec<u8> = s
        .chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() {
                c as u8
            } else {
                b'_'
            }
        })
        .take(width)
        .collect();
    b.resize(width, b' ');
    out.extend_from_slice(&b);
}

fn subfield(s: &str) -> String {
    let t = s.trim();
    if t.is_empty() {
        "X".into()
    } else {
        t.replace(' ', "_")
    }
}

/// Seconds as EDF+ writes them in annotations: no exponent, no trailing zeros.
fn seconds(v: f64) -> String {
    let s = format!("{v:.7}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.starts_with('-') {
        s.to_owned()
    } else {
        format!("+{s}")
    }
}

const MONTHS: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];

/// (year, month, day, hour, minute, second) of Unix seconds, UTC.
fn civil(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = if m <= 2 { y + 1 } else { y };
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
    )
}

/// A channel's scaling as a file of `format` writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Scaling {
    /// The physical minimum and maximum as written (enclosing every sample).
    pub physical: (f64, f64),
    /// The largest difference between a sample and what a reader gets back.
    pub max_error: f64,
    texts: (String, String),
}

/// How `samples` are scaled in a file of `format`, and the error that leaves: what
/// [`write`] does, so a caller can check before writing.
pub fn scaling(samples: &[f32], format: WriteFormat) -> Scaling {
    let (dmin, dmax) = format.digital();
    let (mut lo, mut hi) = samples
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| {
            (l.min(f64::from(v)), h.max(f64::from(v)))
        });
    if !lo.is_finite() || !hi.is_finite() {
        (lo, hi) = (-1.0, 1.0);
    }
    if hi - lo < 1e-6 {
        lo -= 1.0;
        hi += 1.0;
    }
    let (ls, l) = fmt8(lo, false);
    let (hs, h) = fmt8(hi, true);
    Scaling {
        physical: (l, h),
        max_error: (h - l) / f64::from(dmax - dmin) / 2.0,
        texts: (ls, hs),
    }
}

/// Writes `rec` to `out`.
pub fn write<W: Write>(rec: &Recording, out: W) -> Result<Written, WriteError> {
    let mut out = std::io::BufWriter::with_capacity(1 << 16, out);
    let ns = rec.channels.len();
    if ns == 0 {
        return Err(WriteError::NoChannels);
    }
    let len = rec.channels[0].len();
    for (i, c) in rec.channels.iter().enumerate() {
        if c.len() != len {
            return Err(WriteError::Ragged(i, c.len(), len));
        }
        if c.iter().any(|v| !v.is_finite()) {
            return Err(WriteError::NotFinite(i));
        }
    }
    let sb = rec.format.sample_bytes();
    let (duration, spr) = record_layout(rec.sample_rate_hz, ns, sb)
        .ok_or(WriteError::SampleRate(rec.sample_rate_hz))?;
    let records = len.div_ceil(spr).max(1);
    let start_s = rec.start_us.div_euclid(1_000_000);
    let start_frac = rec.start_us.rem_euclid(1_000_000) as f64 / 1e6;
    let (year, month, day, hour, minute, second) = civil(start_s);
    if !(1985..=2084).contains(&year) {
        return Err(WriteError::Date);
    }

    // Annotations per record (by onset), each record beginning with its time keeping.
    let mut tals: Vec<Vec<u8>> = (0..records)
        .map(|k| {
            let mut t = seconds(start_frac + k as f64 * duration).into_bytes();
            t.extend_from_slice(b"\x14\x14\x00");
            t
        })
        .collect();
    let mut annotations = rec.annotations.clone();
    annotations.push(Annotation {
        onset_s: len as f64 / rec.sample_rate_hz,
        duration_s: None,
        text: "clisonix.end".into(),
    });
    for a in &annotations {
        let k = ((a.onset_s / duration).floor().max(0.0) as usize).min(records - 1);
        let t = &mut tals[k];
        t.extend_from_slice(seconds(start_frac + a.onset_s).as_bytes());
        if let Some(d) = a.duration_s {
            t.push(0x15);
            t.extend_from_slice(seconds(d).trim_start_matches('+').as_bytes());
        }
        t.push(0x14);
        t.extend(a.text.bytes().map(|b| if b < 0x20 { b' ' } else { b }));
        t.extend_from_slice(b"\x14\x00");
    }
    let annotation_bytes = tals.iter().map(Vec::len).max().unwrap_or(0);
    let annotation_samples = annotation_bytes.div_ceil(sb);

    // Scaling: physical range enclosing every sample, as written.
    let (dmin, dmax) = rec.format.digital();
    let scalings: Vec<Scaling> = rec
        .channels
        .iter()
        .map(|c| scaling(c, rec.format))
        .collect();
    let physical: Vec<(f64, f64)> = scalings.iter().map(|s| s.physical).collect();
    let texts: Vec<(String, String)> = scalings.iter().map(|s| s.texts.clone()).collect();
    let max_error: Vec<f64> = scalings.iter().map(|s| s.max_error).collect();

    // The header.
    let signals = ns + 1;
    let header_bytes = 256 * (signals + 1);
    let mut h = Vec::with_capacity(header_bytes);
    match rec.format {
        WriteFormat::EdfPlus => field(&mut h, "0", 8),
        WriteFormat::BdfPlus => {
            h.push(0xFF);
            field(&mut h, "BIOSEMI", 7);
        }
    }
    let patient: Vec<String> = rec.patient.iter().map(|s| subfield(s)).collect();
    field(&mut h, &patient.join(" "), 80);
    let recording: Vec<String> = rec.recording.iter().map(|s| subfield(s)).collect();
    field(
        &mut h,
        &format!(
            "Startdate {day:02}-{}-{year} {}",
            MONTHS[month as usize - 1],
            recording.join(" ")
        ),
        80,
    );
    field(&mut h, &format!("{day:02}.{month:02}.{:02}", year % 100), 8);
    field(&mut h, &format!("{hour:02}.{minute:02}.{second:02}"), 8);
    field(&mut h, &header_bytes.to_string(), 8);
    field(
        &mut h,
        match rec.format {
            WriteFormat::EdfPlus => "EDF+C",
            WriteFormat::BdfPlus => "BDF+C",
        },
        44,
    );
    field(&mut h, &records.to_string(), 8);
    let (dur_text, _) = fmt8(duration, false);
    field(&mut h, &dur_text, 8);
    field(&mut h, &signals.to_string(), 4);
    let annotation_label = match rec.format {
        WriteFormat::EdfPlus => "EDF Annotations",
        WriteFormat::BdfPlus => "BDF Annotations",
    };
    for l in &rec.labels {
        field(&mut h, &format!("EEG {}", l.trim()), 16);
    }
    field(&mut h, annotation_label, 16);
    for _ in 0..signals {
        field(&mut h, "", 80); // transducer
    }
    for _ in 0..ns {
        field(&mut h, &rec.unit, 8);
    }
    field(&mut h, "", 8);
    for (lo, _) in &texts {
        field(&mut h, lo, 8);
    }
    field(&mut h, "-1", 8);
    for (_, hi) in &texts {
        field(&mut h, hi, 8);
    }
    field(&mut h, "1", 8);
    for _ in 0..signals {
        field(&mut h, &dmin.to_string(), 8);
    }
    for _ in 0..signals {
        field(&mut h, &dmax.to_string(), 8);
    }
    for _ in 0..signals {
        field(&mut h, "", 80); // prefiltering
    }
    for _ in 0..ns {
        field(&mut h, &spr.to_string(), 8);
    }
    field(&mut h, &annotation_samples.to_string(), 8);
    for _ in 0..signals {
        field(&mut h, "", 32);
    }
    debug_assert_eq!(h.len(), header_bytes);
    out.write_all(&h)?;

    // The data records.
    let gains: Vec<(f64, f64)> = physical
        .iter()
        .map(|(l, hi)| {
            let g = f64::from(dmax - dmin) / (hi - l);
            (g, *l)
        })
        .collect();
    let mut record = Vec::with_capacity((ns * spr + annotation_samples) * sb);
    for (k, tal) in tals.iter().enumerate() {
        record.clear();
        for (c, samples) in rec.channels.iter().enumerate() {
            let (g, lo) = gains[c];
            for i in 0..spr {
                let idx = k * spr + i;
                let v = if idx < len {
                    f64::from(samples[idx])
                } else {
                    0.0f64.clamp(physical[c].0, physical[c].1)
                };
                let d = ((v - lo) * g + f64::from(dmin))
                    .round()
                    .clamp(f64::from(dmin), f64::from(dmax)) as i32;
                record.extend_from_slice(&d.to_le_bytes()[..sb]);
            }
        }
        let start = record.len();
        record.extend_from_slice(tal);
        record.resize(start + annotation_samples * sb, 0);
        out.write_all(&record)?;
    }
    out.flush()?;
    let record_bytes = (ns * spr + annotation_samples) * sb;
    Ok(Written {
        bytes: (header_bytes + records * record_bytes) as u64,
        records: records as u64,
        record_duration_s: duration,
        samples_per_record: spr,
        max_error,
        physical,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Reader;

    fn recording(format: WriteFormat) -> Recording {
        let fs = 128.0;
        let n = 128 * 3 + 40;
        Recording {
            format,
            patient: ["dev-1".into(), "X".into(), "X".into(), "X".into()],
            recording: ["session".into(), "X".into(), "clisonix".into()],
            start_us: 1_765_100_000_250_000,
            sample_rate_hz: fs,
            labels: vec!["Fp1".into(), "Cz".into()],
            unit: "uV".into(),
            channels: vec![
                (0..n).map(|i| (i as f32 * 0.37).sin() * 80.0).collect(),
                (0..n).map(|i| i as f32 * 0.01 - 2.0).collect(),
            ],
            annotations: vec![Annotation {
                onset_s: 1.5,
                duration_s: Some(0.25),
                text: "eyes closed".into(),
            }],
        }
    }

    #[test]
    fn what_is_written_reads_back_within_the_stated_error() {
        for format in [WriteFormat::EdfPlus, WriteFormat::BdfPlus] {
            let rec = recording(format);
            let mut bytes = Vec::new();
            let w = write(&rec, &mut bytes).unwrap();
            assert_eq!(w.bytes as usize, bytes.len());
            assert_eq!((w.records, w.samples_per_record), (4, 128));
            let mut r = Reader::new(std::io::Cursor::new(bytes)).unwrap();
            let header = r.header().clone();
            assert_eq!(header.record_count, Some(4));
            assert_eq!(header.data_signals().len(), 2);
            let mut got: Vec<Vec<f64>> = vec![Vec::new(); 2];
            let mut notes = Vec::new();
            while let Some(record) = r.next_record().unwrap() {
                for (c, k) in header.data_signals().into_iter().enumerate() {
                    got[c].extend(record.physical(&header, k));
                }
                notes.extend(record.annotations);
            }
            for (c, back) in got.iter().enumerate() {
                for (i, &v) in rec.channels[c].iter().enumerate() {
                    let e = (back[i] - f64::from(v)).abs();
                    assert!(e <= w.max_error[c] * 1.000_001, "{format:?} {c}/{i}: {e}");
                }
            }
            let texts: Vec<&str> = notes.iter().map(|a| a.text.as_str()).collect();
            assert!(texts.contains(&"eyes closed"), "{texts:?}");
            assert!(texts.contains(&"clisonix.end"), "{texts:?}");
            let closed = notes.iter().find(|a| a.text == "eyes closed").unwrap();
            assert!((closed.onset_s - 1.75).abs() < 1e-6, "{}", closed.onset_s);
            assert_eq!(closed.duration_s, Some(0.25));
        }
    }

    #[test]
    fn header_numbers_fit_their_eight_characters_and_enclose_the_data() {
        for (v, up) in [
            (123.456_789, true),
            (-0.000_012_3, false),
            (-98_765.432_1, false),
            (7.0, true),
        ] {
            let (s, back) = fmt8(v, up);
            assert!(s.len() <= 8, "{s}");
            assert!(if up { back >= v } else { back <= v }, "{v} -> {s}");
        }
        assert_eq!(seconds(1.5), "+1.5");
        assert_eq!(seconds(3.0), "+3");
        assert_eq!(civil(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(civil(1_765_100_000), (2025, 12, 7, 9, 33, 20));
    }

    #[test]
    fn bad_recordings_are_refused() {
        let mut rec = recording(WriteFormat::EdfPlus);
        rec.channels[1].pop();
        assert!(matches!(
            write(&rec, Vec::new()),
            Err(WriteError::Ragged(..))
        ));
        let mut rec = recording(WriteFormat::EdfPlus);
        rec.sample_rate_hz = 127.33;
        assert!(matches!(
            write(&rec, Vec::new()),
            Err(WriteError::SampleRate(_))
        ));
    }
}
