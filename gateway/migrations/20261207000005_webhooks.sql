-- Webhooks out, to tenants' own systems (the Standard Webhooks scheme). An event is
-- written to the outbox in the same transaction as its cause, with one delivery per
-- endpoint subscribed to its type; the gateway delivers them, retrying with backoff
-- for a day; every attempt is logged.

CREATE TABLE webhook_endpoints (
    id          uuid        PRIMARY KEY,
    tenant_id   uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    url         text        NOT NULL CHECK (length(url) BETWEEN 8 AND 2048),
    description text        NOT NULL DEFAULT '' CHECK (length(description) <= 500),
    events      text[]      NOT NULL CHECK (cardinality(events) > 0),
    -- `whsec_<base64 key>`, shown once when the endpoint is created.
    secret      text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    deleted_at  timestamptz
);
CREATE INDEX webhook_endpoints_tenant ON webhook_endpoints (tenant_id) WHERE deleted_at IS NULL;

-- The outbox. `source` makes an event's creation idempotent: the same cause (an
-- invoice finalized, a session ended, a threshold crossed, a Stripe event) gives one
-- event however often its transaction's work is done again.
CREATE TABLE webhook_events (
    id         text        PRIMARY KEY,
    tenant_id  uuid        NOT NULL,
    type       text        NOT NULL,
    source     text        NOT NULL UNIQUE,
    payload    jsonb       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_deliveries (
    event_id        text        NOT NULL REFERENCES webhook_events (id) ON DELETE CASCADE,
    endpoint_id     uuid        NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    status          text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    -- When it is due; while an attempt is in flight, when that attempt's lease ends.
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_status     integer,
    last_error      text,
    delivered_at    timestamptz,
    PRIMARY KEY (event_id, endpoint_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, event_id);

CREATE TABLE webhook_attempts (
    id           bigserial   PRIMARY KEY,
    event_id     text        NOT NULL,
    endpoint_id  uuid        NOT NULL,
    attempted_at timestamptz NOT NULL DEFAULT now(),
    -- The HTTP status answered, or none (no answer: `error` says why).
    status       integer,
    error        text,
    duration_ms  integer     NOT NULL,
    FOREIGN KEY (event_id, endpoint_id) REFERENCES webhook_deliveries (event_id, endpoint_id) ON DELETE CASCADE
);

-- Writes an event of `tenant` to the outbox, with a delivery to each of its endpoints
-- subscribed to `type`, unless `source` gave one already; nothing when no endpoint is
-- subscribed. In the caller's transaction.
CREATE FUNCTION clisonix_webhook_emit(p_tenant uuid, p_type text, p_source text, p_payload jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_id text := 'msg_' || replace(gen_random_uuid()::text, '-', '');
BEGIN
    IF NOT EXISTS (SELECT 1 FROM webhook_endpoints e
                    WHERE e.tenant_id = p_tenant AND e.deleted_at IS NULL AND p_type = ANY (e.events)) THEN
        RETURN;
    END IF;
    INSERT INTO webhook_events (id, tenant_id, type, source, payload)
    VALUES (v_id, p_tenant, p_type, p_source,
            jsonb_build_object('type', p_type,
                               'timestamp', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                               'data', p_payload))
    ON CONFLICT ON CONSTRAINT webhook_events_source_key DO NOTHING;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    INSERT INTO webhook_deliveries (event_id, endpoint_id)
    SELECT v_id, e.id FROM webhook_endpoints e
     WHERE e.tenant_id = p_tenant AND e.deleted_at IS NULL AND p_type = ANY (e.events);
END;
$$;

-- `usage.threshold_reached`: metering's transaction that crossed 80% or 100% of what
-- the plan includes.
CREATE FUNCTION clisonix_webhook_usage_alert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM clisonix_webhook_emit(NEW.tenant_id, 'usage.threshold_reached',
        format('usage.threshold_reached:%s:%s:%s:%s', NEW.tenant_id, NEW.period_start, NEW.meter, NEW.threshold),
        to_jsonb(NEW));
    RETURN NEW;
END;
$$;
CREATE TRIGGER usage_alerts_webhook AFTER INSERT ON usage_alerts
    FOR EACH ROW EXECUTE FUNCTION clisonix_webhook_usage_alert();

-- `session.ended`: the sink's transaction that stored the session's ended state.
CREATE FUNCTION clisonix_webhook_session_ended() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'ended' AND (TG_OP = 'INSERT' OR OLD.status <> 'ended') THEN
        PERFORM clisonix_webhook_emit(NEW.tenant_id, 'session.ended',
            'session.ended:' || NEW.session_id,
            jsonb_build_object('session_id', NEW.session_id, 'device_id', NEW.device_id,
                               'started_at', NEW.started_at, 'ended_at', NEW.ended_at,
                               'end_reason', NEW.end_reason, 'frames', NEW.frames));
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER sessions_webhook AFTER INSERT OR UPDATE OF status ON sessions
    FOR EACH ROW EXECUTE FUNCTION clisonix_webhook_session_ended();
