-- The event store (docs/EVENTSTORE.md). Times in milliseconds since the
-- Unix epoch, like every custody timestamp on SQLite (docs/SCHEMA.md).
--
-- position: the global log position, assigned at insert. SQLite runs one
-- write transaction at a time and holds the write lock from its first write
-- to its commit, so positions become visible in commit order and a reader
-- may read `WHERE position > last` without skipping a later commit
-- (docs/ARCHITECTURE.md invariant 5). AUTOINCREMENT: a position is never
-- handed out twice, even if the highest events were ever removed.
--
-- Indexes are kept to the two the contract needs (batched appends write
-- every index of every row): (stream, version) for optimistic concurrency
-- and stream reads, id for idempotent re-appends.
CREATE TABLE custody_events (
    position       INTEGER PRIMARY KEY AUTOINCREMENT,
    stream         TEXT    NOT NULL,
    version        INTEGER NOT NULL,
    id             BLOB    NOT NULL,
    event_type     TEXT    NOT NULL,
    schema_version INTEGER NOT NULL,
    content_type   TEXT    NOT NULL,
    payload        BLOB    NOT NULL,
    -- JSON object, NULL when empty
    headers        TEXT    NULL,
    -- JSON array, NULL when empty
    tags           TEXT    NULL,
    recorded_at    INTEGER NOT NULL,
    UNIQUE (stream, version),
    UNIQUE (id)
);

-- One row per stream that has events or metadata. `version` is the number
-- of events ever appended; appends read and move it under the write lock.
CREATE TABLE custody_streams (
    stream          TEXT    PRIMARY KEY,
    category        TEXT    NOT NULL,
    version         INTEGER NOT NULL,
    truncate_before INTEGER NULL,
    max_age_ms      INTEGER NULL,
    -- StreamMetadata::custom as JSON
    metadata        TEXT    NULL,
    tombstoned      INTEGER NOT NULL DEFAULT 0,
    updated_at      INTEGER NOT NULL
) WITHOUT ROWID;

-- Tags of tagged events, for the append conditions (DCB) and read_query:
-- written only for events that carry tags, so untagged appends pay nothing.
CREATE TABLE custody_event_tags (
    tag      TEXT    NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (tag, position)
) WITHOUT ROWID;

CREATE TABLE custody_event_snapshots (
    stream         TEXT    NOT NULL,
    aggregate      TEXT    NOT NULL,
    schema_version INTEGER NOT NULL,
    version        INTEGER NOT NULL,
    state          BLOB    NOT NULL,
    taken_at       INTEGER NOT NULL,
    PRIMARY KEY (stream, aggregate)
);
