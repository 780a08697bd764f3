-- Alerting state (meter_platform/alerts.py). Everything the alert sensor knows lives here, so a
-- restarted daemon carries on where the last one stopped and sends nothing twice.

-- One row per failure episode of a check: opened when the check starts failing, closed when it passes.
CREATE TABLE alert_episodes (
    episode_id       bigserial PRIMARY KEY,
    asset            text        NOT NULL,
    check_name       text        NOT NULL,
    severity         text        NOT NULL CHECK (severity IN ('ERROR', 'WARN')),  -- the worst seen
    opened_at        timestamptz NOT NULL DEFAULT now(),
    closed_at        timestamptz,
    last_description text        NOT NULL,
    last_metadata    jsonb       NOT NULL DEFAULT '{}'
);
-- At most one open episode per check, even if two evaluations race.
CREATE UNIQUE INDEX alert_episodes_one_open ON alert_episodes (asset, check_name) WHERE closed_at IS NULL;

-- The outbox: one row per notice per channel, written in the transaction that opens or closes the
-- episode, and marked delivered right after the channel accepted it. Never deleted by the sender.
CREATE TABLE alert_deliveries (
    delivery_id     uuid        PRIMARY KEY,        -- idempotency key, sent as X-Meter-Delivery
    episode_id      bigint      NOT NULL REFERENCES alert_episodes (episode_id),
    kind            text        NOT NULL CHECK (kind IN ('alert', 'recovery')),
    channel         text        NOT NULL,
    payload         jsonb       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    UNIQUE (episode_id, kind, channel)              -- one alert and one recovery per episode and channel
);
CREATE INDEX alert_deliveries_pending ON alert_deliveries (next_attempt_at) WHERE delivered_at IS NULL;
