//! The object store audio chunks live in, and their keys.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Where every audio object lives under the store's root.
const ROOT: &str = "audio";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the audio store {url:?}: {reason}")]
    Config { url: String, reason: String },
    #[error("no audio object {0}")]
    NotFound(String),
    #[error("the audio store: {0}")]
    Store(#[from] object_store::Error),
}

/// An audio chunk's object key: `audio/<tenant>/<session>/<preset>/<chunk>-<digest>.flac`,
/// the digest being the first 64 bits of the SHA-256 of the object's bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey(String);

impl ObjectKey {
    pub fn new(tenant: Uuid, session: Uuid, preset: &str, chunk_index: u64, bytes: &[u8]) -> Self {
        let digest = Sha256::digest(bytes);
        ObjectKey(format!(
            "{ROOT}/{tenant}/{session}/{preset}/{chunk_index:012}-{}.flac",
            hex::encode(&digest[..8])
        ))
    }

    /// A key as stored in an index row or listed from the store; `None` for anything
    /// else under the store's root.
    pub fn parse(key: &str) -> Option<ObjectKey> {
        let parts: Vec<&str> = key.split('/').collect();
        let [ROOT, tenant, session, preset, name] = parts.as_slice() else {
            return None;
        };
        Uuid::parse_str(tenant).ok()?;
        Uuid::parse_str(session).ok()?;
        let (chunk, digest) = name.strip_suffix(".flac")?.split_once('-')?;
        let ok = !preset.is_empty()
            && chunk.len() == 12
            && chunk.bytes().all(|b| b.is_ascii_digit())
            && digest.len() == 16
            && digest.bytes().all(|b| b.is_ascii_hexdigit());
        ok.then(|| ObjectKey(key.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The object's digest (16 hex digits), which changes with its bytes.
    pub fn digest(&self) -> &str {
        let name = self.0.rsplit('/').next().unwrap_or_default();
        name.strip_suffix(".flac")
            .and_then(|n| n.split_once('-'))
            .map_or("", |(_, d)| d)
    }

    /// The session the object belongs to.
    pub fn session(&self) -> Uuid {
        self.0
            .split('/')
            .nth(2)
            .and_then(|s| Uuid::parse_str(s).ok())
            .expect("a key is made or parsed whole")
    }

    fn path(&self) -> Path {
        Path::from(self.0.as_str())
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An object as listed: its key and when it was last written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub key: ObjectKey,
    pub last_modified: SystemTime,
    pub bytes: u64,
}

/// The store of audio objects.
#[derive(Debug, Clone)]
pub struct AudioStore {
    inner: Arc<dyn ObjectStore>,
    url: String,
}

impl AudioStore {
    /// Opens a store by URL: `file:///a/folder` (or a plain path; created if missing)
    /// or `s3://bucket[/prefix]`, configured from the usual `AWS_*` variables
    /// (`AWS_ENDPOINT` and `AWS_ALLOW_HTTP=true` for MinIO on plain HTTP).
    pub fn from_url(url: &str) -> Result<AudioStore, StoreError> {
        let config = |reason: String| StoreError::Config {
            url: url.to_owned(),
            reason,
        };
        let inner: Arc<dyn ObjectStore> = if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(config("no bucket named".into()));
            }
            install_crypto();
            let s3 = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| config(e.to_string()))?;
            let prefix = prefix.trim_matches('/');
            if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
            }
        } else {
            let dir = match url.strip_prefix("file://") {
                Some(p) => p,
                None if url.contains("://") => {
                    return Err(config("the scheme is neither file:// nor s3://".into()))
                }
                None => url,
            };
            if dir.is_empty() {
                return Err(config("no folder named".into()));
            }
            std::fs::create_dir_all(dir).map_err(|e| config(e.to_string()))?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
                .map_err(|e| config(e.to_string()))?;
            Arc::new(fs)
        };
        Ok(AudioStore {
            inner,
            url: url.to_owned(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Writes an object whole (a reader never sees part of it: a local folder writes a
    /// temporary file and renames it, S3 makes an object visible when complete).
    pub async fn put(&self, key: &ObjectKey, bytes: Bytes) -> Result<(), StoreError> {
        self.inner
            .put(&key.path(), PutPayload::from_bytes(bytes))
            .await?;
        Ok(())
    }

    pub async fn get(&self, key: &ObjectKey) -> Result<Bytes, StoreError> {
        match self.inner.get(&key.path()).await {
            Ok(r) => Ok(r.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => Err(StoreError::NotFound(key.0.clone())),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes an object; one already gone is not an error.
    pub async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        match self.inner.delete(&key.path()).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every audio object, in no particular order (anything else under the root that
    /// is not an audio object's key is skipped).
    pub fn list(&self) -> BoxStream<'_, Result<StoredObject, StoreError>> {
        self.inner
            .list(Some(&Path::from(ROOT)))
            .map_err(StoreError::from)
            .try_filter_map(|meta| async move {
                Ok(
                    ObjectKey::parse(meta.location.as_ref()).map(|key| StoredObject {
                        key,
                        last_modified: meta.last_modified.into(),
                        bytes: meta.size,
                    }),
                )
            })
            .boxed()
    }
}

/// S3 over HTTPS needs a process-wide rustls provider: ring, which the other HTTP
/// clients here use too (rustls deprecates it for lacking post-quantum key exchange;
/// aws-lc-rs, which has it, would add a C library build to every build of the
/// workspace). Installing it twice is harmless.
#[allow(deprecated)]
fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_chunk_and_its_bytes() {
        let (t, s) = (Uuid::new_v4(), Uuid::new_v4());
        let a = ObjectKey::new(t, s, "parameter_mapping", 7, b"one");
        let b = ObjectKey::new(t, s, "parameter_mapping", 7, b"two");
        assert_ne!(a, b);
        assert_eq!(a, ObjectKey::new(t, s, "parameter_mapping", 7, b"one"));
        assert!(a
            .as_str()
            .starts_with(&format!("audio/{t}/{s}/parameter_mapping/000000000007-")));
        assert_eq!(ObjectKey::parse(a.as_str()), Some(a.clone()));
        assert_eq!(a.session(), s);
        for bad in [
            "audio/x/y/p/000000000007-0011223344556677.flac",
            "other/a/b/c/d",
            &format!("audio/{t}/{s}/p/7-0011223344556677.flac"),
            &format!("audio/{t}/{s}/p/000000000007-00112233.flac"),
            &format!("audio/{t}/{s}//000000000007-0011223344556677.flac"),
        ] {
            assert_eq!(ObjectKey::parse(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn a_local_folder_stores_lists_and_deletes() {
        let dir = std::env::temp_dir().join(format!("clisonix-audio-{}", Uuid::new_v4()));
        let store = AudioStore::from_url(&format!("file://{}", dir.display())).unwrap();
        let key = ObjectKey::new(Uuid::new_v4(), Uuid::new_v4(), "p", 0, b"abc");
        assert!(matches!(
            store.get(&key).await,
            Err(StoreError::NotFound(_))
        ));
        store.put(&key, Bytes::from_static(b"abc")).await.unwrap();
        store.put(&key, Bytes::from_static(b"abc")).await.unwrap();
        assert_eq!(store.get(&key).await.unwrap(), Bytes::from_static(b"abc"));
        std::fs::write(dir.join("audio").join("stray.txt"), b"x").unwrap();
        let listed: Vec<StoredObject> = store.list().try_collect().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].key.clone(), listed[0].bytes), (key.clone(), 3));
        store.delete(&key).await.unwrap();
        store.delete(&key).await.unwrap();
        assert!(matches!(
            store.get(&key).await,
            Err(StoreError::NotFound(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_schemes_and_empty_names_are_refused() {
        for url in ["gs://bucket", "s3://", "file://", ""] {
            assert!(
                matches!(AudioStore::from_url(url), Err(StoreError::Config { .. })),
                "{url}"
            );
        }
    }
}
