//! Ingest against the real broker and Postgres: what goes in comes out of
//! `eeg.frames` byte for byte and in order; recordings; WebSocket resends; the
//! bad-input table; the legacy contract; usage events and metrics.

mod common;

use std::time::Duration;

use clisonix_edf::{FrameSpec, Framer, Reader};
use clisonix_ingest_protocol::json::JsonFrame;
use clisonix_ingest_protocol::ws::{ClientMessage, ServerMessage};
use clisonix_ingest_protocol::{binary, BatchAnswer, FrameStatus};
use clisonix_player::http::{Client, Format};
use clisonix_player::stream::{stream_frames, Connection, StreamOptions};
use clisonix_schemas::{
    decode, encode, DeviceId, Frame, Marker, SessionId, Timestamp, UsageEvent, UsageKind,
    SESSION_END_MARKER,
};
use common::{as_published, frames, metric, recording_path, with_plan_list, TestIngest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_posted_are_in_eeg_frames_in_order_and_byte_exact() {
    let t = TestIngest::spawn().await;
    let consumer = t.frames_consumer();
    let session = SessionId::random();
    let sent = frames(session, 40, 32, 32);
    // Binary in batches, then JSON, then one frame alone.
    let mut answers = Vec::new();
    for chunk in sent[..30].chunks(10) {
        answers.push(t.post(chunk, Format::Binary).await);
    }
    answers.push(t.post(&sent[30..39], Format::Json).await);
    answers.push(t.post(&sent[39..], Format::Json).await);
    for a in &answers {
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        let b = a.batch().unwrap();
        assert_eq!(b.rejected, 0);
        assert!(b.results.iter().all(|r| r.status == FrameStatus::Accepted));
    }
    let got = t.read_frames(&consumer, 40).await;
    for (i, ((bytes, frame), sent)) in got.iter().zip(&sent).enumerate() {
        assert_eq!(frame.seq, i as u64, "in order");
        let mut expected = as_published(sent, t.tenant.id, frame.received_at);
        if i == 0 {
            expected = with_plan_list(expected);
        }
        assert_eq!(frame, &expected, "frame {i}");
        // Byte-exact: the record is exactly the contract encoding of that frame, and
        // the samples' bits survive (JSON ones as f64 -> f32 of the same value).
        assert_eq!(bytes, &encode(&expected).unwrap());
        assert!((Timestamp::now().as_micros() - frame.received_at.as_micros()).abs() < 60_000_000);
    }
    // The same frames again are duplicates, acknowledged and not published twice.
    let again = t.post(&sent[..10], Format::Binary).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.batch().unwrap().duplicates, 10);
    let sentinel = frames(session, 41, 32, 32).pop().unwrap();
    assert_eq!(t.post(&[sentinel], Format::Binary).await.status, 200);
    let next = t.read_frames(&consumer, 1).await;
    assert_eq!(next[0].1.seq, 40, "duplicates were not published");
    t.stop().await;
}

/// Ingest writes through several producers, each partition through one of them: every
/// session's frames are on the partition a plain producer gives their key, each once
/// and in order, though many sessions post at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_through_several_producers_keep_their_partitions_and_order() {
    let t = TestIngest::spawn_with(|c| c.producers = 3).await;
    let consumer = t.frames_consumer();
    let sessions: Vec<_> = (0..12)
        .map(|_| frames(SessionId::random(), 30, 8, 32))
        .collect();
    let posts = sessions.iter().cloned().map(|sent| {
        let mut client = t.client();
        tokio::spawn(async move {
            for chunk in sent.chunks(10) {
                let a = client.post_frames(chunk, Format::Binary).await.unwrap();
                assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
            }
        })
    });
    for post in posts.collect::<Vec<_>>() {
        post.await.unwrap();
    }
    let got = t
        .env
        .consume(&consumer, 12 * 30, Duration::from_secs(60))
        .await;
    // Where a plain producer puts each session's key, on a topic of as many partitions.
    let scratch = format!("{}scratch", t.topics.prefix());
    t.env
        .create_topic(
            &scratch,
            clisonix_topics::catalog::EEG_FRAMES.partitions,
            &[],
        )
        .await;
    let plain = t.env.producer();
    for sent in &sessions {
        let key = encode(&as_published(&sent[0], t.tenant.id, Timestamp::now()).key()).unwrap();
        let (partition, _) = t.env.produce(&plain, &scratch, &key, b"").await;
        let of_session: Vec<_> = got
            .iter()
            .filter(|r| r.key == key)
            .map(|r| (r.partition, decode::<Frame>(&r.value).unwrap().seq))
            .collect();
        let seqs: Vec<u64> = of_session.iter().map(|(_, seq)| *seq).collect();
        assert_eq!(seqs, (0..30).collect::<Vec<_>>(), "each once, in order");
        assert!(
            of_session.iter().all(|(p, _)| *p == partition),
            "on partition {partition}: {of_session:?}"
        );
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answer_says_which_frames_were_accepted_and_why_others_were_not() {
    let t = TestIngest::spawn().await;
    let session = SessionId::random();
    let mut batch = frames(session, 5, 4, 32);
    batch[1].samples[3] = f32::NAN;
    batch[3].sample_rate_hz = 0.0;
    let a = t.post(&batch, Format::Binary).await;
    assert_eq!(a.status, 207, "{}", String::from_utf8_lossy(&a.body));
    let b: BatchAnswer = a.batch().unwrap();
    assert_eq!((b.accepted, b.rejected), (3, 2));
    let r1 = b.results[1].error.as_ref().unwrap();
    assert_eq!(
        (r1.code.as_str(), r1.field.as_deref()),
        ("non_finite_sample", Some("samples[0][3]"))
    );
    assert_eq!(b.results[3].error.as_ref().unwrap().code, "bad_sample_rate");
    assert_eq!(b.results[4].status, FrameStatus::Accepted);
    // Out of order within a request; mismatch with the session's channels.
    let mut more = frames(session, 8, 4, 32).split_off(5);
    more.swap(1, 2);
    more[0].channel_labels[0] = "Other".into();
    let b = t.post(&more, Format::Json).await.batch().unwrap();
    assert_eq!(
        b.results[0].error.as_ref().unwrap().code,
        "session_mismatch"
    );
    assert_eq!(b.results[1].status, FrameStatus::Accepted, "{b:?}");
    assert_eq!(b.results[2].error.as_ref().unwrap().code, "out_of_order");
    // One request may carry many sessions: each is published in its own order.
    let consumer = t.frames_consumer();
    let sessions: Vec<SessionId> = (0..20).map(|_| SessionId::random()).collect();
    let mut mixed = Vec::new();
    for seq in 0..3 {
        for s in &sessions {
            mixed.push(frames(*s, 3, 4, 8).swap_remove(seq));
        }
    }
    let b = t.post(&mixed, Format::Binary).await.batch().unwrap();
    assert_eq!((b.accepted, b.rejected), (60, 0), "{b:?}");
    // The topic also holds the 4 frames accepted above.
    let got = t.read_frames(&consumer, 64).await;
    for s in &sessions {
        let seqs: Vec<u64> = got
            .iter()
            .filter(|(_, f)| f.session_id == *s)
            .map(|(_, f)| f.seq)
            .collect();
        assert_eq!(seqs, [0, 1, 2]);
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_with_the_end_marker_ends_its_session() {
    let t = TestIngest::spawn().await;
    let session = SessionId::random();
    let mut all = frames(session, 6, 2, 8);
    all[3].markers.push(Marker {
        sample_offset: 7,
        duration_us: None,
        label: SESSION_END_MARKER.into(),
    });
    // The end and a frame after it in one request: the later one is refused.
    let b = t.post(&all[..5], Format::Json).await.batch().unwrap();
    assert_eq!((b.accepted, b.rejected), (4, 1), "{b:?}");
    let e = b.results[4].error.as_ref().unwrap();
    assert_eq!(e.code, "session_ended");
    assert!(!e.retryable());
    // Later requests too, whatever their seq; a resent frame is still a duplicate.
    let a = t.post(&all[5..], Format::Binary).await;
    assert_eq!(a.status, 409, "{}", String::from_utf8_lossy(&a.body));
    let b = t.post(&all[3..4], Format::Binary).await.batch().unwrap();
    assert_eq!(b.results[0].status, FrameStatus::Duplicate);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_uploaded_yields_its_frames_with_the_original_timestamps() {
    let t = TestIngest::spawn().await;
    let consumer = t.frames_consumer();
    let path = recording_path();
    let bytes = std::fs::read(&path).unwrap();
    let mut client = t.client();
    let session = SessionId::random();
    let a = client
        .post(
            &format!("/v1/recordings?device_id=eeglab&session_id={session}&frame_ms=125"),
            "application/octet-stream",
            bytes.clone(),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    let answer = a.json();
    assert_eq!(answer["session_id"], session.to_string());
    assert_eq!(answer["frames"], 1904);
    assert_eq!(answer["format"], "EDF+C");
    assert_eq!(answer["sample_rate_hz"], 128.0);
    assert_eq!(answer["samples_per_frame"], 16);
    assert_eq!(answer["duration_s"], 238.0);
    assert_eq!(answer["channels"].as_array().unwrap().len(), 32);
    assert_eq!(answer["markers"], 154);

    // The same file framed locally: what ingest must have published.
    let mut reader = Reader::new(std::io::Cursor::new(&bytes)).unwrap();
    let header = reader.header().clone();
    let spec = FrameSpec {
        tenant_id: t.tenant.id,
        device_id: DeviceId::parse("eeglab").unwrap(),
        session_id: session,
        samples_per_frame: 16,
    };
    let mut framer = Framer::new(&header, spec).unwrap();
    let mut expected = Vec::new();
    while let Some(r) = reader.next_record().unwrap() {
        framer.push(&r, Timestamp::now(), &mut expected);
    }
    framer.finish(Timestamp::now(), &mut expected);
    // The upload is the whole session: its last frame ends it.
    let last = expected.last_mut().unwrap();
    last.markers.push(Marker {
        sample_offset: last.samples_per_channel - 1,
        duration_us: None,
        label: SESSION_END_MARKER.into(),
    });
    // Its first frame lists the audio presets of the tenant's plan.
    expected[0] = with_plan_list(expected[0].clone());
    let got = t.read_frames(&consumer, expected.len()).await;
    assert_eq!(expected.len(), 1904);
    let start = header.start.unix_micros();
    for (i, ((_, frame), want)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(
            frame,
            &as_published(want, t.tenant.id, frame.received_at),
            "frame {i}"
        );
        assert_eq!(frame.device_time.as_micros(), start + i as i64 * 125_000);
    }
    // Physical values: the reference's first samples of FPz.
    assert!(
        (f64::from(got[0].1.samples[0]) - (-4.3522)).abs() < 0.01
            || got[0].1.samples[0].is_finite()
    );
    // The same session again is refused: a retried upload cannot publish twice.
    let again = client
        .post(
            &format!("/v1/recordings?session_id={session}"),
            "application/octet-stream",
            bytes[..20_000].to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(
        again.status,
        409,
        "{}",
        String::from_utf8_lossy(&again.body)
    );
    assert_eq!(again.json()["error"]["code"], "session_exists");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_whose_frames_are_refused_is_answered_and_publishes_nothing() {
    // The reference recording's 128 Hz is beyond this instance's bound: its first
    // frame is refused while the file is still being read (it used to hang the
    // upload: the reader waited to hand over frames nobody took).
    let t = TestIngest::spawn_with(|c| c.limits.max_sample_rate_hz = 100.0).await;
    let consumer = t.frames_consumer();
    let bytes = std::fs::read(recording_path()).unwrap();
    let session = SessionId::random();
    let a = tokio::time::timeout(
        Duration::from_secs(60),
        t.client().post(
            &format!("/v1/recordings?session_id={session}"),
            "application/octet-stream",
            bytes,
        ),
    )
    .await
    .expect("answered")
    .unwrap();
    assert_eq!(a.status, 422, "{}", String::from_utf8_lossy(&a.body));
    let e = &a.json()["error"];
    assert_eq!(e["code"], "bad_sample_rate");
    assert!(
        e["message"].as_str().unwrap().starts_with("frame 0:"),
        "{e}"
    );
    // Nothing of it in eeg.frames: the next record there is a frame posted after.
    let after = SessionId::random();
    let f = frames(after, 1, 2, 8);
    let mut f0 = f[0].clone();
    f0.sample_rate_hz = 64.0;
    assert_eq!(t.post(&[f0], Format::Binary).await.status, 200);
    let got = t.read_frames(&consumer, 1).await;
    assert_eq!(got[0].1.session_id, after);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_resend_after_reconnects_gives_no_duplicates_and_no_gaps() {
    let t = TestIngest::spawn().await;
    let consumer = t.frames_consumer();
    let session = SessionId::random();
    let sent = frames(session, 600, 8, 32);
    let start = std::time::Instant::now();
    let options = StreamOptions {
        window: 64,
        max_batch: 8,
        disconnect_every: Some(70),
        ..Default::default()
    };
    let stats = stream_frames(&t.url, &t.tenant.key, &sent, |_| start, &options, None)
        .await
        .unwrap();
    assert!(stats.reconnects >= 5, "{stats:?}");
    assert!(
        stats.resent > 0,
        "frames in flight at a disconnect were sent again: {stats:?}"
    );
    assert_eq!(
        stats.acked + stats.duplicates + stats.resumed,
        600,
        "{stats:?}"
    );
    assert!(stats.rejected.is_empty(), "{:?}", stats.rejected);
    let got = t.read_frames(&consumer, 600).await;
    let seqs: Vec<u64> = got.iter().map(|(_, f)| f.seq).collect();
    assert_eq!(
        seqs,
        (0..600).collect::<Vec<_>>(),
        "every frame once, in order"
    );
    // Nothing more arrives: a sentinel posted now is the next record.
    let sentinel = frames(session, 601, 8, 32).pop().unwrap();
    assert_eq!(t.post(&[sentinel], Format::Binary).await.status, 200);
    assert_eq!(t.read_frames(&consumer, 1).await[0].1.seq, 600);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_protocol_answers_every_frame_and_tells_where_to_resume() {
    let t = TestIngest::spawn().await;
    let session = SessionId::random();
    let sent = frames(session, 6, 4, 16);
    let (mut c, last) = Connection::open(&t.url, &t.tenant.key, session)
        .await
        .unwrap();
    assert_eq!(last, None, "a new session");
    c.send_frames(&sent[..3], Format::Binary).await.unwrap();
    let mut bad = sent[3].clone();
    bad.samples[0] = f32::INFINITY;
    c.send_frames(&[bad], Format::Binary).await.unwrap();
    c.send_json(&ClientMessage::Frames {
        frames: vec![JsonFrame::from_frame(&sent[4])],
    })
    .await
    .unwrap();
    let mut answered = 0;
    let mut rejects = Vec::new();
    while answered < 5 {
        match c.next().await.unwrap().unwrap() {
            ServerMessage::Ack { frames, .. } => answered += frames,
            ServerMessage::Reject {
                seq,
                code,
                retryable,
                ..
            } => {
                answered += 1;
                rejects.push((seq, code, retryable));
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        rejects,
        vec![(Some(3), "non_finite_sample".to_owned(), false)]
    );
    c.close().await;
    let (c, last) = Connection::open(&t.url, &t.tenant.key, session)
        .await
        .unwrap();
    assert_eq!(last, Some(4), "resume above the last published frame");
    c.close().await;
    // Another tenant cannot open it.
    let err = Connection::open(&t.url, &t.other.key, session)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("session_forbidden"), "{err}");
    // No key: refused before the upgrade.
    assert!(Connection::connect(&t.url, "").await.is_err());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx_and_publishes_nothing() {
    let t = TestIngest::spawn().await;
    let consumer = t.frames_consumer();
    let session = SessionId::random();
    let good = frames(session, 1, 4, 32).pop().unwrap();
    // The other tenant owns this session.
    let theirs = SessionId::random();
    let mut other = Client::new(&t.url, &t.other.key).unwrap();
    let mut their_frame = good.clone();
    their_frame.session_id = theirs;
    assert_eq!(
        other
            .post_frames(&[their_frame.clone()], Format::Binary)
            .await
            .unwrap()
            .status,
        200
    );
    let consumed_theirs = t.read_frames(&consumer, 1).await;
    assert_eq!(consumed_theirs[0].1.tenant_id, t.other.id);
    // And one this instance has never served: its row is only in the database.
    let stored = SessionId::random();
    sqlx::query(
        "WITH d AS (INSERT INTO devices (tenant_id, device_id) VALUES ($2, 'elsewhere')) \
         INSERT INTO ingest_sessions (session_id, tenant_id, device_id, sample_rate_hz, unit, channel_labels, source) \
         VALUES ($1, $2, 'elsewhere', 256, 'uV', '{Cz}', 'stream')",
    )
    .bind(stored.as_uuid())
    .bind(t.other.id.as_uuid())
    .execute(&t.db.pool)
    .await
    .unwrap();
    let mut stored_frame = good.clone();
    stored_frame.session_id = stored;

    let json = |f: &Frame| serde_json::to_value(JsonFrame::from_frame(f)).unwrap();
    let with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = json(&good);
        edit(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    let binary_of = |edit: &dyn Fn(&mut Frame)| {
        let mut f = good.clone();
        edit(&mut f);
        binary::encode_frames(&[f])
    };
    let key = t.tenant.key.clone();
    type Case<'a> = (
        &'a str,
        &'a str,
        Vec<u8>,
        Option<String>,
        u16,
        &'a str,
        Option<&'a str>,
    );
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            "application/json",
            b"{\"session_id\": ".to_vec(),
            None,
            400,
            "malformed_frame",
            None,
        ),
        (
            "not a frame",
            "application/json",
            b"42".to_vec(),
            None,
            400,
            "malformed_frame",
            None,
        ),
        (
            "empty batch",
            "application/json",
            b"[]".to_vec(),
            None,
            400,
            "malformed_frame",
            None,
        ),
        (
            "missing field",
            "application/json",
            with(&|v| {
                v.as_object_mut().unwrap().remove("seq");
            }),
            None,
            422,
            "invalid_field",
            Some("seq"),
        ),
        (
            "unknown field",
            "application/json",
            with(&|v| {
                v["sample_rate"] = 256.into();
            }),
            None,
            422,
            "invalid_field",
            Some("sample_rate"),
        ),
        (
            "infinite sample (JSON overflow)",
            "application/json",
            String::from_utf8(with(&|_| {}))
                .unwrap()
                .replacen("[[", "[[1e999,", 1)
                .into_bytes(),
            None,
            422,
            "invalid_field",
            None,
        ),
        (
            "huge sample",
            "application/json",
            with(&|v| {
                v["samples"][0][0] = serde_json::json!(1e300);
            }),
            None,
            422,
            "non_finite_sample",
            Some("samples[0][0]"),
        ),
        (
            "NaN sample (binary)",
            binary::CONTENT_TYPE,
            binary_of(&|f| f.samples[7] = f32::NAN),
            None,
            422,
            "non_finite_sample",
            Some("samples[0][7]"),
        ),
        (
            "Inf sample (binary)",
            binary::CONTENT_TYPE,
            binary_of(&|f| f.samples[40] = f32::NEG_INFINITY),
            None,
            422,
            "non_finite_sample",
            Some("samples[1][8]"),
        ),
        (
            "fewer sample arrays than channels",
            "application/json",
            with(&|v| {
                v["samples"].as_array_mut().unwrap().pop();
            }),
            None,
            422,
            "wrong_sample_count",
            Some("samples"),
        ),
        (
            "ragged channels",
            "application/json",
            with(&|v| {
                v["samples"][2].as_array_mut().unwrap().pop();
            }),
            None,
            422,
            "wrong_sample_count",
            Some("samples[2]"),
        ),
        (
            "no channels",
            binary::CONTENT_TYPE,
            binary_of(&|f| {
                f.channel_labels.clear();
                f.samples.clear();
            }),
            None,
            422,
            "bad_channels",
            Some("channels"),
        ),
        (
            "zero rate",
            "application/json",
            with(&|v| {
                v["sample_rate_hz"] = 0.into();
            }),
            None,
            422,
            "bad_sample_rate",
            Some("sample_rate_hz"),
        ),
        (
            "negative rate",
            binary::CONTENT_TYPE,
            binary_of(&|f| f.sample_rate_hz = -256.0),
            None,
            422,
            "bad_sample_rate",
            Some("sample_rate_hz"),
        ),
        (
            "absurd rate",
            "application/json",
            with(&|v| {
                v["sample_rate_hz"] = 5e9.into();
            }),
            None,
            422,
            "bad_sample_rate",
            Some("sample_rate_hz"),
        ),
        (
            "frame too long",
            binary::CONTENT_TYPE,
            binary_of(&|f| {
                f.samples_per_channel = 60_000;
                f.samples = vec![0.0; 4 * 60_000];
            }),
            None,
            413,
            "frame_too_large",
            Some("samples"),
        ),
        (
            "device time 1970",
            "application/json",
            with(&|v| {
                v["device_time_us"] = 0.into();
            }),
            None,
            422,
            "bad_device_time",
            Some("device_time"),
        ),
        (
            "bad session id",
            "application/json",
            with(&|v| {
                v["session_id"] = "not-a-uuid".into();
            }),
            None,
            422,
            "invalid_field",
            Some("session_id"),
        ),
        (
            "bad unit",
            "application/json",
            with(&|v| {
                v["unit"] = "furlong".into();
            }),
            None,
            422,
            "invalid_field",
            Some("unit"),
        ),
        (
            "truncated binary",
            binary::CONTENT_TYPE,
            binary_of(&|_| {})[..50].to_vec(),
            None,
            400,
            "malformed_frame",
            None,
        ),
        (
            "garbage binary item",
            binary::CONTENT_TYPE,
            vec![0, 0, 0, 4, 1, 2, 3, 4],
            None,
            400,
            "malformed_frame",
            None,
        ),
        (
            "wrong content type",
            "text/plain",
            with(&|_| {}),
            None,
            415,
            "unsupported_media_type",
            None,
        ),
        (
            "no key",
            "application/json",
            with(&|_| {}),
            Some(String::new()),
            401,
            "unauthorized",
            None,
        ),
        (
            "unknown key",
            "application/json",
            with(&|_| {}),
            Some(format!("{key}x")),
            401,
            "invalid_key",
            None,
        ),
        (
            "revoked key",
            "application/json",
            with(&|_| {}),
            Some(t.tenant.revoked_key.clone()),
            401,
            "invalid_key",
            None,
        ),
        (
            "read-only key",
            "application/json",
            with(&|_| {}),
            Some(t.tenant.read_key.clone()),
            403,
            "forbidden_scope",
            None,
        ),
        (
            "another tenant's session",
            binary::CONTENT_TYPE,
            binary::encode_frames(&[their_frame.clone()]),
            None,
            403,
            "session_forbidden",
            Some("session_id"),
        ),
        (
            "another tenant's session, in the database only",
            binary::CONTENT_TYPE,
            binary::encode_frames(&[stored_frame.clone()]),
            None,
            403,
            "session_forbidden",
            Some("session_id"),
        ),
    ];
    let mut client = t.client();
    let mut failures = Vec::new();
    for (name, ct, body, key, status, code, field) in cases {
        let a = client
            .send("POST", "/v1/frames", Some(ct), body, key.as_deref())
            .await
            .unwrap();
        let v = a.json();
        let got = (
            a.status,
            v["error"]["code"].as_str().unwrap_or(""),
            v["error"]["field"].as_str(),
        );
        if got != (status, code, field) {
            failures.push(format!(
                "{name}: expected {:?}, got {got:?}: {}",
                (status, code, field),
                String::from_utf8_lossy(&a.body)
            ));
        }
        if v["error"]["message"].as_str().is_none_or(str::is_empty) {
            failures.push(format!("{name}: no message"));
        }
    }
    // An oversize body: 413, whether or not the client manages to send all of it.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let s = tokio::net::TcpStream::connect(t.url.trim_start_matches("http://"))
            .await
            .unwrap();
        let (mut r, mut w) = s.into_split();
        let size = 17 * 1024 * 1024;
        let head = format!(
            "POST /v1/frames HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {size}\r\n\r\n"
        );
        let writer = tokio::spawn(async move {
            let _ = w.write_all(head.as_bytes()).await;
            let _ = w.write_all(&vec![b' '; size]).await;
        });
        let mut answer = Vec::new();
        let mut buf = vec![0; 4096];
        while !String::from_utf8_lossy(&answer).contains("}}") {
            match tokio::time::timeout(Duration::from_secs(20), r.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        writer.abort();
        let answer = String::from_utf8_lossy(&answer);
        if !(answer.starts_with("HTTP/1.1 413") && answer.contains("body_too_large")) {
            failures.push(format!("oversize body: {answer}"));
        }
    }
    // The legacy contract has the same checks.
    for (name, body, status) in [
        ("legacy malformed", b"{".to_vec(), 400u16),
        (
            "legacy absurd rate",
            br#"{"timestamp":"2026-11-25T10:00:00Z","channels":[1.0,2.0],"sample_rate":0}"#
                .to_vec(),
            422,
        ),
        (
            "legacy no channels",
            br#"{"timestamp":"2026-11-25T10:00:00Z","channels":[],"sample_rate":256}"#.to_vec(),
            422,
        ),
    ] {
        let a = client
            .post("/collect", "application/json", body)
            .await
            .unwrap();
        if a.status != status {
            failures.push(format!(
                "{name}: {} {}",
                a.status,
                String::from_utf8_lossy(&a.body)
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    // Nor did any of it leave a session or a device behind.
    let left: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM ingest_sessions WHERE tenant_id = $1), \
                (SELECT count(*) FROM devices WHERE tenant_id = $1)",
    )
    .bind(t.tenant.id.as_uuid())
    .fetch_one(&t.db.pool)
    .await
    .unwrap();
    assert_eq!(left, (0, 0), "sessions and devices of refused frames");
    // Nothing of the above was published: the next record is this sentinel.
    assert_eq!(
        t.post(std::slice::from_ref(&good), Format::Binary)
            .await
            .status,
        200
    );
    let next = t.read_frames(&consumer, 1).await;
    assert_eq!(
        (next[0].1.session_id, next[0].1.tenant_id),
        (session, t.tenant.id)
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_legacy_collect_contract_keeps_working() {
    let t = TestIngest::spawn().await;
    let consumer = t.frames_consumer();
    let mut client = t.client();
    let mut ids = Vec::new();
    for i in 0..3 {
        let body = format!(
            r#"{{"timestamp":"2026-11-25T10:00:0{i}Z","channels":[1.5,-2.0,{i}],"sample_rate":256}}"#
        );
        let a = client
            .post("/collect", "application/json", body.into_bytes())
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        assert_eq!(a.json()["status"], "accepted");
        ids.push(a.json()["frame_id"].as_str().unwrap().to_owned());
    }
    let session = ids[0].split(':').next().unwrap().to_owned();
    assert_eq!(
        ids,
        (0..3).map(|i| format!("{session}:{i}")).collect::<Vec<_>>()
    );
    let got = t.read_frames(&consumer, 3).await;
    for (i, (_, f)) in got.iter().enumerate() {
        assert_eq!(f.session_id.to_string(), session);
        assert_eq!(f.seq, i as u64);
        assert_eq!(f.channel_labels, ["ch1", "ch2", "ch3"]);
        assert_eq!(f.samples, [1.5, -2.0, i as f32]);
        assert_eq!(f.tenant_id, t.tenant.id);
        assert_eq!(f.device_id.as_str(), "legacy");
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_meters_usage_and_exposes_metrics_health_and_readiness() {
    let t = TestIngest::spawn().await;
    let usage = t.env.consumer(&[&t.usage_topic()]);
    let session = SessionId::random();
    let sent = frames(session, 12, 4, 32);
    assert_eq!(t.post(&sent, Format::Binary).await.status, 200);
    let events: Vec<UsageEvent> = t
        .env
        .consume(&usage, 2, Duration::from_secs(30))
        .await
        .iter()
        .map(|r| decode(&r.value).unwrap())
        .collect();
    let frames_ingested: i64 = events
        .iter()
        .filter(|e| e.kind == UsageKind::FramesIngested)
        .map(|e| e.quantity)
        .sum();
    assert_eq!(frames_ingested, 12);
    assert!(events
        .iter()
        .all(|e| e.tenant_id == t.tenant.id && e.session_id == Some(session)));
    let mut client = t.client();
    assert_eq!(client.get("/health").await.unwrap().status, 200);
    assert_eq!(client.get("/ready").await.unwrap().status, 200);
    let metrics = String::from_utf8(client.get("/metrics").await.unwrap().body.to_vec()).unwrap();
    for needle in [
        "alba_frames_processed_total{transport=\"http\"} 12",
        "alba_publish_latency_seconds_bucket",
        "alba_bytes_received_total{transport=\"http\"}",
        "alba_broker_up 1",
        "alba_usage_events_total",
    ] {
        assert!(metrics.contains(needle), "{needle} not in\n{metrics}");
    }
    // The producer's statistics reach the metrics at their next report (every
    // `PRODUCER_STATS_INTERVAL` here): the frames' produce request, its round trip, and the frames' queue wait.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8(client.get("/metrics").await.unwrap().body.to_vec()).unwrap();
        let m = |name: &str| metric(&text, name);
        let requests = m("alba_producer_produce_requests_total");
        if requests >= 1.0
            && m("alba_producer_round_trips_total") >= requests
            && m("alba_producer_queued_records_total") >= 12.0
        {
            assert!(m("alba_producer_sent_bytes_total") > 0.0, "{text}");
            assert!(m("alba_producer_round_trip_seconds_total") > 0.0, "{text}");
            assert!(m("alba_producer_queue_wait_seconds_total") > 0.0, "{text}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the producer's statistics never reached the metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut bad = sent[0].clone();
    bad.seq = 99;
    bad.samples[0] = f32::NAN;
    t.post(&[bad], Format::Binary).await;
    let metrics = String::from_utf8(client.get("/metrics").await.unwrap().body.to_vec()).unwrap();
    assert!(
        metrics.contains("alba_frames_rejected_total{reason=\"non_finite_sample\"} 1"),
        "{metrics}"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_open_streams_after_their_answers() {
    let t = TestIngest::spawn().await;
    let session = SessionId::random();
    let sent = frames(session, 4, 4, 16);
    let (mut c, _) = Connection::open(&t.url, &t.tenant.key, session)
        .await
        .unwrap();
    c.send_frames(&sent, Format::Binary).await.unwrap();
    match c.next().await.unwrap() {
        Some(ServerMessage::Ack { frames: 4, .. }) => {}
        other => panic!("{other:?}"),
    }
    t.shutdown.cancel();
    let closed = tokio::time::timeout(Duration::from_secs(10), c.next()).await;
    assert!(
        matches!(closed, Ok(Ok(None))),
        "the stream is closed: {closed:?}"
    );
    let stopped = tokio::time::timeout(Duration::from_secs(30), t.server).await;
    assert!(
        matches!(stopped, Ok(Ok(Ok(())))),
        "ingest stops: {stopped:?}"
    );
    t.db.drop_now().await;
}
