-- Quarantine you can work with: replays of quarantined events through the normal path, and the
-- ledger of what each replay moved out of quarantine (see meter_platform/quarantine.py).

CREATE TABLE quarantine_replays (
    replay_id         bigserial PRIMARY KEY,
    started_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,                   -- null while running (or if it was interrupted)
    filters           jsonb       NOT NULL DEFAULT '{}',
    catalog_dir       text,                          -- the catalog the events were re-validated with
    examined          bigint      NOT NULL DEFAULT 0,
    stored            bigint      NOT NULL DEFAULT 0, -- now valid and newly stored (aggregated)
    duplicates        bigint      NOT NULL DEFAULT 0, -- the id was stored already: counted once
    still_quarantined bigint      NOT NULL DEFAULT 0, -- still failing; reasons refreshed
    -- Committed chunk by chunk, in the transaction that moves the events: every examined event is
    -- accounted for.
    CHECK (examined = stored + duplicates + still_quarantined)
);

-- The state of each quarantined event: 'quarantined' until a replay moves it to 'replayed' (stored)
-- or 'duplicate' (its id was stored by another delivery), with the replay and the time.
ALTER TABLE quarantined_events
    ADD COLUMN replay_id   bigint REFERENCES quarantine_replays (replay_id),  -- the last replay that examined it
    ADD COLUMN resolved_at timestamptz,                                       -- when a replay moved it
    ADD CONSTRAINT quarantined_events_status CHECK (status IN ('quarantined', 'replayed', 'duplicate')),
    ADD CONSTRAINT quarantined_events_resolved CHECK ((status = 'quarantined') = (resolved_at IS NULL));

-- GET /v1/quarantine: newest first per status; filters by reason ({"reason": ...} containment).
CREATE INDEX quarantined_events_status_time ON quarantined_events (status, quarantined_at DESC, quarantine_id DESC);
CREATE INDEX quarantined_events_reasons ON quarantined_events USING gin (reasons jsonb_path_ops);
-- Replays walk the still-quarantined rows in quarantine_id order; the ledger counts the moved ones.
CREATE INDEX quarantined_events_open ON quarantined_events (quarantine_id) WHERE status = 'quarantined';
CREATE INDEX quarantined_events_moved ON quarantined_events (status) WHERE status <> 'quarantined';
