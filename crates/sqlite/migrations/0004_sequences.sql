-- Issue 3: live gap detection with per-partition sequence numbers
-- (custody_core::sequence). Same names as the PostgreSQL migration.
-- Timestamps are INTEGER unix milliseconds, as everywhere in this schema.

-- This outbox's producer id: the first part of every (producer, partition,
-- sequence) stamp the relay puts on a message. Made once, never changed.
CREATE TABLE custody_producer (
    id         TEXT    NOT NULL PRIMARY KEY,
    created_at INTEGER NOT NULL
);
INSERT INTO custody_producer (id, created_at)
VALUES (lower(hex(randomblob(16))),
        CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));

-- The next number of each (partition, topic), advanced by the relay holding
-- the partition's lease (the single writer of that partition's numbering).
-- Per topic, so a consumer of some of the topics sees every number of what
-- it subscribes to. No row: the next number is 1.
CREATE TABLE custody_sequence (
    partition INTEGER NOT NULL,
    topic     TEXT    NOT NULL,
    next_seq  INTEGER NOT NULL,
    PRIMARY KEY (partition, topic)
) WITHOUT ROWID;

-- A row's number, given before its first publish and kept by republishes
-- (a relay dead letter's skip marker carries it; a redrive clears it).
ALTER TABLE custody_outbox ADD COLUMN seq INTEGER NULL;
-- `reconcile --live` resolves missing numbers to rows (partition, seq; the
-- topic is checked on the row).
CREATE INDEX custody_outbox_seq ON custody_outbox (partition, seq) WHERE seq IS NOT NULL;

-- Consumer side: the stamp of each numbered message in the inbox ...
ALTER TABLE custody_inbox ADD COLUMN producer TEXT NULL;
ALTER TABLE custody_inbox ADD COLUMN producer_partition INTEGER NULL;
ALTER TABLE custody_inbox ADD COLUMN seq INTEGER NULL;
CREATE INDEX custody_inbox_seq
    ON custody_inbox (consumer, producer, topic, producer_partition, seq) WHERE seq IS NOT NULL;

-- ... and per (consumer, producer, topic, partition) the floor: every number up to
-- it was processed or accounted for; inbox rows at or below it are folded in.
CREATE TABLE custody_inbox_watermark (
    consumer           TEXT    NOT NULL,
    producer           TEXT    NOT NULL,
    topic              TEXT    NOT NULL,
    producer_partition INTEGER NOT NULL,
    floor              INTEGER NOT NULL DEFAULT 0,
    compacted          INTEGER NOT NULL DEFAULT 0,
    updated_at         INTEGER NOT NULL,
    PRIMARY KEY (consumer, producer, topic, producer_partition)
) WITHOUT ROWID;
