//! LISTEN/NOTIFY wake-ups on channel `custody_outbox`.
//!
//! One background task per [`Wake`] (shared by clones of the owner) holds a
//! dedicated connection that LISTENs; every notification bumps a generation
//! counter in a watch channel. Waiters compare generations, so a notification
//! that arrives between a reader's empty fetch and its wait is not lost. When
//! the listening connection drops, notifications sent meanwhile are lost: the
//! task reconnects and bumps the generation, waking every waiter spuriously
//! so they look again. Spurious wake-ups are fine, missed ones are not.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The NOTIFY channel custody's enqueue signals on.
pub(crate) const CHANNEL: &str = "custody_outbox";

/// Pause before reconnecting a failed listener.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

/// Shared state: the generation counter and the lazily started listener task.
pub(crate) struct Wake {
    pool: PgPool,
    channel: &'static str,
    generation: watch::Sender<u64>,
    task: OnceLock<AbortOnDrop>,
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Wake {
    pub(crate) fn new(pool: PgPool) -> Arc<Self> {
        Self::on_channel(pool, CHANNEL)
    }

    /// Wake-ups from NOTIFYs on `channel` instead of `custody_outbox`.
    pub(crate) fn on_channel(pool: PgPool, channel: &'static str) -> Arc<Self> {
        Arc::new(Wake {
            pool,
            channel,
            generation: watch::Sender::new(0),
            task: OnceLock::new(),
        })
    }

    /// The current generation; pass it to [`Wake::wait`] later.
    pub(crate) fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Wait until the generation differs from `seen` or `timeout` passes;
    /// returns the generation now. Starts the listener on first use.
    pub(crate) async fn wait(&self, seen: u64, timeout: Duration) -> u64 {
        self.start();
        let mut rx = self.generation.subscribe();
        if *rx.borrow_and_update() != seen {
            return *rx.borrow();
        }
        let _ = tokio::time::timeout(timeout, rx.changed()).await;
        let now = *rx.borrow();
        now
    }

    fn start(&self) {
        self.task.get_or_init(|| {
            // A pool of its own so the LISTEN connection never takes a slot
            // of the application's pool, with the same connect options.
            let options = self.pool.connect_options().as_ref().clone();
            let listen_pool = PgPoolOptions::new()
                .max_connections(1)
                .min_connections(0)
                .connect_lazy_with(options);
            let generation = self.generation.clone();
            AbortOnDrop(tokio::spawn(listen(listen_pool, self.channel, generation)))
        });
    }
}

/// The listener task: runs until aborted (when the last owner drops).
async fn listen(pool: PgPool, channel: &'static str, generation: watch::Sender<u64>) {
    let bump = || generation.send_modify(|g| *g = g.wrapping_add(1));
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "custody: cannot open LISTEN connection; retrying");
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            }
        };
        listener.eager_reconnect(true);
        if let Err(e) = listener.listen(channel).await {
            tracing::warn!(error = %e, "custody: LISTEN {channel} failed; retrying");
            tokio::time::sleep(RECONNECT_PAUSE).await;
            continue;
        }
        // Anything committed before LISTEN took effect was not signalled.
        bump();
        loop {
            match listener.try_recv().await {
                Ok(Some(_)) => bump(),
                // Lost the connection and reconnected (eager): notifications
                // in between are gone, so wake everyone to look again.
                Ok(None) => {
                    tracing::debug!("custody: LISTEN connection re-established");
                    bump();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "custody: LISTEN connection failed; reconnecting");
                    bump();
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                    break;
                }
            }
        }
    }
}

/// One waiter's view of a shared [`Wake`]: remembers the last generation it
/// saw. Cloning gives the clone its own memory.
pub(crate) struct Waiter {
    wake: Arc<Wake>,
    seen: AtomicU64,
}

impl Waiter {
    pub(crate) fn new(wake: Arc<Wake>) -> Self {
        // 0 is never current after the listener starts, so the first wait
        // returns at once: the caller looks once more, which is harmless.
        Waiter {
            wake,
            seen: AtomicU64::new(0),
        }
    }

    /// Wait for a notification newer than the last one this waiter saw, or
    /// `timeout`.
    pub(crate) async fn wait(&self, timeout: Duration) {
        let seen = self.seen.load(Ordering::Acquire);
        let now = self.wake.wait(seen, timeout).await;
        self.seen.store(now, Ordering::Release);
    }

    /// Forget earlier notifications (used right before looking at the table).
    pub(crate) fn catch_up(&self) {
        self.seen.store(self.wake.generation(), Ordering::Release);
    }
}

impl Clone for Waiter {
    fn clone(&self) -> Self {
        Waiter {
            wake: self.wake.clone(),
            seen: AtomicU64::new(self.seen.load(Ordering::Acquire)),
        }
    }
}
