-- Issue 11 (docs/SEQUENCES.md, docs/OPERATIONS.md):
--   scenario 3: the redrive row is the one exactly-once token of a redrive;
--   scenario 4: a producer identity that changes when its history could have
--               forked; a number at or below the floor whose id was never
--               recorded is dead-lettered, never dropped;
--   scenario 5: accepting a gap, with an audit record.

-- Per (consumer, producer, topic, partition): the highest number whose inbox
-- row compaction or retention may have deleted. Above it, every number up to
-- the floor still has its rows (or was accepted as lost: custody_gap_accepted),
-- so a message numbered there whose id has no row was never recorded. Rows
-- of existing floors may all be gone: start at the floor.
ALTER TABLE custody_inbox_watermark ADD COLUMN IF NOT EXISTS forgotten BIGINT NOT NULL DEFAULT 0;
UPDATE custody_inbox_watermark SET forgotten = floor;

-- Every floor raised past numbers that never arrived: by an operator
-- (`custody reconcile --live --accept`) or by a consumer whose stream did not
-- begin at 1 (by = 'consumer:<name>'). Kept: the audit record.
CREATE TABLE IF NOT EXISTS custody_gap_accepted (
    id                  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer            TEXT NOT NULL,
    producer            TEXT NOT NULL,
    topic               TEXT NOT NULL,
    producer_partition  INT NOT NULL,
    old_floor           BIGINT NOT NULL,
    new_floor           BIGINT NOT NULL,
    numbers             TEXT NOT NULL,   -- the missing numbers accepted: '5, 7-9'
    count               BIGINT NOT NULL,
    accepted_by         TEXT NOT NULL,
    reason              TEXT NOT NULL,
    accepted_at         TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS custody_gap_accepted_consumer
    ON custody_gap_accepted (consumer, producer, topic, producer_partition);

-- Issue 11: the redrive row is the one exactly-once token of a redrive
-- (scenario 3).
--
-- custody_inbox_record as in migration 0007, plus one step: a message that
-- would be new (its first sight, or the mark `custody dlq redrive` left on
-- its row, duplicates = -1) while a redrive of it is still queued is a
-- duplicate, and its row keeps (or gets) the mark. The consumer engine
-- takes a redrive by deleting its queue row (InboxStore::finish_redrive)
-- before recording the message in the same transaction, so only the
-- redrive's own transaction no longer sees the row. Before this, a copy
-- arriving before the queue was drained (a JetStream replay, a republish
-- past the dedupe window) used up the mark, was called a duplicate by the
-- floor check, and the redrive was then a duplicate too: no effect, no
-- dead letter.
--
-- Locking (READ COMMITTED): the insert's row lock on the inbox row (or the
-- conflicting update's) serializes the copy and the redrive. A copy that
-- gets the row first sees the queue row (the redrive's delete is not
-- committed, or not made yet), puts the mark back and commits; the redrive
-- then waits for it and takes the mark. A copy that comes second finds the
-- row already taken (duplicates 0) and counts as a duplicate. A redrive
-- that rolls back restores both its queue row and the mark.
CREATE OR REPLACE FUNCTION custody_inbox_record(
    p_consumer   TEXT,
    p_message_id UUID,
    p_topic      TEXT,
    p_now        TIMESTAMPTZ,
    p_producer   TEXT,
    p_partition  INT,
    p_seq        BIGINT
) RETURNS BOOLEAN
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    dup      INT;
    inserted BOOLEAN;
    current  BIGINT;
    gone     BIGINT;
BEGIN
    -- xmax = 0 on the returned row: it was inserted, not updated (the id
    -- was never recorded before)
    INSERT INTO custody_inbox
        (consumer, message_id, topic, processed_at, producer, producer_partition, seq)
    VALUES (p_consumer, p_message_id, p_topic, p_now, p_producer, p_partition, p_seq)
    ON CONFLICT (consumer, message_id) DO UPDATE
        SET duplicates = CASE WHEN custody_inbox.duplicates < 0 THEN 0
                              ELSE custody_inbox.duplicates + 1 END
    RETURNING duplicates, (xmax = 0) INTO dup, inserted;
    IF dup <> 0 THEN
        RETURN false;
    END IF;
    -- a statement of its own, after the insert: a redrive of the message
    -- still queued (not taken by this transaction) keeps the token
    PERFORM 1 FROM custody_redrive
    WHERE consumer = p_consumer AND message_id = p_message_id;
    IF FOUND THEN
        UPDATE custody_inbox SET duplicates = -1
        WHERE consumer = p_consumer AND message_id = p_message_id;
        RETURN false;
    END IF;
    IF p_producer IS NULL OR p_partition IS NULL OR p_seq IS NULL THEN
        RETURN true;
    END IF;
    SELECT floor, forgotten INTO current, gone FROM custody_inbox_watermark
    WHERE consumer = p_consumer AND producer = p_producer AND topic = p_topic
      AND producer_partition = p_partition;
    IF NOT FOUND THEN
        INSERT INTO custody_inbox_watermark (consumer, producer, topic, producer_partition)
        VALUES (p_consumer, p_producer, p_topic, p_partition) ON CONFLICT DO NOTHING;
        RETURN true;
    END IF;
    IF p_seq > current THEN
        RETURN true;
    END IF;
    -- At or below the floor. Above `forgotten` every accounted-for number
    -- still has its rows, so an id seen for the first time there was never
    -- processed: another message with a number already used (a producer
    -- whose history forked: a restore, a clone), or one that arrived after
    -- its number was accepted as lost. NULL: the caller dead-letters it
    -- (PgInbox::record); its row goes, so reconcile does not count it as
    -- processed. At or below `forgotten` it may be a compacted message: a
    -- duplicate, as before.
    IF inserted AND p_seq > gone THEN
        DELETE FROM custody_inbox WHERE consumer = p_consumer AND message_id = p_message_id;
        RETURN NULL;
    END IF;
    RETURN false;
END
$$;

-- Scenario 4: the producer id is bound to where its history lives. A
-- `CREATE DATABASE … TEMPLATE` clone copied custody_producer.id, and a
-- point-in-time restore or a failover to an async replica rewinds
-- custody_sequence under the same id: numbers were given twice and the
-- consumer dropped the second ones as duplicates. The fingerprint is the
-- cluster's system identifier, the WAL timeline (a promotion or a PITR
-- starts a new one) and the database's oid (a clone, a dump restored
-- elsewhere); custody_producer_id() gives the id a new value when it no
-- longer matches.
ALTER TABLE custody_producer ADD COLUMN IF NOT EXISTS fingerprint TEXT NULL;

-- Every renewal of the id, with why.
CREATE TABLE IF NOT EXISTS custody_producer_history (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    old_id           TEXT NOT NULL,
    new_id           TEXT NOT NULL,
    old_fingerprint  TEXT NULL,
    new_fingerprint  TEXT NOT NULL,
    renumbered       BIGINT NOT NULL,   -- pending rows whose numbers were cleared
    changed_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- system identifier / timeline / database oid. The timeline is read from
-- the current WAL file name (the checkpoint's lags a fast promotion).
CREATE OR REPLACE FUNCTION custody_producer_fingerprint() RETURNS TEXT
LANGUAGE sql VOLATILE
AS $$
    SELECT (SELECT system_identifier::text FROM pg_control_system())
        || '/' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)
        || '/' || (SELECT oid::text FROM pg_database WHERE datname = current_database())
$$;

-- The producer id for this database as it is now. Unchanged while the
-- fingerprint matches (the common case: one read). The first call after
-- this migration binds the existing id to the fingerprint. On a mismatch,
-- under the lock of the custody_producer row: a new id, numbering restarts
-- at 1 for every (partition, topic), and pending rows numbered under the
-- old id lose their numbers (and journal entries) and are numbered again
-- under the new one; published rows keep theirs (history of the old id).
-- Rows the old database had already published as pending copies (a clone's
-- backlog, a restore's rewound marks) are then delivered under the new id
-- with ids the consumer has seen: duplicates by id, and their new numbers
-- show as holes until accepted (docs/OPERATIONS.md, "After a restore").
CREATE OR REPLACE FUNCTION custody_producer_id() RETURNS TEXT
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    now_fp  TEXT := custody_producer_fingerprint();
    cur     custody_producer%ROWTYPE;
    fresh   TEXT;
    n       BIGINT;
BEGIN
    SELECT * INTO cur FROM custody_producer ORDER BY created_at LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'custody_producer is empty; run `custody migrate` on a fresh database or insert the id back';
    END IF;
    IF cur.fingerprint = now_fp THEN
        RETURN cur.id;
    END IF;
    SELECT * INTO cur FROM custody_producer WHERE id = cur.id FOR UPDATE;
    IF cur.fingerprint = now_fp THEN
        RETURN cur.id;  -- another session renewed (or bound) it first
    END IF;
    IF cur.fingerprint IS NULL THEN
        UPDATE custody_producer SET fingerprint = now_fp WHERE id = cur.id;
        RETURN cur.id;
    END IF;
    fresh := gen_random_uuid()::text;
    -- numbering is per (partition, topic) under the partition lease; the
    -- table lock keeps a relay of the old id from numbering meanwhile
    LOCK TABLE custody_sequence IN EXCLUSIVE MODE;
    DELETE FROM custody_sequence;
    DELETE FROM custody_sequence_block;
    UPDATE custody_outbox SET seq = NULL WHERE status = 0 AND seq IS NOT NULL;
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE custody_producer SET id = fresh, fingerprint = now_fp WHERE id = cur.id;
    INSERT INTO custody_producer_history (old_id, new_id, old_fingerprint, new_fingerprint, renumbered)
    VALUES (cur.id, fresh, cur.fingerprint, now_fp, n);
    RETURN fresh;
END
$$;

-- Bind the id of an existing database now, so a clone made after this
-- migration is told apart from its template.
SELECT custody_producer_id();
