//! The sessions stage with plain vectors: frames in, session states out.

use clisonix_schemas::{
    decode, DeviceId, EndReason, Frame, Marker, SampleUnit, SessionId, SessionKey, SessionState,
    SessionStatus, TenantId, Timestamp, SESSION_END_MARKER,
};
use clisonix_sessions::{Sessions, SessionsConfig};
use clisonix_stage::{Output, OutputTopic, RecordMeta, Stage};

const T0_US: i64 = 1_700_000_000_000_000;

/// Frame `seq` of a 256 Hz, 2-channel session: 32 samples (125 ms), received 125 ms
/// apart.
fn frame(session: SessionId, seq: u64) -> Frame {
    Frame {
        tenant_id: TenantId::parse("6f1c2d1e-8a1b-4c3d-9e8f-0123456789ab").unwrap(),
        device_id: DeviceId::parse("dev-1").unwrap(),
        session_id: session,
        seq,
        device_time: Timestamp::from_micros(T0_US + seq as i64 * 125_000),
        received_at: Timestamp::from_micros(T0_US + 50_000 + seq as i64 * 125_000),
        sample_rate_hz: 256.0,
        unit: SampleUnit::Microvolt,
        channel_labels: vec!["C3".into(), "C4".into()],
        samples_per_channel: 32,
        samples: vec![1.0; 64],
        markers: Vec::new(),
    }
}

/// Kafka metadata of a frame: record time is its receive time.
fn meta(offset: i64, f: &Frame) -> RecordMeta {
    RecordMeta {
        partition: 0,
        offset,
        timestamp_ms: Some(f.received_at.as_millis()),
        replay: false,
    }
}

fn states(out: &[Output]) -> Vec<SessionState> {
    out.iter()
        .map(|o| {
            assert_eq!(o.topic, OutputTopic::EegSessions);
            let key: SessionKey = decode(&o.key).unwrap();
            let s: SessionState = decode(&o.value).unwrap();
            assert_eq!(key, s.key(), "states are keyed by session");
            s
        })
        .collect()
}

fn feed(stage: &mut Sessions, frames: &[Frame]) -> Vec<SessionState> {
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        stage
            .process(f.clone(), meta(i as i64, f), &mut out)
            .unwrap();
    }
    states(&out)
}

#[test]
fn a_session_is_written_when_it_starts_every_update_and_when_it_ends() {
    let s = SessionId::random();
    let mut frames: Vec<Frame> = (0..100).map(|q| frame(s, q)).collect();
    frames[99].markers.push(Marker {
        sample_offset: 31,
        duration_us: None,
        label: SESSION_END_MARKER.into(),
    });
    let mut stage = Sessions::new(SessionsConfig::default());
    let written = feed(&mut stage, &frames);
    // 12.5 s of frames: the start, every 5 s (frames 40 and 80), the end.
    assert_eq!(written.len(), 4);
    assert!(written[..3]
        .iter()
        .all(|w| w.status == SessionStatus::Active));
    assert_eq!(written[1].frames, 41);
    let last = &written[3];
    assert_eq!(last.status, SessionStatus::Ended);
    assert_eq!(
        last.ended,
        Some((frames[99].received_at, EndReason::Explicit))
    );
    assert_eq!((last.frames, last.samples_per_channel), (100, 3200));
    assert_eq!(last.started_at, frames[0].received_at);
    assert_eq!(last.last_frame_at, frames[99].received_at);
    assert_eq!(last.first_device_time.as_micros(), T0_US);
    assert_eq!(
        last.last_device_time.as_micros(),
        T0_US + 12_500_000,
        "12.5 s of EEG"
    );
    assert_eq!(last.device_id.as_str(), "dev-1");
    assert_eq!(last.channel_labels, vec!["C3", "C4"]);
    assert_eq!(stage.open_sessions(), 0);
    // Remembered after its end, so a late frame is refused, not a new session.
    let late = frame(s, 100);
    let err = stage
        .process(late.clone(), meta(100, &late), &mut Vec::new())
        .unwrap_err();
    assert_eq!(err.code, "session_ended");
}

#[test]
fn gaps_duplicates_and_late_frames_are_counted() {
    let s = SessionId::random();
    let order = [0u64, 1, 2, 5, 6, 2, 4, 9, 9, 3, 7, 8];
    let frames: Vec<Frame> = order.iter().map(|&q| frame(s, q)).collect();
    let mut stage = Sessions::new(SessionsConfig {
        update_ms: 0,
        ..SessionsConfig::default()
    });
    // Record time moves on with every record, whatever the frames' own times.
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let m = RecordMeta {
            timestamp_ms: Some(T0_US / 1000 + i as i64 * 125),
            ..meta(i as i64, f)
        };
        stage.process(f.clone(), m, &mut out).unwrap();
    }
    let written = states(&out);
    let at = |i: usize| {
        let w = &written[i];
        (
            w.frames,
            w.seq_gaps,
            w.duplicate_frames,
            w.out_of_order_frames,
        )
    };
    assert_eq!(at(4), (5, 2, 0, 0), "after 0 1 2 5 6: 3 and 4 missing");
    assert_eq!(
        at(6),
        (6, 1, 1, 1),
        "2 again is a duplicate, 4 is late and fills a gap"
    );
    assert_eq!(
        at(8),
        (7, 3, 2, 1),
        "9 skips 7 and 8; its resend is a duplicate"
    );
    assert_eq!(
        at(11),
        (10, 0, 2, 4),
        "3, 7 and 8 arrive late too: no gaps left"
    );
}

#[test]
fn an_idle_session_ends_at_its_last_frame_by_record_time() {
    let (a, b) = (SessionId::random(), SessionId::random());
    let mut stage = Sessions::new(SessionsConfig {
        idle_ms: 60_000,
        update_ms: 5_000,
    });
    let mut out = Vec::new();
    let first: Vec<Frame> = (0..4).map(|q| frame(a, q)).collect();
    for (i, f) in first.iter().enumerate() {
        stage
            .process(f.clone(), meta(i as i64, f), &mut out)
            .unwrap();
    }
    assert_eq!(stage.needed_from(0), Some(0));
    // Two minutes later another session's frame arrives on the partition.
    let mut other = frame(b, 0);
    other.received_at = Timestamp::from_micros(T0_US + 120_000_000);
    stage
        .process(other.clone(), meta(10, &other), &mut out)
        .unwrap();
    let written = states(&out);
    let ended = written
        .iter()
        .find(|w| w.session_id == a && w.status == SessionStatus::Ended)
        .unwrap();
    assert_eq!(
        ended.ended,
        Some((first[3].received_at, EndReason::IdleTimeout))
    );
    assert_eq!(ended.frames, 4);
    assert_eq!(
        stage.needed_from(0),
        Some(10),
        "only the new session holds the offset"
    );
}

#[test]
fn poison_frames_are_refused_and_not_counted() {
    let s = SessionId::random();
    let mut stage = Sessions::new(SessionsConfig::default());
    let mut out = Vec::new();
    let f0 = frame(s, 0);
    stage.process(f0.clone(), meta(0, &f0), &mut out).unwrap();
    let mut nan = frame(s, 1);
    nan.samples[5] = f32::INFINITY;
    assert_eq!(
        stage
            .process(nan.clone(), meta(1, &nan), &mut out)
            .unwrap_err()
            .code,
        "non_finite_samples"
    );
    let mut rate = frame(s, 1);
    rate.sample_rate_hz = 512.0;
    assert_eq!(
        stage
            .process(rate.clone(), meta(2, &rate), &mut out)
            .unwrap_err()
            .code,
        "sample_rate_changed"
    );
    let mut end = frame(s, 1);
    end.markers.push(Marker {
        sample_offset: 0,
        duration_us: None,
        label: SESSION_END_MARKER.into(),
    });
    stage.process(end.clone(), meta(3, &end), &mut out).unwrap();
    let last = states(&out).pop().unwrap();
    assert_eq!((last.frames, last.seq_gaps), (2, 0));
}

#[test]
fn replaying_rebuilds_counts_so_the_rest_equals_a_clean_run() {
    let s = SessionId::random();
    let mut frames: Vec<Frame> = (0..200).map(|q| frame(s, q)).collect();
    frames.swap(50, 51);
    frames[120] = frame(s, 110);
    let clean = {
        let mut out = Vec::new();
        let mut stage = Sessions::new(SessionsConfig::default());
        for (i, f) in frames.iter().enumerate() {
            stage
                .process(f.clone(), meta(i as i64, f), &mut out)
                .unwrap();
        }
        out
    };
    let crash = 97;
    let mut before = Vec::new();
    let mut stage = Sessions::new(SessionsConfig::default());
    for (i, f) in frames[..crash].iter().enumerate() {
        stage
            .process(f.clone(), meta(i as i64, f), &mut before)
            .unwrap();
    }
    let mut restarted = Sessions::new(SessionsConfig::default());
    let mut replayed = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let mut m = meta(i as i64, f);
        m.replay = i < crash;
        let out = if m.replay { &mut replayed } else { &mut before };
        restarted.process(f.clone(), m, out).unwrap();
    }
    assert!(replayed.is_empty());
    assert_eq!(before, clean);
}

#[test]
fn a_burst_followed_by_nothing_is_written_once_the_update_interval_has_passed() {
    let mut stage = Sessions::new(SessionsConfig::default());
    let session = SessionId::random();
    // Two seconds of frames: the first is written, the rest wait for the interval.
    let burst: Vec<Frame> = (0..16).map(|seq| frame(session, seq)).collect();
    let written = feed(&mut stage, &burst);
    assert_eq!(written.len(), 1);
    assert_eq!(written[0].frames, 1);
    let last_ms = burst.last().unwrap().received_at.as_millis();
    let idle = |stage: &mut Sessions, now_ms: i64| {
        let mut out = Vec::new();
        stage.idle(0, now_ms, &mut out);
        states(&out)
    };
    // Before the interval since the last write: nothing; on another partition: nothing.
    assert!(idle(&mut stage, last_ms + 1_000).is_empty());
    let mut out = Vec::new();
    stage.idle(1, last_ms + 60_000, &mut out);
    assert!(out.is_empty());
    // Once it has passed: the whole burst, once.
    let later = idle(&mut stage, last_ms + 5_000);
    assert_eq!(later.len(), 1);
    assert_eq!(
        (later[0].frames, later[0].status),
        (16, SessionStatus::Active)
    );
    assert_eq!(later[0].samples_per_channel, 16 * 32);
    assert!(
        idle(&mut stage, last_ms + 60_000).is_empty(),
        "nothing changed since"
    );
}
