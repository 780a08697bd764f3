-- API keys (only a SHA-256 hash of each key is stored) and the audit log of admin actions.

CREATE TABLE api_keys (
    id                  text PRIMARY KEY,
    key_hash            text        NOT NULL UNIQUE,          -- hex SHA-256 of the whole key
    prefix              text        NOT NULL,                 -- the first characters, to recognise it
    name                text,
    scopes              text[]      NOT NULL CHECK (scopes <@ ARRAY['ingest', 'read', 'admin']::text[]),
    customer_id         text,                                 -- set: the key sees only this customer
    events_per_second   double precision NOT NULL CHECK (events_per_second > 0),
    requests_per_second double precision NOT NULL CHECK (requests_per_second > 0),
    created_at          timestamptz NOT NULL DEFAULT now(),
    last_used_at        timestamptz,
    revoked_at          timestamptz
);

CREATE TABLE audit_log (
    audit_id  bigserial PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    actor     text        NOT NULL,   -- a key id, or 'cli'
    action    text        NOT NULL,   -- e.g. key.create, key.revoke, customer.put
    target    text,
    details   jsonb       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_at ON audit_log (at DESC, audit_id DESC);
