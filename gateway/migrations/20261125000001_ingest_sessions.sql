-- Ingest's record of every session it has accepted frames for: who owns it, what its
-- frames look like, and the highest sequence number published to eeg.frames. Ingest
-- locks a session's row (SELECT ... FOR UPDATE) while it publishes a group of that
-- session's frames and advances last_seq only after the broker acknowledged them, so
-- a resend after a reconnect (to any ingest instance) is recognised as a duplicate.
CREATE TABLE ingest_sessions (
    session_id     uuid             PRIMARY KEY,
    tenant_id      uuid             NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    device_id      text             NOT NULL,
    sample_rate_hz double precision NOT NULL CHECK (sample_rate_hz > 0),
    unit           text             NOT NULL,
    channel_labels text[]           NOT NULL,
    -- -1 until the first frame is published.
    last_seq       bigint           NOT NULL DEFAULT -1,
    frames         bigint           NOT NULL DEFAULT 0,
    -- How the session came in: stream (HTTP/WebSocket frames), recording, legacy.
    source         text             NOT NULL,
    created_at     timestamptz      NOT NULL DEFAULT now(),
    last_frame_at  timestamptz,
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id) ON DELETE CASCADE
);
CREATE INDEX ingest_sessions_tenant ON ingest_sessions (tenant_id, created_at DESC);
