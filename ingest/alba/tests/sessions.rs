//! Sessions across ingest instances, against the real broker and Postgres: one
//! instance serves a session at a time; frames sent to another are handed over with
//! no duplicate and no gap; a crashed instance's sessions are taken over once their
//! leases run out; the state written to `ingest_sessions` follows what was published.

mod common;

use std::time::{Duration, Instant};

use clisonix_ingest_protocol::FrameStatus;
use clisonix_player::http::{Answer, Client, Format};
use clisonix_schemas::{Frame, SessionId};
use common::{frames, TestIngest};

async fn post(url: &str, key: &str, frames: &[Frame]) -> Answer {
    Client::new(url, key)
        .unwrap()
        .post_frames(frames, Format::Binary)
        .await
        .unwrap()
}

/// Accepted and duplicate counts of a 200 answer.
fn counts(a: &Answer) -> (usize, usize) {
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let b = a.batch().unwrap();
    assert_eq!(b.rejected, 0, "{b:?}");
    (b.accepted, b.duplicates)
}

/// The session's row: last_seq, frames, and whether an instance holds it.
async fn row(t: &TestIngest, session: SessionId) -> (i64, i64, bool) {
    sqlx::query_as(
        "SELECT last_seq, frames, owner IS NOT NULL FROM ingest_sessions WHERE session_id = $1",
    )
    .bind(session.as_uuid())
    .fetch_one(&t.db.pool)
    .await
    .unwrap()
}

/// Waits until the session's row says `want` (the state is written every tick).
async fn row_becomes(t: &TestIngest, session: SessionId, want: (i64, i64, bool)) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = row(t, session).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the row stayed {got:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn published_seqs(
    t: &TestIngest,
    consumer: &rdkafka::consumer::StreamConsumer,
    count: usize,
) -> Vec<u64> {
    t.read_frames(consumer, count)
        .await
        .into_iter()
        .map(|(_, f)| f.seq)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moves_between_instances_with_no_duplicate_and_no_gap() {
    let t = TestIngest::spawn().await;
    let b = t.another(|_| {}).await;
    let key = t.tenant.key.clone();
    let session = SessionId::random();
    let sent = frames(session, 31, 8, 32);
    let consumer = t.frames_consumer();

    assert_eq!(counts(&post(&t.url, &key, &sent[..10]).await), (10, 0));
    // The state is written within a tick, and the row shows who holds the session.
    row_becomes(&t, session, (9, 10, true)).await;

    // The device reconnects through another instance and resends from 5: the first
    // instance hands the session over, and the resent frames are duplicates.
    let started = Instant::now();
    assert_eq!(counts(&post(&b.url, &key, &sent[5..20]).await), (10, 5));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the handover took {:?}",
        started.elapsed()
    );
    // And back again.
    assert_eq!(counts(&post(&t.url, &key, &sent[15..30]).await), (10, 5));
    assert_eq!(
        published_seqs(&t, &consumer, 30).await,
        (0..30).collect::<Vec<_>>()
    );

    // Another tenant cannot take the session from either instance.
    let foreign = post(&b.url, &t.other.key, &sent[29..30]).await;
    assert_eq!(
        foreign.status,
        403,
        "{}",
        String::from_utf8_lossy(&foreign.body)
    );

    // A stopped instance lets go of its sessions, writing their state first.
    // (The next frame, right after the resent one, shows nothing else was published.)
    assert_eq!(counts(&post(&b.url, &key, &sent[29..]).await), (1, 1));
    assert_eq!(published_seqs(&t, &consumer, 1).await, [30]);
    row_becomes(&t, session, (30, 31, true)).await;
    b.stop().await;
    assert_eq!(row(&t, session).await, (30, 31, false));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_instances_sessions_are_taken_over_once_their_leases_run_out() {
    let short = |c: &mut clisonix_alba::Config| {
        c.publish_timeout = Duration::from_secs(1);
        c.session_lease = Duration::from_secs(3);
        c.handoff_wait = Duration::from_millis(300);
    };
    let t = TestIngest::spawn().await;
    let a = t.another(short).await;
    let b = t.another(short).await;
    let key = t.tenant.key.clone();
    let session = SessionId::random();
    let sent = frames(session, 21, 8, 32);
    let consumer = t.frames_consumer();

    assert_eq!(counts(&post(&a.url, &key, &sent[..10]).await), (10, 0));
    row_becomes(&t, session, (9, 10, true)).await;
    a.crash().await;

    // Until the lease runs out the session is busy: retryable, with Retry-After.
    let busy = post(&b.url, &key, &sent[5..20]).await;
    assert_eq!(busy.status, 503, "{}", String::from_utf8_lossy(&busy.body));
    assert!(busy.headers.contains_key("retry-after"));
    let answer = busy.batch().unwrap();
    assert!(answer
        .results
        .iter()
        .all(|r| r.error.as_ref().is_some_and(|e| e.code == "session_busy")));

    // Then another instance takes it over from the state the crashed one wrote.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let taken = post(&b.url, &key, &sent[5..20]).await;
    assert_eq!(counts(&taken), (10, 5));
    assert!(taken
        .batch()
        .unwrap()
        .results
        .iter()
        .all(|r| r.status != FrameStatus::Rejected));
    assert_eq!(
        published_seqs(&t, &consumer, 20).await,
        (0..20).collect::<Vec<_>>()
    );
    assert_eq!(counts(&post(&b.url, &key, &sent[20..]).await), (1, 0));
    assert_eq!(published_seqs(&t, &consumer, 1).await, [20]);
    b.stop().await;
    assert_eq!(row(&t, session).await, (20, 21, false));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_being_streamed_is_refused_to_uploads_and_to_streams_elsewhere() {
    // Ticks so slow that nothing is written, or let go, during the test.
    let slow = |c: &mut clisonix_alba::Config| {
        c.session_tick = Duration::from_secs(20);
        c.session_lease = Duration::from_secs(120);
        c.handoff_wait = Duration::from_millis(500);
    };
    let t = TestIngest::spawn().await;
    let a = t.another(slow).await;
    let b = t.another(slow).await;
    let key = t.tenant.key.clone();
    let session = SessionId::random();
    let sent = frames(session, 3, 8, 32);
    assert_eq!(counts(&post(&a.url, &key, &sent).await), (3, 0));
    // The row does not show the frames yet, but the session is held: an upload into
    // it would mix a recording into a live stream.
    assert_eq!(row(&t, session).await, (-1, 0, true));
    let upload = Client::new(&a.url, &key)
        .unwrap()
        .post(
            &format!("/v1/recordings?session_id={session}"),
            "application/octet-stream",
            std::fs::read(common::recording_path()).unwrap()[..20_000].to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(
        upload.status,
        409,
        "{}",
        String::from_utf8_lossy(&upload.body)
    );
    assert_eq!(upload.json()["error"]["code"], "session_exists");
    // A stream opened on another instance waits for the handover, then is refused.
    let err = clisonix_player::stream::Connection::open(&b.url, &key, session)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("session_busy"), "{err}");
    // The instance serving it resumes the stream where it is.
    let (c, last) = clisonix_player::stream::Connection::open(&a.url, &key, session)
        .await
        .unwrap();
    assert_eq!(last, Some(2));
    c.close().await;
    a.stop().await;
    b.stop().await;
    assert_eq!(row(&t, session).await, (2, 3, false));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_claimed_again_after_its_writes_failed_keeps_what_was_published() {
    let short = |c: &mut clisonix_alba::Config| {
        c.publish_timeout = Duration::from_secs(1);
        c.session_lease = Duration::from_secs(3);
    };
    let t = TestIngest::spawn().await;
    let a = t.another(short).await;
    let key = t.tenant.key.clone();
    let session = SessionId::random();
    let sent = frames(session, 9, 8, 32);
    let consumer = t.frames_consumer();
    assert_eq!(counts(&post(&a.url, &key, &sent[..3]).await), (3, 0));
    row_becomes(&t, session, (2, 3, true)).await;

    // The state can no longer be written (nor the lease renewed), as when the database
    // refuses writes for a while.
    sqlx::query(
        "ALTER TABLE ingest_sessions ADD CONSTRAINT test_no_more CHECK (frames < 4) NOT VALID",
    )
    .execute(&t.db.pool)
    .await
    .unwrap();
    assert_eq!(counts(&post(&a.url, &key, &sent[3..6]).await), (3, 0));
    // Once the lease has less than its margin left, the next group claims the
    // session again; what was published meanwhile is still known.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(row(&t, session).await, (2, 3, true));
    assert_eq!(counts(&post(&a.url, &key, &sent[3..8]).await), (2, 3));

    sqlx::query("ALTER TABLE ingest_sessions DROP CONSTRAINT test_no_more")
        .execute(&t.db.pool)
        .await
        .unwrap();
    row_becomes(&t, session, (7, 8, true)).await;
    assert_eq!(
        published_seqs(&t, &consumer, 8).await,
        (0..8).collect::<Vec<_>>()
    );
    assert_eq!(counts(&post(&a.url, &key, &sent[8..]).await), (1, 0));
    assert_eq!(published_seqs(&t, &consumer, 1).await, [8]);
    a.stop().await;
    assert_eq!(row(&t, session).await, (8, 9, false));
    t.stop().await;
}
