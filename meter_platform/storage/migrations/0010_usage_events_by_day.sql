-- Raw events partitioned by day (UTC), with dedup by id kept exact across the partitions.
--
-- A primary key on a partitioned table must include the partition key, and (id, ts) would let the
-- same id sent again with another timestamp be stored twice. So the idempotency key moves to a narrow
-- table of its own: `event_ids` holds one row per id ever stored, with the ts that says which day's
-- partition holds the event. It is the dedup authority: never archived, never dropped. A writer
-- inserts into it `ON CONFLICT (id) DO NOTHING` and stores only the rows whose id it inserted; a
-- concurrent writer with the same id waits on the primary key, then sees the conflict.
--
-- `usage_events` becomes `PARTITION BY RANGE (ts)` with one partition per UTC day, named
-- usage_events_YYYYMMDD and covering [day 00:00 UTC, next day 00:00 UTC). There is no DEFAULT
-- partition: a missing day is created on demand (meter_platform.storage.partitions) before the batch
-- transaction, so a day's partition can be archived and dropped whole. The existing rows move over.

CREATE TABLE event_ids (
    id  text PRIMARY KEY,
    ts  timestamptz NOT NULL  -- the stored event's ts: its partition is the day of ts (UTC)
);

ALTER TABLE usage_events RENAME TO usage_events_unpartitioned;
-- Their names are the new indexes' names; the old table is dropped below anyway.
DROP INDEX usage_events_type_ts;
DROP INDEX usage_events_customer_ts;

CREATE TABLE usage_events (
    id           text        NOT NULL,          -- unique through event_ids (the idempotency key)
    event_type   text        NOT NULL,
    customer_id  text        NOT NULL,
    ts           timestamptz NOT NULL,          -- the event's own time, microseconds; the partition key
    received_at  timestamptz NOT NULL,          -- when the gateway (or JetStream) received it
    properties   jsonb       NOT NULL DEFAULT '{}',
    metadata     jsonb       NOT NULL DEFAULT '{}',
    stream_seq   bigint      NOT NULL,          -- the JetStream message that carried it
    stored_at    timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (ts);

-- The days the existing rows need, and today and tomorrow (UTC) so the first batches find theirs.
DO $$
DECLARE
    d date;
BEGIN
    FOR d IN
        SELECT DISTINCT (ts AT TIME ZONE 'UTC')::date FROM usage_events_unpartitioned
        UNION SELECT (now() AT TIME ZONE 'UTC')::date
        UNION SELECT (now() AT TIME ZONE 'UTC')::date + 1
    LOOP
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF usage_events FOR VALUES FROM (%L) TO (%L)',
            'usage_events_' || to_char(d, 'YYYYMMDD'),
            to_char(d, 'YYYY-MM-DD') || ' 00:00:00+00',
            to_char(d + 1, 'YYYY-MM-DD') || ' 00:00:00+00'
        );
    END LOOP;
END
$$;

INSERT INTO usage_events (id, event_type, customer_id, ts, received_at, properties, metadata, stream_seq, stored_at)
SELECT id, event_type, customer_id, ts, received_at, properties, metadata, stream_seq, stored_at
FROM usage_events_unpartitioned ORDER BY ts, id;

INSERT INTO event_ids (id, ts) SELECT id, ts FROM usage_events_unpartitioned ORDER BY id;

DROP TABLE usage_events_unpartitioned;

-- Declared on the parent: every partition, present and future, gets them. (id) serves lookups by id
-- within a day (with ts from event_ids) and the archive's checks; it is not unique on its own.
CREATE INDEX usage_events_id ON usage_events (id);
CREATE INDEX usage_events_type_ts ON usage_events (event_type, ts);
CREATE INDEX usage_events_customer_ts ON usage_events (customer_id, ts);

-- The newest rows of the partitions around now, for the pipeline's batch-delay figure
-- (ingest_gateway.metrics_pipeline): a TID range scan of the last `pages` pages of each of
-- yesterday's, today's and tomorrow's partitions (UTC) that exist. pg_relation_size of the
-- partitioned parent is 0, so the tail has to be read per partition.
CREATE FUNCTION usage_events_tail(pages integer)
RETURNS TABLE (stored_at timestamptz, received_at timestamptz)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    d date;
    part regclass;
BEGIN
    FOR d IN SELECT (now() AT TIME ZONE 'UTC')::date + k FROM generate_series(-1, 1) AS k LOOP
        part := to_regclass('usage_events_' || to_char(d, 'YYYYMMDD'));
        CONTINUE WHEN part IS NULL;
        RETURN QUERY EXECUTE format(
            'SELECT stored_at, received_at FROM %s WHERE ctid >= $1', part
        ) USING ('(' || greatest(pg_relation_size(part) / current_setting('block_size')::bigint - pages, 0)
                 || ',0)')::tid;
    END LOOP;
END
$$;
