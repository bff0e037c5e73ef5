//! The catalog of topics: name, partitions, retention, cleanup policy, key and value
//! schema of every topic, in one place. Pure data; [`crate::admin`] applies it.
//!
//! Replication is not part of the catalog: it is a property of the cluster a
//! deployment runs on (one node locally, three in production), chosen when the topics
//! are created.

use clisonix_schemas::Family;

/// How a topic discards old records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleanup {
    /// Segments older than the retention are deleted.
    Delete,
    /// Only the newest record per key is kept (a table as a topic).
    Compact,
}

impl Cleanup {
    pub fn as_str(self) -> &'static str {
        match self {
            Cleanup::Delete => "delete",
            Cleanup::Compact => "compact",
        }
    }
}

/// One topic of the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicSpec {
    /// Name without the deployment prefix (see [`Topics`]).
    pub name: &'static str,
    pub partitions: i32,
    pub cleanup: Cleanup,
    /// `None` keeps records forever (compacted topics).
    pub retention_ms: Option<i64>,
    pub key: Family,
    pub value: Family,
    /// Further topic configs that must hold, e.g. the largest record accepted.
    pub extra: &'static [(&'static str, &'static str)],
    /// What the topic carries and who reads it.
    pub purpose: &'static str,
}

const DAY_MS: i64 = 24 * 60 * 60 * 1000;
/// Large enough for a 1 s, 256-channel, 1 kHz frame (1 MiB of samples) with room.
const MAX_RECORD: (&str, &str) = ("max.message.bytes", "2097152");

pub const EEG_FRAMES: TopicSpec = TopicSpec {
    name: "eeg.frames",
    partitions: 6,
    cleanup: Cleanup::Delete,
    retention_ms: Some(7 * DAY_MS),
    key: Family::SessionKey,
    value: Family::EegFrame,
    extra: &[MAX_RECORD],
    purpose: "EEG frames accepted by ingest, keyed by session (one session stays in order on one partition); read by albi, jona, sessions",
};

pub const EEG_FEATURES: TopicSpec = TopicSpec {
    name: "eeg.features",
    partitions: 6,
    cleanup: Cleanup::Delete,
    retention_ms: Some(30 * DAY_MS),
    key: Family::FeatureKey,
    value: Family::EegFeatures,
    extra: &[],
    purpose: "Spectral features per session, channel and window from albi; read by the sinks and live streams",
};

pub const AUDIO_CHUNKS: TopicSpec = TopicSpec {
    name: "audio.chunks",
    partitions: 6,
    cleanup: Cleanup::Delete,
    retention_ms: Some(7 * DAY_MS),
    key: Family::AudioChunkKey,
    value: Family::AudioChunk,
    extra: &[MAX_RECORD],
    purpose: "Synthesized audio per session and preset from jona; read by the audio sink and live streams",
};

pub const EEG_SESSIONS: TopicSpec = TopicSpec {
    name: "eeg.sessions",
    partitions: 6,
    cleanup: Cleanup::Compact,
    retention_ms: None,
    key: Family::SessionKey,
    value: Family::SessionState,
    extra: &[
        ("min.cleanable.dirty.ratio", "0.1"),
        ("delete.retention.ms", "86400000"),
    ],
    purpose: "Latest lifecycle state of every session (compacted); written by the sessions stage",
};

pub const USAGE_EVENTS: TopicSpec = TopicSpec {
    name: "usage.events",
    partitions: 3,
    cleanup: Cleanup::Delete,
    retention_ms: Some(35 * DAY_MS),
    key: Family::TenantKey,
    value: Family::UsageEvent,
    extra: &[],
    purpose: "Metered usage per tenant from every service; read by metering for billing",
};

pub const DEAD_LETTERS: TopicSpec = TopicSpec {
    name: "stages.deadletter",
    partitions: 3,
    cleanup: Cleanup::Delete,
    retention_ms: Some(30 * DAY_MS),
    key: Family::DeadLetterKey,
    value: Family::DeadLetter,
    extra: &[MAX_RECORD],
    purpose:
        "Records a stage could not process, with the original bytes, source position and reason",
};

/// Every topic, in data-flow order.
pub const CATALOG: [TopicSpec; 6] = [
    EEG_FRAMES,
    EEG_FEATURES,
    AUDIO_CHUNKS,
    EEG_SESSIONS,
    USAGE_EVENTS,
    DEAD_LETTERS,
];

impl TopicSpec {
    /// The topic configs the catalog requires, as Kafka names them.
    pub fn configs(&self) -> Vec<(&'static str, String)> {
        let mut configs = vec![("cleanup.policy", self.cleanup.as_str().to_owned())];
        configs.push(("retention.ms", self.retention_ms.unwrap_or(-1).to_string()));
        configs.extend(self.extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        configs
    }

    /// Looks a topic up by its unprefixed name.
    pub fn find(name: &str) -> Option<&'static TopicSpec> {
        CATALOG.iter().find(|t| t.name == name)
    }
}

/// The catalog as deployed: every name behind an optional prefix, so several
/// environments (or tests) can share one cluster without touching each other.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Topics {
        Topics {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The deployed name of a catalog topic.
    pub fn name(&self, spec: &TopicSpec) -> String {
        format!("{}{}", self.prefix, spec.name)
    }

    /// Every catalog topic with its deployed name.
    pub fn all(&self) -> impl Iterator<Item = (String, &'static TopicSpec)> + '_ {
        CATALOG.iter().map(move |spec| (self.name(spec), spec))
    }

    /// The catalog entry of a deployed name, if it is one.
    pub fn spec_of(&self, deployed: &str) -> Option<&'static TopicSpec> {
        deployed
            .strip_prefix(&self.prefix)
            .and_then(TopicSpec::find)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_frames_are_keyed_by_session() {
        let mut names: Vec<_> = CATALOG.iter().map(|t| t.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), CATALOG.len());
        assert_eq!(EEG_FRAMES.key, Family::SessionKey);
        assert_eq!(EEG_SESSIONS.cleanup, Cleanup::Compact);
        assert_eq!(EEG_SESSIONS.key, Family::SessionKey);
    }

    #[test]
    fn every_record_family_has_a_topic() {
        for family in Family::ALL {
            assert!(
                CATALOG.iter().any(|t| t.key == family || t.value == family),
                "{family} travels on no topic"
            );
        }
    }

    #[test]
    fn prefixes_apply_and_resolve() {
        let topics = Topics::new("test-1.");
        assert_eq!(topics.name(&EEG_FRAMES), "test-1.eeg.frames");
        assert_eq!(topics.spec_of("test-1.eeg.features"), Some(&EEG_FEATURES));
        assert_eq!(topics.spec_of("eeg.features"), None);
        let configs = EEG_SESSIONS.configs();
        assert!(configs.contains(&("cleanup.policy", "compact".to_owned())));
        assert!(configs.contains(&("retention.ms", "-1".to_owned())));
    }
}
