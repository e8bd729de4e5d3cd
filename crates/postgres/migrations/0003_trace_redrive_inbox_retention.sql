-- Issue 3: trace, repair, redrive, inbox retention (docs/OPERATIONS.md).

-- The transport's reference from its durable ack (e.g. NATS `STREAM:seq`),
-- stored by mark_published, shown by `custody trace`. Adding a nullable
-- column (and one with a constant default) rewrites nothing on PostgreSQL 11+.
ALTER TABLE custody_outbox ADD COLUMN IF NOT EXISTS publish_ref TEXT NULL;
-- Times a repair or redrive put the row back to pending; the relay then
-- publishes with a new transport dedupe id (`<id>:r<n>` on NATS).
ALTER TABLE custody_outbox ADD COLUMN IF NOT EXISTS republish INT NOT NULL DEFAULT 0;

-- Dead letters an operator sent back to a consumer (`custody dlq redrive`):
-- the consumer engine hands each to its handler through the inbox and
-- deletes the row in the handler's transaction.
CREATE TABLE IF NOT EXISTS custody_redrive (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer     TEXT NOT NULL,
    message_id   UUID NOT NULL,
    topic        TEXT NOT NULL,
    envelope     TEXT NOT NULL,
    redriven_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (consumer, message_id)
);

-- Inbox retention: InboxStore::prune deletes a consumer's oldest rows.
CREATE INDEX IF NOT EXISTS custody_inbox_processed ON custody_inbox (consumer, processed_at);
-- Trace and redrive look dead letters up by message id.
CREATE INDEX IF NOT EXISTS custody_dead_letter_message ON custody_dead_letter (message_id);
