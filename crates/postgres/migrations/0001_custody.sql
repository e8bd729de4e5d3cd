-- custody's tables on PostgreSQL; see docs/SCHEMA.md.

-- Producer side -------------------------------------------------------------

CREATE TABLE custody_outbox (
    -- assigned at insert, not at commit: readers need the txid guard below
    position      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- visibility guard (docs/ARCHITECTURE.md invariant 5): readers only take rows with
    -- txid < pg_snapshot_xmin(pg_current_snapshot())
    txid          xid8 NOT NULL DEFAULT pg_current_xact_id(),
    id            UUID NOT NULL UNIQUE,
    kind          TEXT NOT NULL,
    topic         TEXT NOT NULL,
    msg_key       TEXT NOT NULL,
    partition     INT NOT NULL,
    message_type  TEXT NOT NULL,
    content_type  TEXT NOT NULL,
    headers       TEXT NOT NULL DEFAULT '{}',
    payload       BYTEA NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    enqueued_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- 0 pending, 1 published, 2 dead
    status        SMALLINT NOT NULL DEFAULT 0,
    attempts      INT NOT NULL DEFAULT 0,
    retry_at      TIMESTAMPTZ NULL,
    last_error    TEXT NULL,
    published_at  TIMESTAMPTZ NULL
);

-- Serves the relay's fetch_batch: pending rows of the leased partitions in
-- position order (status = 0 AND partition = ANY(..) ORDER BY position).
CREATE INDEX custody_outbox_pending ON custody_outbox (partition, position)
    WHERE status = 0;

-- Serves fetch_batch's NOT EXISTS probe for parked keys (a pending row of the
-- same partition and key at a lower or equal position with retry_at > now).
-- Small: only rows that failed at least once and are still pending.
CREATE INDEX custody_outbox_parked ON custody_outbox (partition, msg_key, position)
    WHERE status = 0 AND retry_at IS NOT NULL;

-- Serves the embedded readers (PgEmbeddedSubscriber): rows of some topics
-- after a (txid, position) cursor, in (txid, position) order.
CREATE INDEX custody_outbox_topic ON custody_outbox (topic, txid, position);

-- Serves embedded readers of every topic: (txid, position) order.
CREATE INDEX custody_outbox_log ON custody_outbox (txid, position);

-- Partition leases of relay instances.
CREATE TABLE custody_relay_lease (
    partition   INT PRIMARY KEY,
    owner       TEXT NULL,
    expires_at  TIMESTAMPTZ NULL
);

-- Live relay instances (heartbeats); the fair share of each is
-- ceil(partitions / live members).
CREATE TABLE custody_relay_member (
    relay         TEXT PRIMARY KEY,
    heartbeat_at  TIMESTAMPTZ NOT NULL
);

-- Embedded readers' positions in this outbox.
CREATE TABLE custody_checkpoint (
    subscription  TEXT PRIMARY KEY,
    position      BIGINT NOT NULL,
    -- txid of the row at `position`: readers resume after (txid, position),
    -- the order they read in (see PgEmbeddedSubscriber)
    txid          xid8 NOT NULL DEFAULT '0',
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Consumer side -------------------------------------------------------------

CREATE TABLE custody_inbox (
    consumer      TEXT NOT NULL,
    message_id    UUID NOT NULL,
    topic         TEXT NOT NULL,
    processed_at  TIMESTAMPTZ NOT NULL,
    duplicates    INT NOT NULL DEFAULT 0,
    PRIMARY KEY (consumer, message_id)
);

-- Both sides: the relay writes origin 'relay', consumers 'consumer:<name>'.
CREATE TABLE custody_dead_letter (
    seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id    UUID NULL,
    origin        TEXT NOT NULL,
    topic         TEXT NOT NULL,
    msg_key       TEXT NULL,
    message_type  TEXT NULL,
    payload       BYTEA NOT NULL,
    envelope      TEXT NULL,
    error         TEXT NOT NULL,
    attempts      INT NOT NULL DEFAULT 0,
    dead_at       TIMESTAMPTZ NOT NULL
);
