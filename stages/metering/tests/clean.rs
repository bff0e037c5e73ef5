//! The clean channel-time meter on the reference recording: Albi's feature records of
//! its 119 windows of 32 channels, counted by metering and, independently, by the
//! rule as written in `docs/metering.md`; then through the store into Postgres and
//! back from the stored features (the rule is recomputable from them).

use std::path::PathBuf;

use clisonix_albi::{Albi, AlbiConfig};
use clisonix_e2e::TestEnv;
use clisonix_edf::{FrameSpec, Framer, Reader};
use clisonix_metering::{from_features, Input, Meter, MeteringStore, Position};
use clisonix_schemas::{decode, DeviceId, Features, SessionId, TenantId, Timestamp};
use clisonix_stage::{RecordMeta, Stage};

fn features_of_the_reference_recording(tenant: TenantId, session: SessionId) -> Vec<Features> {
    let dir = std::env::var_os("CLISONIX_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"));
    let file = std::fs::File::open(dir.join("eeglab_sample_32ch_128hz_238s.edf")).unwrap();
    let mut reader = Reader::new(std::io::BufReader::new(file)).unwrap();
    let header = reader.header().clone();
    let spec = FrameSpec {
        tenant_id: tenant,
        device_id: DeviceId::parse("edf").unwrap(),
        session_id: session,
        samples_per_frame: 16,
    };
    let mut framer = Framer::new(&header, spec).unwrap();
    let mut frames = Vec::new();
    while let Some(r) = reader.next_record().unwrap() {
        framer.push(
            &r,
            Timestamp::from_micros(1_700_000_000_000_000),
            &mut frames,
        );
    }
    framer.finish(Timestamp::from_micros(1_700_000_000_000_000), &mut frames);
    let mut albi = Albi::new(AlbiConfig::default());
    let mut out = Vec::new();
    for (i, f) in frames.into_iter().enumerate() {
        let meta = RecordMeta {
            partition: 0,
            offset: i as i64,
            timestamp_ms: None,
            replay: false,
        };
        albi.process(f, meta, &mut out).unwrap();
    }
    out.iter().map(|o| decode(&o.value).unwrap()).collect()
}

/// The rule, written out again: not flat, at most 1% clipped, the PSD at 50 Hz and at
/// 60 Hz at most 25 dB above the median of the bins around it; a clean 2 s window at
/// 128 Hz (no overlap) is 2,000 ms of channel time.
fn clean_ms_by_hand(features: &[Features]) -> i64 {
    features
        .iter()
        .filter(|f| {
            let q = &f.quality;
            !q.flat
                && q.clipped_fraction <= 0.01
                && q.line_noise_50hz.is_none_or(|r| 10.0 * r.log10() <= 25.0)
                && q.line_noise_60hz.is_none_or(|r| 10.0 * r.log10() <= 25.0)
        })
        .count() as i64
        * 2_000
}

#[tokio::test]
async fn clean_channel_time_of_the_reference_recording_equals_the_rule_applied_by_hand() {
    let (tenant, session) = (TenantId::random(), SessionId::random());
    let features = features_of_the_reference_recording(tenant, session);
    assert_eq!(features.len(), 119 * 32);
    let want = clean_ms_by_hand(&features);
    // The recording is real EEG with 60 Hz mains pickup: most windows are clean, not
    // all (the line stands over 25 dB above its surroundings in about one in twelve).
    let all = 119 * 32 * 2_000;
    assert!(
        want > all * 85 / 100 && want < all * 95 / 100,
        "{want} of {all}"
    );

    let counted: i64 = features
        .iter()
        .flat_map(|f| from_features(f, 0))
        .filter(|u| u.meter == Meter::CleanChannelMs)
        .map(|u| u.quantity)
        .sum();
    assert_eq!(counted, want);

    // Through the store: the session's clean time, and the same again recomputed from
    // the feature rows the results sink stores (the query docs/metering.md gives).
    let db = TestEnv::get().fresh_database().await;
    sqlx::migrate!("../../gateway/migrations")
        .run(&db.pool)
        .await
        .unwrap();
    let store = MeteringStore::new(db.pool.clone());
    let now = Timestamp::now().as_millis();
    let batch: Vec<(Position, Option<Input>)> = features
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let at = Position {
                topic: "eeg.features".into(),
                partition: 0,
                offset: i as i64,
                timestamp_ms: Some(now),
            };
            (at, Some(Input::Features(Box::new(f.clone()))))
        })
        .collect();
    store.apply(&batch, now).await.unwrap();
    let stored: i64 = sqlx::query_scalar(
        "SELECT quantity FROM usage_sessions WHERE session_id = $1 AND meter = 'clean_channel_ms'",
    )
    .bind(session.as_uuid())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(stored, want);
    let results = clisonix_sink::Results::new(
        db.pool.clone(),
        clisonix_audio::AudioStore::from_url(&db.audio_store()).unwrap(),
    );
    let records: Vec<clisonix_sink::SinkRecord> = features
        .into_iter()
        .map(|f| clisonix_sink::SinkRecord::Features(Box::new(f)))
        .collect();
    results
        .write(&records.iter().collect::<Vec<_>>())
        .await
        .unwrap();
    let recomputed: i64 = sqlx::query_scalar(include_str!("../clean_channel_ms.sql"))
        .bind(session.as_uuid())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(recomputed, want);
    db.drop_now().await;
}
