-- Tenants: the unit of isolation. Every row of every later table belongs to one,
-- and every query is scoped by tenant_id.
CREATE TABLE tenants (
    id         uuid        PRIMARY KEY,
    name       text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at timestamptz NOT NULL DEFAULT now()
);
