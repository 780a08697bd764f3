-- A JetStream stream that is deleted and created again starts its sequences at 1 again. The ledger
-- therefore keys each message by the stream's creation time *and* its sequence: otherwise the new
-- stream's message 1 would look "already committed" and be skipped, its events lost.

ALTER TABLE ingest_messages ADD COLUMN stream_created timestamptz;
-- Rows from before this migration belong to an earlier incarnation whose creation time was not kept.
UPDATE ingest_messages SET stream_created = '-infinity';
ALTER TABLE ingest_messages ALTER COLUMN stream_created SET NOT NULL;
ALTER TABLE ingest_messages DROP CONSTRAINT ingest_messages_pkey;
ALTER TABLE ingest_messages ADD PRIMARY KEY (stream_created, stream_seq);

ALTER TABLE ingest_batches ADD COLUMN stream_created timestamptz;
