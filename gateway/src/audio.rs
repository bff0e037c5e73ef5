//! Reading audio chunks: their FLAC objects in the audio store (what the sink writes),
//! or their PCM inline in Postgres (rows written before the store existed).

use axum::body::Bytes;
use axum::http::StatusCode;
use clisonix_audio::{flac, AudioStore, ObjectKey, StoreError};
use sqlx::postgres::PgRow;
use sqlx::Row;

use crate::error::ApiError;

/// The columns [`Stored::from_row`] reads.
pub const COLUMNS: &str = "pcm, object_key, sample_rate_hz, channels";

/// Where a chunk's audio is.
#[derive(Debug, Clone)]
pub enum Stored {
    /// 16-bit little-endian PCM in the row.
    Inline {
        pcm: Vec<u8>,
        channels: u16,
        sample_rate_hz: u32,
    },
    Object(ObjectKey),
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("this gateway has no audio store (CLISONIX_AUDIO_STORE) to read {0} from")]
    NoStore(ObjectKey),
    #[error("a chunk's row names no readable object: {0:?}")]
    BadKey(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Flac(#[from] flac::FlacError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("the audio codec panicked: {0}")]
    Panicked(String),
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> ApiError {
        tracing::error!(error = %e, "reading audio failed");
        match e {
            ReadError::NoStore(_) | ReadError::Store(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "audio_store_unavailable",
                "the audio store cannot be read now; try again later",
            ),
            _ => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "reading the audio failed",
            ),
        }
    }
}

impl Stored {
    pub fn from_row(row: &PgRow) -> Result<Stored, ReadError> {
        let key: Option<String> = row.try_get("object_key")?;
        Ok(match key {
            Some(k) => Stored::Object(ObjectKey::parse(&k).ok_or(ReadError::BadKey(k))?),
            None => Stored::Inline {
                pcm: row.try_get("pcm")?,
                channels: u16::try_from(row.try_get::<i16, _>("channels")?).unwrap_or(1),
                sample_rate_hz: u32::try_from(row.try_get::<i32, _>("sample_rate_hz")?)
                    .unwrap_or(0),
            },
        })
    }

    /// The chunk's PCM: signed 16-bit little-endian, interleaved.
    pub async fn pcm(self, store: Option<&AudioStore>) -> Result<Vec<u8>, ReadError> {
        match self {
            Stored::Inline { pcm, .. } => Ok(pcm),
            Stored::Object(key) => {
                let store = store.ok_or_else(|| ReadError::NoStore(key.clone()))?;
                let bytes = store.get(&key).await?;
                let decoded = blocking(move || flac::decode(&bytes)).await??;
                Ok(clisonix_sink::pcm_bytes(&decoded.samples))
            }
        }
    }

    /// The chunk as FLAC: its object as stored, or its inline PCM encoded.
    pub async fn flac(self, store: Option<&AudioStore>) -> Result<Bytes, ReadError> {
        match self {
            Stored::Object(key) => {
                let store = store.ok_or_else(|| ReadError::NoStore(key.clone()))?;
                Ok(store.get(&key).await?)
            }
            Stored::Inline {
                pcm,
                channels,
                sample_rate_hz,
            } => {
                let samples: Vec<i16> = pcm
                    .chunks_exact(2)
                    .map(|b| i16::from_le_bytes([b[0], b[1]]))
                    .collect();
                let encoded =
                    blocking(move || flac::encode(&samples, channels, sample_rate_hz)).await??;
                Ok(Bytes::from(encoded))
            }
        }
    }
}

/// Codec work off the runtime's threads (a second of audio is about 0.7 ms to decode).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ReadError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ReadError::Panicked(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows from before the audio store keep their PCM inline and are served as they
    /// are, as PCM and as FLAC; a row naming an object needs the store.
    #[tokio::test]
    async fn inline_rows_are_served_and_objects_need_the_store() {
        let db = clisonix_e2e::TestEnv::get().fresh_database().await;
        sqlx::migrate!("./migrations").run(&db.pool).await.unwrap();
        let pcm: Vec<i16> = (0..2 * 5000)
            .map(|i| (i * 13 % 2000 - 1000) as i16)
            .collect();
        let bytes = clisonix_sink::pcm_bytes(&pcm);
        let key = ObjectKey::new(uuid::Uuid::new_v4(), uuid::Uuid::new_v4(), "p", 1, b"x");
        let row = |index: i64, pcm: Option<&[u8]>, key: Option<&str>| {
            sqlx::query(
                "INSERT INTO audio_chunks (session_id, preset, chunk_index, tenant_id, preset_version, \
                 start_frame, frames, eeg_start, sample_rate_hz, channels, source_first_seq, \
                 source_last_seq, pcm, object_key) \
                 VALUES (gen_random_uuid(), 'p', $1, gen_random_uuid(), '1', 0, 5000, now(), 44100, 2, 0, 0, $2, $3) \
                 RETURNING pcm, object_key, sample_rate_hz, channels",
            )
            .bind(index)
            .bind(pcm.map(<[u8]>::to_vec))
            .bind(key.map(str::to_owned))
            .fetch_one(&db.pool)
        };
        let inline = Stored::from_row(&row(0, Some(&bytes), None).await.unwrap()).unwrap();
        assert_eq!(inline.clone().pcm(None).await.unwrap(), bytes);
        let flac = inline.flac(None).await.unwrap();
        assert_eq!(flac::decode(&flac).unwrap().samples, pcm);
        let object = Stored::from_row(&row(1, None, Some(key.as_str())).await.unwrap()).unwrap();
        assert!(matches!(object.pcm(None).await, Err(ReadError::NoStore(_))));
        // A row has its PCM or an object, never both nor neither.
        assert!(row(2, Some(&bytes), Some(key.as_str())).await.is_err());
        assert!(row(3, None, None).await.is_err());
    }
}
