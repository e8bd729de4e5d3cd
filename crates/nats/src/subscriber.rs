use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::Subject;
use bytes::Bytes;
use custody_core::{Delivery, Malformed, Result, Subscriber};
use futures::{FutureExt, StreamExt};

use crate::codec::decode;
use crate::direct::{decode_stored, next_message};
use crate::{NatsError, StreamSpec};

/// Settings of a [`NatsSubscriber`] beyond its stream, name and topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberOptions {
    /// How long JetStream waits for an ack before delivering a message
    /// again. Default 30 s. Must exceed the longest time a consumer takes to
    /// process one fetched batch, or messages are redelivered while still
    /// being processed (harmless with an inbox, but wasted work).
    pub ack_wait: Duration,
    /// How long [`Subscriber::ack`] waits for the server to confirm an ack
    /// (and a read of a stored message, see [`NatsSubscriber`]). Default 5 s.
    pub ack_timeout: Duration,
    /// How many times JetStream delivers a message before it gives up on
    /// it; `-1` for no limit. Default 20. The subscriber redelivers in stream
    /// order by itself after any lost delivery, so this limit is a backstop
    /// only: a message that reaches it is handed over as malformed (and
    /// dead-lettered by the consumer) from the server's `MAX_DELIVERIES`
    /// advisory, which the subscriber listens to.
    pub max_deliver: i64,
}

impl Default for SubscriberOptions {
    fn default() -> Self {
        SubscriberOptions {
            ack_wait: Duration::from_secs(30),
            ack_timeout: Duration::from_secs(5),
            max_deliver: 20,
        }
    }
}

/// Acknowledges one JetStream delivery: its ack subject and stream sequence
/// (no ack subject for a message the subscriber read from the stream by
/// sequence: its ack is recorded by the subscriber).
#[derive(Debug, Clone)]
pub struct NatsAckToken {
    reply: Option<Subject>,
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
/// Delivery is at least once and in stream order, also across a lost
/// connection, a restart or a message the client cannot parse: whenever a
/// delivery may have been lost (the subscriber starts with unacknowledged
/// deliveries, a pull ended with an error or a reconnect, or the consumer
/// sequence of a delivery skips one), the subscriber reads the messages
/// after the durable's ack floor from the stream by sequence, in order
/// (`$JS.API.STREAM.MSG.GET`, headers parsed by custody, so a header the
/// client cannot parse makes a [`Malformed`] delivery instead of a dropped
/// connection), and once they are all acknowledged it starts the durable
/// again just after them. JetStream's own redelivery after `ack_wait` would
/// put them behind newer messages of their keys. What was processed already
/// is skipped by the inbox.
///
/// Acks are confirmed by the server ("double ack"), so an ack the server
/// did not record is an error, not a silent redelivery later.
///
/// One subscriber per durable may be active at a time: the durable is
/// restarted under any other. Several instances of a consumer share it
/// through a lease (`custody_engine::LeasedConsumer`, docs/OPERATIONS.md).
pub struct NatsSubscriber {
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    consumer: PullConsumer,
    config: pull::Config,
    stream: String,
    durable: String,
    subject_prefix: String,
    /// Subjects to read from the stream by sequence (the filters, or all).
    read_subjects: Vec<String>,
    ack_timeout: Duration,
    /// Consumer sequence of the last delivery received from the durable.
    last_consumer_sequence: u64,
    /// A delivery may have been lost: look at the durable before pulling.
    check: bool,
    /// Redelivering after the ack floor by reading the stream.
    resync: Option<Resync>,
    /// The server's advisories about messages that reached `max_deliver`.
    advisories: Option<async_nats::Subscriber>,
}

/// Messages after the durable's ack floor, redelivered by stream sequence.
#[derive(Debug)]
struct Resync {
    /// The next stream sequence to read.
    cursor: u64,
    /// The last one (the durable's last delivered stream sequence).
    until: u64,
    /// Handed out and not yet acknowledged, in order.
    unacked: VecDeque<u64>,
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
        if options.max_deliver == 0 || options.max_deliver < -1 {
            return Err(custody_core::Error::Config(format!(
                "max_deliver {} is not valid; use a positive number of deliveries, or -1 for no limit",
                options.max_deliver
            )));
        }
        let config = pull::Config {
            durable_name: Some(durable.to_owned()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: options.ack_wait,
            max_deliver: options.max_deliver,
            filter_subject: filter_subject.clone(),
            filter_subjects: filter_subjects.clone(),
            ..Default::default()
        };
        let js = async_nats::jetstream::new(client.clone());
        check_stream(&js, &client, spec, durable, &filters).await?;
        let consumer_error = |source| {
            NatsError::Consumer {
                stream: spec.name.clone(),
                durable: durable.to_owned(),
                source,
            }
            .into_core("create consumer")
        };
        let consumer: PullConsumer = match js.get_consumer_from_stream(durable, &spec.name).await {
            Ok(existing) => existing,
            Err(_) => js
                .create_consumer_on_stream(config.clone(), &spec.name)
                .await
                .map_err(consumer_error)?,
        };

        // A subscriber that died left messages delivered but unacknowledged;
        // JetStream would redeliver them only after `ack_wait`, *behind*
        // newer messages of their keys. The first fetch redelivers them in
        // stream order instead (see `NatsSubscriber`).
        let info = consumer.cached_info().clone();
        let check = info.num_ack_pending > 0;
        if check {
            tracing::info!(
                durable,
                pending = info.num_ack_pending,
                ack_floor = info.ack_floor.stream_sequence,
                "unacknowledged deliveries from a previous run; redelivering in stream order after the ack floor"
            );
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

        let read_subjects = if filters.is_empty() {
            vec![format!("{}.>", spec.subject_prefix)]
        } else {
            filters.clone()
        };
        let advisories = client
            .subscribe(format!(
                "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{durable}",
                spec.name
            ))
            .await
            .map_err(|e| {
                NatsError::NotConnected {
                    what: format!("subscribe to the max-deliveries advisories of {durable}: {e}"),
                    state: client.connection_state().to_string(),
                }
                .into_core("create consumer")
            })?;
        Ok(NatsSubscriber {
            client,
            js,
            consumer,
            config,
            stream: spec.name.clone(),
            durable: durable.to_owned(),
            subject_prefix: spec.subject_prefix.clone(),
            read_subjects,
            ack_timeout: options.ack_timeout,
            last_consumer_sequence: info.delivered.consumer_sequence,
            check,
            resync: None,
            advisories: Some(advisories),
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

    /// A delivery may have been lost: unless nothing is pending, redeliver
    /// from the ack floor by reading the stream.
    async fn begin_resync(&mut self) -> Result<()> {
        let durable = self.durable.clone();
        let info = self
            .consumer
            .info()
            .await
            .map_err(|e| NatsError::Fetch {
                durable: durable.clone(),
                source: Box::new(e),
            })
            .map_err(|e| e.into_core("fetch"))?
            .clone();
        if info.num_ack_pending == 0 {
            self.last_consumer_sequence = info.delivered.consumer_sequence;
            return Ok(());
        }
        let (floor, until) = (
            info.ack_floor.stream_sequence,
            info.delivered.stream_sequence,
        );
        tracing::info!(
            durable,
            pending = info.num_ack_pending,
            from = floor + 1,
            until,
            "deliveries may have been lost; redelivering after the ack floor in stream order"
        );
        self.resync = Some(Resync {
            cursor: floor + 1,
            until,
            unacked: VecDeque::new(),
        });
        Ok(())
    }

    /// The next stored message at or after `sequence` on one of the
    /// subscribed subjects.
    async fn next_stored(&self, sequence: u64) -> Result<Option<crate::direct::StoredMessage>> {
        let mut best: Option<crate::direct::StoredMessage> = None;
        for subject in &self.read_subjects {
            let found = next_message(
                &self.client,
                &self.stream,
                sequence,
                subject,
                self.ack_timeout,
            )
            .await
            .map_err(|e| e.into_core("fetch"))?;
            if let Some(m) = found {
                if best.as_ref().is_none_or(|b| m.sequence < b.sequence) {
                    best = Some(m);
                }
            }
        }
        Ok(best)
    }

    /// Up to `max` messages of the resync, read from the stream in order.
    async fn serve(&mut self, max: usize) -> Result<Vec<Delivery<NatsAckToken>>> {
        let mut out = Vec::new();
        let Some(r) = self.resync.as_mut() else {
            return Ok(out);
        };
        // handed out before and not acknowledged: from the first of them again
        if let Some(&first) = r.unacked.front() {
            r.cursor = first;
            r.unacked.clear();
        }
        let (mut cursor, until) = (r.cursor, r.until);
        let mut served = Vec::new();
        while out.len() < max && cursor <= until {
            let Some(stored) = self.next_stored(cursor).await? else {
                cursor = until + 1;
                break;
            };
            if stored.sequence > until {
                cursor = until + 1;
                break;
            }
            let message = decode_stored(&self.stream, &stored, &self.subject_prefix);
            if let Err(bad) = &message {
                tracing::warn!(stream_sequence = stored.sequence, reason = %bad.reason, "malformed message");
            }
            served.push(stored.sequence);
            out.push(Delivery {
                message,
                delivery_count: 2,
                token: NatsAckToken {
                    reply: None,
                    stream_sequence: stored.sequence,
                },
            });
            cursor = stored.sequence + 1;
        }
        if let Some(r) = self.resync.as_mut() {
            r.cursor = cursor;
            r.unacked.extend(served);
        }
        Ok(out)
    }

    /// Restart the durable at stream sequence `start_sequence`: everything
    /// before it was redelivered and acknowledged.
    async fn resume_at(&mut self, start_sequence: u64) -> Result<()> {
        let resume_error = |reason: String| {
            NatsError::Resume {
                stream: self.stream.clone(),
                durable: self.durable.clone(),
                start_sequence,
                reason,
            }
            .into_core("fetch")
        };
        // An error here is most likely "not found": gone already.
        if let Err(e) = self
            .js
            .delete_consumer_from_stream(&self.durable, &self.stream)
            .await
        {
            tracing::debug!(durable = %self.durable, error = %e, "delete before resume");
        }
        let config = pull::Config {
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence },
            ..self.config.clone()
        };
        self.consumer = self
            .js
            .create_consumer_on_stream(config, &self.stream)
            .await
            .map_err(|e| resume_error(e.to_string()))?;
        self.last_consumer_sequence = 0;
        tracing::info!(durable = %self.durable, start_sequence, "redelivered in order; pulling again");
        Ok(())
    }

    /// Messages the server gave up on (`max_deliver`), as malformed
    /// deliveries to dead-letter, read from the stream with their bytes.
    async fn given_up(&mut self) -> Vec<Delivery<NatsAckToken>> {
        #[derive(serde::Deserialize)]
        struct Advisory {
            stream_seq: u64,
            #[serde(default)]
            deliveries: u64,
        }
        let mut seqs = Vec::new();
        if let Some(sub) = self.advisories.as_mut() {
            while let Some(Some(msg)) = sub.next().now_or_never() {
                match serde_json::from_slice::<Advisory>(&msg.payload) {
                    Ok(a) => seqs.push(a),
                    Err(e) => tracing::warn!(error = %e, "unreadable max-deliveries advisory"),
                }
            }
        }
        let mut out = Vec::new();
        for a in seqs {
            let stored = match self.next_stored(a.stream_seq).await {
                Ok(Some(m)) if m.sequence == a.stream_seq => Some(m),
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(error = %e, stream_sequence = a.stream_seq, "cannot read a message JetStream gave up on");
                    None
                }
            };
            let why = format!(
                "JetStream gave up delivering stream sequence {} of stream {} to {} after {} deliveries (max_deliver); it was never acknowledged. Find out why (the consumer's log), then redrive the dead letter",
                a.stream_seq, self.stream, self.durable, a.deliveries
            );
            let message = match stored {
                Some(m) => match decode_stored(&self.stream, &m, &self.subject_prefix) {
                    Ok(msg) => Err(Malformed {
                        id: Some(msg.id),
                        topic: msg.topic,
                        payload: msg.payload,
                        reason: why,
                    }),
                    Err(mut bad) => {
                        bad.reason = format!("{why}; {}", bad.reason);
                        Err(bad)
                    }
                },
                None => Err(Malformed {
                    id: None,
                    topic: String::new(),
                    payload: Vec::new(),
                    reason: format!("{why}; it is no longer in the stream"),
                }),
            };
            tracing::warn!(
                stream_sequence = a.stream_seq,
                "JetStream gave up on a message (max_deliver); dead-lettering it"
            );
            out.push(Delivery {
                message,
                delivery_count: u32::try_from(a.deliveries).unwrap_or(u32::MAX),
                token: NatsAckToken {
                    reply: None,
                    stream_sequence: a.stream_seq,
                },
            });
        }
        out
    }

    /// Record the ack of a message read from the stream.
    fn ack_served(&mut self, stream_sequence: u64) {
        if let Some(r) = self.resync.as_mut() {
            r.unacked.retain(|s| *s != stream_sequence);
        }
    }

    /// Once every message of the resync was read and acknowledged, move the
    /// durable past them at once (not only at the next fetch), so a
    /// restart does not read them again.
    async fn finish_resync_if_done(&mut self) -> Result<()> {
        let done = self
            .resync
            .as_ref()
            .filter(|r| r.cursor > r.until && r.unacked.is_empty())
            .map(|r| r.until);
        if let Some(until) = done {
            self.resume_at(until + 1).await?;
            self.resync = None;
        }
        Ok(())
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
            self.check = true;
            return Err(NatsError::NotConnected {
                what: format!("pull from consumer {}", self.durable),
                state: state.to_string(),
            }
            .into_core("fetch"));
        }
        let mut out = self.given_up().await;
        if self.check {
            self.begin_resync().await?;
            self.check = false;
        }
        if self.resync.is_some() {
            let served = self.serve(max.saturating_sub(out.len()).max(1)).await?;
            if !served.is_empty() || !out.is_empty() {
                out.extend(served);
                return Ok(out);
            }
            // all read and acknowledged: pull again just after them
            if let Some(until) = self.resync.as_ref().map(|r| r.until) {
                self.resume_at(until + 1).await?;
                self.resync = None;
            }
        }
        let connects = self.client.statistics().connects.load(Ordering::Relaxed);
        // A no-wait pull with an expiry: the server answers as soon as it has
        // at least one message (with as many as are ready, up to `max`), or
        // after `wait` with none.
        let mut request = self.consumer.fetch().max_messages(max - out.len());
        if !wait.is_zero() {
            request = request.expires(wait);
        }
        let mut batch = request
            .messages()
            .await
            .map_err(|e| self.fetch_error(Box::new(e)))?;

        // The pull's messages are lost with the connection (the client drops
        // it, e.g., on a header it cannot parse); do not wait past the pull's
        // expiry for them.
        let deadline = tokio::time::Instant::now() + wait + self.ack_timeout;
        loop {
            let item = match tokio::time::timeout_at(deadline, batch.next()).await {
                Ok(Some(item)) => item,
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(durable = %self.durable, "pull did not end by its expiry; checking for lost deliveries");
                    self.check = true;
                    break;
                }
            };
            let msg = match item {
                Ok(m) => m,
                // An error status ends the pull. Messages already received
                // are delivered (they are in order); what may have followed
                // them is redelivered in order on the next fetch.
                Err(e) if !out.is_empty() => {
                    tracing::warn!(error = %e, "pull ended with an error after {} messages", out.len());
                    self.check = true;
                    break;
                }
                Err(e) => {
                    self.check = true;
                    return Err(self.fetch_error(e));
                }
            };
            let (stream_sequence, consumer_sequence, delivered) = match msg.info() {
                Ok(info) => (info.stream_sequence, info.consumer_sequence, info.delivered),
                Err(e) => {
                    self.check = true;
                    return Err(self.fetch_error(e));
                }
            };
            // Every delivery of this durable has the next consumer sequence.
            // A skipped one went elsewhere (a lost connection, another
            // subscriber on the durable) and would come back after ack_wait,
            // behind this one: redeliver in order from the ack floor first.
            if consumer_sequence != self.last_consumer_sequence + 1 {
                tracing::warn!(
                    durable = %self.durable,
                    expected = self.last_consumer_sequence + 1,
                    got = consumer_sequence,
                    stream_sequence,
                    "a delivery of this durable was lost; redelivering in order from the ack floor"
                );
                self.check = true;
                break;
            }
            self.last_consumer_sequence = consumer_sequence;
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
                    reply: Some(reply),
                    stream_sequence,
                },
            });
        }
        if self.client.statistics().connects.load(Ordering::Relaxed) != connects {
            self.check = true;
        }
        Ok(out)
    }

    #[tracing::instrument(skip_all, fields(durable = %self.durable, stream_sequence = token.stream_sequence))]
    async fn ack(&mut self, token: NatsAckToken) -> Result<()> {
        match token.reply {
            Some(reply) => {
                ack_one(&self.client, self.ack_timeout, reply, token.stream_sequence).await
            }
            None => {
                self.ack_served(token.stream_sequence);
                self.finish_resync_if_done().await
            }
        }
    }

    /// Acks of a batch sent concurrently; each is still confirmed by the server.
    async fn ack_all(&mut self, tokens: Vec<NatsAckToken>) -> Result<()> {
        let mut replies = Vec::with_capacity(tokens.len());
        for t in tokens {
            match t.reply {
                Some(reply) => replies.push((reply, t.stream_sequence)),
                None => self.ack_served(t.stream_sequence),
            }
        }
        let acks = replies
            .into_iter()
            .map(|(reply, seq)| ack_one(&self.client, self.ack_timeout, reply, seq));
        for r in futures::future::join_all(acks).await {
            r?;
        }
        self.finish_resync_if_done().await
    }
}

/// Fail with an error that says what to do when the stream of `spec` does
/// not exist or does not capture the subjects `filters` (every subject under
/// the prefix when empty): the subscriber would otherwise wait forever for
/// messages that are never stored. Other failures to read the stream's
/// description are left to creating the consumer, which reports them.
async fn check_stream(
    js: &async_nats::jetstream::Context,
    client: &async_nats::Client,
    spec: &StreamSpec,
    durable: &str,
    filters: &[String],
) -> Result<()> {
    use async_nats::jetstream::context::GetStreamErrorKind;
    let mut stream = match js.get_stream(&spec.name).await {
        Ok(stream) => stream,
        Err(e) => {
            if let GetStreamErrorKind::JetStream(js_err) = e.kind() {
                if js_err.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND {
                    let info = client.server_info();
                    return Err(NatsError::StreamNotFound {
                        stream: spec.name.clone(),
                        server: format!("{} ({}:{})", info.server_name, info.host, info.port),
                    }
                    .into_core("create consumer"));
                }
            }
            return Ok(());
        }
    };
    let stream_subjects = match stream.info().await {
        Ok(info) => info.config.subjects.clone(),
        Err(_) => return Ok(()),
    };
    let wanted = if filters.is_empty() {
        vec![format!("{}.>", spec.subject_prefix)]
    } else {
        filters.to_vec()
    };
    let uncovered: Vec<String> = wanted
        .into_iter()
        .filter(|w| {
            !stream_subjects
                .iter()
                .any(|p| crate::stream::subject_covers(p, w))
        })
        .collect();
    if uncovered.is_empty() {
        return Ok(());
    }
    Err(NatsError::SubjectsNotCaptured {
        stream: spec.name.clone(),
        durable: durable.to_owned(),
        stream_subjects,
        uncovered,
    }
    .into_core("create consumer"))
}

/// Ack one delivery and wait for the server's confirmation.
async fn ack_one(
    client: &async_nats::Client,
    ack_timeout: std::time::Duration,
    reply: Subject,
    stream_sequence: u64,
) -> Result<()> {
    // A request (not a plain publish) makes the server confirm the ack.
    let request = client.request(reply, Bytes::from_static(b"+ACK"));
    match tokio::time::timeout(ack_timeout, request).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(source)) => Err(NatsError::Ack {
            stream_sequence,
            source,
        }
        .into_core("ack")),
        Err(_) => Err(NatsError::Timeout {
            what: format!("confirmation of ack for stream sequence {stream_sequence}"),
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
