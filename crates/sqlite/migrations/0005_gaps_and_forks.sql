-- Issue 11 (docs/SEQUENCES.md, docs/OPERATIONS.md): the same as PostgreSQL
-- migration 0008, for SQLite.

-- Per (consumer, producer, topic, partition): the highest number whose inbox
-- row compaction or retention may have deleted. Above it, every number up to
-- the floor still has its rows (or was accepted as lost), so a message
-- numbered there whose id has no row was never recorded: the inbox
-- dead-letters it instead of calling it a duplicate. Existing floors: their
-- rows may all be gone.
ALTER TABLE custody_inbox_watermark ADD COLUMN forgotten INTEGER NOT NULL DEFAULT 0;
UPDATE custody_inbox_watermark SET forgotten = floor;

-- Every floor raised past numbers that never arrived: by an operator
-- (`custody reconcile --live --accept`) or by a consumer whose stream did not
-- begin at 1 (accepted_by = 'consumer:<name>'). Kept: the audit record.
CREATE TABLE custody_gap_accepted (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    consumer            TEXT    NOT NULL,
    producer            TEXT    NOT NULL,
    topic               TEXT    NOT NULL,
    producer_partition  INTEGER NOT NULL,
    old_floor           INTEGER NOT NULL,
    new_floor           INTEGER NOT NULL,
    numbers             TEXT    NOT NULL,  -- the missing numbers accepted: '5, 7-9'
    count               INTEGER NOT NULL,
    accepted_by         TEXT    NOT NULL,
    reason              TEXT    NOT NULL,
    accepted_at         INTEGER NOT NULL
);
CREATE INDEX custody_gap_accepted_consumer
    ON custody_gap_accepted (consumer, producer, topic, producer_partition);

-- The file the producer id is bound to (device and inode of the database
-- file): a copy of the file is another producer (SqliteOutbox::producer_id
-- renews the id, restarts the numbering and records it here). NULL until
-- the first relay binds it.
ALTER TABLE custody_producer ADD COLUMN fingerprint TEXT NULL;
CREATE TABLE custody_producer_history (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    old_id           TEXT    NOT NULL,
    new_id           TEXT    NOT NULL,
    old_fingerprint  TEXT    NULL,
    new_fingerprint  TEXT    NOT NULL,
    renumbered       INTEGER NOT NULL,
    changed_at       INTEGER NOT NULL
);
