-- Issue 3: trace, repair, redrive, inbox retention (docs/OPERATIONS.md).

-- The transport's reference from its durable ack (e.g. NATS `STREAM:seq`),
-- stored by mark_published, shown by `custody trace`.
ALTER TABLE custody_outbox ADD COLUMN publish_ref TEXT NULL;
-- Times a repair or redrive put the row back to pending; the relay then
-- publishes with a new transport dedupe id (`<id>:r<n>` on NATS).
ALTER TABLE custody_outbox ADD COLUMN republish INTEGER NOT NULL DEFAULT 0;

-- Dead letters an operator sent back to a consumer (`custody dlq redrive`):
-- the consumer engine hands each to its handler through the inbox and
-- deletes the row in the handler's transaction.
CREATE TABLE custody_redrive (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    consumer     TEXT    NOT NULL,
    message_id   TEXT    NOT NULL,
    topic        TEXT    NOT NULL,
    envelope     TEXT    NOT NULL,
    redriven_at  INTEGER NOT NULL,
    UNIQUE (consumer, message_id)
);

-- Inbox retention: InboxStore::prune deletes a consumer's oldest rows.
CREATE INDEX custody_inbox_processed ON custody_inbox (consumer, processed_at);
