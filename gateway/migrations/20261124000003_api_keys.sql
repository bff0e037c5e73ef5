-- API keys for programs and devices. Only a SHA-256 hash of the key is stored; the
-- prefix (shown in listings) identifies it to people.
CREATE TABLE api_keys (
    id           uuid        PRIMARY KEY,
    tenant_id    uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    created_by   uuid        REFERENCES users (id) ON DELETE SET NULL,
    name         text        NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    prefix       text        NOT NULL UNIQUE,
    key_hash     bytea       NOT NULL UNIQUE,
    scopes       text[]      NOT NULL CHECK (scopes <@ ARRAY['ingest', 'read', 'admin']::text[] AND cardinality(scopes) > 0),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id, created_at DESC);

-- Devices a tenant streams from (registered by ingest on first use, or by admins).
CREATE TABLE devices (
    tenant_id  uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    device_id  text        NOT NULL CHECK (device_id ~ '^[A-Za-z0-9._:-]{1,128}$'),
    name       text,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, device_id)
);
