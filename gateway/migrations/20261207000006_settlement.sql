-- Settling finalized invoices in self-hosted mode (lib/billing/src/settle.rs, run by
-- operators with `clisonix-gateway billing ...`): marked paid with the payment's
-- reference, voided with a reason, corrected by credit notes (numbered without gaps in
-- their own series, never more in all than the invoice's total).

ALTER TABLE invoices
    ADD COLUMN payment_reference text CHECK (length(payment_reference) BETWEEN 1 AND 200),
    ADD COLUMN void_reason       text CHECK (length(void_reason) BETWEEN 1 AND 1000),
    ADD CHECK ((status = 'paid') = (paid_at IS NOT NULL)),
    ADD CHECK ((status = 'void') = (voided_at IS NOT NULL AND void_reason IS NOT NULL));

-- What settles an invoice is written once, with its state.
CREATE FUNCTION clisonix_invoice_settlement_once() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (OLD.payment_reference IS NOT NULL AND NEW.payment_reference IS DISTINCT FROM OLD.payment_reference)
       OR (OLD.void_reason IS NOT NULL AND NEW.void_reason IS DISTINCT FROM OLD.void_reason)
       OR (OLD.paid_at IS NOT NULL AND NEW.paid_at IS DISTINCT FROM OLD.paid_at)
       OR (OLD.voided_at IS NOT NULL AND NEW.voided_at IS DISTINCT FROM OLD.voided_at) THEN
        RAISE EXCEPTION 'how invoice % was settled cannot change', OLD.id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER invoices_settlement_once BEFORE UPDATE ON invoices
    FOR EACH ROW EXECUTE FUNCTION clisonix_invoice_settlement_once();

-- A tenant's credit notes, and a note's invoice, at hand.
ALTER TABLE credit_notes ADD COLUMN tenant_id uuid REFERENCES tenants (id) ON DELETE CASCADE;
UPDATE credit_notes c SET tenant_id = i.tenant_id FROM invoices i WHERE i.id = c.invoice_id;
ALTER TABLE credit_notes ALTER COLUMN tenant_id SET NOT NULL;
CREATE INDEX credit_notes_tenant ON credit_notes (tenant_id, created_at DESC);

-- A credit note never changes once issued (it goes only with its tenant).
CREATE FUNCTION clisonix_credit_notes_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'credit note % cannot change', OLD.number USING ERRCODE = 'check_violation';
END;
$$;
CREATE TRIGGER credit_notes_immutable BEFORE UPDATE ON credit_notes
    FOR EACH ROW EXECUTE FUNCTION clisonix_credit_notes_immutable();

-- Webhooks out take each endpoint's oldest due deliveries (a few per endpoint at a
-- time, lib/billing/src/webhooks.rs).
CREATE INDEX webhook_deliveries_endpoint_due ON webhook_deliveries (endpoint_id, next_attempt_at)
    WHERE status = 'pending';
