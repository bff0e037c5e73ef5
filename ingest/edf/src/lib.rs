//! A streaming reader for EDF, EDF+ and BDF (BioSemi 24-bit) recordings.
//!
//! It reads the header, then one data record at a time from any [`Read`], so an upload
//! can be split into frames as it arrives without buffering the whole file. Samples
//! come out both as stored (digital) and scaled to physical units with the header's
//! calibration: `x = pmin + (d - dmin) * (pmax - pmin) / (dmax - dmin)`.
//! EDF+ annotation signals are parsed into [`Annotation`]s (time-stamped annotation
//! lists) and are not returned as signals.
//!
//! [`writer`] writes EDF+ and BDF+ files (sessions exported to other EEG tools).
//!
//! Pure: no async runtime, no allocation per sample beyond the record's buffers.

use std::io::{self, Read};

mod frames;
pub mod writer;
pub use frames::{FrameSpec, Framer, FramerError};

/// What went wrong reading a recording.
#[derive(Debug, thiserror::Error)]
pub enum EdfError {
    #[error("reading the recording failed: {0}")]
    Io(#[from] io::Error),
    #[error("header field {field}: {reason}")]
    Header { field: &'static str, reason: String },
    #[error("data record {record} is truncated: {got} of {expected} bytes")]
    Truncated {
        record: u64,
        got: usize,
        expected: usize,
    },
    #[error("annotation in data record {record}: {reason}")]
    Annotation { record: u64, reason: String },
}

/// The file format, from the version field and the reserved field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Plain EDF (16-bit).
    Edf,
    /// EDF+, continuous (`EDF+C`) or discontinuous (`EDF+D`).
    EdfPlus { continuous: bool },
    /// BioSemi BDF (24-bit).
    Bdf,
    /// BDF+ (24-bit with annotations).
    BdfPlus { continuous: bool },
}

impl Format {
    /// Bytes per stored sample.
    pub fn sample_bytes(self) -> usize {
        match self {
            Format::Edf | Format::EdfPlus { .. } => 2,
            Format::Bdf | Format::BdfPlus { .. } => 3,
        }
    }
}

/// The header of one signal.
#[derive(Debug, Clone, PartialEq)]
pub struct SignalHeader {
    pub label: String,
    pub transducer: String,
    pub physical_dimension: String,
    pub physical_min: f64,
    pub physical_max: f64,
    pub digital_min: i32,
    pub digital_max: i32,
    pub prefiltering: String,
    pub samples_per_record: usize,
}

impl SignalHeader {
    /// Physical units per digital step.
    pub fn gain(&self) -> f64 {
        (self.physical_max - self.physical_min) / f64::from(self.digital_max - self.digital_min)
    }

    /// The physical value of a digital sample.
    pub fn to_physical(&self, digital: i32) -> f64 {
        self.physical_min + f64::from(digital - self.digital_min) * self.gain()
    }

    /// An EDF+/BDF+ annotation channel rather than a signal.
    pub fn is_annotation(&self) -> bool {
        self.label == "EDF Annotations" || self.label == "BDF Annotations"
    }
}

/// A calendar start date and time as written in the header (no time zone: EDF stores
/// local time of the recording site).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartTime {
    pub year: i32,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl StartTime {
    /// Microseconds since the Unix epoch, reading the header's time as UTC.
    pub fn unix_micros(&self) -> i64 {
        // Days from civil (Howard Hinnant's algorithm), proleptic Gregorian.
        let y = i64::from(self.year) - i64::from(self.month <= 2);
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let m = i64::from(self.month);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        let secs = days * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second);
        secs * 1_000_000
    }
}

/// The file header.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub format: Format,
    pub patient: String,
    pub recording: String,
    pub start: StartTime,
    pub header_bytes: usize,
    /// `None` when the writer did not know (-1, e.g. still recording).
    pub record_count: Option<u64>,
    pub record_duration_s: f64,
    /// All signals in file order, annotation channels included.
    pub signals: Vec<SignalHeader>,
}

impl Header {
    /// Indices (into `signals`) of the ordinary signals, annotation channels excluded.
    pub fn data_signals(&self) -> Vec<usize> {
        (0..self.signals.len())
            .filter(|&i| !self.signals[i].is_annotation())
            .collect()
    }

    /// Sample rate of signal `i` in Hz.
    pub fn sample_rate(&self, i: usize) -> f64 {
        self.signals[i].samples_per_record as f64 / self.record_duration_s
    }

    /// Bytes of one data record.
    pub fn record_bytes(&self) -> usize {
        self.signals
            .iter()
            .map(|s| s.samples_per_record)
            .sum::<usize>()
            * self.format.sample_bytes()
    }
}

/// An EDF+ annotation: onset relative to the file's start time.
#[derive(Debug, Clone, PartialEq)]
pub struct Annotation {
    pub onset_s: f64,
    pub duration_s: Option<f64>,
    pub text: String,
}

/// One data record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// 0-based record number.
    pub index: u64,
    /// Start of the record in seconds from the file's start time: the record's
    /// time-keeping annotation for EDF+/BDF+, else `index * record_duration`.
    pub onset_s: f64,
    /// Digital samples of every data signal (in [`Header::data_signals`] order).
    pub digital: Vec<Vec<i32>>,
    /// Annotations of this record (the time-keeping one excluded).
    pub annotations: Vec<Annotation>,
}

impl Record {
    /// Physical samples of data signal `k` (the k-th of [`Header::data_signals`]).
    pub fn physical(&self, header: &Header, k: usize) -> Vec<f64> {
        let signal = &header.signals[header.data_signals()[k]];
        self.digital[k]
            .iter()
            .map(|&d| signal.to_physical(d))
            .collect()
    }
}

/// Reads a recording record by record.
#[derive(Debug)]
pub struct Reader<R> {
    inner: R,
    header: Header,
    data_signals: Vec<usize>,
    next_index: u64,
    buf: Vec<u8>,
}

impl<R: Read> Reader<R> {
    /// Reads and validates the header.
    pub fn new(mut inner: R) -> Result<Self, EdfError> {
        let header = read_header(&mut inner)?;
        let data_signals = header.data_signals();
        let buf = vec![0; header.record_bytes()];
        Ok(Reader {
            inner,
            header,
            data_signals,
            next_index: 0,
            buf,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The next data record, or `None` at the end of the recording.
    pub fn next_record(&mut self) -> Result<Option<Record>, EdfError> {
        if self.header.record_count == Some(self.next_index) {
            return Ok(None);
        }
        let index = self.next_index;
        let got = read_full(&mut self.inner, &mut self.buf)?;
        if got == 0 {
            return match self.header.record_count {
                None => Ok(None),
                Some(_) => Err(EdfError::Truncated {
                    record: index,
                    got,
                    expected: self.buf.len(),
                }),
            };
        }
        if got < self.buf.len() {
            return Err(EdfError::Truncated {
                record: index,
                got,
                expected: self.buf.len(),
            });
        }
        self.next_index += 1;

        let width = self.header.format.sample_bytes();
        let mut digital = Vec::with_capacity(self.data_signals.len());
        let mut annotations = Vec::new();
        let mut onset_s = None;
        let mut at = 0;
        for signal in &self.header.signals {
            let len = signal.samples_per_record * width;
            let bytes = &self.buf[at..at + len];
            at += len;
            if signal.is_annotation() {
                let (keeping, mut anns) = parse_tals(bytes, index)?;
                if onset_s.is_none() {
                    onset_s = keeping;
                }
                annotations.append(&mut anns);
            } else if width == 2 {
                digital.push(
                    bytes
                        .chunks_exact(2)
                        .map(|b| i32::from(i16::from_le_bytes([b[0], b[1]])))
                        .collect(),
                );
            } else {
                digital.push(
                    bytes
                        .chunks_exact(3)
                        .map(|b| i32::from_le_bytes([0, b[0], b[1], b[2]]) >> 8)
                        .collect(),
                );
            }
        }
        Ok(Some(Record {
            index,
            onset_s: onset_s.unwrap_or(index as f64 * self.header.record_duration_s),
            digital,
            annotations,
        }))
    }
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn ascii(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_owned()
}

fn number<T: std::str::FromStr>(bytes: &[u8], field: &'static str) -> Result<T, EdfError> {
    let s = ascii(bytes);
    s.parse().map_err(|_| EdfError::Header {
        field,
        reason: format!("{s:?} is not a number"),
    })
}

fn read_header<R: Read>(r: &mut R) -> Result<Header, EdfError> {
    let mut fixed = [0u8; 256];
    let got = read_full(r, &mut fixed)?;
    if got < 256 {
        return Err(EdfError::Header {
            field: "header",
            reason: format!("file is {got} bytes, shorter than the 256-byte header"),
        });
    }
    let bdf = fixed[0] == 0xFF && &fixed[1..8] == b"BIOSEMI";
    if !bdf && &fixed[..8] != b"0       " {
        return Err(EdfError::Header {
            field: "version",
            reason: "not an EDF ('0') or BDF (0xFF BIOSEMI) file".into(),
        });
    }
    let reserved = ascii(&fixed[192..236]);
    let format = match (bdf, reserved.as_str()) {
        (false, r) if r.starts_with("EDF+C") => Format::EdfPlus { continuous: true },
        (false, r) if r.starts_with("EDF+D") => Format::EdfPlus { continuous: false },
        (false, _) => Format::Edf,
        (true, r) if r.starts_with("BDF+C") => Format::BdfPlus { continuous: true },
        (true, r) if r.starts_with("BDF+D") => Format::BdfPlus { continuous: false },
        (true, _) => Format::Bdf,
    };
    let date = ascii(&fixed[168..176]);
    let time = ascii(&fixed[176..184]);
    let start = parse_start(&date, &time)?;
    let header_bytes: usize = number(&fixed[184..192], "header bytes")?;
    let record_count: i64 = number(&fixed[236..244], "number of data records")?;
    let record_duration_s: f64 = number(&fixed[244..252], "duration of a data record")?;
    let ns: usize = number(&fixed[252..256], "number of signals")?;
    if ns == 0 || ns > 4096 {
        return Err(EdfError::Header {
            field: "number of signals",
            reason: format!("{ns} signals"),
        });
    }
    if header_bytes != 256 * (ns + 1) {
        return Err(EdfError::Header {
            field: "header bytes",
            reason: format!("{header_bytes}, expected 256 * ({ns} + 1)"),
        });
    }
    if !(record_duration_s.is_finite() && record_duration_s >= 0.0) {
        return Err(EdfError::Header {
            field: "duration of a data record",
            reason: format!("{record_duration_s}"),
        });
    }
    let mut rest = vec![0u8; 256 * ns];
    let got = read_full(r, &mut rest)?;
    if got < rest.len() {
        return Err(EdfError::Header {
            field: "signal headers",
            reason: format!("{got} of {} bytes", rest.len()),
        });
    }
    // Signal fields are stored field by field: all labels, then all transducers, ...
    let mut offset = 0;
    let mut column = |width: usize| {
        let fields: Vec<&[u8]> = (0..ns)
            .map(|i| &rest[offset + i * width..offset + (i + 1) * width])
            .collect();
        offset += width * ns;
        fields
    };
    let labels = column(16);
    let transducers = column(80);
    let dimensions = column(8);
    let pmins = column(8);
    let pmaxs = column(8);
    let dmins = column(8);
    let dmaxs = column(8);
    let prefilters = column(80);
    let samples = column(8);
    let mut signals = Vec::with_capacity(ns);
    for i in 0..ns {
        let signal = SignalHeader {
            label: ascii(labels[i]),
            transducer: ascii(transducers[i]),
            physical_dimension: ascii(dimensions[i]),
            physical_min: number(pmins[i], "physical minimum")?,
            physical_max: number(pmaxs[i], "physical maximum")?,
            digital_min: number(dmins[i], "digital minimum")?,
            digital_max: number(dmaxs[i], "digital maximum")?,
            prefiltering: ascii(prefilters[i]),
            samples_per_record: number(samples[i], "number of samples in each data record")?,
        };
        if signal.digital_max <= signal.digital_min && !signal.is_annotation() {
            return Err(EdfError::Header {
                field: "digital maximum",
                reason: format!(
                    "signal {:?}: digital max {} is not above digital min {}",
                    signal.label, signal.digital_max, signal.digital_min
                ),
            });
        }
        if signal.physical_max == signal.physical_min && !signal.is_annotation() {
            return Err(EdfError::Header {
                field: "physical maximum",
                reason: format!("signal {:?}: physical range is empty", signal.label),
            });
        }
        signals.push(signal);
    }
    Ok(Header {
        format,
        patient: ascii(&fixed[8..88]),
        recording: ascii(&fixed[88..168]),
        start,
        header_bytes,
        record_count: u64::try_from(record_count).ok(),
        record_duration_s,
        signals,
    })
}

fn parse_start(date: &str, time: &str) -> Result<StartTime, EdfError> {
    let parts = |s: &str, field: &'static str| -> Result<[u32; 3], EdfError> {
        let v: Vec<u32> = s
            .split(['.', ':'])
            .map(|p| p.trim().parse::<u32>())
            .collect::<Result<_, _>>()
            .map_err(|_| EdfError::Header {
                field,
                reason: format!("{s:?}"),
            })?;
        v.try_into().map_err(|_| EdfError::Header {
            field,
            reason: format!("{s:?}"),
        })
    };
    let [day, month, yy] = parts(date, "startdate")?;
    let [hour, minute, second] = parts(time, "starttime")?;
    // EDF's two-digit year: 85..99 are 1985..1999, 00..84 are 2000..2084.
    let year = if yy >= 85 { 1900 + yy } else { 2000 + yy } as i32;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return Err(EdfError::Header {
            field: "startdate",
            reason: format!("{date} {time}"),
        });
    }
    Ok(StartTime {
        year,
        month,
        day,
        hour,
        minute,
        second: second.min(59),
    })
}

/// Parses the time-stamped annotation lists of one annotation signal. Returns the
/// record's time-keeping onset (the first TAL, with no text) and the annotations.
fn parse_tals(bytes: &[u8], record: u64) -> Result<(Option<f64>, Vec<Annotation>), EdfError> {
    let err = |reason: String| EdfError::Annotation { record, reason };
    let mut keeping = None;
    let mut annotations = Vec::new();
    for tal in bytes.split(|&b| b == 0).filter(|t| !t.is_empty()) {
        // "+onset[\x15duration]\x14text\x14text\x14"
        let mut parts = tal.split(|&b| b == 0x14);
        let stamp = parts.next().unwrap_or_default();
        let (onset, duration) = match stamp.iter().position(|&b| b == 0x15) {
            Some(i) => (&stamp[..i], Some(&stamp[i + 1..])),
            None => (stamp, None),
        };
        let onset_s: f64 = std::str::from_utf8(onset)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| err(format!("bad onset {:?}", String::from_utf8_lossy(onset))))?;
        let duration_s = match duration {
            None => None,
            Some([]) => None,
            Some(d) => Some(
                std::str::from_utf8(d)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .ok_or_else(|| err(format!("bad duration {:?}", String::from_utf8_lossy(d))))?,
            ),
        };
        let texts: Vec<String> = parts
            .filter(|t| !t.is_empty())
            .map(|t| String::from_utf8_lossy(t).into_owned())
            .collect();
        if texts.is_empty() {
            if keeping.is_none() {
                keeping = Some(onset_s);
            }
            continue;
        }
        for text in texts {
            annotations.push(Annotation {
                onset_s,
                duration_s,
                text,
            });
        }
    }
    Ok((keeping, annotations))
}
