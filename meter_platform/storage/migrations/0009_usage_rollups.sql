-- Hourly and daily rollups of the per-minute aggregates (UTC hours and days), so usage over long
-- ranges reads one row per customer-day instead of one per customer-minute. They hold exactly the sums
-- of their minutes: the writer and meter rebuilds upsert all three levels in one statement from the
-- same newly stored rows, and the reconciliation check compares them (meter_platform.meters.rollups).

CREATE TABLE usage_hour_aggregates (
    meter_slug   text        NOT NULL,
    hour         timestamptz NOT NULL,          -- a UTC hour: [hour, hour + 1 hour)
    customer_id  text        NOT NULL,
    dims         jsonb       NOT NULL,
    event_count  bigint      NOT NULL,
    value_count  bigint      NOT NULL,
    value_sum    numeric,
    value_min    numeric,
    value_max    numeric,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    -- Range first: "all customers over a range" reads a contiguous slice.
    PRIMARY KEY (meter_slug, hour, customer_id, dims)
);
-- "One customer over a range" in a zone whose days are not UTC days (Europe/Berlin: most of a month
-- is read as hours): without it, every customer's hours of the range are read.
CREATE INDEX usage_hour_aggregates_customer ON usage_hour_aggregates (meter_slug, customer_id, hour);

CREATE TABLE usage_day_aggregates (
    meter_slug   text        NOT NULL,
    day          timestamptz NOT NULL,          -- a UTC day: [day, day + 1 day)
    customer_id  text        NOT NULL,
    dims         jsonb       NOT NULL,
    event_count  bigint      NOT NULL,
    value_count  bigint      NOT NULL,
    value_sum    numeric,
    value_min    numeric,
    value_max    numeric,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (meter_slug, day, customer_id, dims)
);
-- "One customer over a range": without it a month by day for one customer reads every customer's
-- days of the month. Day rows are few per batch, so this index costs the write path little.
CREATE INDEX usage_day_aggregates_customer ON usage_day_aggregates (meter_slug, customer_id, day);

-- Backfill from the minutes already stored, so existing data is covered at once.
INSERT INTO usage_hour_aggregates
    (meter_slug, hour, customer_id, dims, event_count, value_count, value_sum, value_min, value_max)
SELECT meter_slug, date_trunc('hour', minute, 'UTC'), customer_id, dims, sum(event_count),
       sum(value_count), sum(value_sum), min(value_min), max(value_max)
FROM usage_minute_aggregates
GROUP BY 1, 2, 3, 4;

INSERT INTO usage_day_aggregates
    (meter_slug, day, customer_id, dims, event_count, value_count, value_sum, value_min, value_max)
SELECT meter_slug, date_trunc('day', hour, 'UTC'), customer_id, dims, sum(event_count),
       sum(value_count), sum(value_sum), min(value_min), max(value_max)
FROM usage_hour_aggregates
GROUP BY 1, 2, 3, 4;
