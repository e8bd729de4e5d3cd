//! Shared helpers for the NATS integration tests.
#![allow(dead_code)]

use std::time::Duration;

use custody_core::{Message, MessageKind};
use custody_nats::{NatsPublisher, NatsSubscriber, StreamSpec, SubscriberOptions};

/// A stream of this test's own on the server at `url`; deleted on drop, also
/// when the test panics.
pub struct TestStream {
    pub url: String,
    pub spec: StreamSpec,
    pub client: async_nats::Client,
}

impl TestStream {
    pub async fn create(url: &str) -> anyhow::Result<TestStream> {
        let client = custody_nats::connect(url).await?;
        let spec = StreamSpec::new(
            &custody_testkit::unique_name("CUSTODY_T"),
            &custody_testkit::unique_name("custody_t"),
        );
        custody_nats::ensure_stream(&client, &spec).await?;
        Ok(TestStream {
            url: url.to_owned(),
            spec,
            client,
        })
    }

    /// A stream of this test's own on the machine's NATS server, or `None`
    /// when the test is to be skipped (see [`custody_testkit::nats`]).
    pub async fn on_shared_server() -> anyhow::Result<Option<TestStream>> {
        match custody_testkit::nats().await? {
            Some(url) => Ok(Some(TestStream::create(&url).await?)),
            None => Ok(None),
        }
    }

    /// A publisher to this stream.
    pub fn publisher(&self) -> NatsPublisher {
        NatsPublisher::new(self.client.clone(), &self.spec)
    }

    /// A durable subscriber `durable` on this stream with default options.
    pub async fn subscriber(
        &self,
        durable: &str,
        topics: &[String],
    ) -> custody_core::Result<NatsSubscriber> {
        NatsSubscriber::new(self.client.clone(), &self.spec, durable, topics).await
    }

    /// A durable subscriber `durable` on this stream with `options`.
    pub async fn subscriber_with(
        &self,
        durable: &str,
        topics: &[String],
        options: SubscriberOptions,
    ) -> custody_core::Result<NatsSubscriber> {
        NatsSubscriber::with_options(self.client.clone(), &self.spec, durable, topics, options)
            .await
    }

    pub async fn message_count(&self) -> anyhow::Result<u64> {
        let js = async_nats::jetstream::new(self.client.clone());
        let mut stream = js.get_stream(&self.spec.name).await?;
        Ok(stream.info().await?.state.messages)
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let url = self.url.clone();
        let name = self.spec.name.clone();
        custody_testkit::block_on_own_runtime(async move {
            let connect = async_nats::ConnectOptions::new().connect(url);
            if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(3), connect).await {
                let _ = async_nats::jetstream::new(c).delete_stream(&name).await;
            }
        });
    }
}

/// A message exercising every field, including values that need encoding.
pub fn rich_message(topic: &str, key: &str) -> Message {
    Message::builder(topic, key, "OrderPlaced")
        .kind(MessageKind::Command)
        .payload(
            "application/json; charset=utf-8",
            br#"{"amount":990}"#.to_vec(),
        )
        .header("correlationid", "req-42")
        .and_then(|b| {
            b.header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
        })
        .and_then(|b| b.header("note", " spaces, \"quotes\", 100% and\r\na newline "))
        .and_then(|b| b.header("time", "a header named like a CloudEvents attribute"))
        .and_then(|b| b.build())
        .expect("valid test message")
}
