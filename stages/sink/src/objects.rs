//! Audio chunks' objects, and the order of the writes that keeps every index row's
//! audio readable:
//!
//! 1. the batch's chunks are encoded as FLAC, each keyed by its bytes
//!    ([`clisonix_audio::ObjectKey`]);
//! 2. their keys go into `audio_object_checks`, committed at once: from here on, an
//!    object whose row never comes is known;
//! 3. the batch's transaction takes the sweep's advisory lock ([`LOCK`]) shared, the
//!    objects are written, then the rows (naming their objects) and the commit.
//!
//! A sink killed anywhere leaves either nothing a reader can see (rows are committed
//! last) or complete rows with their objects. Re-reading the batch writes the same
//! bytes under the same keys: the objects are reused. An object that never gets a row
//! (the chunk is never re-read; or a chunk rendered again differently, whose row keeps
//! its first object) stays in `audio_object_checks`, and [`Results::sweep_objects`]
//! deletes it once the check is older than a grace period. The sweep holds [`LOCK`]
//! exclusively while it decides and deletes, so it never runs between a batch's
//! objects and its commit: an object it finds without a row has none on its way.

use std::time::Duration;

use bytes::Bytes;
use clisonix_audio::{flac, ObjectKey};
use clisonix_schemas::AudioChunk;
use futures::{StreamExt, TryStreamExt};
use sqlx::types::chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};

use crate::{Results, WriteError};

/// The advisory lock between the sink's audio writes (shared) and the sweep
/// (exclusive); any constant the other locks do not use.
pub const LOCK: i64 = 0x636c_6973_6175_6f62; // "clisauob"

/// Objects written or deleted at once.
const CONCURRENT_OBJECTS: usize = 16;

/// How long a sweep waits for the batches in flight to let go of [`LOCK`].
const SWEEP_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// A chunk with its FLAC bytes and key.
#[derive(Debug)]
pub(crate) struct EncodedChunk<'a> {
    pub chunk: &'a AudioChunk,
    pub key: ObjectKey,
    pub flac: Bytes,
}

/// Encodes the chunks as FLAC on the blocking pool (about 1.8 ms per second of audio).
pub(crate) async fn encode<'a>(
    chunks: &[&'a AudioChunk],
) -> Result<Vec<EncodedChunk<'a>>, WriteError> {
    if chunks.is_empty() {
        return Ok(Vec::new());
    }
    let inputs: Vec<(Vec<i16>, u16, u32)> = chunks
        .iter()
        .map(|c| (c.pcm.clone(), c.channels, c.sample_rate_hz))
        .collect();
    let encoded = tokio::task::spawn_blocking(move || {
        inputs
            .iter()
            .map(|(pcm, channels, rate)| flac::encode(pcm, *channels, *rate))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| WriteError::Panicked(e.to_string()))??;
    Ok(chunks
        .iter()
        .zip(encoded)
        .map(|(&chunk, flac)| EncodedChunk {
            chunk,
            key: ObjectKey::new(
                chunk.tenant_id.as_uuid(),
                chunk.session_id.as_uuid(),
                &chunk.preset,
                chunk.chunk_index,
                &flac,
            ),
            flac: Bytes::from(flac),
        })
        .collect())
}

/// Takes the sweep's lock shared for the rest of the transaction.
pub(crate) async fn hold_sweep(tx: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
        .bind(LOCK)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Checks done (objects looked at).
    pub checked: u64,
    /// Objects deleted because no row names them.
    pub deleted: u64,
}

impl Results {
    /// Step 2: the keys about to be written, committed before any object is.
    pub(crate) async fn will_write(&self, chunks: &[EncodedChunk<'_>]) -> Result<(), WriteError> {
        // Each key once: a batch may hold a chunk twice (a record produced again), and
        // one statement cannot update a row twice.
        let keys: Vec<&str> = chunks
            .iter()
            .map(|c| c.key.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        sqlx::query(
            "INSERT INTO audio_object_checks (object_key) SELECT unnest($1::text[]) \
             ON CONFLICT (object_key) DO UPDATE SET created_at = now()",
        )
        .bind(&keys)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Step 3: the objects, several at once.
    pub(crate) async fn put_objects(&self, chunks: &[EncodedChunk<'_>]) -> Result<(), WriteError> {
        let puts: Vec<_> = chunks
            .iter()
            .map(|c| {
                let (store, key, bytes) = (self.audio.clone(), c.key.clone(), c.flac.clone());
                async move { store.put(&key, bytes).await }
            })
            .collect();
        futures::stream::iter(puts)
            .buffer_unordered(CONCURRENT_OBJECTS)
            .try_collect::<()>()
            .await?;
        Ok(())
    }

    /// Deletes the objects no row names among the checks older than `grace` at `now`,
    /// up to `batch` checks per transaction, until none is due. `None`: the sink's
    /// writes held the lock past the timeout (the next sweep tries again).
    pub async fn sweep_objects(
        &self,
        now: DateTime<Utc>,
        grace: Duration,
        batch: i64,
    ) -> Result<Option<Swept>, WriteError> {
        let before = now - grace;
        let mut total = Swept::default();
        loop {
            let mut tx = self.pool.begin().await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SET LOCAL lock_timeout = '{}ms'",
                SWEEP_LOCK_TIMEOUT.as_millis()
            )))
            .execute(&mut *tx)
            .await?;
            match sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(LOCK)
                .execute(&mut *tx)
                .await
            {
                Ok(_) => {}
                // lock_not_available: batches kept it; another sweep will come.
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
                    return Ok(None)
                }
                Err(e) => return Err(e.into()),
            }
            let due: Vec<(String, bool)> = sqlx::query_as(
                "WITH due AS ( \
                     SELECT object_key FROM audio_object_checks WHERE created_at < $1 \
                     ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 DELETE FROM audio_object_checks c USING due WHERE c.object_key = due.object_key \
                 RETURNING c.object_key, \
                     EXISTS (SELECT 1 FROM audio_chunks a WHERE a.object_key = c.object_key)",
            )
            .bind(before)
            .bind(batch)
            .fetch_all(&mut *tx)
            .await?;
            let orphans: Vec<ObjectKey> = due
                .iter()
                .filter(|(_, named)| !named)
                .filter_map(|(key, _)| ObjectKey::parse(key))
                .collect();
            // Deleted before the checks go: a failure leaves the checks for next time.
            let deletes: Vec<_> = orphans
                .iter()
                .map(|k| {
                    let (store, key) = (self.audio.clone(), k.clone());
                    async move { store.delete(&key).await }
                })
                .collect();
            futures::stream::iter(deletes)
                .buffer_unordered(CONCURRENT_OBJECTS)
                .try_collect::<()>()
                .await?;
            tx.commit().await?;
            total.checked += due.len() as u64;
            total.deleted += orphans.len() as u64;
            if (due.len() as i64) < batch {
                return Ok(Some(total));
            }
        }
    }
}
