use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::Subject;
use bytes::Bytes;
use custody_core::{Delivery, Result, Subscriber};
use futures::StreamExt;

use crate::codec::decode;
use crate::{NatsError, StreamSpec};

/// Settings of a [`NatsSubscriber`] beyond its stream, name and topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberOptions {
    /// How long JetStream waits for an ack before delivering a message
    /// again. Default 30 s. Must exceed the longest time a consumer takes to
    /// process one fetched batch, or messages are redelivered while still
    /// being processed (harmless with an inbox, but wasted work).
    pub ack_wait: Duration,
    /// How long [`Subscriber::ack`] waits for the server to confirm an ack.
    /// Default 5 s.
    pub ack_timeout: Duration,
}

impl Default for SubscriberOptions {
    fn default() -> Self {
        SubscriberOptions {
            ack_wait: Duration::from_secs(30),
            ack_timeout: Duration::from_secs(5),
        }
    }
}

/// Acknowledges one JetStream delivery: its ack subject and stream sequence.
#[derive(Debug, Clone)]
pub struct NatsAckToken {
    reply: Subject,
    stream_sequence: u64,
}

impl NatsAckToken {
    /// The message's sequence number in the stream.
    pub fn stream_sequence(&self) -> u64 {
        self.stream_sequence
    }
}

/// Pulls custody messages from a durable JetStream consumer.
///
/// Delivery is at least once: a message not acknowledged within `ack_wait`
/// is delivered again, with no limit on the number of deliveries (custody's
/// consumer dead-letters poison messages itself). Acks are confirmed by the
/// server ("double ack"), so an ack the server did not record is an error,
/// not a silent redelivery later.
pub struct NatsSubscriber {
    client: async_nats::Client,
    consumer: PullConsumer,
    stream: String,
    durable: String,
    subject_prefix: String,
    ack_timeout: Duration,
}

impl std::fmt::Debug for NatsSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSubscriber")
            .field("stream", &self.stream)
            .field("durable", &self.durable)
            .field("subject_prefix", &self.subject_prefix)
            .finish_non_exhaustive()
    }
}

impl NatsSubscriber {
    /// Create (or update) the durable pull consumer `durable` on the stream
    /// of `spec`, filtered to `<prefix>.<topic>` for each of `topics` (every
    /// topic when empty), explicit ack, `ack_wait` 30 s, unlimited
    /// redeliveries. Subscribers with the same `durable` share its position.
    pub async fn new(
        client: async_nats::Client,
        spec: &StreamSpec,
        durable: &str,
        topics: &[String],
    ) -> Result<Self> {
        Self::with_options(client, spec, durable, topics, SubscriberOptions::default()).await
    }

    /// [`NatsSubscriber::new`] with explicit [`SubscriberOptions`].
    pub async fn with_options(
        client: async_nats::Client,
        spec: &StreamSpec,
        durable: &str,
        topics: &[String],
        options: SubscriberOptions,
    ) -> Result<Self> {
        if durable.is_empty()
            || durable.contains(|c: char| {
                c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control()
            })
        {
            return Err(custody_core::Error::Config(format!(
                "durable consumer name {durable:?} is not a valid JetStream name; use letters, digits, '-' and '_'"
            )));
        }
        let filters: Vec<String> = topics.iter().map(|t| spec.subject(t)).collect();
        let (filter_subject, filter_subjects) = match filters.as_slice() {
            [] => (String::new(), Vec::new()),
            [one] => (one.clone(), Vec::new()),
            many => (String::new(), many.to_vec()),
        };
        if filter_subjects.len() > 1 && !supports_several_filters(&client.server_info().version) {
            return Err(NatsError::FilterNotApplied {
                stream: spec.name.clone(),
                durable: durable.to_owned(),
                server_version: client.server_info().version,
                wanted: filters,
                got: Vec::new(),
            }
            .into_core("create consumer"));
        }
        let config = pull::Config {
            durable_name: Some(durable.to_owned()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: options.ack_wait,
            max_deliver: -1,
            filter_subject: filter_subject.clone(),
            filter_subjects: filter_subjects.clone(),
            ..Default::default()
        };
        let js = async_nats::jetstream::new(client.clone());
        let consumer_error = |source| {
            NatsError::Consumer {
                stream: spec.name.clone(),
                durable: durable.to_owned(),
                source,
            }
            .into_core("create consumer")
        };
        let mut consumer: PullConsumer =
            match js.get_consumer_from_stream(durable, &spec.name).await {
                Ok(existing) => existing,
                Err(_) => js
                    .create_consumer_on_stream(config.clone(), &spec.name)
                    .await
                    .map_err(consumer_error)?,
            };

        // Resume in stream order after a crash. A subscriber that died left
        // messages delivered but unacknowledged; JetStream would redeliver
        // them only after `ack_wait`, *behind* newer messages of the same
        // key, and the consumer would apply a key's later message first.
        // Instead restart the durable just after its ack floor: everything
        // after it comes again in order (what was already processed is
        // skipped by the inbox). One active subscriber per durable is
        // assumed for ordered processing.
        let info = consumer.cached_info().clone();
        if info.num_ack_pending > 0 {
            let start_sequence = info.ack_floor.stream_sequence + 1;
            tracing::info!(
                durable,
                pending = info.num_ack_pending,
                start_sequence,
                "unacknowledged deliveries from a previous run; resuming in order after the ack floor"
            );
            js.delete_consumer_from_stream(durable, &spec.name)
                .await
                .map_err(consumer_error)?;
            let resume = pull::Config {
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence },
                ..config
            };
            consumer = js
                .create_consumer_on_stream(resume, &spec.name)
                .await
                .map_err(consumer_error)?;
        }

        // Servers before 2.10 silently ignore `filter_subjects`; such a
        // consumer would deliver every topic. The version check above should
        // have caught that; this also catches servers that misreport.
        let applied = &consumer.cached_info().config;
        let got: Vec<String> = if applied.filter_subjects.is_empty() {
            Some(applied.filter_subject.clone())
                .filter(|s| !s.is_empty())
                .into_iter()
                .collect()
        } else {
            applied.filter_subjects.clone()
        };
        let mut wanted_sorted = filters.clone();
        wanted_sorted.sort();
        let mut got_sorted = got.clone();
        got_sorted.sort();
        if wanted_sorted != got_sorted {
            return Err(NatsError::FilterNotApplied {
                stream: spec.name.clone(),
                durable: durable.to_owned(),
                server_version: client.server_info().version,
                wanted: filters,
                got,
            }
            .into_core("create consumer"));
        }

        Ok(NatsSubscriber {
            client,
            consumer,
            stream: spec.name.clone(),
            durable: durable.to_owned(),
            subject_prefix: spec.subject_prefix.clone(),
            ack_timeout: options.ack_timeout,
        })
    }

    /// The stream name.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The durable consumer name.
    pub fn durable(&self) -> &str {
        &self.durable
    }

    fn fetch_error(&self, source: async_nats::Error) -> custody_core::Error {
        NatsError::Fetch {
            durable: self.durable.clone(),
            source,
        }
        .into_core("fetch")
    }
}

impl Subscriber for NatsSubscriber {
    type Token = NatsAckToken;

    #[tracing::instrument(skip_all, fields(durable = %self.durable, max))]
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery<NatsAckToken>>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        // A pull sent while reconnecting would sit in the client's buffer
        // and come back empty after `wait` plus the client's grace period;
        // say what is going on instead.
        let state = self.client.connection_state();
        if state != async_nats::connection::State::Connected {
            return Err(NatsError::NotConnected {
                what: format!("pull from consumer {}", self.durable),
                state: state.to_string(),
            }
            .into_core("fetch"));
        }
        // A no-wait pull with an expiry: the server answers as soon as it has
        // at least one message (with as many as are ready, up to `max`), or
        // after `wait` with none.
        let mut request = self.consumer.fetch().max_messages(max);
        if !wait.is_zero() {
            request = request.expires(wait);
        }
        let mut batch = request
            .messages()
            .await
            .map_err(|e| self.fetch_error(Box::new(e)))?;

        let mut out = Vec::new();
        while let Some(item) = batch.next().await {
            let msg = match item {
                Ok(m) => m,
                // An error status ends the pull. Messages already received
                // are delivered (dropping them would only delay them until
                // ack_wait); the error surfaces on the next fetch if it lasts.
                Err(e) if !out.is_empty() => {
                    tracing::warn!(error = %e, "pull ended with an error after {} messages", out.len());
                    break;
                }
                Err(e) => return Err(self.fetch_error(e)),
            };
            let (stream_sequence, delivered) = match msg.info() {
                Ok(info) => (info.stream_sequence, info.delivered),
                Err(e) => return Err(self.fetch_error(e)),
            };
            let Some(reply) = msg.reply.clone() else {
                return Err(self.fetch_error("JetStream message without an ack subject".into()));
            };
            let message = decode(
                msg.subject.as_str(),
                msg.headers.as_ref(),
                &msg.payload,
                &self.subject_prefix,
            );
            if let Err(bad) = &message {
                tracing::warn!(stream_sequence, reason = %bad.reason, "malformed message");
            }
            out.push(Delivery {
                message,
                delivery_count: u32::try_from(delivered).unwrap_or(u32::MAX),
                token: NatsAckToken {
                    reply,
                    stream_sequence,
                },
            });
        }
        Ok(out)
    }

    #[tracing::instrument(skip_all, fields(durable = %self.durable, stream_sequence = token.stream_sequence))]
    async fn ack(&mut self, token: NatsAckToken) -> Result<()> {
        ack_one(&self.client, self.ack_timeout, token).await
    }

    /// Acks of a batch sent concurrently; each is still confirmed by the server.
    async fn ack_all(&mut self, tokens: Vec<NatsAckToken>) -> Result<()> {
        let acks = tokens
            .into_iter()
            .map(|t| ack_one(&self.client, self.ack_timeout, t));
        for r in futures::future::join_all(acks).await {
            r?;
        }
        Ok(())
    }
}

/// Ack one delivery and wait for the server's confirmation.
async fn ack_one(
    client: &async_nats::Client,
    ack_timeout: std::time::Duration,
    token: NatsAckToken,
) -> Result<()> {
    // A request (not a plain publish) makes the server confirm the ack.
    let request = client.request(token.reply.clone(), Bytes::from_static(b"+ACK"));
    match tokio::time::timeout(ack_timeout, request).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(source)) => Err(NatsError::Ack {
            stream_sequence: token.stream_sequence,
            source,
        }
        .into_core("ack")),
        Err(_) => Err(NatsError::Timeout {
            what: format!(
                "confirmation of ack for stream sequence {}",
                token.stream_sequence
            ),
            after: ack_timeout,
        }
        .into_core("ack")),
    }
}

/// Whether a server of `version` (`"2.10.4"`) applies `filter_subjects`.
/// Unparseable versions are given the benefit of the doubt; the check of the
/// created consumer's config still applies.
fn supports_several_filters(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
    });
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= (2, 10),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::supports_several_filters;

    #[test]
    fn several_filters_need_2_10() {
        assert!(!supports_several_filters("2.9.10"));
        assert!(supports_several_filters("2.10.0"));
        assert!(supports_several_filters("2.11.3-beta"));
        assert!(supports_several_filters("3.0.0"));
        assert!(supports_several_filters("unknown"));
    }
}
