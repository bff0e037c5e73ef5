//! The schema registry compiled into every binary: each record family with all of
//! its versions, parsed once, indexed by their Avro (CRC-64-AVRO, "Rabin") fingerprint.
//!
//! A family's newest version is the one we write; every version is kept so that data
//! written by an older producer still decodes (it is resolved into the newest version).
//! Adding a version means adding `avro/<family>/vN.avsc` and listing it in
//! [`Family::sources`]; the compatibility tests then prove the new version reads the
//! previous one.

use std::sync::LazyLock;

use apache_avro::{rabin::Rabin, Schema};

/// A record type of the contracts: one folder `avro/<dir>/` of versioned schemas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    SessionKey,
    EegFrame,
    FeatureKey,
    EegFeatures,
    AudioChunkKey,
    AudioChunk,
    SessionState,
    TenantKey,
    UsageEvent,
    DeadLetterKey,
    DeadLetter,
}

impl Family {
    /// Every family, in catalog order.
    pub const ALL: [Family; 11] = [
        Family::SessionKey,
        Family::EegFrame,
        Family::FeatureKey,
        Family::EegFeatures,
        Family::AudioChunkKey,
        Family::AudioChunk,
        Family::SessionState,
        Family::TenantKey,
        Family::UsageEvent,
        Family::DeadLetterKey,
        Family::DeadLetter,
    ];

    /// The folder under `schemas/avro/` holding this family's versions.
    pub fn dir(self) -> &'static str {
        match self {
            Family::SessionKey => "session_key",
            Family::EegFrame => "eeg_frame",
            Family::FeatureKey => "feature_key",
            Family::EegFeatures => "eeg_features",
            Family::AudioChunkKey => "audio_chunk_key",
            Family::AudioChunk => "audio_chunk",
            Family::SessionState => "session_state",
            Family::TenantKey => "tenant_key",
            Family::UsageEvent => "usage_event",
            Family::DeadLetterKey => "dead_letter_key",
            Family::DeadLetter => "dead_letter",
        }
    }

    /// The Avro full name of the record, e.g. `clisonix.EegFrame`.
    pub fn full_name(self) -> &'static str {
        match self {
            Family::SessionKey => "clisonix.SessionKey",
            Family::EegFrame => "clisonix.EegFrame",
            Family::FeatureKey => "clisonix.FeatureKey",
            Family::EegFeatures => "clisonix.EegFeatures",
            Family::AudioChunkKey => "clisonix.AudioChunkKey",
            Family::AudioChunk => "clisonix.AudioChunk",
            Family::SessionState => "clisonix.SessionState",
            Family::TenantKey => "clisonix.TenantKey",
            Family::UsageEvent => "clisonix.UsageEvent",
            Family::DeadLetterKey => "clisonix.DeadLetterKey",
            Family::DeadLetter => "clisonix.DeadLetter",
        }
    }

    /// The schema texts of versions 1..=N, oldest first.
    pub fn sources(self) -> &'static [&'static str] {
        match self {
            Family::SessionKey => &[include_str!("../avro/session_key/v1.avsc")],
            Family::EegFrame => &[include_str!("../avro/eeg_frame/v1.avsc")],
            Family::FeatureKey => &[include_str!("../avro/feature_key/v1.avsc")],
            Family::EegFeatures => &[include_str!("../avro/eeg_features/v1.avsc")],
            Family::AudioChunkKey => &[include_str!("../avro/audio_chunk_key/v1.avsc")],
            Family::AudioChunk => &[include_str!("../avro/audio_chunk/v1.avsc")],
            Family::SessionState => &[include_str!("../avro/session_state/v1.avsc")],
            Family::TenantKey => &[include_str!("../avro/tenant_key/v1.avsc")],
            Family::UsageEvent => &[
                include_str!("../avro/usage_event/v1.avsc"),
                include_str!("../avro/usage_event/v2.avsc"),
            ],
            Family::DeadLetterKey => &[include_str!("../avro/dead_letter_key/v1.avsc")],
            Family::DeadLetter => &[include_str!("../avro/dead_letter/v1.avsc")],
        }
    }

    /// The version this build writes.
    pub fn current(self) -> &'static SchemaVersion {
        let registry = registry();
        registry
            .versions
            .iter()
            .rev()
            .find(|v| v.family == self)
            .expect("every family has at least one version")
    }

    /// All versions of this family, oldest first.
    pub fn versions(self) -> impl Iterator<Item = &'static SchemaVersion> {
        registry().versions.iter().filter(move |v| v.family == self)
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.full_name())
    }
}

/// One parsed version of a family's schema.
#[derive(Debug)]
pub struct SchemaVersion {
    pub family: Family,
    /// 1-based version number (`vN.avsc`).
    pub version: u32,
    pub schema: Schema,
    /// CRC-64-AVRO of the schema's Parsing Canonical Form as the Avro specification
    /// defines it ([`crate::canonical`]): what single-object encoding puts in every
    /// record's header, and what other Avro implementations compute.
    pub fingerprint: u64,
    /// The fingerprint builds before the specification's wrote (apache-avro's
    /// canonical form, which differs for logical types): still read, never written.
    pub legacy_fingerprint: u64,
    /// The `.avsc` text, as committed.
    pub source: &'static str,
}

#[derive(Debug)]
pub(crate) struct Registry {
    pub(crate) versions: Vec<SchemaVersion>,
}

impl Registry {
    fn load() -> Registry {
        let mut versions = Vec::new();
        for family in Family::ALL {
            for (i, source) in family.sources().iter().enumerate() {
                // The schemas are compiled in and covered by tests, so a parse failure
                // here is a build defect, not a runtime condition.
                let schema = Schema::parse_str(source).unwrap_or_else(|e| {
                    panic!("schema {}/v{} does not parse: {e}", family.dir(), i + 1)
                });
                let legacy_fingerprint = fingerprint(&schema);
                let fingerprint = crate::canonical::fingerprint(source).unwrap_or_else(|e| {
                    panic!(
                        "schema {}/v{} has no canonical form: {e}",
                        family.dir(),
                        i + 1
                    )
                });
                versions.push(SchemaVersion {
                    family,
                    version: i as u32 + 1,
                    schema,
                    fingerprint,
                    legacy_fingerprint,
                    source,
                });
            }
        }
        Registry { versions }
    }

    pub(crate) fn by_fingerprint(&self, fingerprint: u64) -> Option<&SchemaVersion> {
        // Eleven families with a version or two each: a scan beats hashing.
        self.versions
            .iter()
            .find(|v| v.fingerprint == fingerprint)
            .or_else(|| {
                self.versions
                    .iter()
                    .find(|v| v.legacy_fingerprint == fingerprint)
            })
    }
}

/// apache-avro's CRC-64-AVRO fingerprint of a schema (of its own canonical form, which
/// is not the specification's for logical types), as a number: what builds before the
/// specification's fingerprint wrote.
pub fn fingerprint(schema: &Schema) -> u64 {
    let fp = schema.fingerprint::<Rabin>();
    let bytes: [u8; 8] = fp.bytes[..]
        .try_into()
        .expect("a Rabin fingerprint is 8 bytes");
    u64::from_le_bytes(bytes)
}

pub(crate) fn registry() -> &'static Registry {
    static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::load);
    &REGISTRY
}

/// Looks up the schema version that wrote a record with this fingerprint.
pub fn lookup(fingerprint: u64) -> Option<&'static SchemaVersion> {
    registry().by_fingerprint(fingerprint)
}
