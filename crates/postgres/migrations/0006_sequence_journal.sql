-- Issue 4: numbering without a second version of every outbox row
-- (docs/SEQUENCES.md, "Where a number lives"; docs/BENCHMARKS.md).
--
-- The relay numbers a batch before publishing it, and the numbers must be
-- durable by then (a republish after a crash has to carry the same ones).
-- Writing them into custody_outbox.seq cost an UPDATE of every row: a new
-- version of the wide row and an entry in each of its indexes, only for the
-- mark to write yet another version moments later. Instead the numbering
-- statement writes one journal row per (partition, topic) of the batch, and
-- the mark (or the failure / dead-letter record) copies each row's number
-- into custody_outbox.seq in the version it writes anyway, then deletes the
-- journal rows it has fully copied. So:
--   number of an outbox row = custody_outbox.seq, or else its entry here.
-- Journal rows left behind (a relay that crashed or lost its lease between
-- numbering and marking) are reused by the next numbering of those rows and
-- swept once every row in them carries its number.
CREATE TABLE IF NOT EXISTS custody_sequence_block (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    partition  INT NOT NULL,
    topic      TEXT NOT NULL,
    -- the range of positions, so lookups by position visit only the
    -- blocks that can hold it
    first_pos  BIGINT NOT NULL,
    last_pos   BIGINT NOT NULL,
    -- positions[i] got number seqs[i]; a redriven dead letter's position is
    -- replaced by 0 (it gets a new number)
    positions  BIGINT[] NOT NULL,
    seqs       BIGINT[] NOT NULL
);
CREATE INDEX IF NOT EXISTS custody_sequence_block_pos
    ON custody_sequence_block (partition, last_pos);

-- Never chosen by the planner since custody_outbox_pending_order (0004)
-- exists (fetch_batch's order across several partitions), yet written by
-- every enqueue and every numbering: one index entry per row for nothing.
DROP INDEX IF EXISTS custody_outbox_pending;
