//! The conformance suites on the in-memory backends of `custody_testkit::memory`.

use std::sync::{Arc, Mutex};

use custody_core::{DeadLetter, Message, Publisher};
use custody_testkit::conformance::{Scenario, StoreFixture, TransportFixture};
use custody_testkit::memory::{MemoryBroker, MemoryInbox, MemoryOutbox, MemorySubscriber};

/// A memory outbox and inbox. The memory outbox never deletes a row (it
/// keeps no history to prune), so the positions it handed out are its rows.
struct Memory {
    outbox: MemoryOutbox,
    inbox: MemoryInbox,
    positions: Arc<Mutex<Vec<i64>>>,
}

impl StoreFixture for Memory {
    type Outbox = MemoryOutbox;
    type Inbox = MemoryInbox;

    async fn fresh() -> anyhow::Result<Option<Self>> {
        Ok(Some(Memory {
            outbox: MemoryOutbox::new(16),
            inbox: MemoryInbox::default(),
            positions: Arc::default(),
        }))
    }

    fn not_applicable(&self, scenario: Scenario) -> Option<&'static str> {
        match scenario {
            Scenario::StoreOutage => None,
            Scenario::Prune | Scenario::PruneEmbeddedReader | Scenario::InboxPrune => {
                Some("the memory stores keep no history to prune")
            }
            Scenario::RedriveQueue => Some("the memory inbox has no operator redrive queue"),
            Scenario::Sequences => {
                Some("the memory stores number nothing (no producer id, no floors)")
            }
        }
    }

    fn outbox(&self) -> MemoryOutbox {
        self.outbox.clone()
    }

    fn inbox(&self) -> MemoryInbox {
        self.inbox.clone()
    }

    async fn enqueue(&self, messages: &[Message], commit: bool) -> anyhow::Result<Vec<i64>> {
        let mut out = Vec::new();
        for m in messages {
            // Producers run concurrently: a transaction whose key another
            // open transaction holds waits (the model inserts its row when
            // the holder ends), so retry the commit/rollback until it can.
            // (`MemoryOutbox::enqueue` is for one producer: used here, a
            // waiting row was inserted after its handle was dropped and
            // held its key's lock forever, stalling the relay.)
            let mut row = self.outbox.begin_enqueue(m.clone());
            while self.outbox.is_waiting(&row) {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            out.extend(self.outbox.position(&row));
            loop {
                let ended = if commit {
                    self.outbox.commit(row)
                } else {
                    self.outbox.rollback(row)
                };
                match ended {
                    Ok(()) => break,
                    Err(back) => {
                        row = back;
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    }
                }
            }
        }
        if commit {
            let mut p = self.positions.lock().unwrap_or_else(|e| e.into_inner());
            p.extend(&out);
            p.sort_unstable();
        }
        Ok(out)
    }

    async fn outbox_positions(&self) -> anyhow::Result<Vec<i64>> {
        Ok(self
            .positions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone())
    }

    async fn outbox_dead_letters(&self) -> anyhow::Result<usize> {
        Ok(self.outbox.dead_letters().len())
    }

    async fn set_store_down(&self, down: bool) -> anyhow::Result<()> {
        self.outbox.set_down(down);
        Ok(())
    }

    async fn settle(&self) -> anyhow::Result<()> {
        // rows are visible at commit
        Ok(())
    }

    async fn read_and_ack(&self, _reader: &str, _max: usize) -> anyhow::Result<Vec<i64>> {
        anyhow::bail!("the memory outbox has no embedded reader")
    }

    async fn set_checkpoint(&self, _reader: &str, _position: i64) -> anyhow::Result<()> {
        anyhow::bail!("the memory outbox has no embedded reader")
    }

    async fn redrive(&self, _id: uuid::Uuid) -> anyhow::Result<()> {
        anyhow::bail!("the memory inbox has no redrive queue")
    }

    async fn inbox_dead_letters(&self) -> anyhow::Result<Vec<DeadLetter>> {
        Ok(self.inbox.dead_letters())
    }
}

custody_testkit::store_conformance!(Memory);

/// The memory broker as a transport.
struct Broker {
    broker: MemoryBroker,
}

impl TransportFixture for Broker {
    type Subscriber = MemorySubscriber;

    async fn fresh() -> anyhow::Result<Option<Self>> {
        Ok(Some(Broker {
            broker: MemoryBroker::default(),
        }))
    }

    fn topic(&self) -> String {
        "orders".into()
    }

    async fn send(&self, messages: &[Message]) -> anyhow::Result<()> {
        for m in messages {
            self.broker.publish(m).await?;
        }
        Ok(())
    }

    async fn subscriber(&self, name: &str) -> anyhow::Result<MemorySubscriber> {
        Ok(self.broker.subscribe(name))
    }
}

custody_testkit::transport_conformance!(Broker);
