//! Example records of every family, deterministic given a seed: for tests (round trips
//! through the broker, codec checks) and for documentation. Every optional field is
//! set and every collection is non-empty, so a round trip exercises the whole schema.

use uuid::Uuid;

use crate::domain::*;

fn uuid(seed: u64, salt: u64) -> Uuid {
    Uuid::from_u64_pair(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt, seed)
}

fn tenant(seed: u64) -> TenantId {
    TenantId::new(uuid(seed, 1))
}

fn session(seed: u64) -> SessionId {
    SessionId::new(uuid(seed, 2))
}

fn device() -> DeviceId {
    DeviceId::parse("headset-01").expect("valid device id")
}

/// A frame of `channels` x `samples_per_channel` samples with distinct values.
pub fn frame(seed: u64, channels: usize, samples_per_channel: u32) -> Frame {
    let n = samples_per_channel as usize;
    Frame {
        tenant_id: tenant(seed),
        device_id: device(),
        session_id: session(seed),
        seq: seed,
        device_time: Timestamp::from_micros(1_700_000_000_000_000 + seed as i64 * 125_000),
        received_at: Timestamp::from_micros(1_700_000_000_010_000 + seed as i64 * 125_000),
        sample_rate_hz: 256.0,
        unit: SampleUnit::Microvolt,
        channel_labels: (0..channels).map(|c| format!("Ch{c}")).collect(),
        samples_per_channel,
        samples: (0..channels * n)
            .map(|i| ((i as f32) * 0.37 + seed as f32).sin() * 50.0)
            .collect(),
        markers: vec![Marker {
            sample_offset: 3,
            duration_us: Some(250_000),
            label: "square".into(),
        }],
    }
}

pub fn features(seed: u64) -> Features {
    let some = |x: f64| Some(x + seed as f64);
    Features {
        tenant_id: tenant(seed),
        session_id: session(seed),
        device_id: device(),
        channel_index: 3,
        channel_label: "Fz".into(),
        window_index: seed,
        window_start_sample: seed * 256,
        window_start: Timestamp::from_micros(1_700_000_000_000_000 + seed as i64 * 2_000_000),
        window_samples: 256,
        sample_rate_hz: 128.0,
        unit: SampleUnit::Microvolt,
        algorithm_version: "albi-1.0.0".into(),
        abs: Bands {
            delta: some(10.0),
            theta: some(5.0),
            alpha: some(4.0),
            beta: some(2.0),
            gamma: some(0.5),
        },
        total_abs: some(21.5),
        rel: Bands {
            delta: Some(0.46),
            theta: Some(0.23),
            alpha: Some(0.19),
            beta: Some(0.09),
            gamma: Some(0.02),
        },
        peak_alpha_hz: Some(10.0),
        peak_alpha_psd: some(3.25),
        spectral_entropy: Some(0.71),
        hjorth: Hjorth {
            activity: some(120.0),
            mobility: Some(0.31),
            complexity: Some(1.9),
        },
        aperiodic_exponent: Some(-1.4),
        psd_resolution_hz: 1.0,
        psd: (0..65).map(|k| 100.0 / (1.0 + k as f64)).collect(),
        quality: WindowQuality {
            flat: false,
            clipped_fraction: 0.0,
            line_noise_50hz: Some(1.2),
            line_noise_60hz: None,
            seq_gaps: 1,
            duplicate_frames: 0,
            out_of_order_frames: 2,
        },
    }
}

pub fn audio_chunk(seed: u64) -> AudioChunk {
    AudioChunk {
        tenant_id: tenant(seed),
        session_id: session(seed),
        preset: "parameter_mapping".into(),
        preset_version: "1.0.0".into(),
        chunk_index: seed,
        start_frame: seed * 4410,
        eeg_start: Timestamp::from_micros(1_700_000_000_000_000 + seed as i64 * 100_000),
        sample_rate_hz: 44_100,
        channels: 2,
        pcm: (0..2 * 441).map(|i| (i as i16).wrapping_mul(73)).collect(),
        source_first_seq: seed * 4,
        source_last_seq: seed * 4 + 3,
    }
}

pub fn session_state(seed: u64) -> SessionState {
    SessionState {
        tenant_id: tenant(seed),
        session_id: session(seed),
        device_id: device(),
        status: SessionStatus::Ended,
        started_at: Timestamp::from_micros(1_700_000_000_000_000),
        last_frame_at: Timestamp::from_micros(1_700_000_238_000_000),
        first_device_time: Timestamp::from_micros(1_699_999_999_990_000),
        last_device_time: Timestamp::from_micros(1_700_000_237_990_000),
        sample_rate_hz: 128.0,
        channel_labels: vec!["FPz".into(), "EOG1".into(), "F3".into()],
        frames: 1904 + seed,
        samples_per_channel: 30_464,
        seq_gaps: 2,
        duplicate_frames: 1,
        out_of_order_frames: 0,
        ended: Some((
            Timestamp::from_micros(1_700_000_268_000_000),
            EndReason::IdleTimeout,
        )),
    }
}

pub fn usage_event(seed: u64) -> UsageEvent {
    UsageEvent {
        event_id: uuid(seed, 3),
        tenant_id: tenant(seed),
        kind: UsageKind::FramesIngested,
        quantity: 8 + seed as i64,
        occurred_at: Timestamp::from_micros(1_700_000_000_000_000),
        source: "ingest".into(),
        session_id: Some(session(seed)),
        device_id: Some(device()),
        detail: None,
    }
}

pub fn dead_letter(seed: u64) -> DeadLetter {
    DeadLetter {
        stage: "albi".into(),
        stage_version: "1.0.0".into(),
        source_topic: "eeg.frames".into(),
        source_partition: 2,
        source_offset: seed as i64,
        source_timestamp_ms: Some(1_700_000_000_000),
        key: Some(vec![0xC3, 0x01, 1, 2]),
        value: Some(b"not avro".to_vec()),
        headers: vec![
            Header {
                name: "traceparent".into(),
                value: Some(b"00-abc-def-01".to_vec()),
            },
            Header {
                name: "empty".into(),
                value: None,
            },
        ],
        reason_code: "not_avro".into(),
        reason_detail: "record does not start with the Avro single-object marker".into(),
        failed_at: Timestamp::from_micros(1_700_000_000_500_000),
    }
}
