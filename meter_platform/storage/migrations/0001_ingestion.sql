-- The ingestion spine: raw events, quarantine, per-minute aggregates and the ledger that proves
-- every JetStream message was committed exactly once.

CREATE TABLE usage_events (
    id           text PRIMARY KEY,              -- the idempotency key: one row per id, ever
    event_type   text        NOT NULL,
    customer_id  text        NOT NULL,
    ts           timestamptz NOT NULL,          -- the event's own time, microseconds
    received_at  timestamptz NOT NULL,          -- when the gateway (or JetStream) received it
    properties   jsonb       NOT NULL DEFAULT '{}',
    metadata     jsonb       NOT NULL DEFAULT '{}',
    stream_seq   bigint      NOT NULL,          -- the JetStream message that carried it
    stored_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_events_type_ts ON usage_events (event_type, ts);
CREATE INDEX usage_events_customer_ts ON usage_events (customer_id, ts);

CREATE TABLE quarantined_events (
    quarantine_id  bigserial PRIMARY KEY,
    event_id       text,                        -- null when the message could not be read as events
    event_type     text,
    customer_id    text,
    ts             timestamptz,
    received_at    timestamptz NOT NULL,
    payload        jsonb,                       -- the item as received
    payload_text   text,                        -- the raw message when it was not JSON
    reasons        jsonb       NOT NULL,        -- [{"field", "reason", "message"}]
    stream_seq     bigint      NOT NULL,
    quarantined_at timestamptz NOT NULL DEFAULT now(),
    status         text        NOT NULL DEFAULT 'quarantined'
);
CREATE UNIQUE INDEX quarantined_events_event_id ON quarantined_events (event_id) WHERE event_id IS NOT NULL;
CREATE INDEX quarantined_events_type ON quarantined_events (event_type, quarantined_at);

CREATE TABLE usage_minute_aggregates (
    meter_slug   text        NOT NULL,
    minute       timestamptz NOT NULL,          -- [minute, minute + 1 min)
    customer_id  text        NOT NULL,
    dims         jsonb       NOT NULL,          -- the meter's group_by values (null when absent)
    event_count  bigint      NOT NULL,          -- events that matched the meter
    value_count  bigint      NOT NULL,          -- of those, events carrying a numeric value
    value_sum    numeric,
    value_min    numeric,
    value_max    numeric,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (meter_slug, minute, customer_id, dims)
);

CREATE TABLE ingest_batches (
    batch_id     bigserial PRIMARY KEY,
    run_id       text,
    first_seq    bigint      NOT NULL,
    last_seq     bigint      NOT NULL,
    messages     integer     NOT NULL,
    events       integer     NOT NULL,
    stored       integer     NOT NULL,
    duplicates   integer     NOT NULL,
    quarantined  integer     NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now(),
    CHECK (events = stored + duplicates + quarantined)
);

-- One row per committed JetStream message: a redelivered message finds its row and is acked
-- without being applied twice; gaps in stream_seq are what the continuity check looks for.
CREATE TABLE ingest_messages (
    stream_seq   bigint PRIMARY KEY,
    batch_id     bigint  NOT NULL REFERENCES ingest_batches (batch_id),
    subject      text    NOT NULL,
    events       integer NOT NULL,
    stored       integer NOT NULL,
    duplicates   integer NOT NULL,
    quarantined  integer NOT NULL,
    CHECK (events = stored + duplicates + quarantined)
);
