//! Albi with plain vectors: frames in, feature records out.

use std::path::PathBuf;

use clisonix_albi::{Albi, AlbiConfig};
use clisonix_edf::{FrameSpec, Framer, Reader};
use clisonix_schemas::{
    decode, DeviceId, FeatureKey, Features, Frame, SessionId, TenantId, Timestamp,
};
use clisonix_stage::{Output, OutputTopic, RecordMeta, Stage};

fn data_dir() -> PathBuf {
    std::env::var_os("CLISONIX_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"))
}

/// The reference recording as frames of `samples` samples.
fn recording(samples: u32) -> Vec<Frame> {
    let file = std::fs::File::open(data_dir().join("eeglab_sample_32ch_128hz_238s.edf")).unwrap();
    let mut reader = Reader::new(std::io::BufReader::new(file)).unwrap();
    let header = reader.header().clone();
    let spec = FrameSpec {
        tenant_id: TenantId::parse("6f1c2d1e-8a1b-4c3d-9e8f-0123456789ab").unwrap(),
        device_id: DeviceId::parse("edf").unwrap(),
        session_id: SessionId::parse("0b6c1a7e-3f4d-4e5a-9b8c-7d6e5f4a3b2c").unwrap(),
        samples_per_frame: samples,
    };
    let mut framer = Framer::new(&header, spec).unwrap();
    let mut frames = Vec::new();
    while let Some(r) = reader.next_record().unwrap() {
        framer.push(&r, Timestamp::from_micros(0), &mut frames);
    }
    framer.finish(Timestamp::from_micros(0), &mut frames);
    frames
}

fn meta(offset: i64) -> RecordMeta {
    RecordMeta {
        partition: 0,
        offset,
        timestamp_ms: Some(1_700_000_000_000 + offset),
        replay: false,
    }
}

/// Runs frames through a fresh Albi; returns decoded features in output order.
fn run(albi: &mut Albi, frames: &[Frame]) -> Vec<Features> {
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        albi.process(f.clone(), meta(i as i64), &mut out).unwrap();
    }
    features(&out)
}

fn features(out: &[Output]) -> Vec<Features> {
    out.iter()
        .map(|o| {
            assert_eq!(o.topic, OutputTopic::EegFeatures);
            let key: FeatureKey = decode(&o.key).unwrap();
            let f: Features = decode(&o.value).unwrap();
            assert_eq!(
                key,
                f.key(),
                "outputs are keyed by session, channel and window"
            );
            f
        })
        .collect()
}

#[test]
fn the_recording_gives_the_reference_features() {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data_dir().join("eeglab_sample_32ch_128hz_238s.reference.json"))
            .unwrap(),
    )
    .unwrap();
    let frames = recording(16);
    let mut albi = Albi::new(AlbiConfig::default());
    let features = run(&mut albi, &frames);
    assert_eq!(
        features.len(),
        119 * 32,
        "every full 2 s window of 238 s, 32 channels"
    );
    let keys = [
        "abs_delta",
        "abs_theta",
        "abs_alpha",
        "abs_beta",
        "abs_gamma",
        "total_abs",
        "rel_delta",
        "rel_theta",
        "rel_alpha",
        "rel_beta",
        "rel_gamma",
        "peak_alpha_psd",
        "spectral_entropy",
        "hjorth_activity",
        "hjorth_mobility",
        "hjorth_complexity",
    ];
    for w in reference["windows"].as_array().unwrap() {
        let (c, k) = (
            w["channel"].as_u64().unwrap(),
            w["window"].as_u64().unwrap(),
        );
        let f = features
            .iter()
            .find(|f| u64::from(f.channel_index) == c && f.window_index == k)
            .unwrap();
        assert_eq!(f.channel_label, w["label"].as_str().unwrap());
        assert_eq!(f.window_start_sample, w["start_sample"].as_u64().unwrap());
        assert_eq!(f.peak_alpha_hz, w["peak_alpha_hz"].as_f64());
        let got = [
            f.abs.delta,
            f.abs.theta,
            f.abs.alpha,
            f.abs.beta,
            f.abs.gamma,
            f.total_abs,
            f.rel.delta,
            f.rel.theta,
            f.rel.alpha,
            f.rel.beta,
            f.rel.gamma,
            f.peak_alpha_psd,
            f.spectral_entropy,
            f.hjorth.activity,
            f.hjorth.mobility,
            f.hjorth.complexity,
        ];
        for (name, got) in keys.iter().zip(got) {
            let want = w[*name].as_f64().unwrap();
            let rel = (got.unwrap() - want).abs() / want.abs();
            assert!(rel <= 1e-6, "channel {c} window {k} {name}: rel {rel:e}");
        }
        assert_eq!(
            f.quality.seq_gaps + f.quality.duplicate_frames + f.quality.out_of_order_frames,
            0
        );
        assert_eq!(f.algorithm_version, clisonix_signal::ALGORITHM_VERSION);
        assert_eq!(f.psd.len(), 65);
        // The window starts where its first sample was recorded (2000-01-01 + 2k s).
        assert_eq!(
            f.window_start.as_micros(),
            946_684_800_000_000 + k as i64 * 2_000_000
        );
    }
    // The session stays open (its device may send more) until it idles out, and holds
    // the committed offset at its first frame.
    assert_eq!(albi.needed_from(0), Some(0));
}

#[test]
fn frame_length_does_not_change_the_features() {
    let a = run(&mut Albi::new(AlbiConfig::default()), &recording(16)[..200]);
    let b = run(&mut Albi::new(AlbiConfig::default()), &recording(37)[..87]);
    let n = a.len().min(b.len());
    assert!(n >= 32 * 10);
    for (x, y) in a[..n].iter().zip(&b[..n]) {
        assert_eq!(
            (x.window_index, x.channel_index),
            (y.window_index, y.channel_index)
        );
        assert_eq!(x.psd, y.psd);
        assert_eq!(x.hjorth, y.hjorth);
    }
}

#[test]
fn replaying_gives_byte_identical_outputs() {
    let frames = &recording(16)[..300];
    let mut outputs = Vec::new();
    for _ in 0..2 {
        let mut albi = Albi::new(AlbiConfig::default());
        let mut out = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            albi.process(f.clone(), meta(i as i64), &mut out).unwrap();
        }
        outputs.push(out);
    }
    assert_eq!(outputs[0], outputs[1]);
}

#[test]
fn gaps_duplicates_and_reordering_are_counted_not_smoothed() {
    let frames = recording(16);
    // Window 0 needs frames 0..16 (16 x 16 = 256 samples).
    let mut stream: Vec<Frame> = frames[..40].to_vec();
    stream.remove(5); // a gap of one frame (window 0 then reaches into frame 16)
    let duplicate = stream[8].clone();
    stream.insert(9, duplicate); // a duplicate
    let late = stream.remove(20); // frame 21 arrives late, after 23
    stream.insert(22, late);
    let mut albi = Albi::new(AlbiConfig::default());
    let f = run(&mut albi, &stream);
    let w0: Vec<_> = f.iter().filter(|f| f.window_index == 0).collect();
    assert_eq!(w0.len(), 32);
    assert_eq!(w0[0].quality.seq_gaps, 1);
    assert_eq!(w0[0].quality.duplicate_frames, 1);
    let later: u32 = f
        .iter()
        .filter(|f| f.window_index == 1 && f.channel_index == 0)
        .map(|f| f.quality.out_of_order_frames + f.quality.seq_gaps)
        .sum();
    // Frame 21 dropped late is reported as out of order; the jump to 22 as a gap.
    assert!(later >= 1, "{later}");
}

#[test]
fn poison_frames_are_rejected_and_the_session_goes_on() {
    let frames = recording(16);
    let mut albi = Albi::new(AlbiConfig::default());
    let mut out = Vec::new();
    albi.process(frames[0].clone(), meta(0), &mut out).unwrap();
    let mut nan = frames[1].clone();
    nan.samples[3] = f32::NAN;
    assert_eq!(
        albi.process(nan, meta(1), &mut out).unwrap_err().code,
        "non_finite_samples"
    );
    let mut faster = frames[1].clone();
    faster.sample_rate_hz = 256.0;
    assert_eq!(
        albi.process(faster, meta(2), &mut out).unwrap_err().code,
        "sample_rate_changed"
    );
    let mut fewer = frames[1].clone();
    fewer.channel_labels[0] = "Xx".into();
    assert_eq!(
        albi.process(fewer, meta(3), &mut out).unwrap_err().code,
        "channels_changed"
    );
    let mut odd = frames[0].clone();
    odd.session_id = SessionId::random();
    odd.sample_rate_hz = 100.5;
    assert_eq!(
        albi.process(odd, meta(4), &mut out).unwrap_err().code,
        "unsupported_sample_rate"
    );
    for (i, f) in frames[1..20].iter().enumerate() {
        albi.process(f.clone(), meta(5 + i as i64), &mut out)
            .unwrap();
    }
    assert_eq!(features(&out).len(), 32, "window 0 still completes");
}

#[test]
fn the_low_watermark_is_the_oldest_frame_an_open_window_needs() {
    let frames = recording(16);
    let mut albi = Albi::new(AlbiConfig::default());
    let mut out = Vec::new();
    assert_eq!(albi.needed_from(0), None);
    for (i, f) in frames[..20].iter().enumerate() {
        albi.process(f.clone(), meta(100 + i as i64), &mut out)
            .unwrap();
    }
    // Window 0 is out, but the open session's numbering starts at its first frame.
    assert_eq!(features(&out).len(), 32);
    assert_eq!(albi.needed_from(0), Some(100));
    assert_eq!(albi.needed_from(1), None);
    albi.forget(0);
    assert_eq!(albi.needed_from(0), None);
    assert_eq!(albi.open_sessions(), 0);
}

#[test]
fn idle_sessions_are_closed_by_record_time() {
    let frames = recording(16);
    let mut albi = Albi::new(AlbiConfig {
        idle_ms: 60_000,
        ..AlbiConfig::default()
    });
    let mut out = Vec::new();
    albi.process(
        frames[0].clone(),
        RecordMeta {
            partition: 0,
            offset: 0,
            timestamp_ms: Some(0),
            replay: false,
        },
        &mut out,
    )
    .unwrap();
    let mut other = frames[0].clone();
    other.session_id = SessionId::random();
    albi.process(
        other,
        RecordMeta {
            partition: 0,
            offset: 1,
            timestamp_ms: Some(120_000),
            replay: false,
        },
        &mut out,
    )
    .unwrap();
    assert_eq!(albi.open_sessions(), 1);
    assert_eq!(albi.needed_from(0), Some(1));
}

#[test]
fn replaying_rebuilds_state_so_the_rest_equals_a_clean_run() {
    let frames = recording(16);
    let clean = {
        let mut albi = Albi::new(AlbiConfig::default());
        let mut out = Vec::new();
        for (i, f) in frames[..300].iter().enumerate() {
            albi.process(f.clone(), meta(i as i64), &mut out).unwrap();
        }
        out
    };
    // A restart after 137 records: everything is re-read, the first 137 as replay.
    let mut albi = Albi::new(AlbiConfig::default());
    let mut before = Vec::new();
    for (i, f) in frames[..137].iter().enumerate() {
        albi.process(f.clone(), meta(i as i64), &mut before)
            .unwrap();
    }
    let mut restarted = Albi::new(AlbiConfig::default());
    let mut replayed = Vec::new();
    let mut after = Vec::new();
    for (i, f) in frames[..300].iter().enumerate() {
        let mut m = meta(i as i64);
        m.replay = i < 137;
        let out = if m.replay { &mut replayed } else { &mut after };
        restarted.process(f.clone(), m, out).unwrap();
    }
    assert!(replayed.is_empty(), "replayed windows compute nothing");
    before.extend(after);
    assert_eq!(
        before, clean,
        "before the crash + after the restart = one clean run"
    );
}

#[test]
fn overlapping_windows_and_other_sample_rates() {
    let fs = 256.0;
    let n = 64u32;
    let frames: Vec<Frame> = (0..40u64)
        .map(|seq| {
            let mut f = clisonix_schemas::examples::frame(0, 2, n);
            f.seq = seq;
            f.sample_rate_hz = fs;
            f.samples = (0..2 * n as usize)
                .map(|i| {
                    let t = (seq as f64 * n as f64 + (i % n as usize) as f64) / fs;
                    (20.0 * (2.0 * std::f64::consts::PI * 20.0 * t).sin()) as f32
                })
                .collect();
            f
        })
        .collect();
    let mut albi = Albi::new(AlbiConfig {
        window_seconds: 2.0,
        hop_seconds: 1.0,
        ..AlbiConfig::default()
    });
    let f = run(&mut albi, &frames);
    // 40 x 64 = 2560 samples = 10 s: windows start every 1 s while 2 s remain: 9 windows.
    assert_eq!(f.len(), 9 * 2);
    for x in &f {
        assert_eq!(x.window_start_sample, x.window_index * 256);
        assert_eq!(x.psd.len(), 129, "1 Hz bins up to 128 Hz");
        assert!(x.rel.beta.unwrap() > 0.95, "20 Hz is beta: {:?}", x.rel);
    }
}
