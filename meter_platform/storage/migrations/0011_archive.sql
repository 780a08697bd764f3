-- The archive of raw events: days older than METER_HOT_DAYS are written to Parquet files (zstd),
-- verified against the ledger and the aggregates, and only then is their day partition of
-- usage_events detached and dropped (meter_platform.archive).
--
-- One row per file. A day usually has one part; it gets another when events for it are stored after
-- it was archived (a quarantine replay recreates its partition), and that partition is archived in
-- turn: the day's events are then the union of its parts and of its partition, if one exists.
-- event_ids keeps every id of every part: dedup stays exact across the archive.

CREATE TABLE archived_days (
    day          date        NOT NULL,        -- a UTC day: events with ts in [day, day + 1)
    part         integer     NOT NULL,        -- 1, 2, ...: the day's archives in the order written
    path         text,                        -- the Parquet file (URL or local path); NULL: no events
    rows         bigint      NOT NULL,
    bytes        bigint      NOT NULL,        -- the file's size
    checksum     text        NOT NULL,        -- sum over the ids of the first 60 bits of md5(id), decimal
    archived_at  timestamptz NOT NULL DEFAULT now(),
    deleted_at   timestamptz,                 -- the file was deleted by retention (METER_RETENTION_DAYS)
    PRIMARY KEY (day, part)
);

-- Per part and customer: how many events, and when the newest of them was stored. Billing asks whether
-- a customer has usage in a final period stored after it was finalized (a late event, billed as an
-- adjustment on the next draft); for days no longer in usage_events, this answers it exactly.
CREATE TABLE archived_customer_days (
    day             date        NOT NULL,
    part            integer     NOT NULL,
    customer_id     text        NOT NULL,
    events          bigint      NOT NULL,
    last_stored_at  timestamptz NOT NULL,
    PRIMARY KEY (day, part, customer_id),
    FOREIGN KEY (day, part) REFERENCES archived_days (day, part)
);
CREATE INDEX archived_customer_days_customer ON archived_customer_days (customer_id, day);
