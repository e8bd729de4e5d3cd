-- Retention: serves OutboxStore::prune (SqliteOutbox's PRUNE), which deletes
-- the oldest published / dead rows. The expression is published_at for
-- published rows and enqueued_at for dead ones, and must match PRUNE's
-- spelling exactly. Partial on status <> 0: inserts (status 0) never touch
-- it; mark_published adds one entry. Without it, a prune call that finds
-- nothing old enough scans every row kept for the retention window.
CREATE INDEX IF NOT EXISTS custody_outbox_done
    ON custody_outbox (COALESCE(published_at, enqueued_at), partition)
    WHERE status <> 0;
