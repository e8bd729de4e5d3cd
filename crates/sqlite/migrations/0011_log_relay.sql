-- The event log as outbox (docs/EVENTSTORE.md, "Publishing the event log"): the state of each
-- named log relay, in the event store's database. Times in milliseconds
-- since the Unix epoch.
--
-- One row per relay: its lease (holder, expiry, fencing token), its
-- checkpoint (every event of its filter at or below it is settled: acked by
-- the transport, or dead-lettered with its skip marker acked) and the
-- producer id its sequence stamps carry. Every write of the holder runs in
-- a BEGIN IMMEDIATE transaction that first checks holder and token, so a
-- takeover (a write) waits for it and every later write of the old holder
-- is refused.
CREATE TABLE custody_log_relay (
    relay       TEXT    PRIMARY KEY,
    producer    TEXT    NOT NULL,
    checkpoint  INTEGER NOT NULL DEFAULT 0,
    holder      TEXT    NULL,
    lease_until INTEGER NULL,
    token       INTEGER NOT NULL DEFAULT 0,
    updated_at  INTEGER NOT NULL
);

-- The last sequence number a relay gave per topic (custody_core::sequence).
CREATE TABLE custody_log_relay_seq (
    relay TEXT    NOT NULL,
    topic TEXT    NOT NULL,
    last  INTEGER NOT NULL,
    PRIMARY KEY (relay, topic)
);

-- What a relay did with each event it took: number, status (0 pending,
-- 1 published, 2 dead with its skip marker to publish, 3 dead and settled),
-- attempts and parking, the error or dead-letter reason, the transport's
-- reference. Reconcile and trace read it; rows at or below the checkpoint
-- are pruned after the relay's retention.
CREATE TABLE custody_log_relay_journal (
    relay        TEXT    NOT NULL,
    position     INTEGER NOT NULL,
    event_id     TEXT    NOT NULL,
    stream       TEXT    NOT NULL,
    topic        TEXT    NOT NULL,
    seq          INTEGER NULL,
    status       INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    republish    INTEGER NOT NULL DEFAULT 0,
    retry_at     INTEGER NULL,
    error        TEXT    NULL,
    marker_id    TEXT    NULL,
    ack_ref      TEXT    NULL,
    published_at INTEGER NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (relay, position)
);
CREATE INDEX custody_log_relay_journal_id ON custody_log_relay_journal (event_id);
CREATE INDEX custody_log_relay_journal_topic ON custody_log_relay_journal (relay, topic, event_id);
