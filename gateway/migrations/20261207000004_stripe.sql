-- Stripe: each tenant's customer, the Stripe subscription behind a tenant's
-- subscription, and every event Stripe delivered to the webhook endpoint (deduped by
-- its id: Stripe delivers at least once, in any order).

CREATE TABLE stripe_customers (
    tenant_id   uuid        PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    customer_id text        NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE subscriptions
    ADD COLUMN stripe_subscription_id text,
    -- The time (Stripe's `created`) of the newest event applied to this subscription:
    -- an older event arriving later changes nothing.
    ADD COLUMN stripe_event_at timestamptz;

CREATE TABLE stripe_events (
    event_id    text        PRIMARY KEY,
    type        text        NOT NULL,
    tenant_id   uuid,
    -- The delivery's signature time (`t=`): the same event signed at the same time
    -- again is a replayed delivery, not Stripe's redelivery (which signs anew).
    signed_at   bigint      NOT NULL,
    created     timestamptz NOT NULL,
    -- applied, ignored (a type or object this deployment does not act on) or stale (an
    -- event older than one already applied).
    outcome     text        NOT NULL CHECK (outcome IN ('applied', 'ignored', 'stale')),
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stripe_events_tenant ON stripe_events (tenant_id, received_at DESC);

-- Usage reported to Stripe's meters: per tenant, meter and hour, the total reported so
-- far and the key it went under ({tenant}:{meter}:{hour}:{total}).
CREATE TABLE stripe_meter_reports (
    tenant_id   uuid        NOT NULL,
    meter       text        NOT NULL,
    hour        timestamptz NOT NULL,
    reported    bigint      NOT NULL CHECK (reported >= 0),
    identifier  text        NOT NULL,
    reported_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, meter, hour)
);
