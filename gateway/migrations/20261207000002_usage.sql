-- Metered usage, written by the metering stage only, exactly once: a batch of records
-- from usage.events, eeg.sessions and eeg.features is applied in one transaction that
-- also moves metering_offsets, so a record is counted if and only if its offset is
-- recorded (see ARCHITECTURE.md, "Exactly once in metering").

-- The next offset to apply per input partition. A record below it has been counted.
-- Keyed by topic, not by consumer group: a replay of a topic under any group into the
-- same database counts nothing twice.
CREATE TABLE metering_offsets (
    topic       text    NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint  NOT NULL CHECK (next_offset >= 0),
    PRIMARY KEY (topic, partition)
);

-- Usage events already counted, by id: a producer that resends an event whose first
-- attempt did land (a timeout) writes it at a second offset with the same id. Kept
-- longer than usage.events' retention, then pruned by the metering stage.
CREATE TABLE metering_events (
    event_id    uuid        PRIMARY KEY,
    occurred_at timestamptz NOT NULL
);
CREATE INDEX metering_events_time ON metering_events (occurred_at);

-- Usage per tenant, meter, hour (UTC, truncated) and billing period. The hour is when the usage
-- happened: a usage event's occurred_at, a session state's last frame received, a
-- feature record's Kafka timestamp (when Albi produced it). A row of a closed period
-- never changes. Usage of a tenant without a subscription (not a tenant of this
-- deployment) is kept under the period '1970-01-01', so that nothing is dropped.
CREATE TABLE usage_hourly (
    tenant_id    uuid        NOT NULL,
    meter        text        NOT NULL,
    hour         timestamptz NOT NULL CHECK (date_trunc('hour', hour, 'UTC') = hour),
    period_start timestamptz NOT NULL,
    quantity     bigint      NOT NULL CHECK (quantity >= 0),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    -- An hour that a period boundary cuts has a row on each side of it.
    PRIMARY KEY (tenant_id, meter, hour, period_start)
);
CREATE INDEX usage_hourly_period ON usage_hourly (tenant_id, period_start);

-- Usage that arrived after its period was closed, carried into the period that was
-- open when it arrived (and counted there), with the hour it happened in.
CREATE TABLE usage_carried (
    tenant_id     uuid        NOT NULL,
    meter         text        NOT NULL,
    occurred_hour timestamptz NOT NULL,
    period_start  timestamptz NOT NULL,
    quantity      bigint      NOT NULL CHECK (quantity >= 0),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, meter, occurred_hour, period_start)
);

-- Usage per session and meter (sessions' device and channel time are counted from the
-- session's cumulative state, so this row is also what has been counted so far);
-- `detail` splits a meter where its events do (audio by preset), '' otherwise.
CREATE TABLE usage_sessions (
    session_id uuid        NOT NULL,
    meter      text        NOT NULL,
    detail     text        NOT NULL DEFAULT '',
    tenant_id  uuid        NOT NULL,
    quantity   bigint      NOT NULL CHECK (quantity >= 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, meter, detail)
);
CREATE INDEX usage_sessions_tenant ON usage_sessions (tenant_id, session_id);

-- A tenant's usage per period and meter, the sum of its hours and what was carried
-- into it: what quotas are checked against.
CREATE VIEW usage_periods AS
SELECT tenant_id, meter, period_start, sum(quantity)::bigint AS quantity
  FROM (SELECT tenant_id, meter, period_start, quantity FROM usage_hourly
        UNION ALL
        SELECT tenant_id, meter, period_start, quantity FROM usage_carried) u
 GROUP BY tenant_id, meter, period_start;

-- A tenant's usage of a meter crossed 80% or 100% of what its plan includes in the
-- period: written once per (tenant, period, meter, threshold) by the metering
-- transaction that crossed it. For a soft limit this is the warning that overage
-- begins; for a hard one, that refusals do. The billing issue turns these into
-- webhooks.
CREATE TABLE usage_alerts (
    tenant_id     uuid        NOT NULL,
    period_start  timestamptz NOT NULL,
    meter         text        NOT NULL,
    threshold     smallint    NOT NULL CHECK (threshold IN (80, 100)),
    used          bigint      NOT NULL,
    included      bigint      NOT NULL,
    limit_kind    text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, period_start, meter, threshold)
);
CREATE INDEX usage_alerts_time ON usage_alerts (created_at);
