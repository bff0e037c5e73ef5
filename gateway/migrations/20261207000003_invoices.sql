-- Invoices from each billing period's metered usage (lib/billing). One per tenant and
-- period (a unique key): a draft from the period's end while late usage may still
-- change it (until the period closes, billing_settings.close_after), then finalized:
-- numbered without gaps per deployment and immutable; then paid or void. A credit note
-- corrects a finalized invoice.

ALTER TABLE billing_settings
    ADD COLUMN tax_rate_bp integer NOT NULL DEFAULT 0 CHECK (tax_rate_bp BETWEEN 0 AND 10000);

-- Every plan a subscription has been on, from when (its first, then every change),
-- written by triggers whatever makes the change: what invoices prorate by. The plan
-- in force at a time is the last row at or before it.
CREATE TABLE subscription_changes (
    id           bigserial   PRIMARY KEY,
    tenant_id    uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    at           timestamptz NOT NULL,
    plan_id      text        NOT NULL,
    plan_version integer     NOT NULL,
    FOREIGN KEY (plan_id, plan_version) REFERENCES plans (plan_id, version)
);
CREATE INDEX subscription_changes_tenant ON subscription_changes (tenant_id, at, id);

CREATE FUNCTION clisonix_record_plan_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO subscription_changes (tenant_id, at, plan_id, plan_version)
    VALUES (NEW.tenant_id, now(), NEW.plan_id, NEW.plan_version);
    RETURN NEW;
END;
$$;
CREATE TRIGGER subscriptions_plan_start AFTER INSERT ON subscriptions
    FOR EACH ROW EXECUTE FUNCTION clisonix_record_plan_change();
CREATE TRIGGER subscriptions_plan_change AFTER UPDATE OF plan_id, plan_version ON subscriptions
    FOR EACH ROW WHEN ((OLD.plan_id, OLD.plan_version) IS DISTINCT FROM (NEW.plan_id, NEW.plan_version))
    EXECUTE FUNCTION clisonix_record_plan_change();
-- The subscriptions that exist: on their plan since they began (all that is known).
INSERT INTO subscription_changes (tenant_id, at, plan_id, plan_version)
SELECT tenant_id, created_at, plan_id, plan_version FROM subscriptions;

CREATE TABLE invoices (
    id             uuid        PRIMARY KEY,
    tenant_id      uuid        NOT NULL,
    period_start   timestamptz NOT NULL,
    period_end     timestamptz NOT NULL,
    status         text        NOT NULL CHECK (status IN ('draft', 'finalized', 'paid', 'void')),
    -- Set when finalized, from invoice_numbers: 1, 2, 3, ... across the deployment.
    number         bigint      UNIQUE,
    currency       text        NOT NULL,
    subtotal_minor bigint      NOT NULL CHECK (subtotal_minor >= 0),
    tax_rate_bp    integer     NOT NULL,
    tax_minor      bigint      NOT NULL CHECK (tax_minor >= 0),
    total_minor    bigint      NOT NULL CHECK (total_minor >= 0),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    finalized_at   timestamptz,
    paid_at        timestamptz,
    voided_at      timestamptz,
    UNIQUE (tenant_id, period_start),
    FOREIGN KEY (tenant_id, period_start) REFERENCES billing_periods (tenant_id, period_start) ON DELETE CASCADE,
    CHECK ((status = 'draft') = (number IS NULL))
);
-- A tenant's invoices newest first.
CREATE INDEX invoices_tenant ON invoices (tenant_id, period_start DESC);

CREATE TABLE invoice_lines (
    invoice_id       uuid        NOT NULL REFERENCES invoices (id) ON DELETE CASCADE,
    line_no          integer     NOT NULL,
    kind             text        NOT NULL CHECK (kind IN ('base_fee', 'usage')),
    plan_id          text        NOT NULL,
    plan_version     integer     NOT NULL,
    meter            text,
    description      text        NOT NULL,
    period_from      timestamptz NOT NULL,
    period_to        timestamptz NOT NULL,
    share_ppm        bigint      NOT NULL,
    quantity         bigint      NOT NULL,
    included         bigint      NOT NULL,
    billable         bigint      NOT NULL,
    unit_price_minor bigint      NOT NULL,
    price_per        bigint      NOT NULL,
    amount_minor     bigint      NOT NULL CHECK (amount_minor >= 0),
    PRIMARY KEY (invoice_id, line_no)
);

-- The last number given to a finalized invoice and to a credit note. Taken in the
-- finalizing transaction (a row lock), so a rolled-back one leaves no gap.
CREATE TABLE invoice_numbers (
    series text   PRIMARY KEY CHECK (series IN ('invoice', 'credit_note')),
    last   bigint NOT NULL DEFAULT 0
);
INSERT INTO invoice_numbers (series) VALUES ('invoice'), ('credit_note');

CREATE TABLE credit_notes (
    id           uuid        PRIMARY KEY,
    invoice_id   uuid        NOT NULL REFERENCES invoices (id) ON DELETE CASCADE,
    number       bigint      NOT NULL UNIQUE,
    amount_minor bigint      NOT NULL CHECK (amount_minor > 0),
    reason       text        NOT NULL CHECK (length(reason) BETWEEN 1 AND 1000),
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credit_notes_invoice ON credit_notes (invoice_id);

-- A finalized invoice's content never changes: only its state moves on (to paid or
-- void, with when). Its lines cannot change either.
CREATE FUNCTION clisonix_invoice_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status <> 'draft' AND (
        (NEW.currency, NEW.subtotal_minor, NEW.tax_rate_bp, NEW.tax_minor, NEW.total_minor, NEW.number,
         NEW.period_start, NEW.period_end, NEW.tenant_id)
        IS DISTINCT FROM
        (OLD.currency, OLD.subtotal_minor, OLD.tax_rate_bp, OLD.tax_minor, OLD.total_minor, OLD.number,
         OLD.period_start, OLD.period_end, OLD.tenant_id)
        OR NEW.status = 'draft'
        OR (OLD.status IN ('paid', 'void') AND NEW.status <> OLD.status)) THEN
        RAISE EXCEPTION 'invoice % is % and cannot change', OLD.id, OLD.status
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER invoices_immutable BEFORE UPDATE ON invoices
    FOR EACH ROW EXECUTE FUNCTION clisonix_invoice_immutable();

CREATE FUNCTION clisonix_invoice_lines_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    st text;
BEGIN
    SELECT status INTO st FROM invoices WHERE id = coalesce(NEW.invoice_id, OLD.invoice_id);
    IF st IS NOT NULL AND st <> 'draft' THEN
        RAISE EXCEPTION 'the lines of a % invoice cannot change', st USING ERRCODE = 'check_violation';
    END IF;
    RETURN coalesce(NEW, OLD);
END;
$$;
CREATE TRIGGER invoice_lines_immutable BEFORE INSERT OR UPDATE OR DELETE ON invoice_lines
    FOR EACH ROW EXECUTE FUNCTION clisonix_invoice_lines_immutable();
