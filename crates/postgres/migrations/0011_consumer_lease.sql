-- One active instance per consumer (docs/OPERATIONS.md, "Running several
-- instances of a consumer"). A takeover increments epoch; the holder's inbox
-- transactions check their epoch under FOR SHARE on this row, so a takeover
-- (an UPDATE of the row) waits until they end and they fail after it.
CREATE TABLE custody_consumer_lease (
    consumer   TEXT PRIMARY KEY,
    holder     TEXT,
    epoch      BIGINT NOT NULL DEFAULT 0,
    expires_at TIMESTAMPTZ,
    taken_at   TIMESTAMPTZ
);
