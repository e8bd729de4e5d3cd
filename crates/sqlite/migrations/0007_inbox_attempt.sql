-- Issue 11, scenario 10: poison detection. Same table as PostgreSQL's
-- migration 0010 (see there): one row per message a consumer run started
-- and has not finished; the handler's transaction deletes it.
-- Timestamps are INTEGER unix milliseconds, as everywhere in this schema.
CREATE TABLE custody_inbox_attempt (
    consumer    TEXT    NOT NULL,
    message_id  TEXT    NOT NULL,
    run         TEXT    NOT NULL,
    prev_run    TEXT    NULL,
    alone       INTEGER NOT NULL,
    crashes     INTEGER NOT NULL DEFAULT 0,
    started_at  INTEGER NOT NULL,
    PRIMARY KEY (consumer, message_id)
) WITHOUT ROWID;
