-- Issue 11, scenario 10: a message that crashes the consumer process must
-- not loop forever. Before the handler runs, the consumer records that its
-- run (one process, an id made at start) started the message, in a
-- statement that commits on its own; the handler's transaction deletes the
-- row when it commits (custody_relay::Consumer, docs/OPERATIONS.md
-- "Poison messages"). A row left by another run is an unfinished attempt:
-- a crash, a kill, an out-of-memory, a hang ended by a restart. The message
-- is then applied alone; when a run that started it alone did not finish it,
-- the crash is its own (`crashes`), and after `consumer.poison-after` of
-- them it is dead-lettered as poison without running the handler again.
CREATE TABLE custody_inbox_attempt (
    consumer    TEXT        NOT NULL,
    message_id  UUID        NOT NULL,
    -- the run that started it last; starting it again in the same run
    -- (a retry after a transient error) counts nothing
    run         UUID        NOT NULL,
    -- the run before, when a later run started it (NULL: first start)
    prev_run    UUID        NULL,
    -- whether `run` started it alone (not in a group with other messages)
    alone       BOOLEAN     NOT NULL,
    -- runs that started it alone and never finished it
    crashes     INT         NOT NULL DEFAULT 0,
    started_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (consumer, message_id)
);
