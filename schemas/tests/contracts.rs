//! The contracts' own tests: every record round-trips, every schema file is registered,
//! every version reads its predecessor, and bad bytes give typed errors, never panics.

use std::path::Path;

use apache_avro::Schema;
use clisonix_schemas::codec::{read_datum, HEADER_LEN, MAGIC};
use clisonix_schemas::compat::{check_family, check_pair, CompatError};
use clisonix_schemas::records::samples_from_le_bytes;
use clisonix_schemas::*;

fn round_trip<R: AvroRecord + PartialEq + std::fmt::Debug>(record: R) -> Vec<u8> {
    let bytes = encode(&record).expect("encodes");
    assert_eq!(bytes[..2], MAGIC);
    let fp = u64::from_le_bytes(bytes[2..HEADER_LEN].try_into().unwrap());
    assert_eq!(fp, R::FAMILY.current().fingerprint);
    let back: R = decode(&bytes).expect("decodes");
    assert_eq!(back, record);
    bytes
}

#[test]
fn every_record_type_round_trips() {
    for seed in [0, 1, 99] {
        let frame = examples::frame(seed, 32, 32);
        round_trip(frame.key());
        round_trip(frame);
        let features = examples::features(seed);
        round_trip(features.key());
        round_trip(features);
        let chunk = examples::audio_chunk(seed);
        round_trip(chunk.key());
        round_trip(chunk);
        round_trip(examples::session_state(seed));
        let usage = examples::usage_event(seed);
        round_trip(usage.key());
        round_trip(usage);
        let dead = examples::dead_letter(seed);
        round_trip(dead.key());
        round_trip(dead);
    }
}

#[test]
fn optional_fields_round_trip_when_absent() {
    let mut state = examples::session_state(5);
    state.ended = None;
    state.status = SessionStatus::Active;
    round_trip(state);
    let mut usage = examples::usage_event(5);
    usage.session_id = None;
    usage.device_id = None;
    round_trip(usage);
    let mut features = examples::features(5);
    features.abs = Bands::default();
    features.rel = Bands::default();
    features.hjorth = Hjorth::default();
    features.total_abs = None;
    features.peak_alpha_hz = None;
    features.quality.flat = true;
    round_trip(features);
    let mut frame = examples::frame(5, 1, 0);
    frame.markers.clear();
    round_trip(frame);
}

#[test]
fn frame_samples_are_little_endian_f32_channel_major() {
    let frame = examples::frame(7, 3, 4);
    let bytes = encode(&frame).unwrap();
    let raw: Vec<u8> = frame.samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    let at = bytes
        .windows(raw.len())
        .position(|w| w == raw.as_slice())
        .expect("the samples travel as one little-endian block");
    // The block is preceded by its Avro length (zigzag varint of 48 bytes = 0x60).
    assert_eq!(bytes[at - 1], 0x60);
    assert_eq!(samples_from_le_bytes(&raw).unwrap(), frame.samples);
    let back: Frame = decode(&bytes).unwrap();
    assert_eq!(back.channel(1), &frame.samples[4..8]);
}

#[test]
fn inconsistent_frames_are_not_encoded() {
    let mut frame = examples::frame(1, 4, 8);
    frame.samples.pop();
    let err = encode(&frame).unwrap_err();
    assert!(
        matches!(
            err,
            EncodeError::Invalid {
                field: "samples",
                ..
            }
        ),
        "{err}"
    );
    let mut chunk = examples::audio_chunk(1);
    chunk.pcm.pop();
    assert!(matches!(
        encode(&chunk).unwrap_err(),
        EncodeError::Invalid { field: "pcm", .. }
    ));
}

#[test]
fn every_schema_file_is_registered_and_identical() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("avro");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    dirs.sort();
    let mut families: Vec<_> = Family::ALL.iter().map(|f| f.dir().to_owned()).collect();
    families.sort();
    assert_eq!(
        dirs, families,
        "every folder under avro/ is a registered family"
    );
    for family in Family::ALL {
        let dir = root.join(family.dir());
        let files = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(
            files,
            family.sources().len(),
            "{family}: files vs registered versions"
        );
        for (i, source) in family.sources().iter().enumerate() {
            let on_disk = std::fs::read_to_string(dir.join(format!("v{}.avsc", i + 1))).unwrap();
            assert_eq!(&on_disk, source, "{family} v{}", i + 1);
        }
        let current = family.current();
        let name = match &current.schema {
            Schema::Record(r) => r.name.fullname(None),
            other => panic!("{family} is not a record: {other:?}"),
        };
        assert_eq!(name, family.full_name());
    }
}

#[test]
fn fingerprints_are_crc64_avro_of_the_specifications_canonical_form() {
    // CRC-64-AVRO exactly as the Avro specification writes it, independent of the
    // crate's implementation.
    fn crc64_avro(data: &[u8]) -> u64 {
        const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
        let mut table = [0u64; 256];
        for (i, entry) in table.iter_mut().enumerate() {
            let mut fp = i as u64;
            for _ in 0..8 {
                fp = (fp >> 1) ^ (EMPTY & (fp & 1).wrapping_neg());
            }
            *entry = fp;
        }
        let mut fp = EMPTY;
        for &b in data {
            fp = (fp >> 8) ^ table[((fp ^ u64::from(b)) & 0xff) as usize];
        }
        fp
    }
    let mut seen = std::collections::HashSet::new();
    for family in Family::ALL {
        for v in family.versions() {
            let form = clisonix_schemas::canonical::parsing_canonical_form(v.source).unwrap();
            assert_eq!(v.fingerprint, crc64_avro(form.as_bytes()), "{family}");
            // What earlier builds wrote: apache-avro's form, read still.
            assert_eq!(
                v.legacy_fingerprint,
                crc64_avro(v.schema.canonical_form().as_bytes()),
                "{family}"
            );
            assert!(seen.insert(v.fingerprint), "fingerprints are unique");
            if v.legacy_fingerprint != v.fingerprint {
                assert!(seen.insert(v.legacy_fingerprint), "fingerprints are unique");
            }
        }
    }
}

#[test]
fn records_are_written_with_the_specifications_fingerprint_and_read_with_either() {
    let key = SessionKey {
        tenant_id: TenantId::random(),
        session_id: SessionId::random(),
    };
    let frame = clisonix_schemas::examples::frame(7, 4, 32);
    for (bytes, family) in [
        (encode(&key).unwrap(), Family::SessionKey),
        (encode(&frame).unwrap(), Family::EegFrame),
    ] {
        let current = family.current();
        assert_eq!(bytes[..2], [0xC3, 0x01]);
        assert_eq!(bytes[2..10], current.fingerprint.to_le_bytes());
        let mut legacy = bytes.clone();
        legacy[2..10].copy_from_slice(&current.legacy_fingerprint.to_le_bytes());
        match family {
            Family::SessionKey => assert_eq!(decode::<SessionKey>(&legacy).unwrap(), key),
            _ => assert_eq!(decode::<Frame>(&legacy).unwrap(), frame),
        }
    }
    // Frames' timestamps are logical types: the two fingerprints differ there.
    assert_ne!(
        Family::EegFrame.current().fingerprint,
        Family::EegFrame.current().legacy_fingerprint
    );
}

#[test]
fn every_version_reads_its_predecessor() {
    for family in Family::ALL {
        check_family(family).unwrap_or_else(|e| panic!("{e}"));
    }
}

fn fixture(name: &str) -> Schema {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    Schema::parse_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn compatibility_check_accepts_a_field_added_with_a_default() {
    let v1 = &Family::EegFrame.current().schema;
    check_pair(v1, &fixture("frame_v2_with_default.avsc")).unwrap();
}

#[test]
fn compatibility_check_rejects_breaking_changes() {
    let v1 = &Family::EegFrame.current().schema;
    for name in ["frame_v2_no_default.avsc", "frame_v2_narrowed.avsc"] {
        let err = check_pair(v1, &fixture(name)).unwrap_err();
        assert!(matches!(err, CompatError::Incompatible(_)), "{name}: {err}");
    }
}

#[test]
fn garbage_gives_typed_errors() {
    assert_eq!(decode::<Frame>(&[]), Err(DecodeError::TooShort { len: 0 }));
    assert_eq!(
        decode::<Frame>(b"{\"json\": 1}"),
        Err(DecodeError::BadMagic)
    );
    let mut unknown = vec![0xC3, 0x01];
    unknown.extend_from_slice(&0x0123_4567_89ab_cdefu64.to_le_bytes());
    unknown.extend_from_slice(b"whatever");
    assert_eq!(
        decode::<Frame>(&unknown),
        Err(DecodeError::UnknownSchema {
            fingerprint: 0x0123_4567_89ab_cdef
        })
    );
    let err = decode::<SessionKey>(&b"\xC3\x01".repeat(40)).unwrap_err();
    assert_eq!(err.reason_code(), "unknown_schema");
}

#[test]
fn a_record_of_another_family_is_a_wrong_schema() {
    let bytes = encode(&examples::frame(1, 2, 2).key()).unwrap();
    let err = decode::<Frame>(&bytes).unwrap_err();
    assert_eq!(
        err,
        DecodeError::WrongSchema {
            expected: Family::EegFrame,
            found: Family::SessionKey,
            version: 1
        }
    );
    assert_eq!(err.reason_code(), "wrong_schema");
}

#[test]
fn every_truncation_and_extension_is_an_error() {
    let records = [
        encode(&examples::frame(3, 4, 8)).unwrap(),
        encode(&examples::features(3)).unwrap(),
        encode(&examples::dead_letter(3)).unwrap(),
    ];
    for bytes in &records {
        for len in 0..bytes.len() {
            let version = writer_schema(bytes).unwrap();
            let truncated = &bytes[..len];
            let result = match version.family {
                Family::EegFrame => decode::<Frame>(truncated).map(|_| ()),
                Family::EegFeatures => decode::<Features>(truncated).map(|_| ()),
                _ => decode::<DeadLetter>(truncated).map(|_| ()),
            };
            assert!(
                result.is_err(),
                "{} truncated to {len} decoded",
                version.family
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        let version = writer_schema(bytes).unwrap();
        let err = read_datum(version, &longer[HEADER_LEN..]).unwrap_err();
        assert!(
            matches!(err, DecodeError::TrailingBytes { count: 1, .. }),
            "{err}"
        );
    }
}

#[test]
fn corrupted_datums_never_panic() {
    // A deterministic xorshift so a failure reproduces.
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let original = encode(&examples::frame(9, 8, 16)).unwrap();
    let mut errors = 0;
    for _ in 0..20_000 {
        let mut bytes = original.clone();
        // Keep the header so the datum decoder itself is exercised.
        for _ in 0..1 + next() % 4 {
            let at = HEADER_LEN + (next() as usize) % (bytes.len() - HEADER_LEN);
            bytes[at] = next() as u8;
        }
        if decode::<Frame>(&bytes).is_err() {
            errors += 1;
        }
    }
    assert!(errors > 1_000, "corruption is detected often: {errors}");
    for len in [0usize, 1, 9, 10, 11, 64, 4096] {
        let noise: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        assert!(decode::<Features>(&noise).is_err());
    }
}

#[test]
fn invalid_fields_are_named() {
    // A structurally valid datum whose samples block is the wrong size.
    let frame = examples::frame(2, 2, 4);
    let good = encode(&frame).unwrap();
    let raw: Vec<u8> = frame.samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    let at = good
        .windows(raw.len())
        .position(|w| w == raw.as_slice())
        .unwrap();
    let mut bad = good[..at - 1].to_vec();
    bad.push(0x08); // length 4 bytes instead of 32
    bad.extend_from_slice(&raw[..4]);
    bad.extend_from_slice(&good[at + raw.len()..]);
    let err = decode::<Frame>(&bad).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::Invalid {
                field: "samples",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.reason_code(), "invalid_field");
}
