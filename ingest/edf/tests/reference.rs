//! The reader against the reference recording in shared/data (its header facts, gains
//! and first samples are in the reference JSON), plus synthetic EDF+ and BDF files.

use std::path::PathBuf;

use clisonix_edf::{EdfError, Format, Reader};

fn data_dir() -> PathBuf {
    std::env::var_os("CLISONIX_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"))
}

const EDF: &str = "eeglab_sample_32ch_128hz_238s.edf";

fn reference() -> serde_json::Value {
    let path = data_dir().join("eeglab_sample_32ch_128hz_238s.reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "reference data missing at {} ({e}); set CLISONIX_DATA_DIR",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn open() -> Reader<std::io::BufReader<std::fs::File>> {
    let file = std::fs::File::open(data_dir().join(EDF)).expect("the reference EDF");
    Reader::new(std::io::BufReader::new(file)).unwrap()
}

#[test]
fn header_matches_the_reference() {
    let reference = reference();
    let h = &reference["header"];
    let reader = open();
    let header = reader.header();
    assert_eq!(header.format, Format::EdfPlus { continuous: true });
    assert_eq!(
        header.signals.len() as u64,
        h["n_signals"].as_u64().unwrap()
    );
    assert_eq!(header.record_count, h["n_records"].as_u64());
    assert_eq!(
        header.record_duration_s,
        h["record_duration_s"].as_f64().unwrap()
    );
    assert_eq!(
        header.header_bytes as u64,
        h["header_bytes"].as_u64().unwrap()
    );
    assert_eq!(header.recording, h["recording"].as_str().unwrap());
    assert_eq!(header.data_signals().len(), 32);
    assert!(header.signals[32].is_annotation());
    assert_eq!(header.sample_rate(0), 128.0);
    assert_eq!(header.start.year, 2000);
    assert_eq!(header.start.unix_micros(), 946_684_800_000_000);
    for (k, ch) in reference["channels"].as_array().unwrap().iter().enumerate() {
        let s = &header.signals[header.data_signals()[k]];
        assert_eq!(s.label, ch["label"].as_str().unwrap());
        assert_eq!(s.physical_dimension, ch["dimension"].as_str().unwrap());
        let gain = ch["gain"].as_f64().unwrap();
        assert!((s.gain() - gain).abs() <= 1e-15 * gain, "{}", s.label);
    }
}

#[test]
fn samples_and_scaling_match_the_reference() {
    let reference = reference();
    let mut reader = open();
    let header = reader.header().clone();
    let first = reader.next_record().unwrap().unwrap();
    for (k, ch) in reference["channels"].as_array().unwrap().iter().enumerate() {
        let digital: Vec<i64> = ch["first_digital"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as i64)
            .collect();
        let got: Vec<i64> = first.digital[k][..8].iter().map(|&d| d.into()).collect();
        assert_eq!(got, digital, "channel {k}");
        let physical = first.physical(&header, k);
        for (i, want) in ch["first_physical"].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            assert!(
                (physical[i] - want).abs() <= 1e-12 * want.abs().max(1.0),
                "channel {k} sample {i}: {} vs {want}",
                physical[i]
            );
        }
    }
    // The rest of the file: 238 records, continuous onsets, the events as annotations.
    let mut records = 1;
    let mut annotations = first.annotations.len();
    let mut labels = std::collections::BTreeSet::new();
    while let Some(record) = reader.next_record().unwrap() {
        assert_eq!(record.onset_s, record.index as f64);
        assert_eq!(record.digital.len(), 32);
        assert!(record.digital.iter().all(|d| d.len() == 128));
        // EDF+ lets an annotation sit in any data record (this file stores most of
        // them a record early), so only the recording's span bounds the onsets.
        for a in &record.annotations {
            assert!((0.0..238.0).contains(&a.onset_s), "{a:?}");
            labels.insert(a.text.clone());
        }
        annotations += record.annotations.len();
        records += 1;
    }
    assert_eq!(records, 238);
    assert!(annotations > 100, "{annotations} annotations");
    assert!(
        labels.contains("square") && labels.contains("rt"),
        "{labels:?}"
    );
}

/// Builds a small EDF+ or BDF file in memory.
fn synthetic(bdf: bool, records: usize, values: &[i32]) -> Vec<u8> {
    let ns = if bdf { 1 } else { 2 };
    let mut h = Vec::new();
    let field = |s: &str, w: usize| {
        let mut b = s.as_bytes().to_vec();
        b.resize(w, b' ');
        b
    };
    if bdf {
        h.push(0xFF);
        h.extend_from_slice(b"BIOSEMI");
    } else {
        h.extend(field("0", 8));
    }
    h.extend(field("X X X X", 80));
    h.extend(field("Startdate 24-NOV-2026 X X test", 80));
    h.extend(field("24.11.26", 8));
    h.extend(field("13.05.09", 8));
    h.extend(field(&(256 * (ns + 1)).to_string(), 8));
    h.extend(field(if bdf { "24BIT" } else { "EDF+C" }, 44));
    h.extend(field(&records.to_string(), 8));
    h.extend(field("0.5", 8));
    h.extend(field(&ns.to_string(), 4));
    let signal_fields: [(&str, &str, usize); 9] = [
        ("Cz", "EDF Annotations", 16),
        ("AgAgCl", "", 80),
        ("uV", "", 8),
        ("-100", "-1", 8),
        ("100", "1", 8),
        (if bdf { "-8388608" } else { "-32768" }, "-32768", 8),
        (if bdf { "8388607" } else { "32767" }, "32767", 8),
        ("HP:0.1Hz", "", 80),
        ("4", "16", 8),
    ];
    for (signal, annotation, w) in signal_fields {
        h.extend(field(signal, w));
        if !bdf {
            h.extend(field(annotation, w));
        }
    }
    h.extend(std::iter::repeat_n(b' ', 32 * ns));
    for r in 0..records {
        for &v in &values[r * 4..r * 4 + 4] {
            if bdf {
                h.extend_from_slice(&v.to_le_bytes()[..3]);
            } else {
                h.extend_from_slice(&(v as i16).to_le_bytes());
            }
        }
        if !bdf {
            let mut tal = format!("+{}\x14\x14\x00", r as f64 * 0.5).into_bytes();
            if r == 1 {
                tal.extend_from_slice(b"+0.75\x150.2\x14stim\x14\x00");
            }
            tal.resize(32, 0);
            h.extend(tal);
        }
    }
    h
}

#[test]
fn edf_plus_annotations_and_onsets() {
    let values = [0, 1, -1, 32767, -32768, 100, 200, 300];
    let bytes = synthetic(false, 2, &values);
    let mut reader = Reader::new(&bytes[..]).unwrap();
    assert_eq!(reader.header().format, Format::EdfPlus { continuous: true });
    assert_eq!(reader.header().sample_rate(0), 8.0);
    let r0 = reader.next_record().unwrap().unwrap();
    assert_eq!(r0.digital[0], vec![0, 1, -1, 32767]);
    let p = r0.physical(reader.header(), 0);
    assert!((p[3] - 100.0).abs() < 1e-12);
    let r1 = reader.next_record().unwrap().unwrap();
    assert_eq!(r1.onset_s, 0.5);
    assert_eq!(r1.annotations.len(), 1);
    assert_eq!(r1.annotations[0].text, "stim");
    assert_eq!(r1.annotations[0].onset_s, 0.75);
    assert_eq!(r1.annotations[0].duration_s, Some(0.2));
    assert!(reader.next_record().unwrap().is_none());
}

#[test]
fn bdf_is_24_bit_twos_complement() {
    let values = [8_388_607, -8_388_608, -1, 1];
    let bytes = synthetic(true, 1, &values);
    let mut reader = Reader::new(&bytes[..]).unwrap();
    assert_eq!(reader.header().format, Format::Bdf);
    let r = reader.next_record().unwrap().unwrap();
    assert_eq!(r.digital[0], values.to_vec());
    let p = r.physical(reader.header(), 0);
    assert!((p[0] - 100.0).abs() < 1e-9 && (p[1] + 100.0).abs() < 1e-9);
}

#[test]
fn truncated_and_malformed_files_are_errors() {
    let bytes = synthetic(false, 2, &[0; 8]);
    let mut reader = Reader::new(&bytes[..bytes.len() - 5]).unwrap();
    reader.next_record().unwrap();
    assert!(matches!(
        reader.next_record(),
        Err(EdfError::Truncated { record: 1, .. })
    ));
    assert!(matches!(
        Reader::new(&bytes[..300]),
        Err(EdfError::Header { .. })
    ));
    let mut wrong = bytes.clone();
    wrong[0] = b'9';
    assert!(matches!(
        Reader::new(&wrong[..]),
        Err(EdfError::Header {
            field: "version",
            ..
        })
    ));
    let mut bad_count = bytes.clone();
    bad_count[252..256].copy_from_slice(b"x   ");
    assert!(matches!(
        Reader::new(&bad_count[..]),
        Err(EdfError::Header {
            field: "number of signals",
            ..
        })
    ));
}

#[test]
fn the_recording_frames_into_contract_frames() {
    use clisonix_edf::{FrameSpec, Framer};
    use clisonix_schemas::{DeviceId, SampleUnit, SessionId, TenantId, Timestamp};
    let mut reader = open();
    let header = reader.header().clone();
    let spec = FrameSpec {
        tenant_id: TenantId::random(),
        device_id: DeviceId::parse("edf-player").unwrap(),
        session_id: SessionId::random(),
        samples_per_frame: 48, // does not divide the 128-sample records
    };
    let mut framer = Framer::new(&header, spec).unwrap();
    let mut frames = Vec::new();
    let mut physical: Vec<Vec<f64>> = vec![Vec::new(); 32];
    let now = Timestamp::from_micros(42);
    while let Some(record) = reader.next_record().unwrap() {
        for (k, p) in physical.iter_mut().enumerate() {
            p.extend(record.physical(&header, k));
        }
        framer.push(&record, now, &mut frames);
    }
    framer.finish(now, &mut frames);
    let total: usize = 238 * 128;
    assert_eq!(frames.len(), total.div_ceil(48));
    assert_eq!(
        frames.last().unwrap().samples_per_channel as usize,
        total % 48
    );
    let mut markers = 0;
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f.seq, i as u64);
        assert_eq!(f.unit, SampleUnit::Microvolt);
        assert_eq!(f.channel_labels.len(), 32);
        assert_eq!(f.channel_labels[13], "Cz");
        let start = i * 48;
        assert_eq!(
            f.device_time.as_micros(),
            946_684_800_000_000 + (start as f64 * 1e6 / 128.0).round() as i64
        );
        for c in [0, 13, 31] {
            let want: Vec<f32> = physical[c][start..start + f.samples_per_channel as usize]
                .iter()
                .map(|&x| x as f32)
                .collect();
            assert_eq!(f.channel(c), want.as_slice());
        }
        for m in &f.markers {
            assert!(m.sample_offset < f.samples_per_channel);
        }
        markers += f.markers.len();
    }
    // Every event of the recording lands in exactly one frame.
    let mut reader = open();
    let mut annotations = 0;
    while let Some(r) = reader.next_record().unwrap() {
        annotations += r.annotations.len();
    }
    assert_eq!(markers, annotations);
    // The first event, at 1.0001 s (sample 128), is stored in record 0 but belongs to frame 2.
    assert_eq!(frames[2].markers[0].label, "square");
    assert_eq!(frames[2].markers[0].sample_offset, 128 - 96);
}
