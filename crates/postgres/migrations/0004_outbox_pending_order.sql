-- Serves the relay's fetch_batch in position order across all its leased
-- partitions (status = 0 AND partition = ANY(..) ORDER BY position LIMIT n).
-- custody_outbox_pending (partition, position) cannot give that order for
-- several partitions at once, so the planner walked the primary key from the
-- start and filtered out every published row: each batch got slower as a
-- backlog drained (43 ms per batch after 43k published rows, seconds after
-- several hundred thousand). This index holds only pending rows, in position
-- order, so a batch reads about `n` entries however much history is kept.
CREATE INDEX custody_outbox_pending_order ON custody_outbox (position)
    WHERE status = 0;
