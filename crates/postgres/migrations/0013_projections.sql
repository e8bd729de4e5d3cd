-- CQRS projections, the read-model side (docs/PROJECTIONS.md). One row per
-- projection: its active generation (the one the views `<base>` point at),
-- an operator's pending request (`custody projection rebuild|reset`) and
-- what its runner last saw (head, lag). The runner's lease is
-- custody_consumer_lease's row `projection:<name>`; every write here runs in
-- a transaction of the lease holder, which holds FOR SHARE on that row
-- first, so a takeover waits for it.
CREATE TABLE custody_projection (
    name         TEXT PRIMARY KEY,
    active       BIGINT,
    request      TEXT,
    request_to   BIGINT,
    requested_at TIMESTAMPTZ,
    head         BIGINT NOT NULL DEFAULT 0,
    lag_events   BIGINT NOT NULL DEFAULT 0,
    lag_seconds  DOUBLE PRECISION NOT NULL DEFAULT 0,
    reported_at  TIMESTAMPTZ
);

-- The generations of a projection's read model: the active one and at most
-- one being built beside it (a rebuild). `checkpoint` is the log position
-- the generation's tables include, written in the same transaction as them.
CREATE TABLE custody_projection_generation (
    name       TEXT   NOT NULL REFERENCES custody_projection (name),
    generation BIGINT NOT NULL,
    version    BIGINT NOT NULL,
    checkpoint BIGINT NOT NULL,
    applied    BIGINT NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (name, generation)
);

-- Events a generation's projection failed on permanently, skipped
-- (docs/ARCHITECTURE.md invariant 6); `custody projection retry` sets
-- retry_requested and the runner applies the event again.
CREATE TABLE custody_projection_dead_letter (
    name            TEXT        NOT NULL,
    generation      BIGINT      NOT NULL,
    position        BIGINT      NOT NULL,
    stream          TEXT        NOT NULL,
    stream_version  BIGINT      NOT NULL,
    event_id        UUID        NOT NULL,
    event_type      TEXT        NOT NULL,
    reason          TEXT        NOT NULL,
    failed_at       TIMESTAMPTZ NOT NULL,
    retry_requested BOOLEAN     NOT NULL DEFAULT FALSE,
    PRIMARY KEY (name, generation, position)
);
