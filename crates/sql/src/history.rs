//! Statements of reconciliation, message status and dead-letter operations
//! that are the same on every backend. Ids are bound as each backend stores
//! them (PostgreSQL `uuid`, SQLite hyphenated lowercase text); both order
//! bytewise, so an id range is a range of the UNIQUE (id) index.

/// Dead outbox rows of topic `$3` with ids in [`$1`, `$2`), with their last
/// error.
pub const SENT_DEAD: &str = "\
SELECT id, COALESCE(last_error, '') FROM custody_outbox
WHERE id >= $1 AND id < $2 AND topic = $3 AND status = 2 ORDER BY id";

/// Consumer `$4`'s dead letters of topic `$3` with ids in [`$1`, `$2`)
/// (the parameters of [`SENT_DEAD`], and the consumer).
pub const PROCESSED_DEAD: &str = "\
SELECT message_id, error FROM custody_dead_letter
WHERE origin = 'consumer:' || $4 AND topic = $3 AND message_id >= $1 AND message_id < $2
ORDER BY message_id";

/// Consumer `$1`'s queued redrives of topic `$2` with ids in [`$3`, `$4`)
/// (their inbox rows carry `duplicates = -1` until processed again).
pub const REDRIVING: &str = "\
SELECT message_id FROM custody_redrive
WHERE consumer = $1 AND topic = $2 AND message_id >= $3 AND message_id < $4 ORDER BY message_id";

/// The distinct numbers above the floor `$5` (a skip marker and its
/// original can share one), each with its first record, lowest first, at
/// most `$6`: a range of the partial index custody_inbox_seq.
pub const NUMBERS_ABOVE_FLOOR: &str = "\
SELECT seq, MIN(processed_at) FROM custody_inbox
WHERE consumer = $1 AND producer = $2 AND topic = $3 AND producer_partition = $4
  AND seq > $5
GROUP BY seq ORDER BY seq LIMIT $6";

/// The producer id the numbers were given under: the first one stored.
pub const PRODUCER: &str = "SELECT id FROM custody_producer ORDER BY created_at, id LIMIT 1";

/// The last number given per (topic, partition); no row or `next_seq = 1`:
/// nothing numbered there yet.
pub const SEQUENCE_HEADS: &str = "\
SELECT topic, partition, next_seq - 1 FROM custody_sequence
WHERE next_seq > 1 ORDER BY topic, partition";

/// Message `$1`'s dead letters, oldest first.
pub const DEAD_OF: &str = "\
SELECT origin, error, attempts, dead_at FROM custody_dead_letter WHERE message_id = $1 ORDER BY seq";

/// Message `$1`'s inbox rows, one per consumer (a redriven row, `duplicates
/// = -1`, is not processed yet).
pub const INBOX_OF: &str = "\
SELECT consumer, processed_at, duplicates FROM custody_inbox
WHERE message_id = $1 AND duplicates >= 0 ORDER BY consumer";

/// Message `$1`'s queued redrives.
pub const REDRIVES_OF: &str = "\
SELECT consumer, redriven_at FROM custody_redrive WHERE message_id = $1 ORDER BY seq";

/// Every dead letter, oldest first.
pub const DEAD_LETTER_ROWS: &str = "\
SELECT seq, message_id, origin, topic, msg_key, message_type, payload, envelope, error, attempts, dead_at
FROM custody_dead_letter ORDER BY seq";

/// Queue envelope `$4` of message `$2` (topic `$3`) for consumer `$1`, at
/// `$5`; once (a second redrive of the same message queues nothing).
pub const QUEUE_REDRIVE: &str = "\
INSERT INTO custody_redrive (consumer, message_id, topic, envelope, redriven_at)
VALUES ($1, $2, $3, $4, $5) ON CONFLICT (consumer, message_id) DO NOTHING";

/// Delete dead letter `$1`.
pub const DELETE_DEAD_LETTER: &str = "DELETE FROM custody_dead_letter WHERE seq = $1";
