-- Plans, subscriptions and billing periods. Plans are data: a plan is a (plan_id,
-- version) row with its limits and one row per meter with the included quantity, the
-- overage price and whether the limit is hard (usage refused once the included
-- quantity is used) or soft (usage let through, billed as overage, with events at 80%
-- and 100%). A published version is never edited: a change is a new version, and
-- subscriptions name the version they are on.

-- How long a billing period lasts and how long after its end late usage still counts
-- in it. One row; an operator changes it with UPDATE (tests use minutes).
CREATE TABLE billing_settings (
    id            boolean  PRIMARY KEY DEFAULT true CHECK (id),
    period_length interval NOT NULL DEFAULT '1 month' CHECK (period_length >= interval '1 second'),
    close_after   interval NOT NULL DEFAULT '1 hour' CHECK (close_after >= interval '0'),
    -- How long a past_due tenant keeps streaming before it is refused (402).
    past_due_grace interval NOT NULL DEFAULT '7 days' CHECK (past_due_grace >= interval '0')
);
INSERT INTO billing_settings DEFAULT VALUES;

CREATE TABLE plans (
    plan_id                      text        NOT NULL CHECK (plan_id ~ '^[a-z][a-z0-9_-]{0,39}$'),
    version                      integer     NOT NULL CHECK (version > 0),
    name                         text        NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    -- ISO 4217, and every amount of the plan in its minor unit (cents).
    currency                     text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    base_fee_minor               bigint      NOT NULL CHECK (base_fee_minor >= 0),
    -- NULL: no limit.
    max_concurrent_sessions      integer     CHECK (max_concurrent_sessions > 0),
    max_devices                  integer     CHECK (max_devices > 0),
    -- Authenticated API requests per minute and caller, by role (the premium rate for
    -- premium, admin and owner).
    requests_per_minute_member   integer     NOT NULL CHECK (requests_per_minute_member > 0),
    requests_per_minute_premium  integer     NOT NULL CHECK (requests_per_minute_premium >= requests_per_minute_member),
    audio_presets                text[]      NOT NULL,
    retention_days               integer     NOT NULL CHECK (retention_days > 0),
    -- Listed by GET /v1/plans and open to PUT /v1/subscription.
    public                       boolean     NOT NULL DEFAULT true,
    created_at                   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (plan_id, version)
);

-- The meters, in their base units. Time meters count milliseconds.
CREATE TABLE plan_meters (
    plan_id             text    NOT NULL,
    version             integer NOT NULL,
    meter               text    NOT NULL CHECK (meter IN ('frames', 'bytes', 'device_ms', 'channel_ms',
                                    'clean_channel_ms', 'feature_windows', 'audio_ms', 'api_requests', 'recording_uploads')),
    -- Included per billing period.
    included            bigint  NOT NULL CHECK (included >= 0),
    -- Overage: price_minor per price_per units beyond the included quantity.
    price_minor         bigint  NOT NULL CHECK (price_minor >= 0),
    price_per           bigint  NOT NULL DEFAULT 1 CHECK (price_per > 0),
    limit_kind          text    NOT NULL CHECK (limit_kind IN ('hard', 'soft')),
    PRIMARY KEY (plan_id, version, meter),
    FOREIGN KEY (plan_id, version) REFERENCES plans (plan_id, version) ON DELETE CASCADE
);

-- The catalog's first versions. Free: a trial-sized allowance, hard limits. Pro and
-- enterprise: soft limits with overage.
INSERT INTO plans (plan_id, version, name, currency, base_fee_minor, max_concurrent_sessions, max_devices,
                   requests_per_minute_member, requests_per_minute_premium, audio_presets, retention_days) VALUES
    ('free',       1, 'Free',       'EUR',      0,    2,    5,  120,  1200, ARRAY['parameter_mapping'],                  7),
    ('pro',        1, 'Pro',        'EUR',   4900,   50,  100,  600,  6000, ARRAY['audification', 'parameter_mapping'], 90),
    ('enterprise', 1, 'Enterprise', 'EUR', 490000, NULL, NULL, 3000, 30000, ARRAY['audification', 'parameter_mapping'], 365);

INSERT INTO plan_meters (plan_id, version, meter, included, price_minor, price_per, limit_kind) VALUES
    -- Free: about ten device-hours of 32 channels at 128 Hz in 1/8 s frames.
    ('free', 1, 'frames',             288000,  0, 1, 'hard'),
    ('free', 1, 'bytes',          1500000000,  0, 1, 'hard'),
    ('free', 1, 'device_ms',        36000000,  0, 1, 'hard'),
    ('free', 1, 'channel_ms',     1152000000,  0, 1, 'hard'),
    ('free', 1, 'recording_uploads',      20,  0, 1, 'hard'),
    ('free', 1, 'api_requests',       100000,  0, 1, 'hard'),
    -- Pro: 500 device-hours included, then 0.50 EUR per device-hour.
    ('pro', 1, 'frames',            14400000,  1, 1000, 'soft'),
    ('pro', 1, 'bytes',          80000000000,  1, 100000000, 'soft'),
    ('pro', 1, 'device_ms',       1800000000, 50, 3600000, 'soft'),
    ('pro', 1, 'channel_ms',     57600000000,  1, 100000000, 'soft'),
    ('pro', 1, 'clean_channel_ms', 57600000000, 0, 1, 'soft'),
    ('pro', 1, 'feature_windows',  30000000,  1, 100000, 'soft'),
    ('pro', 1, 'audio_ms',         360000000,  10, 3600000, 'soft'),
    ('pro', 1, 'recording_uploads',     1000,  5, 1, 'soft'),
    ('pro', 1, 'api_requests',       5000000,  1, 10000, 'soft'),
    -- Enterprise: 10,000 device-hours included, then 0.30 EUR per device-hour.
    ('enterprise', 1, 'frames',          288000000,  1, 10000, 'soft'),
    ('enterprise', 1, 'bytes',      1600000000000,  1, 1000000000, 'soft'),
    ('enterprise', 1, 'device_ms',     36000000000, 30, 3600000, 'soft'),
    ('enterprise', 1, 'channel_ms',  1152000000000,  1, 1000000000, 'soft'),
    ('enterprise', 1, 'clean_channel_ms', 1152000000000, 0, 1, 'soft'),
    ('enterprise', 1, 'feature_windows', 600000000,  1, 1000000, 'soft'),
    ('enterprise', 1, 'audio_ms',       7200000000,  5, 3600000, 'soft'),
    ('enterprise', 1, 'recording_uploads',   50000,  1, 1, 'soft'),
    ('enterprise', 1, 'api_requests',  100000000,  1, 100000, 'soft');

-- A tenant's one subscription: the plan version in force and the current period.
CREATE TABLE subscriptions (
    tenant_id      uuid        PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    plan_id        text        NOT NULL,
    plan_version   integer     NOT NULL,
    status         text        NOT NULL CHECK (status IN ('trialing', 'active', 'past_due', 'canceled')),
    -- Periods are anchor + n * period_length.
    anchor         timestamptz NOT NULL,
    period_start   timestamptz NOT NULL,
    period_end     timestamptz NOT NULL CHECK (period_end > period_start),
    past_due_since timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (plan_id, plan_version) REFERENCES plans (plan_id, version)
);
CREATE INDEX subscriptions_plan ON subscriptions (plan_id, status);
-- The periods due to start (clisonix_roll_periods runs every few seconds).
CREATE INDEX subscriptions_period_end ON subscriptions (period_end);

-- Every period a tenant has had. Usage counts in the period its hour falls in until the
-- period is closed (closed_at, set close_after past its end); after that the period's
-- usage never changes, and later usage for it is carried into the open period.
CREATE TABLE billing_periods (
    tenant_id    uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    period_start timestamptz NOT NULL,
    period_end   timestamptz NOT NULL CHECK (period_end > period_start),
    plan_id      text        NOT NULL,
    plan_version integer     NOT NULL,
    closed_at    timestamptz,
    PRIMARY KEY (tenant_id, period_start),
    FOREIGN KEY (plan_id, plan_version) REFERENCES plans (plan_id, version)
);
CREATE INDEX billing_periods_open ON billing_periods (period_end) WHERE closed_at IS NULL;

-- Brings every subscription's current period up to `at`: a period that ended starts
-- the next (anchor + n * period_length, so months do not drift), and periods that
-- ended more than close_after ago are closed. Idempotent; the metering stage calls it
-- every few seconds, and readers may call it too.
CREATE FUNCTION clisonix_roll_periods(at timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    s billing_settings;
    sub record;
    next_start timestamptz;
    next_end timestamptz;
BEGIN
    SELECT * INTO s FROM billing_settings;
    FOR sub IN SELECT * FROM subscriptions WHERE period_end <= at ORDER BY tenant_id FOR UPDATE LOOP
        next_start := sub.period_end;
        LOOP
            next_end := clisonix_period_end(sub.anchor, next_start, s.period_length);
            INSERT INTO billing_periods (tenant_id, period_start, period_end, plan_id, plan_version)
            VALUES (sub.tenant_id, next_start, next_end, sub.plan_id, sub.plan_version)
            ON CONFLICT DO NOTHING;
            EXIT WHEN next_end > at;
            next_start := next_end;
        END LOOP;
        UPDATE subscriptions
           SET period_start = next_start, period_end = next_end, updated_at = now()
         WHERE tenant_id = sub.tenant_id;
    END LOOP;
    UPDATE billing_periods
       SET closed_at = at
     WHERE closed_at IS NULL AND period_end + s.close_after <= at;
END;
$$;

-- The end of the period that starts at `start`: the first anchor + n * length after it.
CREATE FUNCTION clisonix_period_end(anchor timestamptz, start timestamptz, length interval)
RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
DECLARE
    n integer;
BEGIN
    -- A first guess from the average length, then exact steps.
    n := greatest(1, floor(extract(epoch FROM start - anchor) / extract(epoch FROM length))::integer);
    WHILE n > 1 AND anchor + (n - 1) * length > start LOOP
        n := n - 1;
    END LOOP;
    WHILE anchor + n * length <= start LOOP
        n := n + 1;
    END LOOP;
    RETURN anchor + n * length;
END;
$$;

-- A tenant starts on the free plan's newest version, its first period from now.
CREATE FUNCTION clisonix_subscribe_new_tenant() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    s billing_settings;
    v integer;
    t timestamptz := now();
BEGIN
    SELECT * INTO s FROM billing_settings;
    SELECT max(version) INTO v FROM plans WHERE plan_id = 'free';
    INSERT INTO subscriptions (tenant_id, plan_id, plan_version, status, anchor, period_start, period_end)
    VALUES (NEW.id, 'free', v, 'active', t, t, t + s.period_length);
    INSERT INTO billing_periods (tenant_id, period_start, period_end, plan_id, plan_version)
    VALUES (NEW.id, t, t + s.period_length, 'free', v);
    RETURN NEW;
END;
$$;
CREATE TRIGGER tenants_subscribe AFTER INSERT ON tenants
    FOR EACH ROW EXECUTE FUNCTION clisonix_subscribe_new_tenant();

-- Tenants that existed before plans: on the free plan from now.
INSERT INTO subscriptions (tenant_id, plan_id, plan_version, status, anchor, period_start, period_end)
SELECT id, 'free', 1, 'active', now(), now(), now() + interval '1 month' FROM tenants;
INSERT INTO billing_periods (tenant_id, period_start, period_end, plan_id, plan_version)
SELECT tenant_id, period_start, period_end, plan_id, plan_version FROM subscriptions;
