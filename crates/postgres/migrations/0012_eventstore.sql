-- The event store (custody_postgres::PgEventStore; docs/EVENTSTORE.md, "PostgreSQL: how gaps are prevented").
--
-- Global-log positions are assigned after commit, in commit order, by a
-- sequencer step any reader may run, so a reader of the log never skips a
-- commit (docs/ARCHITECTURE.md invariant 5) without serializing writers,
-- without a timeout and without the cluster-wide pg_snapshot_xmin.

-- One value per append (an append call, or one combined batch of them),
-- taken after the append holds its stream row locks. It must stay CACHE 1
-- (the default): per-stream order inside one sequencing run relies on a
-- later nextval returning a larger number, which session caches would break.
CREATE SEQUENCE custody_event_tx;

-- One row per stream: its version, metadata and state. Appenders lock it
-- FOR UPDATE to check the expected version, so appenders of one stream
-- take turns (and appenders of different streams do not).
CREATE TABLE custody_streams (
    stream      TEXT PRIMARY KEY,
    category    TEXT NOT NULL,
    version     BIGINT NOT NULL DEFAULT 0,
    -- custody_core::event::StreamMetadata as JSON
    metadata    JSONB NOT NULL DEFAULT '{}',
    tombstoned  BOOLEAN NOT NULL DEFAULT false,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The events. No position here: an event's position is
-- custody_event_commits.first_position + ordinal, known once its append's
-- transaction has committed and been sequenced. Writing the position into
-- this table would be an update per event.
CREATE TABLE custody_events (
    tx              BIGINT NOT NULL,
    ordinal         INT NOT NULL,
    stream          TEXT NOT NULL,
    version         BIGINT NOT NULL,
    -- the message id when published: unique in the store, because consumers
    -- dedupe by it and would drop a second event with the same id
    id              UUID NOT NULL UNIQUE,
    event_type      TEXT NOT NULL,
    schema_version  INT NOT NULL,
    content_type    TEXT NOT NULL,
    payload         BYTEA NOT NULL,
    -- JSON object of header name -> value
    headers         TEXT NOT NULL,
    tags            TEXT[] NOT NULL,
    recorded_at     TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tx, ordinal),
    UNIQUE (stream, version)
);

-- Serves the append condition check and read_query (tags @> ...).
CREATE INDEX custody_events_tags ON custody_events USING gin (tags);

-- One row per append whose transaction has not been sequenced yet. It
-- becomes visible to the sequencer exactly when the append commits.
CREATE TABLE custody_event_pending (
    tx  BIGINT PRIMARY KEY,
    n   INT NOT NULL
);

-- One row per sequenced append: its events have the positions
-- first_position .. last_position (dense over the whole table).
CREATE TABLE custody_event_commits (
    tx              BIGINT PRIMARY KEY,
    first_position  BIGINT NOT NULL,
    last_position   BIGINT NOT NULL UNIQUE
);

-- The gap-free head: the highest position handed out. Its row lock
-- serializes sequencing runs (never appends).
CREATE TABLE custody_event_head (
    id    BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
    head  BIGINT NOT NULL
);
INSERT INTO custody_event_head (id, head) VALUES (true, 0);

-- Saved aggregate states, one per stream and aggregate type.
CREATE TABLE custody_event_snapshots (
    stream          TEXT NOT NULL,
    aggregate       TEXT NOT NULL,
    schema_version  INT NOT NULL,
    version         BIGINT NOT NULL,
    state           BYTEA NOT NULL,
    taken_at        TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (stream, aggregate)
);
