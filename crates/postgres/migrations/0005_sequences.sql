-- Issue 3: live gap detection with per-partition sequence numbers
-- (docs/SEQUENCES.md). Every statement is a catalog change or touches a
-- table that has no rows yet: nothing is rewritten on PostgreSQL 11+.

-- This outbox's producer id: the first part of every (producer, partition,
-- sequence) stamp the relay puts on a message. Made once, never changed.
CREATE TABLE IF NOT EXISTS custody_producer (
    id          TEXT PRIMARY KEY,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO custody_producer (id)
SELECT gen_random_uuid()::text WHERE NOT EXISTS (SELECT 1 FROM custody_producer);

-- The next number of each (partition, topic), advanced by the relay that
-- holds the partition's lease (the single writer of that partition's
-- numbering). Per topic, so a consumer of some topics sees every number of
-- what it subscribes to.
CREATE TABLE IF NOT EXISTS custody_sequence (
    partition  INT NOT NULL,
    topic      TEXT NOT NULL,
    next_seq   BIGINT NOT NULL,
    PRIMARY KEY (partition, topic)
);

-- A row's number, given before its first publish and kept by republishes.
ALTER TABLE custody_outbox ADD COLUMN IF NOT EXISTS seq BIGINT NULL;
-- `reconcile --live` resolves missing numbers to rows (partition, seq; the
-- topic is checked on the row).
CREATE INDEX IF NOT EXISTS custody_outbox_seq ON custody_outbox (partition, seq)
    WHERE seq IS NOT NULL;

-- Consumer side: the stamp of each numbered message in the inbox ...
ALTER TABLE custody_inbox ADD COLUMN IF NOT EXISTS producer TEXT NULL;
ALTER TABLE custody_inbox ADD COLUMN IF NOT EXISTS producer_partition INT NULL;
ALTER TABLE custody_inbox ADD COLUMN IF NOT EXISTS seq BIGINT NULL;
CREATE INDEX IF NOT EXISTS custody_inbox_seq
    ON custody_inbox (consumer, producer, topic, producer_partition, seq) WHERE seq IS NOT NULL;

-- ... and per (consumer, producer, topic, partition) the floor: every number up to
-- it was processed or accounted for, and its inbox rows were folded into it.
CREATE TABLE IF NOT EXISTS custody_inbox_watermark (
    consumer            TEXT NOT NULL,
    producer            TEXT NOT NULL,
    topic               TEXT NOT NULL,
    producer_partition  INT NOT NULL,
    floor               BIGINT NOT NULL DEFAULT 0,
    compacted           BIGINT NOT NULL DEFAULT 0,
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, producer, topic, producer_partition)
);
