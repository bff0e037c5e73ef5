//! The results sink's Postgres side: session states, feature records and audio chunks
//! from their topics into the `sessions`, `features` and `audio_chunks` tables
//! (`gateway/migrations/20261125000002_results.sql`), which the gateway's results API
//! reads. Knows nothing of Kafka: the runtime's sink loop hands it decoded batches and
//! commits the topics' offsets only after [`Results::write`] returned.
//!
//! Every write is idempotent, so a batch written twice (a crash between the database
//! commit and the offset commit, a rebalance, a replay) changes nothing:
//! - features and audio chunks are keyed like their records and inserted with
//!   `ON CONFLICT DO NOTHING` (stages are deterministic: a record written again is the
//!   same record);
//! - an audio chunk's PCM goes to the audio store as FLAC before its row, under a key
//!   derived from its bytes, so a chunk written again reuses its object (see
//!   [`objects`] for the order of the writes and the sweep that collects objects no
//!   row names);
//! - a session's row is replaced only by a state at least as far along (more frames
//!   processed, or the same and ended), so an old state re-read cannot undo a newer one.
//!
//! Results are deleted when their tenant's plan no longer keeps them: see
//! [`retention`].
//!
//! One batch is one transaction. On commit, Postgres delivers one notification per
//! session and kind on [`CHANNEL`], which the gateway's live stream listens to: by then
//! the rows are readable.

use std::collections::BTreeSet;

pub mod objects;
pub mod retention;

use clisonix_audio::AudioStore;
use clisonix_schemas::{AudioChunk, Features, SessionState, SessionStatus};
use sqlx::{PgPool, Postgres, QueryBuilder, Transaction};

use crate::objects::EncodedChunk;

/// The `LISTEN` channel the sink notifies on commit. Payload: `<kind>:<session id>`,
/// kind one of `features`, `audio`, `session`.
pub const CHANNEL: &str = "clisonix_results";

/// A decoded record for the sink.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkRecord {
    Session(SessionState),
    Features(Box<Features>),
    Audio(AudioChunk),
}

impl SinkRecord {
    /// The table a record goes to (for metrics).
    pub fn table(&self) -> &'static str {
        match self {
            SinkRecord::Session(_) => "sessions",
            SinkRecord::Features(_) => "features",
            SinkRecord::Audio(_) => "audio_chunks",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("writing results to Postgres: {0}")]
    Database(#[from] sqlx::Error),
    #[error("writing audio: {0}")]
    Audio(#[from] clisonix_audio::StoreError),
    #[error("encoding audio: {0}")]
    Encode(#[from] clisonix_audio::flac::FlacError),
    #[error("the audio encoder panicked: {0}")]
    Panicked(String),
}

/// Rows a batch inserted or updated (fewer than its records when some were already
/// there).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    pub sessions: u64,
    pub features: u64,
    pub audio_chunks: u64,
}

/// Features per INSERT statement (its arrays bound the statement's size, not the
/// number of parameters).
const FEATURE_ROWS_PER_STATEMENT: usize = 1_500;
const AUDIO_ROWS_PER_STATEMENT: usize = 200;

/// The results database and the audio store beside it.
#[derive(Debug, Clone)]
pub struct Results {
    pool: PgPool,
    audio: AudioStore,
}

fn status(s: SessionStatus) -> &'static str {
    match s {
        SessionStatus::Active => "active",
        SessionStatus::Ended => "ended",
    }
}

fn micros(
    t: clisonix_schemas::Timestamp,
) -> sqlx::types::chrono::DateTime<sqlx::types::chrono::Utc> {
    sqlx::types::chrono::DateTime::from_timestamp_micros(t.as_micros())
        .unwrap_or(sqlx::types::chrono::DateTime::UNIX_EPOCH)
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Results {
    pub fn new(pool: PgPool, audio: AudioStore) -> Results {
        Results { pool, audio }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn audio(&self) -> &AudioStore {
        &self.audio
    }

    /// Writes a batch in one transaction and notifies the sessions it touched. Its
    /// audio chunks' objects are written first (see [`objects`]).
    pub async fn write(&self, records: &[&SinkRecord]) -> Result<Written, WriteError> {
        let chunks: Vec<&AudioChunk> = records
            .iter()
            .filter_map(|r| match r {
                SinkRecord::Audio(a) => Some(a),
                _ => None,
            })
            .collect();
        let encoded = objects::encode(&chunks).await?;
        if !encoded.is_empty() {
            self.will_write(&encoded).await?;
        }
        let mut tx = self.pool.begin().await?;
        if !encoded.is_empty() {
            objects::hold_sweep(&mut tx).await?;
            self.put_objects(&encoded).await?;
        }
        let mut written = Written::default();
        let mut touched: BTreeSet<(&'static str, uuid::Uuid)> = BTreeSet::new();
        let mut features: Vec<&Features> = Vec::new();
        for r in records.iter().copied() {
            match r {
                SinkRecord::Session(s) => {
                    written.sessions += upsert_session(&mut tx, s).await?;
                    touched.insert(("session", s.session_id.as_uuid()));
                }
                SinkRecord::Features(f) => {
                    touched.insert(("features", f.session_id.as_uuid()));
                    features.push(f);
                }
                SinkRecord::Audio(a) => {
                    touched.insert(("audio", a.session_id.as_uuid()));
                }
            }
        }
        for part in features.chunks(FEATURE_ROWS_PER_STATEMENT) {
            written.features += insert_features(&mut tx, part).await?;
        }
        for part in encoded.chunks(AUDIO_ROWS_PER_STATEMENT) {
            written.audio_chunks += insert_audio(&mut tx, part).await?;
        }
        // One statement for every session touched (a round trip each was most of a
        // batch's statements at a hundred devices).
        if !touched.is_empty() {
            let payloads: Vec<String> = touched
                .iter()
                .map(|(kind, session)| format!("{kind}:{session}"))
                .collect();
            sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
                .bind(CHANNEL)
                .bind(&payloads)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(written)
    }
}

async fn upsert_session(
    tx: &mut Transaction<'_, Postgres>,
    s: &SessionState,
) -> Result<u64, sqlx::Error> {
    let (ended_at, end_reason) = match s.ended {
        Some((at, reason)) => (Some(micros(at)), Some(reason.as_str())),
        None => (None, None::<&str>),
    };
    let done = sqlx::query(
        "INSERT INTO sessions (session_id, tenant_id, device_id, status, started_at, last_frame_at, \
             first_device_time, last_device_time, sample_rate_hz, channel_labels, frames, \
             samples_per_channel, seq_gaps, duplicate_frames, out_of_order_frames, ended_at, end_reason) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
         ON CONFLICT (session_id) DO UPDATE SET \
             status = EXCLUDED.status, last_frame_at = EXCLUDED.last_frame_at, \
             first_device_time = EXCLUDED.first_device_time, last_device_time = EXCLUDED.last_device_time, \
             frames = EXCLUDED.frames, samples_per_channel = EXCLUDED.samples_per_channel, \
             seq_gaps = EXCLUDED.seq_gaps, duplicate_frames = EXCLUDED.duplicate_frames, \
             out_of_order_frames = EXCLUDED.out_of_order_frames, ended_at = EXCLUDED.ended_at, \
             end_reason = EXCLUDED.end_reason, updated_at = now() \
         WHERE sessions.tenant_id = EXCLUDED.tenant_id \
           AND (EXCLUDED.frames + EXCLUDED.duplicate_frames, EXCLUDED.status = 'ended') \
             >= (sessions.frames + sessions.duplicate_frames, sessions.status = 'ended')",
    )
    .bind(s.session_id.as_uuid())
    .bind(s.tenant_id.as_uuid())
    .bind(s.device_id.as_str())
    .bind(status(s.status))
    .bind(micros(s.started_at))
    .bind(micros(s.last_frame_at))
    .bind(micros(s.first_device_time))
    .bind(micros(s.last_device_time))
    .bind(s.sample_rate_hz)
    .bind(&s.channel_labels)
    .bind(i64_of(s.frames))
    .bind(i64_of(s.samples_per_channel))
    .bind(i64_of(s.seq_gaps))
    .bind(i64_of(s.duplicate_frames))
    .bind(i64_of(s.out_of_order_frames))
    .bind(ended_at)
    .bind(end_reason)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected())
}

/// The PSD as stored: little-endian f64 per bin.
pub fn psd_bytes(psd: &[f64]) -> Vec<u8> {
    psd.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Inserts feature rows in one statement whose text never changes (the rows travel as
/// one array per column), so Postgres parses and plans it once per connection rather
/// than once per batch size.
async fn insert_features(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[&Features],
) -> Result<u64, sqlx::Error> {
    fn col<'a, T>(rows: &[&'a Features], f: impl Fn(&'a Features) -> T) -> Vec<T> {
        rows.iter().map(|r| f(r)).collect()
    }
    let done = sqlx::query(
        "INSERT INTO features (session_id, window_index, channel_index, tenant_id, channel_label, \
         window_start, window_start_sample, window_samples, sample_rate_hz, unit, algorithm_version, \
         abs_delta, abs_theta, abs_alpha, abs_beta, abs_gamma, total_abs, \
         rel_delta, rel_theta, rel_alpha, rel_beta, rel_gamma, peak_alpha_hz, peak_alpha_psd, \
         spectral_entropy, hjorth_activity, hjorth_mobility, hjorth_complexity, aperiodic_exponent, \
         flat, clipped_fraction, line_noise_50hz, line_noise_60hz, seq_gaps, duplicate_frames, \
         out_of_order_frames, psd_resolution_hz, psd) \
         SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::int[], $4::uuid[], $5::text[], \
             $6::timestamptz[], $7::bigint[], $8::int[], $9::float8[], $10::text[], $11::text[], \
             $12::float8[], $13::float8[], $14::float8[], $15::float8[], $16::float8[], $17::float8[], \
             $18::float8[], $19::float8[], $20::float8[], $21::float8[], $22::float8[], \
             $23::float8[], $24::float8[], $25::float8[], $26::float8[], $27::float8[], \
             $28::float8[], $29::float8[], $30::bool[], $31::float8[], $32::float8[], \
             $33::float8[], $34::int[], $35::int[], $36::int[], $37::float8[], $38::bytea[]) \
         ON CONFLICT (session_id, window_index, channel_index) DO NOTHING",
    )
    .bind(col(rows, |f| f.session_id.as_uuid()))
    .bind(col(rows, |f| i64_of(f.window_index)))
    .bind(col(rows, |f| f.channel_index as i32))
    .bind(col(rows, |f| f.tenant_id.as_uuid()))
    .bind(col(rows, |f| f.channel_label.as_str()))
    .bind(col(rows, |f| micros(f.window_start)))
    .bind(col(rows, |f| i64_of(f.window_start_sample)))
    .bind(col(rows, |f| f.window_samples as i32))
    .bind(col(rows, |f| f.sample_rate_hz))
    .bind(col(rows, |f| f.unit.symbol()))
    .bind(col(rows, |f| f.algorithm_version.as_str()))
    .bind(col(rows, |f| f.abs.delta))
    .bind(col(rows, |f| f.abs.theta))
    .bind(col(rows, |f| f.abs.alpha))
    .bind(col(rows, |f| f.abs.beta))
    .bind(col(rows, |f| f.abs.gamma))
    .bind(col(rows, |f| f.total_abs))
    .bind(col(rows, |f| f.rel.delta))
    .bind(col(rows, |f| f.rel.theta))
    .bind(col(rows, |f| f.rel.alpha))
    .bind(col(rows, |f| f.rel.beta))
    .bind(col(rows, |f| f.rel.gamma))
    .bind(col(rows, |f| f.peak_alpha_hz))
    .bind(col(rows, |f| f.peak_alpha_psd))
    .bind(col(rows, |f| f.spectral_entropy))
    .bind(col(rows, |f| f.hjorth.activity))
    .bind(col(rows, |f| f.hjorth.mobility))
    .bind(col(rows, |f| f.hjorth.complexity))
    .bind(col(rows, |f| f.aperiodic_exponent))
    .bind(col(rows, |f| f.quality.flat))
    .bind(col(rows, |f| f.quality.clipped_fraction))
    .bind(col(rows, |f| f.quality.line_noise_50hz))
    .bind(col(rows, |f| f.quality.line_noise_60hz))
    .bind(col(rows, |f| f.quality.seq_gaps as i32))
    .bind(col(rows, |f| f.quality.duplicate_frames as i32))
    .bind(col(rows, |f| f.quality.out_of_order_frames as i32))
    .bind(col(rows, |f| f.psd_resolution_hz))
    .bind(col(rows, |f| psd_bytes(&f.psd)))
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected())
}

/// PCM as stored inline by earlier versions, and as the live stream and the WAV file
/// carry it: signed 16-bit little-endian.
pub fn pcm_bytes(pcm: &[i16]) -> Vec<u8> {
    pcm.iter().flat_map(|v| v.to_le_bytes()).collect()
}

async fn insert_audio(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[EncodedChunk<'_>],
) -> Result<u64, sqlx::Error> {
    let mut q: QueryBuilder<Postgres> = QueryBuilder::new(
        "INSERT INTO audio_chunks (session_id, preset, chunk_index, tenant_id, preset_version, \
         start_frame, frames, eeg_start, sample_rate_hz, channels, source_first_seq, \
         source_last_seq, object_key, object_bytes) ",
    );
    q.push_values(rows, |mut b, e| {
        let a = e.chunk;
        let frames = a.pcm.len() / usize::from(a.channels.max(1));
        b.push_bind(a.session_id.as_uuid())
            .push_bind(&a.preset)
            .push_bind(i64_of(a.chunk_index))
            .push_bind(a.tenant_id.as_uuid())
            .push_bind(&a.preset_version)
            .push_bind(i64_of(a.start_frame))
            .push_bind(frames as i64)
            .push_bind(micros(a.eeg_start))
            .push_bind(a.sample_rate_hz as i32)
            .push_bind(i16::try_from(a.channels).unwrap_or(i16::MAX))
            .push_bind(i64_of(a.source_first_seq))
            .push_bind(i64_of(a.source_last_seq))
            .push_bind(e.key.as_str())
            .push_bind(i32::try_from(e.flac.len()).unwrap_or(i32::MAX));
    });
    q.push(" ON CONFLICT (session_id, preset, chunk_index) DO NOTHING");
    Ok(q.build().execute(&mut **tx).await?.rows_affected())
}
