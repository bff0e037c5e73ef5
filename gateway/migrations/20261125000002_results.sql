-- Results written by the sink stage from eeg.sessions, eeg.features and audio.chunks,
-- read by the gateway's results API. Every write is idempotent: rows are keyed by the
-- same keys as their Kafka records, so replays and restarts never duplicate a row.
-- There are no foreign keys to tenants: rows arrive from topics in any order and a
-- sink must never stall on one; tenant scoping is by tenant_id in every query.

-- The newest known state of each session (eeg.sessions is compacted to the same).
CREATE TABLE sessions (
    session_id          uuid             PRIMARY KEY,
    tenant_id           uuid             NOT NULL,
    device_id           text             NOT NULL,
    status              text             NOT NULL CHECK (status IN ('active', 'ended')),
    started_at          timestamptz      NOT NULL,
    last_frame_at       timestamptz      NOT NULL,
    first_device_time   timestamptz      NOT NULL,
    last_device_time    timestamptz      NOT NULL,
    sample_rate_hz      double precision NOT NULL,
    channel_labels      text[]           NOT NULL,
    frames              bigint           NOT NULL,
    samples_per_channel bigint           NOT NULL,
    seq_gaps            bigint           NOT NULL,
    duplicate_frames    bigint           NOT NULL,
    out_of_order_frames bigint           NOT NULL,
    ended_at            timestamptz,
    end_reason          text,
    updated_at          timestamptz      NOT NULL DEFAULT now()
);
-- Listing a tenant's sessions newest first (keyset pagination on started_at, id),
-- optionally by device.
CREATE INDEX sessions_tenant_started ON sessions (tenant_id, started_at DESC, session_id DESC);
CREATE INDEX sessions_tenant_device ON sessions (tenant_id, device_id, started_at DESC, session_id DESC);

-- One row per session, window and channel. The primary key is the record's key (the
-- idempotent write); reading a session's time range goes through
-- features_session_time, a B-tree on (session_id, window_start): one index descent to
-- the range's start, then the range's rows in order. At millions of rows the cost of a
-- read depends on the rows returned, not on the table's size; see the README for the
-- measurement and for why this is an index rather than partitioning.
CREATE TABLE features (
    session_id          uuid             NOT NULL,
    window_index        bigint           NOT NULL,
    channel_index       integer          NOT NULL,
    tenant_id           uuid             NOT NULL,
    channel_label       text             NOT NULL,
    window_start        timestamptz      NOT NULL,
    window_start_sample bigint           NOT NULL,
    window_samples      integer          NOT NULL,
    sample_rate_hz      double precision NOT NULL,
    unit                text             NOT NULL,
    algorithm_version   text             NOT NULL,
    abs_delta           double precision,
    abs_theta           double precision,
    abs_alpha           double precision,
    abs_beta            double precision,
    abs_gamma           double precision,
    total_abs           double precision,
    rel_delta           double precision,
    rel_theta           double precision,
    rel_alpha           double precision,
    rel_beta            double precision,
    rel_gamma           double precision,
    peak_alpha_hz       double precision,
    peak_alpha_psd      double precision,
    spectral_entropy    double precision,
    hjorth_activity     double precision,
    hjorth_mobility     double precision,
    hjorth_complexity   double precision,
    aperiodic_exponent  double precision,
    flat                boolean          NOT NULL,
    clipped_fraction    double precision NOT NULL,
    line_noise_50hz     double precision,
    line_noise_60hz     double precision,
    seq_gaps            integer          NOT NULL,
    duplicate_frames    integer          NOT NULL,
    out_of_order_frames integer          NOT NULL,
    psd_resolution_hz   double precision NOT NULL,
    -- The Welch PSD, little-endian f64 per bin from 0 Hz.
    psd                 bytea            NOT NULL,
    PRIMARY KEY (session_id, window_index, channel_index)
);
CREATE INDEX features_session_time ON features (session_id, window_start);

-- One row per audio chunk, PCM included: the chunk and its index commit together, so
-- a write is idempotent and a reader never sees an index row without its audio.
CREATE TABLE audio_chunks (
    session_id       uuid        NOT NULL,
    preset           text        NOT NULL,
    chunk_index      bigint      NOT NULL,
    tenant_id        uuid        NOT NULL,
    preset_version   text        NOT NULL,
    start_frame      bigint      NOT NULL,
    frames           bigint      NOT NULL,
    eeg_start        timestamptz NOT NULL,
    sample_rate_hz   integer     NOT NULL,
    channels         smallint    NOT NULL,
    source_first_seq bigint      NOT NULL,
    source_last_seq  bigint      NOT NULL,
    -- Signed 16-bit little-endian PCM, interleaved by channel. PCM does not compress
    -- with pglz, so it is stored out of line uncompressed.
    pcm              bytea       NOT NULL,
    PRIMARY KEY (session_id, preset, chunk_index)
);
ALTER TABLE audio_chunks ALTER COLUMN pcm SET STORAGE EXTERNAL;
