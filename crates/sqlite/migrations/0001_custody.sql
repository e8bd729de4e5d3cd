-- custody schema for SQLite (see docs/SCHEMA.md). Timestamps are INTEGER unix
-- milliseconds, uuids hyphenated TEXT.

-- Producer side ---------------------------------------------------------------

-- AUTOINCREMENT (not plain rowid) so a position is never reused once a row
-- with it committed, even after published rows are pruned: readers keep
-- `position > checkpoint` cursors into this table.
CREATE TABLE custody_outbox (
    position     INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT    NOT NULL UNIQUE,
    kind         TEXT    NOT NULL,
    topic        TEXT    NOT NULL,
    msg_key      TEXT    NOT NULL,
    partition    INTEGER NOT NULL,
    message_type TEXT    NOT NULL,
    content_type TEXT    NOT NULL,
    headers      TEXT    NOT NULL DEFAULT '{}',
    payload      BLOB    NOT NULL,
    created_at   INTEGER NOT NULL,
    enqueued_at  INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    status       INTEGER NOT NULL DEFAULT 0,  -- 0 pending, 1 published, 2 dead
    attempts     INTEGER NOT NULL DEFAULT 0,
    retry_at     INTEGER NULL,
    last_error   TEXT    NULL,
    published_at INTEGER NULL
);

-- What the relay reads next.
CREATE INDEX custody_outbox_pending ON custody_outbox (partition, position) WHERE status = 0;
-- Parked messages hold back their key.
CREATE INDEX custody_outbox_parked ON custody_outbox (partition, msg_key, position)
    WHERE status = 0 AND retry_at IS NOT NULL;
-- Embedded readers.
CREATE INDEX custody_outbox_topic ON custody_outbox (topic, position);

CREATE TABLE custody_relay_lease (
    partition  INTEGER PRIMARY KEY,
    owner      TEXT    NULL,
    expires_at INTEGER NULL
);

CREATE TABLE custody_relay_member (
    relay        TEXT    PRIMARY KEY,
    heartbeat_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE custody_checkpoint (
    subscription TEXT    PRIMARY KEY,
    position     INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
) WITHOUT ROWID;

-- Consumer side ---------------------------------------------------------------

CREATE TABLE custody_inbox (
    consumer     TEXT    NOT NULL,
    message_id   TEXT    NOT NULL,
    topic        TEXT    NOT NULL,
    processed_at INTEGER NOT NULL,
    duplicates   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (consumer, message_id)
) WITHOUT ROWID;

-- Both sides: origin 'relay' or 'consumer:<name>'.
CREATE TABLE custody_dead_letter (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id   TEXT    NULL,
    origin       TEXT    NOT NULL,
    topic        TEXT    NOT NULL,
    msg_key      TEXT    NULL,
    message_type TEXT    NULL,
    payload      BLOB    NOT NULL,
    envelope     TEXT    NULL,
    error        TEXT    NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    dead_at      INTEGER NOT NULL
);

CREATE INDEX custody_dead_letter_message ON custody_dead_letter (message_id);
