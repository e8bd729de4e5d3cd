//! Statements of the read-only checks (`custody reconcile`, `trace`, `dlq`):
//! has this database ever seen a topic or a consumer name, and which ones
//! does it know. None of them writes (docs/ARCHITECTURE.md invariant 8).

/// Whether topic `$1` is written down anywhere. The outbox lookup uses its
/// topic index; the inbox has no topic index, so it comes last (OR
/// short-circuits: only reached when nothing else knows the topic).
pub const TOPIC_SEEN: &str = "SELECT \
    EXISTS (SELECT 1 FROM custody_outbox WHERE topic = $1) \
 OR EXISTS (SELECT 1 FROM custody_sequence WHERE topic = $1) \
 OR EXISTS (SELECT 1 FROM custody_dead_letter WHERE topic = $1) \
 OR EXISTS (SELECT 1 FROM custody_inbox_watermark WHERE topic = $1) \
 OR EXISTS (SELECT 1 FROM custody_redrive WHERE topic = $1) \
 OR EXISTS (SELECT 1 FROM custody_inbox WHERE topic = $1)";

/// Whether consumer `$1` recorded anything. The inbox lookup is a prefix of
/// its primary key (consumer, message_id).
pub const CONSUMER_SEEN: &str = "SELECT \
    EXISTS (SELECT 1 FROM custody_inbox WHERE consumer = $1) \
 OR EXISTS (SELECT 1 FROM custody_inbox_watermark WHERE consumer = $1) \
 OR EXISTS (SELECT 1 FROM custody_redrive WHERE consumer = $1) \
 OR EXISTS (SELECT 1 FROM custody_dead_letter WHERE origin = 'consumer:' || $1)";

/// Up to `$1` topics, sorted. Distinct values through their indexes (a loose
/// index scan: one index seek per distinct value, not a read of every row),
/// for "names known here".
pub const TOPICS: &str = "\
WITH RECURSIVE t(topic) AS (
  SELECT MIN(topic) FROM custody_outbox
  UNION ALL
  SELECT (SELECT MIN(topic) FROM custody_outbox WHERE topic > t.topic) FROM t WHERE t.topic IS NOT NULL
)
SELECT topic FROM t WHERE topic IS NOT NULL
UNION SELECT topic FROM custody_sequence
UNION SELECT topic FROM custody_inbox_watermark
ORDER BY 1 LIMIT $1";

/// Up to `$1` consumer names, sorted; a loose index scan as [`TOPICS`].
pub const CONSUMERS: &str = "\
WITH RECURSIVE c(consumer) AS (
  SELECT MIN(consumer) FROM custody_inbox
  UNION ALL
  SELECT (SELECT MIN(consumer) FROM custody_inbox WHERE consumer > c.consumer) FROM c WHERE c.consumer IS NOT NULL
)
SELECT consumer FROM c WHERE consumer IS NOT NULL
UNION SELECT consumer FROM custody_inbox_watermark
ORDER BY 1 LIMIT $1";
