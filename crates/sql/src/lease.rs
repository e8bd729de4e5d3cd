//! Statements of the consumer lease ([`custody_core::lease`]). The fence
//! (the holder's check inside each inbox transaction) differs per backend:
//! how it keeps a takeover out is the backend's locking, so each backend
//! keeps its own `CHECK`.

/// Takeover of consumer `$1` by holder `$2` until `$3`, at `$4`. A lease is
/// free when never held, released (holder NULL) or expired by the caller's
/// clock. Clocks of different instances may disagree; that only moves the
/// moment of a takeover, never lets two holders commit (the epoch does
/// that). How the upsert waits for the current holder's transactions is
/// the backend's (see its consumer_lease.rs).
pub const ACQUIRE: &str = "\
INSERT INTO custody_consumer_lease AS l (consumer, holder, epoch, expires_at, taken_at)
VALUES ($1, $2, 1, $3, $4)
ON CONFLICT (consumer) DO UPDATE
    SET holder = excluded.holder, epoch = l.epoch + 1,
        expires_at = excluded.expires_at, taken_at = excluded.taken_at
    WHERE l.holder IS NULL OR l.expires_at IS NULL OR l.expires_at <= $4
RETURNING epoch";

/// Extend lease (`$1`, `$2`, epoch `$3`) to `$4`; no row: the lease is lost.
pub const RENEW: &str = "\
UPDATE custody_consumer_lease SET expires_at = $4
WHERE consumer = $1 AND holder = $2 AND epoch = $3";

/// Give lease (`$1`, `$2`, epoch `$3`) up.
pub const RELEASE: &str = "\
UPDATE custody_consumer_lease SET holder = NULL, expires_at = NULL
WHERE consumer = $1 AND holder = $2 AND epoch = $3";
