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
    dup     INT;
    current BIGINT;
BEGIN
    INSERT INTO custody_inbox
        (consumer, message_id, topic, processed_at, producer, producer_partition, seq)
    VALUES (p_consumer, p_message_id, p_topic, p_now, p_producer, p_partition, p_seq)
    ON CONFLICT (consumer, message_id) DO UPDATE
        SET duplicates = CASE WHEN custody_inbox.duplicates < 0 THEN 0
                              ELSE custody_inbox.duplicates + 1 END
    RETURNING duplicates INTO dup;
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
    SELECT floor INTO current FROM custody_inbox_watermark
    WHERE consumer = p_consumer AND producer = p_producer AND topic = p_topic
      AND producer_partition = p_partition;
    IF NOT FOUND THEN
        INSERT INTO custody_inbox_watermark (consumer, producer, topic, producer_partition)
        VALUES (p_consumer, p_producer, p_topic, p_partition) ON CONFLICT DO NOTHING;
        RETURN true;
    END IF;
    -- at or below the floor: processed before, its row compacted into it
    RETURN p_seq > current;
END
$$;
