-- Issue 4: the inbox's record step in one round trip (docs/BENCHMARKS.md).
--
-- PgInbox::record ran two or three statements per message: the inbox
-- insert, then (for a numbered message) the read of its partition's floor,
-- as a statement of its own, and the first time the floor row's insert.
-- The floor must be read by a statement that starts after the insert went
-- ahead (see RECORD in crates/postgres/src/inbox.rs for why), which ruled
-- out one SQL statement. A VOLATILE function gives every statement in it a
-- fresh snapshot (READ COMMITTED), exactly like separate statements, so the
-- same steps run here in the same order, at one round trip per message.
--
-- Returns true when the message is new for the consumer (apply it), false
-- when it is a duplicate (seen before, or compacted into the floor).
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
    -- The row lock taken by the insert (or by the conflicting update)
    -- serializes two deliveries of one message to one consumer. A row
    -- `custody dlq redrive` marked (duplicates = -1) counts as new once.
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
    IF p_producer IS NULL OR p_partition IS NULL OR p_seq IS NULL THEN
        RETURN true;
    END IF;
    -- a statement of its own, after the insert: a fresh snapshot
    SELECT floor INTO current FROM custody_inbox_watermark
    WHERE consumer = p_consumer AND producer = p_producer AND topic = p_topic
      AND producer_partition = p_partition;
    IF NOT FOUND THEN
        -- the partition's first numbered message: give it a floor row
        -- (progress and compaction go by these rows)
        INSERT INTO custody_inbox_watermark (consumer, producer, topic, producer_partition)
        VALUES (p_consumer, p_producer, p_topic, p_partition) ON CONFLICT DO NOTHING;
        RETURN true;
    END IF;
    -- at or below the floor: processed before, its row compacted into it
    RETURN p_seq > current;
END
$$;

-- Several messages of one consumer in one round trip, in order: exactly
-- custody_inbox_record for each (each of its statements still takes a
-- fresh snapshot), one result per message. NULL elements of the last three
-- arrays: an unnumbered message.
CREATE OR REPLACE FUNCTION custody_inbox_record_all(
    p_consumer   TEXT,
    p_ids        UUID[],
    p_topics     TEXT[],
    p_now        TIMESTAMPTZ,
    p_producers  TEXT[],
    p_partitions INT[],
    p_seqs       BIGINT[]
) RETURNS BOOLEAN[]
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    result BOOLEAN[] := '{}';
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_ids, 1), 0) LOOP
        result := result || custody_inbox_record(p_consumer, p_ids[i], p_topics[i], p_now,
                                                 p_producers[i], p_partitions[i], p_seqs[i]);
    END LOOP;
    RETURN result;
END
$$;
