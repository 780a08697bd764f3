-- Room on each page of the aggregate tables for the next versions of their rows (HOT updates).
--
-- Every micro-batch updates the rows of the current minute, hour and day again: an aggregate row is
-- rewritten many times while its period is open. With full pages (fillfactor 100) the new version
-- often has no room on its page and moves to another one; the update then also inserts a new entry
-- into every index (the primary key with its jsonb dims, and the hour and day tables' customer
-- index), and the next upsert's conflict check walks past the dead entries to the live one (that
-- check is the largest part of the upsert's CPU). With room on the page the update is HOT: no index
-- entry, and the dead version is pruned in place.
--
-- Measured on the writer's upsert (3,000 new api_call events per batch, 2 meters, minutes, hours and
-- days; tables of 900k / 240k / 150k rows): HOT updates went from 71-80 % to 92-97 %, the backend's
-- CPU per batch from 293 to 243 ms, WAL per batch from 2.8 to 2.0 MiB. 80 % for minutes and 50 % for
-- hours and days gained about 3 % more CPU, for twice the space. The price is space in closed periods,
-- whose rows no longer change but keep the room: about +6 % for the minutes, +15 % for hours and days
-- when compared with tightly packed tables (a table that gets non-HOT updates is not packed either: on
-- fresh databases fed by the real writer the three tables ended up smaller with this migration).
--
-- Only pages written from now on leave the room; existing full pages keep their rows until those are
-- next updated (then they move once, to pages that leave the room).

ALTER TABLE usage_minute_aggregates SET (fillfactor = 90);
ALTER TABLE usage_hour_aggregates SET (fillfactor = 70);
ALTER TABLE usage_day_aggregates SET (fillfactor = 70);
