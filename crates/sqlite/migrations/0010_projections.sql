-- CQRS projections, the read-model side (docs/PROJECTIONS.md). One row per
-- projection: its active generation (the one the views `<base>` point at),
-- an operator's pending request (`custody projection rebuild|reset`) and
-- what its runner last saw (head, lag). Times in milliseconds since the
-- Unix epoch. The runner's lease is custody_consumer_lease's row
-- `projection:<name>`; every write here runs in a transaction of the lease
-- holder (BEGIN IMMEDIATE, the lease checked first).
CREATE TABLE custody_projection (
    name         TEXT    PRIMARY KEY,
    active       INTEGER NULL,
    request      TEXT    NULL,
    request_to   INTEGER NULL,
    requested_at INTEGER NULL,
    head         INTEGER NOT NULL DEFAULT 0,
    lag_events   INTEGER NOT NULL DEFAULT 0,
    lag_seconds  REAL    NOT NULL DEFAULT 0,
    reported_at  INTEGER NULL
);

-- The generations of a projection's read model: the active one and at most
-- one being built beside it (a rebuild). `checkpoint` is the log position
-- the generation's tables include, written in the same transaction as them.
CREATE TABLE custody_projection_generation (
    name       TEXT    NOT NULL REFERENCES custody_projection (name),
    generation INTEGER NOT NULL,
    version    INTEGER NOT NULL,
    checkpoint INTEGER NOT NULL,
    applied    INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (name, generation)
);

-- Events a generation's projection failed on permanently, skipped
-- (docs/ARCHITECTURE.md invariant 6); `custody projection retry` sets
-- retry_requested and the runner applies the event again.
CREATE TABLE custody_projection_dead_letter (
    name            TEXT    NOT NULL,
    generation      INTEGER NOT NULL,
    position        INTEGER NOT NULL,
    stream          TEXT    NOT NULL,
    stream_version  INTEGER NOT NULL,
    event_id        TEXT    NOT NULL,
    event_type      TEXT    NOT NULL,
    reason          TEXT    NOT NULL,
    failed_at       INTEGER NOT NULL,
    retry_requested INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (name, generation, position)
);
