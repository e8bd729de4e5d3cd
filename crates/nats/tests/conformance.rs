//! The transport conformance suite (custody_testkit::conformance) on
//! NATS JetStream, each run on a stream of its own.

mod common;

use common::TestStream;
use custody_core::{Message, Publisher};
use custody_nats::NatsSubscriber;
use custody_testkit::conformance::TransportFixture;

struct Nats(TestStream);

impl TransportFixture for Nats {
    type Subscriber = NatsSubscriber;

    async fn fresh() -> anyhow::Result<Option<Self>> {
        Ok(TestStream::on_shared_server().await?.map(Nats))
    }

    fn topic(&self) -> String {
        "orders".into()
    }

    async fn send(&self, messages: &[Message]) -> anyhow::Result<()> {
        let publisher = self.0.publisher();
        for m in messages {
            let ack = publisher.publish(m).await?;
            anyhow::ensure!(ack.stream.as_deref() == Some(self.0.spec.name.as_str()));
            anyhow::ensure!(!ack.duplicate, "a first publish is no duplicate");
        }
        Ok(())
    }

    async fn subscriber(&self, name: &str) -> anyhow::Result<NatsSubscriber> {
        Ok(self.0.subscriber(name, &[self.topic()]).await?)
    }
}

custody_testkit::transport_conformance!(Nats);
