-- Each session is served by one ingest instance at a time. The instance that claims a
-- session writes its id (`owner`) and a lease deadline; while the lease runs it alone
-- publishes the session's frames, keeps last_seq in memory and writes it back every
-- tick (renewing the lease). Another instance that gets the session's frames sets
-- `handoff_at`, and the owner lets go (owner NULL) at its next tick. A crashed
-- instance's sessions are claimable once their leases run out. Recordings refuse a
-- session that is claimed.
ALTER TABLE ingest_sessions
    ADD COLUMN owner       uuid,
    ADD COLUMN owner_until timestamptz,
    ADD COLUMN handoff_at  timestamptz;
CREATE INDEX ingest_sessions_owner ON ingest_sessions (owner) WHERE owner IS NOT NULL;
