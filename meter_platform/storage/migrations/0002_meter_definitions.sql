-- Active meter definitions (what the aggregates were computed with) and the history of replays.

CREATE TABLE meter_definitions (
    slug            text PRIMARY KEY,
    definition      jsonb       NOT NULL,
    definition_hash text        NOT NULL,
    version         integer     NOT NULL,
    activated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE meter_replays (
    replay_id       bigserial PRIMARY KEY,
    slug            text        NOT NULL,
    kind            text        NOT NULL,           -- added | changed | removed
    old_definition  jsonb,
    new_definition  jsonb,
    events          bigint      NOT NULL,
    report          jsonb       NOT NULL,           -- {customer: [old, new]}
    replayed_at     timestamptz NOT NULL DEFAULT now()
);
