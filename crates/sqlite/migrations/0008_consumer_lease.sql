-- One active instance per consumer (docs/OPERATIONS.md, "Running several
-- instances of a consumer"), as PostgreSQL's migration 0011. A takeover
-- increments epoch; every inbox transaction starts with BEGIN IMMEDIATE and
-- checks its epoch first, so a takeover (a write) waits until it ends and
-- it fails after one. Times in milliseconds since the Unix epoch.
CREATE TABLE custody_consumer_lease (
    consumer   TEXT    PRIMARY KEY,
    holder     TEXT    NULL,
    epoch      INTEGER NOT NULL DEFAULT 0,
    expires_at INTEGER NULL,
    taken_at   INTEGER NULL
);
