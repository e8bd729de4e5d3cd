//! In-memory, deterministic implementations of custody's store and transport
//! traits, with fault hooks, for model tests and simulations of the engines
//! (`Relay::step`, `Consumer::run_once`) under a `ManualClock`.
//!
//! They follow the contracts of the real backends (the SQLite outbox, the
//! NATS subscriber) rather than anything convenient: leases with a fair
//! share and expiry, fenced marking, failure recording and dead-lettering,
//! per-key parking, PostgreSQL's visibility (positions at insert, visible at
//! commit, commits in any order, no visibility guard) with the key locks of
//! `PgOutbox::enqueue`, publish deduplication by message id, redelivery of
//! everything not acknowledged after a subscriber restart.
//!
//! Faults that stand for a crash make the operation *hang*: the test drops the
//! engine's future, which is what `kill -9` does to a process at that point.
//!
//! ```
//! use custody_testkit::memory::{MemoryBroker, MemoryInbox, MemoryOutbox};
//! let outbox = MemoryOutbox::new(4);
//! let broker = MemoryBroker::default();
//! let inbox = MemoryInbox::default();
//! let msg = custody_core::Message::builder("t", "k", "T").build()?;
//! outbox.enqueue(msg);
//! assert_eq!(outbox.pending(), 1);
//! # drop((broker, inbox));
//! # Ok::<(), custody_core::Error>(())
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use custody_core::{
    partition_for, plan_leases, DeadLetter, Delivery, Error, InboxOutcome, InboxStore, Malformed,
    Message, OutboxRecord, OutboxStore, PublishAck, Publisher, Result, RowWrite, Subscriber,
};
use custody_core::{AcceptedGap, Attempt, Compaction, GapAcceptance, PartitionProgress, Redrive};
use uuid::Uuid;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unavailable(what: &'static str, op: &'static str) -> Error {
    Error::store(what, op, true, "simulated outage")
}

async fn hang() -> ! {
    std::future::pending::<()>().await;
    unreachable!("pending never resolves")
}

// ---------------------------------------------------------------- outbox

/// Status of an outbox row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowStatus {
    /// Inserted by a transaction that has not committed yet: invisible, but
    /// holds its position.
    Uncommitted,
    /// Committed, not yet published.
    Pending,
    /// Published (marked after the transport's ack).
    Published,
    /// Dead-lettered by the relay.
    Dead,
}

#[derive(Debug, Clone)]
struct Row {
    record: OutboxRecord,
    status: RowStatus,
    retry_at: Option<DateTime<Utc>>,
    error: Option<String>,
    /// Order of the commit among all commits (0 while uncommitted).
    committed_as: u64,
    /// When the relay marked it published or dead-lettered it (what
    /// [`OutboxStore::prune`] ages rows by).
    done_at: Option<DateTime<Utc>>,
}

/// A producer transaction of the model: waiting for its key's lock (no row
/// yet), or holding it with its row inserted.
#[derive(Debug)]
enum OpenTx {
    Waiting(Message),
    Inserted(i64),
}

#[derive(Debug, Default)]
struct OutboxState {
    next_position: i64,
    commits: u64,
    rows: BTreeMap<i64, Row>,
    /// open producer transactions by id (ids increase: FIFO among waiters)
    txs: BTreeMap<u64, (String, OpenTx)>,
    next_tx: u64,
    /// key → the transaction holding its lock
    key_locks: HashMap<String, u64>,
    /// partition → (owner, expires_at)
    leases: HashMap<u32, (String, DateTime<Utc>)>,
    /// relay → last heartbeat
    members: HashMap<String, DateTime<Utc>>,
    down: bool,
    /// (message id, reason): kept when the row is pruned, like a dead-letter table
    dead: Vec<(Uuid, String)>,
}

/// An outbox in memory: [`OutboxStore`] for the relay, plus the producer's
/// side (`enqueue`, `begin_enqueue`) and read access for assertions.
///
/// It models PostgreSQL's visibility as the relay meets it: a row gets its
/// position at insert and becomes visible at its commit; transactions commit
/// in any order, so a lower position can become visible after a higher one;
/// the relay reads pending rows by their state (no transaction-id guard).
/// And it models the key lock of `PgOutbox::enqueue` (a transaction-scoped
/// advisory lock on the key, taken before the insert): a transaction that
/// enqueues a key another open transaction holds waits, without a row, until
/// that one commits or rolls back, and only then inserts. Without the key
/// locks ([`MemoryOutbox::without_key_locks`]) a key's transactions can
/// commit out of position order, as on PostgreSQL without them.
#[derive(Debug, Clone)]
pub struct MemoryOutbox {
    partitions: u32,
    key_locks: bool,
    state: Arc<Mutex<OutboxState>>,
}

/// An open producer transaction that enqueues one message: either waiting
/// for its key's lock, or with its row inserted (holding a position, not
/// visible) until [`MemoryOutbox::commit`] or [`MemoryOutbox::rollback`].
#[derive(Debug)]
pub struct UncommittedRow {
    tx: u64,
}

impl OutboxState {
    /// Insert `msg` for transaction `tx`: the row takes the next position.
    fn insert(&mut self, partitions: u32, tx: u64, msg: Message) -> i64 {
        self.next_position += 1;
        let position = self.next_position;
        let partition = partition_for(&msg.key, partitions);
        self.rows.insert(
            position,
            Row {
                record: OutboxRecord {
                    position,
                    partition,
                    attempts: 0,
                    republish: 0,
                    sequence: None,
                    message: msg,
                },
                status: RowStatus::Uncommitted,
                retry_at: None,
                error: None,
                committed_as: 0,
                done_at: None,
            },
        );
        let key = self
            .txs
            .get(&tx)
            .map(|(k, _)| k.clone())
            .unwrap_or_default();
        self.txs.insert(tx, (key, OpenTx::Inserted(position)));
        position
    }

    /// Transaction `tx` ended: release its key's lock and let the first
    /// transaction waiting for that key take it and insert.
    fn release(&mut self, partitions: u32, tx: u64) {
        let Some((key, _)) = self.txs.remove(&tx) else {
            return;
        };
        if self.key_locks.get(&key) != Some(&tx) {
            return;
        }
        self.key_locks.remove(&key);
        let next = self
            .txs
            .iter()
            .find(|(_, (k, t))| *k == key && matches!(t, OpenTx::Waiting(_)))
            .map(|(id, _)| *id);
        if let Some(next) = next {
            self.key_locks.insert(key, next);
            if let Some((_, OpenTx::Waiting(msg))) = self.txs.get(&next) {
                let msg = msg.clone();
                self.insert(partitions, next, msg);
            }
        }
    }
}

impl MemoryOutbox {
    /// An empty outbox with `partitions` partitions, taking key locks.
    pub fn new(partitions: u32) -> Self {
        MemoryOutbox {
            partitions: partitions.max(1),
            key_locks: true,
            state: Arc::default(),
        }
    }

    /// Enqueue without key locks (what `PgOutbox::with_key_locks(false)`
    /// does): transactions of one key may then commit out of position
    /// order. For tests that show what the locks prevent.
    pub fn without_key_locks(mut self) -> Self {
        self.key_locks = false;
        self
    }

    /// Insert and commit `msg`; returns its position.
    ///
    /// # Panics
    ///
    /// When an open transaction holds `msg`'s key lock. A real store's
    /// enqueue would block until that transaction ends; here the caller
    /// could only wait for itself, and a silently parked row would keep the
    /// key locked forever and never be published. Concurrent producers use
    /// [`MemoryOutbox::begin_enqueue`], [`MemoryOutbox::is_waiting`] and
    /// [`MemoryOutbox::commit`] instead.
    pub fn enqueue(&self, msg: Message) -> i64 {
        let row = {
            let mut s = lock(&self.state);
            if self.key_locks {
                if let Some(holder) = s.key_locks.get(&msg.key).copied() {
                    drop(s);
                    panic!(
                        "MemoryOutbox::enqueue: key {:?} is locked by open transaction {holder}; \
                         commit or roll it back first, or enqueue with begin_enqueue and commit \
                         once is_waiting is false",
                        msg.key
                    );
                }
            }
            self.begin_in(&mut s, msg)
        };
        let position = self.position(&row).unwrap_or_default();
        let _ = self.commit(row);
        position
    }

    /// Begin a transaction that enqueues `msg`, to be committed later
    /// ([`MemoryOutbox::commit`]) or rolled back ([`MemoryOutbox::rollback`]).
    /// With key locks, it waits (no row yet) while another open transaction
    /// holds `msg`'s key ([`MemoryOutbox::is_waiting`]).
    pub fn begin_enqueue(&self, msg: Message) -> UncommittedRow {
        self.begin_in(&mut lock(&self.state), msg)
    }

    fn begin_in(&self, s: &mut OutboxState, msg: Message) -> UncommittedRow {
        s.next_tx += 1;
        let tx = s.next_tx;
        let key = msg.key.clone();
        if self.key_locks && s.key_locks.contains_key(&key) {
            s.txs.insert(tx, (key, OpenTx::Waiting(msg)));
        } else {
            if self.key_locks {
                s.key_locks.insert(key.clone(), tx);
            }
            s.txs.insert(tx, (key, OpenTx::Waiting(msg.clone())));
            s.insert(self.partitions, tx, msg);
        }
        UncommittedRow { tx }
    }

    /// Whether `row`'s transaction still waits for its key's lock (it can
    /// neither commit nor roll back yet in this model; it inserts when the
    /// holder ends).
    pub fn is_waiting(&self, row: &UncommittedRow) -> bool {
        matches!(
            lock(&self.state).txs.get(&row.tx),
            Some((_, OpenTx::Waiting(_)))
        )
    }

    /// The position of `row`'s insert, once it has one.
    pub fn position(&self, row: &UncommittedRow) -> Option<i64> {
        match lock(&self.state).txs.get(&row.tx) {
            Some((_, OpenTx::Inserted(p))) => Some(*p),
            _ => None,
        }
    }

    /// Commit a transaction from [`MemoryOutbox::begin_enqueue`]: its row
    /// becomes visible, its key lock passes on. A transaction still waiting
    /// for its key cannot commit: it is handed back.
    pub fn commit(&self, row: UncommittedRow) -> std::result::Result<(), UncommittedRow> {
        let mut s = lock(&self.state);
        let position = match s.txs.get(&row.tx) {
            Some((_, OpenTx::Inserted(p))) => *p,
            Some((_, OpenTx::Waiting(_))) => return Err(row),
            None => return Ok(()),
        };
        s.commits += 1;
        let order = s.commits;
        if let Some(r) = s.rows.get_mut(&position) {
            r.status = RowStatus::Pending;
            r.committed_as = order;
        }
        s.release(self.partitions, row.tx);
        Ok(())
    }

    /// Roll back a transaction from [`MemoryOutbox::begin_enqueue`]: its
    /// row never existed. A transaction still waiting is handed back.
    pub fn rollback(&self, row: UncommittedRow) -> std::result::Result<(), UncommittedRow> {
        let mut s = lock(&self.state);
        let position = match s.txs.get(&row.tx) {
            Some((_, OpenTx::Inserted(p))) => *p,
            Some((_, OpenTx::Waiting(_))) => return Err(row),
            None => return Ok(()),
        };
        s.rows.remove(&position);
        s.release(self.partitions, row.tx);
        Ok(())
    }

    /// Make every operation fail with a retryable error (database down).
    pub fn set_down(&self, down: bool) {
        lock(&self.state).down = down;
    }

    /// Committed rows not yet published or dead-lettered.
    pub fn pending(&self) -> usize {
        lock(&self.state)
            .rows
            .values()
            .filter(|r| r.status == RowStatus::Pending)
            .count()
    }

    /// Every committed message, in commit order (which is not position
    /// order: transactions commit in any order).
    pub fn committed(&self) -> Vec<Message> {
        let s = lock(&self.state);
        let mut rows: Vec<&Row> = s
            .rows
            .values()
            .filter(|r| r.status != RowStatus::Uncommitted)
            .collect();
        rows.sort_by_key(|r| r.committed_as);
        rows.into_iter().map(|r| r.record.message.clone()).collect()
    }

    /// Status of the row holding message `id`.
    pub fn status(&self, id: Uuid) -> Option<RowStatus> {
        lock(&self.state)
            .rows
            .values()
            .find(|r| r.record.message.id == id)
            .map(|r| r.status)
    }

    /// Failed attempts recorded for the row holding message `id`.
    pub fn attempts(&self, id: Uuid) -> Option<u32> {
        lock(&self.state)
            .rows
            .values()
            .find(|r| r.record.message.id == id)
            .map(|r| r.record.attempts)
    }

    /// Messages the relay dead-lettered, with the reason.
    pub fn dead_letters(&self) -> Vec<(Uuid, String)> {
        lock(&self.state).dead.clone()
    }

    /// Current lease holders: partition → relay.
    pub fn lease_owners(&self, now: DateTime<Utc>) -> BTreeMap<u32, String> {
        lock(&self.state)
            .leases
            .iter()
            .filter(|(_, (_, exp))| *exp > now)
            .map(|(p, (o, _))| (*p, o.clone()))
            .collect()
    }
}

impl OutboxState {
    /// The fence of the relay's writes: whether `relay` holds an unexpired
    /// lease on the row at `position`'s partition, and the row's status.
    fn fence(&self, relay: &str, position: i64, now: DateTime<Utc>) -> Option<(bool, RowStatus)> {
        let row = self.rows.get(&position)?;
        let leased = self
            .leases
            .get(&row.record.partition)
            .is_some_and(|(o, exp)| o == relay && *exp > now);
        Some((leased, row.status))
    }
}

impl OutboxStore for MemoryOutbox {
    fn partitions(&self) -> u32 {
        self.partitions
    }

    async fn acquire_leases(
        &self,
        relay: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<Vec<u32>> {
        let mut s = lock(&self.state);
        if s.down {
            return Err(unavailable("memory", "acquire relay leases"));
        }
        let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::seconds(10));
        s.members.insert(relay.to_owned(), now);
        s.members.retain(|_, hb| *hb >= now - ttl);
        let live = u64::try_from(s.members.len()).unwrap_or(u64::MAX);
        let mut held = Vec::new();
        let mut free = Vec::new();
        for p in 0..self.partitions {
            match s.leases.get(&p) {
                Some((o, _)) if o == relay => held.push(p),
                Some((_, exp)) if *exp > now => {}
                _ => free.push(p),
            }
        }
        let plan = plan_leases(self.partitions, live, &held);
        let release = plan.release.clone();
        let held = plan.held_after(&plan.claims(&free));
        for p in release {
            s.leases.remove(&p);
        }
        for p in &held {
            s.leases.insert(*p, (relay.to_owned(), now + ttl));
        }
        Ok(held)
    }

    async fn release_leases(&self, relay: &str) -> Result<()> {
        let mut s = lock(&self.state);
        s.leases.retain(|_, (o, _)| o != relay);
        s.members.remove(relay);
        Ok(())
    }

    // PostgreSQL's visibility without a guard: committed pending rows by
    // state, in position order; uncommitted rows are invisible and hold
    // nothing back. A parked row holds back every other row of its key,
    // whatever the positions.
    async fn fetch_batch(
        &self,
        partitions: &[u32],
        limit: usize,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxRecord>> {
        let s = lock(&self.state);
        if s.down {
            return Err(unavailable("memory", "fetch outbox batch"));
        }
        let wanted: HashSet<u32> = partitions.iter().copied().collect();
        let parked_keys: HashSet<(u32, &str)> = s
            .rows
            .values()
            .filter(|r| r.status == RowStatus::Pending && r.retry_at.is_some_and(|t| t > now))
            .map(|r| (r.record.partition, r.record.message.key.as_str()))
            .collect();
        let out = s
            .rows
            .values()
            .filter(|r| r.status == RowStatus::Pending && wanted.contains(&r.record.partition))
            .filter(|r| !parked_keys.contains(&(r.record.partition, r.record.message.key.as_str())))
            .take(limit)
            .map(|r| r.record.clone())
            .collect();
        Ok(out)
    }

    async fn mark_published(
        &self,
        relay: &str,
        acked: &[(i64, PublishAck)],
        now: DateTime<Utc>,
    ) -> Result<u64> {
        let mut s = lock(&self.state);
        if s.down {
            return Err(unavailable("memory", "mark published"));
        }
        let owned: HashSet<u32> = s
            .leases
            .iter()
            .filter(|(_, (o, exp))| o == relay && *exp > now)
            .map(|(p, _)| *p)
            .collect();
        let mut n = 0;
        for (pos, _) in acked {
            if let Some(r) = s.rows.get_mut(pos) {
                if r.status == RowStatus::Pending && owned.contains(&r.record.partition) {
                    r.status = RowStatus::Published;
                    r.done_at = Some(now);
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    async fn record_failure(
        &self,
        relay: &str,
        position: i64,
        error: &str,
        retry_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<RowWrite> {
        let mut s = lock(&self.state);
        if s.down {
            return Err(unavailable("memory", "record publish failure"));
        }
        match s.fence(relay, position, now) {
            None => Ok(RowWrite::NotPending),
            Some((false, _)) => Ok(RowWrite::Fenced),
            Some((true, status)) if status != RowStatus::Pending => Ok(RowWrite::NotPending),
            Some((true, _)) => {
                if let Some(r) = s.rows.get_mut(&position) {
                    r.record.attempts += 1;
                    r.retry_at = Some(retry_at);
                    r.error = Some(error.to_owned());
                }
                Ok(RowWrite::Written)
            }
        }
    }

    async fn dead_letter(
        &self,
        relay: &str,
        position: i64,
        error: &str,
        now: DateTime<Utc>,
    ) -> Result<RowWrite> {
        let mut s = lock(&self.state);
        if s.down {
            return Err(unavailable("memory", "dead-letter"));
        }
        match s.fence(relay, position, now) {
            None => Ok(RowWrite::NotPending),
            Some((false, _)) => Ok(RowWrite::Fenced),
            Some((true, status)) if status != RowStatus::Pending => Ok(RowWrite::NotPending),
            Some((true, _)) => {
                let Some(r) = s.rows.get_mut(&position) else {
                    return Ok(RowWrite::NotPending);
                };
                r.status = RowStatus::Dead;
                r.done_at = Some(now);
                let id = r.record.message.id;
                s.dead.push((id, error.to_owned()));
                Ok(RowWrite::Written)
            }
        }
    }

    /// The memory outbox publishes unnumbered messages: it keeps no
    /// producer id.
    async fn producer_id(&self) -> Result<Option<String>> {
        if lock(&self.state).down {
            return Err(unavailable("memory", "read producer id"));
        }
        Ok(None)
    }

    /// Numbers nothing (see [`MemoryOutbox::producer_id`]), but keeps the
    /// fence of the contract: records of partitions `relay` no longer leases
    /// are removed.
    async fn assign_sequences(
        &self,
        relay: &str,
        records: &mut Vec<OutboxRecord>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let s = lock(&self.state);
        if s.down {
            return Err(unavailable("memory", "assign sequences"));
        }
        records.retain(|r| {
            s.leases
                .get(&r.partition)
                .is_some_and(|(o, exp)| o == relay && *exp > now)
        });
        Ok(())
    }

    /// Deletes published and dead-lettered rows of `partitions` marked
    /// before `older_than`, lowest positions first (there are no embedded
    /// readers to wait for). Dead letters stay readable through
    /// [`MemoryOutbox::dead_letters`].
    async fn prune(
        &self,
        partitions: &[u32],
        older_than: DateTime<Utc>,
        limit: usize,
    ) -> Result<u64> {
        let mut s = lock(&self.state);
        if s.down {
            return Err(unavailable("memory", "prune outbox"));
        }
        let doomed: Vec<i64> = s
            .rows
            .values()
            .filter(|r| matches!(r.status, RowStatus::Published | RowStatus::Dead))
            .filter(|r| partitions.contains(&r.record.partition))
            .filter(|r| r.done_at.is_some_and(|t| t < older_than))
            .take(limit)
            .map(|r| r.record.position)
            .collect();
        for p in &doomed {
            s.rows.remove(p);
        }
        Ok(u64::try_from(doomed.len()).unwrap_or(u64::MAX))
    }

    async fn wait_for_new(&self, timeout: Duration) {
        tokio::time::sleep(timeout).await;
    }
}

// ---------------------------------------------------------------- broker

#[derive(Debug, Clone)]
enum Stored {
    Message(Message),
    Malformed(Malformed),
}

#[derive(Debug, Default)]
struct BrokerState {
    /// The stream, in broker order (sequence = index + 1).
    log: Vec<Stored>,
    /// Ids stored (deduplication window: forever).
    ids: HashSet<Uuid>,
    down: bool,
    /// The next publish is stored but its ack is lost (the publisher sees an error).
    lose_next_ack: bool,
    /// Messages the broker refuses (retryable), as if too big for it today.
    poison: HashSet<Uuid>,
    /// Publishes left before the next one hangs (a relay crash mid-batch).
    hang_after: Option<usize>,
    /// The next ack never returns (a consumer crash after its commit).
    hang_next_ack: bool,
    /// consumer → acked sequences
    acked: HashMap<String, HashSet<u64>>,
}

/// A JetStream-like broker in memory: [`Publisher`] (durable ack, dedupe by
/// message id) and the source of [`MemorySubscriber`]s (durable consumers
/// with an ack floor).
#[derive(Debug, Clone, Default)]
pub struct MemoryBroker {
    state: Arc<Mutex<BrokerState>>,
}

impl MemoryBroker {
    /// Refuse every publish and fetch with a retryable error.
    pub fn set_down(&self, down: bool) {
        lock(&self.state).down = down;
    }

    /// Store the next published message but fail its ack.
    pub fn lose_next_ack(&self) {
        lock(&self.state).lose_next_ack = true;
    }

    /// Refuse message `id` (retryable error) while others get through.
    pub fn poison(&self, id: Uuid) {
        lock(&self.state).poison.insert(id);
    }

    /// After `n` more successful publishes, the next publish never returns.
    pub fn hang_after(&self, n: usize) {
        lock(&self.state).hang_after = Some(n);
    }

    /// The next ack never returns: a consumer crash after its commit, before the ack.
    pub fn hang_next_ack(&self) {
        lock(&self.state).hang_next_ack = true;
    }

    /// Clear the hangs of [`MemoryBroker::hang_after`] and [`MemoryBroker::hang_next_ack`].
    pub fn clear_hang(&self) {
        let mut s = lock(&self.state);
        s.hang_after = None;
        s.hang_next_ack = false;
    }

    /// Store a copy of an already stored message under a new broker sequence,
    /// bypassing deduplication (it is delivered twice). Returns whether there
    /// was a message at `index`.
    pub fn duplicate(&self, index: usize) -> bool {
        let mut s = lock(&self.state);
        let Some(m) = s.log.get(index).cloned() else {
            return false;
        };
        s.log.push(m);
        true
    }

    /// Store a message that cannot be decoded.
    pub fn inject_malformed(&self, topic: &str, payload: &[u8], reason: &str) {
        lock(&self.state).log.push(Stored::Malformed(Malformed {
            id: None,
            topic: topic.to_owned(),
            payload: payload.to_vec(),
            reason: reason.to_owned(),
        }));
    }

    /// Messages stored, in broker order (malformed ones left out).
    pub fn stored(&self) -> Vec<Message> {
        lock(&self.state)
            .log
            .iter()
            .filter_map(|s| match s {
                Stored::Message(m) => Some(m.clone()),
                Stored::Malformed(_) => None,
            })
            .collect()
    }

    /// Everything stored, messages and malformed ones.
    pub fn len(&self) -> usize {
        lock(&self.state).log.len()
    }

    /// Whether nothing was stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A subscriber for the durable consumer `name`: it starts at the ack
    /// floor, so everything `name` has not acknowledged is delivered (again).
    pub fn subscribe(&self, name: &str) -> MemorySubscriber {
        MemorySubscriber {
            broker: self.clone(),
            name: name.to_owned(),
            cursor: 0,
        }
    }

    /// Sequences consumer `name` has not acknowledged yet.
    pub fn unacked(&self, name: &str) -> usize {
        let s = lock(&self.state);
        let acked = s.acked.get(name).map(HashSet::len).unwrap_or(0);
        s.log.len() - acked
    }
}

impl Publisher for MemoryBroker {
    async fn publish(&self, message: &Message) -> Result<PublishAck> {
        let hang_now = {
            let mut s = lock(&self.state);
            if s.down {
                return Err(Error::transport(
                    "memory",
                    "publish",
                    true,
                    "broker unavailable",
                ));
            }
            if s.poison.contains(&message.id) {
                return Err(Error::transport(
                    "memory",
                    "publish",
                    true,
                    "broker refused this message",
                ));
            }
            match s.hang_after {
                Some(0) => true,
                Some(n) => {
                    s.hang_after = Some(n - 1);
                    false
                }
                None => false,
            }
        };
        if hang_now {
            hang().await;
        }
        // let other tasks run between publishes (interleavings under join!)
        tokio::task::yield_now().await;
        let mut s = lock(&self.state);
        let duplicate = !s.ids.insert(message.id);
        if !duplicate {
            s.log.push(Stored::Message(message.clone()));
        }
        let seq = s.log.len() as u64;
        if std::mem::take(&mut s.lose_next_ack) {
            return Err(Error::transport(
                "memory",
                "publish",
                true,
                "ack lost (message stored)",
            ));
        }
        Ok(PublishAck {
            stream: Some("memory".into()),
            sequence: Some(seq),
            duplicate,
        })
    }
}

/// A durable pull consumer on a [`MemoryBroker`]. Dropping it and calling
/// [`MemoryBroker::subscribe`] again is a consumer restart: every
/// unacknowledged message comes again, in stream order.
#[derive(Debug)]
pub struct MemorySubscriber {
    broker: MemoryBroker,
    name: String,
    /// Index in the log of the next delivery.
    cursor: usize,
}

impl MemorySubscriber {
    /// Deliver every unacknowledged message again, from the ack floor
    /// (like an ack-wait expiry).
    pub fn redeliver_unacked(&mut self) {
        self.cursor = 0;
    }
}

impl Subscriber for MemorySubscriber {
    type Token = u64;

    async fn fetch(&mut self, max: usize, _wait: Duration) -> Result<Vec<Delivery<u64>>> {
        let s = lock(&self.broker.state);
        if s.down {
            return Err(Error::transport(
                "memory",
                "fetch",
                true,
                "broker unavailable",
            ));
        }
        let acked = s.acked.get(&self.name);
        if self.cursor >= s.log.len() {
            // nothing new: what is still unacknowledged is delivered again
            // (JetStream's ack-wait expiry; e.g. after a failed ack)
            self.cursor = 0;
        }
        let mut out = Vec::new();
        while self.cursor < s.log.len() && out.len() < max {
            let seq = self.cursor as u64 + 1;
            let stored = &s.log[self.cursor];
            self.cursor += 1;
            if acked.is_some_and(|a| a.contains(&seq)) {
                continue;
            }
            out.push(Delivery {
                message: match stored {
                    Stored::Message(m) => Ok(m.clone()),
                    Stored::Malformed(b) => Err(b.clone()),
                },
                delivery_count: 1,
                token: seq,
            });
        }
        Ok(out)
    }

    async fn ack(&mut self, token: u64) -> Result<()> {
        let hang_now = {
            let mut s = lock(&self.broker.state);
            if s.down {
                return Err(Error::transport(
                    "memory",
                    "ack",
                    true,
                    "broker unavailable",
                ));
            }
            std::mem::take(&mut s.hang_next_ack)
        };
        if hang_now {
            hang().await;
        }
        let mut s = lock(&self.broker.state);
        s.acked.entry(self.name.clone()).or_default().insert(token);
        Ok(())
    }
}

// ---------------------------------------------------------------- inbox

/// One effect a handler applied, in commit order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effect {
    /// The message that caused it.
    pub message_id: Uuid,
    /// Its key.
    pub key: String,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// One row of the attempts table: the run that started the message last,
/// the run before it, whether the last run started it alone, crashes.
#[derive(Debug)]
struct Started {
    run: Uuid,
    prev_run: Option<Uuid>,
    alone: bool,
    crashes: u32,
}

/// An inbox row: when it was recorded and the duplicates seen since.
#[derive(Debug, Clone, Copy)]
struct InboxRow {
    recorded_at: DateTime<Utc>,
    duplicates: u64,
}

#[derive(Debug, Default)]
struct InboxState {
    /// (consumer, id) → its inbox row
    inbox: HashMap<(String, Uuid), InboxRow>,
    /// the redrive queue: seq → (consumer, message)
    redrives: BTreeMap<i64, (String, Message)>,
    next_redrive: i64,
    effects: Vec<Effect>,
    dead: Vec<DeadLetter>,
    down: bool,
    hang_next_commit: bool,
    /// (consumer, id) → started attempts (as in custody_inbox_attempt)
    attempts: HashMap<(String, Uuid), Started>,
}

/// A consumer's database in memory: the inbox, the effects a handler
/// applies through [`MemoryTx`], and dead letters. A transaction is a
/// buffer applied atomically at commit; dropping it is a rollback.
#[derive(Debug, Clone, Default)]
pub struct MemoryInbox {
    state: Arc<Mutex<InboxState>>,
}

/// A transaction on a [`MemoryInbox`].
#[derive(Debug, Default)]
pub struct MemoryTx {
    finished: Vec<(String, Uuid)>,
    inbox: Vec<((String, Uuid), DateTime<Utc>)>,
    redrives_finished: Vec<i64>,
    duplicates: Vec<(String, Uuid)>,
    effects: Vec<Effect>,
}

impl MemoryTx {
    /// Apply `msg`'s effect (visible after commit).
    pub fn apply(&mut self, msg: &Message) {
        self.effects.push(Effect {
            message_id: msg.id,
            key: msg.key.clone(),
            payload: msg.payload.clone(),
        });
    }
}

impl MemoryInbox {
    /// Fail every operation with a retryable error (database down).
    pub fn set_down(&self, down: bool) {
        lock(&self.state).down = down;
    }

    /// The next commit never returns: a crash between handler and commit.
    pub fn hang_next_commit(&self) {
        lock(&self.state).hang_next_commit = true;
    }

    /// Clear the hang of [`MemoryInbox::hang_next_commit`].
    pub fn clear_hang(&self) {
        lock(&self.state).hang_next_commit = false;
    }

    /// Committed effects, in commit order.
    pub fn effects(&self) -> Vec<Effect> {
        lock(&self.state).effects.clone()
    }

    /// Dead letters, in order.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        lock(&self.state).dead.clone()
    }

    /// Duplicates the inbox suppressed for `consumer`.
    pub fn duplicates(&self, consumer: &str) -> u64 {
        lock(&self.state)
            .inbox
            .iter()
            .filter(|((c, _), _)| c == consumer)
            .map(|(_, row)| row.duplicates)
            .sum()
    }

    /// What `custody dlq redrive` does to a dead letter of `consumer`: queue
    /// `message` for it and delete its inbox row, so
    /// [`InboxStore::redrives`] hands it to the consumer as new. Returns the
    /// queue sequence.
    pub fn redrive(&self, consumer: &str, message: Message) -> i64 {
        let mut s = lock(&self.state);
        s.next_redrive += 1;
        let seq = s.next_redrive;
        s.inbox.remove(&(consumer.to_owned(), message.id));
        s.redrives.insert(seq, (consumer.to_owned(), message));
        seq
    }

    /// Redrives queued for `consumer` and not yet taken.
    pub fn queued_redrives(&self, consumer: &str) -> usize {
        lock(&self.state)
            .redrives
            .values()
            .filter(|(c, _)| c == consumer)
            .count()
    }

    /// Whether `consumer` has an inbox row for `id`.
    pub fn seen(&self, consumer: &str, id: Uuid) -> bool {
        lock(&self.state)
            .inbox
            .contains_key(&(consumer.to_owned(), id))
    }
}

impl InboxStore for MemoryInbox {
    type Tx = MemoryTx;

    async fn begin(&self) -> Result<MemoryTx> {
        if lock(&self.state).down {
            return Err(unavailable("memory", "begin"));
        }
        Ok(MemoryTx::default())
    }

    async fn record(
        &self,
        tx: &mut MemoryTx,
        consumer: &str,
        message: &Message,
        now: DateTime<Utc>,
    ) -> Result<InboxOutcome> {
        let s = lock(&self.state);
        if s.down {
            return Err(unavailable("memory", "record in inbox"));
        }
        let k = (consumer.to_owned(), message.id);
        // While a redrive of the message is queued (and not taken in this
        // transaction), only the redrive itself is new.
        let redrive_queued = s.redrives.iter().any(|(seq, (c, m))| {
            c == consumer && m.id == message.id && !tx.redrives_finished.contains(seq)
        });
        if s.inbox.contains_key(&k) || tx.inbox.iter().any(|(t, _)| *t == k) || redrive_queued {
            tx.duplicates.push(k);
            Ok(InboxOutcome::Duplicate)
        } else {
            tx.inbox.push((k, now));
            Ok(InboxOutcome::New)
        }
    }

    async fn commit(&self, tx: MemoryTx) -> Result<()> {
        let hang_now = {
            let mut s = lock(&self.state);
            if s.down {
                return Err(unavailable("memory", "commit"));
            }
            std::mem::take(&mut s.hang_next_commit)
        };
        if hang_now {
            hang().await;
        }
        let mut s = lock(&self.state);
        for (k, recorded_at) in tx.inbox {
            s.inbox.insert(
                k,
                InboxRow {
                    recorded_at,
                    duplicates: 0,
                },
            );
        }
        for k in tx.duplicates {
            if let Some(row) = s.inbox.get_mut(&k) {
                row.duplicates += 1;
            }
        }
        for seq in tx.redrives_finished {
            s.redrives.remove(&seq);
        }
        s.effects.extend(tx.effects);
        for k in tx.finished {
            s.attempts.remove(&k);
        }
        Ok(())
    }

    async fn start_attempts(
        &self,
        consumer: &str,
        run: Uuid,
        ids: &[Uuid],
        alone: bool,
        _now: DateTime<Utc>,
    ) -> Result<Vec<Attempt>> {
        let mut s = lock(&self.state);
        if s.down {
            return Err(unavailable("memory", "start attempts"));
        }
        Ok(ids
            .iter()
            .map(|id| {
                let e = s
                    .attempts
                    .entry((consumer.to_owned(), *id))
                    .or_insert(Started {
                        run,
                        prev_run: None,
                        alone,
                        crashes: 0,
                    });
                if e.run == run {
                    e.alone |= alone;
                } else {
                    if e.alone {
                        e.crashes += 1;
                    }
                    e.prev_run = Some(e.run);
                    e.run = run;
                    e.alone = alone;
                }
                Attempt {
                    unfinished: e.prev_run.is_some_and(|p| p != run),
                    crashes: e.crashes,
                }
            })
            .collect())
    }

    async fn finish_attempts(&self, tx: &mut MemoryTx, consumer: &str, ids: &[Uuid]) -> Result<()> {
        if lock(&self.state).down {
            return Err(unavailable("memory", "finish attempts"));
        }
        tx.finished
            .extend(ids.iter().map(|id| (consumer.to_owned(), *id)));
        Ok(())
    }

    async fn is_recorded(&self, consumer: &str, id: Uuid) -> Result<bool> {
        if lock(&self.state).down {
            return Err(unavailable("memory", "read inbox"));
        }
        Ok(self.seen(consumer, id))
    }

    async fn dead_letter(&self, consumer: &str, dead: &DeadLetter) -> Result<()> {
        let mut s = lock(&self.state);
        if s.down {
            return Err(unavailable("memory", "store dead letter"));
        }
        if let Some(id) = dead.message_id {
            s.inbox
                .entry((consumer.to_owned(), id))
                .or_insert(InboxRow {
                    recorded_at: dead.dead_at,
                    duplicates: 0,
                });
        }
        // the origin names the consumer, as the SQLite and PostgreSQL inboxes store it
        s.dead.push(DeadLetter {
            origin: format!("consumer:{consumer}"),
            ..dead.clone()
        });
        Ok(())
    }

    async fn redrives(&self, consumer: &str, limit: usize) -> Result<Vec<Redrive>> {
        let s = lock(&self.state);
        if s.down {
            return Err(unavailable("memory", "read redrive queue"));
        }
        Ok(s.redrives
            .iter()
            .filter(|(_, (c, _))| c == consumer)
            .take(limit)
            .map(|(seq, (_, message))| Redrive {
                seq: *seq,
                message: message.clone(),
            })
            .collect())
    }

    async fn finish_redrive(&self, tx: &mut MemoryTx, seq: i64) -> Result<()> {
        if lock(&self.state).down {
            return Err(unavailable("memory", "finish redrive"));
        }
        tx.redrives_finished.push(seq);
        Ok(())
    }

    async fn drop_redrive(&self, seq: i64) -> Result<()> {
        let mut s = lock(&self.state);
        if s.down {
            return Err(unavailable("memory", "drop redrive"));
        }
        s.redrives.remove(&seq);
        Ok(())
    }

    /// Deletes `consumer`'s rows recorded before `older_than`, oldest first,
    /// keeping the rows of messages that still have a dead letter.
    async fn prune(&self, consumer: &str, older_than: DateTime<Utc>, limit: usize) -> Result<u64> {
        let mut s = lock(&self.state);
        if s.down {
            return Err(unavailable("memory", "prune inbox"));
        }
        let origin = format!("consumer:{consumer}");
        let dead: HashSet<Uuid> = s
            .dead
            .iter()
            .filter(|d| d.origin == origin)
            .filter_map(|d| d.message_id)
            .collect();
        let mut doomed: Vec<(DateTime<Utc>, Uuid)> = s
            .inbox
            .iter()
            .filter(|((c, id), row)| {
                c == consumer && row.recorded_at < older_than && !dead.contains(id)
            })
            .map(|((_, id), row)| (row.recorded_at, *id))
            .collect();
        doomed.sort_unstable();
        doomed.truncate(limit);
        for (_, id) in &doomed {
            s.inbox.remove(&(consumer.to_owned(), *id));
        }
        Ok(u64::try_from(doomed.len()).unwrap_or(u64::MAX))
    }

    /// The memory inbox keeps no sequence floors (the memory outbox numbers
    /// nothing): no partition has progress.
    async fn progress(&self, _consumer: &str) -> Result<Vec<PartitionProgress>> {
        if lock(&self.state).down {
            return Err(unavailable("memory", "read progress"));
        }
        Ok(Vec::new())
    }

    /// Refused: the memory inbox keeps no sequence floors.
    async fn accept_gap(
        &self,
        consumer: &str,
        _gap: &GapAcceptance,
        _now: DateTime<Utc>,
    ) -> Result<AcceptedGap> {
        Err(Error::store(
            "memory",
            "accept gap",
            false,
            format!("the memory inbox of consumer {consumer:?} keeps no sequence floors: there is no gap to accept"),
        ))
    }

    /// Nothing to fold: the memory inbox keeps no sequence floors (dedupe is
    /// by id only; [`InboxStore::prune`] ages rows out).
    async fn compact(
        &self,
        _consumer: &str,
        _keep_after: DateTime<Utc>,
        _limit: usize,
    ) -> Result<Compaction> {
        if lock(&self.state).down {
            return Err(unavailable("memory", "compact inbox"));
        }
        Ok(Compaction::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(key: &str) -> Message {
        Message::builder("t", key, "T").build().unwrap()
    }

    #[test]
    fn enqueue_refuses_a_key_an_open_transaction_holds() {
        let outbox = MemoryOutbox::new(1);
        let open = outbox.begin_enqueue(msg("k"));
        let shared = outbox.clone();
        let refused = std::thread::spawn(move || shared.enqueue(msg("k"))).join();
        assert!(
            refused.is_err(),
            "enqueue parked a row behind an open transaction"
        );
        // nothing was left waiting: the holder commits, the key is free again
        assert!(outbox.commit(open).is_ok());
        outbox.enqueue(msg("k"));
        assert_eq!(outbox.committed().len(), 2);
        assert_eq!(outbox.pending(), 2);
    }
}
