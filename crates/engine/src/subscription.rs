//! Catch-up and live subscriptions to an event store's global log, a
//! category or event types ([`LogFilter`]).
//!
//! One task reads pages of [`EventStore::read_all`] from a checkpoint; when
//! a page reaches the gap-free head it waits for the head to move
//! ([`EventStore::wait_for_head`]) and reads on from where it stopped. There
//! is no separate "live" mode to switch to: catch-up and live are the same
//! loop over the same cursor, so an event appended while the subscription
//! catches up is read by the next page, never skipped nor read twice, and
//! `read_all` never hands out a position past the gap-free head
//! (docs/ARCHITECTURE.md invariant 5).
//!
//! Pages go through a bounded channel: a slow consumer fills it and the
//! reader waits, so memory stays bounded by `buffer` pages. The task is
//! owned by the [`Subscription`]: dropping it (or cancelling the token given
//! to [`Subscription::start_with`]) stops the reader.

use std::time::Duration;

use custody_core::event::{EventStore, LogFilter, RecordedEvent};
use custody_core::{Backoff, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::warn;

/// How a [`Subscription`] reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct SubscriptionConfig {
    /// Events per `read_all` page. Default 1000.
    pub page_size: usize,
    /// Pages buffered between the reader and the consumer. Default 4.
    pub buffer: usize,
    /// Longest wait for the head to move before looking again (appends
    /// wake the wait earlier). Default 5 s.
    #[serde(with = "custody_core::duration_serde")]
    pub live_wait: Duration,
    /// Backoff between attempts after a retryable read error.
    pub backoff: Backoff,
}

impl Default for SubscriptionConfig {
    fn default() -> Self {
        SubscriptionConfig {
            page_size: 1000,
            buffer: 4,
            live_wait: Duration::from_secs(5),
            backoff: Backoff::default(),
        }
    }
}

/// One page of a subscription: the matching events in position order and
/// the position the read covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The events that pass the filter, in position order.
    pub events: Vec<RecordedEvent>,
    /// The checkpoint to store once `events` are handled: the next read
    /// starts after it. With a filter it may be past the last event.
    pub scanned_to: u64,
    /// The gap-free head when the page was read; `scanned_to == head`
    /// means the subscription had caught up.
    pub head: u64,
}

impl Page {
    /// Whether the page reached the head (the subscription is live).
    pub fn caught_up(&self) -> bool {
        self.scanned_to >= self.head
    }
}

/// A running subscription: pages in position order from [`Self::next`].
/// Dropping it stops its reader.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::Receiver<Result<Page>>,
    _stop: DropGuard,
}

impl Subscription {
    /// Subscribe to `store`'s log after position `from` (0: from the start)
    /// through `filter`.
    pub fn start<E: EventStore>(
        store: E,
        from: u64,
        filter: LogFilter,
        config: SubscriptionConfig,
    ) -> Self {
        Self::start_with(store, from, filter, config, CancellationToken::new())
    }

    /// [`Self::start`], also stopped when `token` is cancelled.
    pub fn start_with<E: EventStore>(
        store: E,
        from: u64,
        filter: LogFilter,
        config: SubscriptionConfig,
        token: CancellationToken,
    ) -> Self {
        let stop = token.child_token();
        let (tx, rx) = mpsc::channel(config.buffer.max(1));
        tokio::spawn(read_loop(store, from, filter, config, tx, stop.clone()));
        Subscription {
            rx,
            _stop: stop.drop_guard(),
        }
    }

    /// The next page; `None` once the reader stopped (cancelled). An error
    /// is one the reader could not retry (it stops after it).
    pub async fn next(&mut self) -> Option<Result<Page>> {
        self.rx.recv().await
    }
}

async fn read_loop<E: EventStore>(
    store: E,
    mut after: u64,
    filter: LogFilter,
    config: SubscriptionConfig,
    tx: mpsc::Sender<Result<Page>>,
    stop: CancellationToken,
) {
    let page_size = config.page_size.max(1);
    let mut failures = 0u32;
    loop {
        let read = tokio::select! {
            _ = stop.cancelled() => return,
            r = store.read_all(after, &filter, page_size) => r,
        };
        let slice = match read {
            Ok(slice) => {
                failures = 0;
                slice
            }
            Err(e) if e.retryable() => {
                failures += 1;
                let delay = config.backoff.delay(failures, &mut rand::thread_rng());
                warn!(error = %e, ?delay, after, "subscription read failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let advanced = slice.scanned_to > after;
        if advanced {
            after = slice.scanned_to;
            let page = Page {
                events: slice.events,
                scanned_to: slice.scanned_to,
                head: slice.head,
            };
            // back-pressure: a full channel parks the reader here
            tokio::select! {
                _ = stop.cancelled() => return,
                sent = tx.send(Ok(page)) => if sent.is_err() { return },
            }
        }
        if after >= slice.head {
            // live: the same cursor, read again once the head passes it
            let waited = tokio::select! {
                _ = stop.cancelled() => return,
                w = store.wait_for_head(after, config.live_wait) => w,
            };
            if let Err(e) = waited {
                warn!(error = %e, "subscription wait for head failed; reading again");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(config.backoff.base) => {},
                }
            }
        } else if !advanced {
            // a store whose read did not move below its head: never spin
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(config.backoff.base) => {},
            }
        }
    }
}
