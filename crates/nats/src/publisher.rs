use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use custody_core::{Message, PublishAck, Publisher, Result};

use crate::codec::{encode_headers_with_msg_id, headers_wire_len};
use crate::stream::check_subject;
use crate::{NatsError, StreamSpec};

/// Default time to wait for JetStream's PubAck.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes custody messages to a JetStream stream and returns only once
/// JetStream has stored them (PubAck).
///
/// The message id is sent as `Nats-Msg-Id`, so a publish retried within the
/// stream's duplicate window is acknowledged with `duplicate: true` and not
/// stored twice. Cheap to clone; clones share the connection.
#[derive(Clone, Debug)]
pub struct NatsPublisher {
    client: async_nats::Client,
    js: jetstream::Context,
    subject_prefix: String,
    ack_timeout: Duration,
}

impl NatsPublisher {
    /// A publisher to the stream of `spec` (see [`crate::ensure_stream`]).
    pub fn new(client: async_nats::Client, spec: &StreamSpec) -> Self {
        let mut js = jetstream::new(client.clone());
        js.set_timeout(DEFAULT_ACK_TIMEOUT);
        NatsPublisher {
            client,
            js,
            subject_prefix: spec.subject_prefix.clone(),
            ack_timeout: DEFAULT_ACK_TIMEOUT,
        }
    }

    /// How long one publish waits for the PubAck before failing with a
    /// retryable error (default 5 s). When the server is down a publish
    /// fails after this time.
    pub fn with_ack_timeout(mut self, d: Duration) -> Self {
        self.ack_timeout = d;
        self.js.set_timeout(d);
        self
    }

    async fn publish_inner(
        &self,
        message: &Message,
        generation: u32,
    ) -> std::result::Result<PublishAck, NatsError> {
        if let Err(reason) = check_subject(&message.topic) {
            return Err(NatsError::BadSubject {
                topic: message.topic.clone(),
                reason,
            });
        }
        let subject = format!("{}.{}", self.subject_prefix, message.topic);
        // A republish (repair / redrive) within the stream's duplicate
        // window must not be dropped as a duplicate of the original;
        // consumers still deduplicate by ce-id in their inbox.
        let nats_msg_id = (generation > 0).then(|| republish_id(message, generation));
        let headers = encode_headers_with_msg_id(message, nats_msg_id);

        // The server closes the whole connection on a message above
        // max_payload, and JetStream publishes skip the client's own check:
        // refuse it here, with the numbers.
        let size = headers_wire_len(&headers) + message.payload.len();
        let limit = self.client.server_info().max_payload;
        if limit > 0 && size > limit {
            return Err(NatsError::PayloadTooLarge {
                subject,
                size,
                limit,
            });
        }

        let payload = Bytes::copy_from_slice(&message.payload);
        let attempt = async {
            let ack = self
                .js
                .publish_with_headers(subject.clone(), headers, payload)
                .await?;
            ack.await
        };
        match tokio::time::timeout(self.ack_timeout, attempt).await {
            Err(_) => Err(NatsError::Timeout {
                what: format!("PubAck for {subject}"),
                after: self.ack_timeout,
            }),
            Ok(Err(source)) => Err(NatsError::Publish { subject, source }),
            Ok(Ok(ack)) => Ok(PublishAck {
                stream: Some(ack.stream),
                sequence: Some(ack.sequence),
                duplicate: ack.duplicate,
            }),
        }
    }
}

/// The `Nats-Msg-Id` of the `generation`th republish of `message`: `<id>:r<generation>`.
pub fn republish_id(message: &Message, generation: u32) -> String {
    format!("{}:r{generation}", message.id)
}

impl Publisher for NatsPublisher {
    #[tracing::instrument(skip_all, fields(message_id = %message.id, topic = %message.topic))]
    async fn publish(&self, message: &Message) -> Result<PublishAck> {
        self.publish_again(message, 0).await
    }

    #[tracing::instrument(skip_all, fields(message_id = %message.id, topic = %message.topic, generation))]
    async fn publish_again(&self, message: &Message, generation: u32) -> Result<PublishAck> {
        message.validate()?;
        let ack = self
            .publish_inner(message, generation)
            .await
            .map_err(|e| e.into_core("publish"))?;
        if ack.duplicate {
            tracing::debug!(sequence = ?ack.sequence, "JetStream recognised a duplicate");
        }
        Ok(ack)
    }
}
