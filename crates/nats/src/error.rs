use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::context::{CreateStreamErrorKind, PublishErrorKind};
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::ErrorCode;
use async_nats::{ConnectErrorKind, RequestErrorKind};

/// What went wrong talking to NATS. It reaches users as the `#[source]` of a
/// [`custody_core::Error::Transport`] (transport `"nats"`); downcast to this
/// type to inspect it. Whether a retry can help is decided in one place,
/// [`NatsError::retryable`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// The first connection to the server failed.
    #[error("NATS {url}: cannot connect: {source}{detail}; {hint}", detail = connect_detail(source), hint = connect_hint(source))]
    Connect {
        /// The URL given to [`crate::connect`], its password redacted.
        url: String,
        /// The client's error.
        #[source]
        source: async_nats::ConnectError,
    },

    /// Headers plus payload exceed the server's `max_payload`.
    #[error("message for {subject} is {size} bytes (headers and payload), above the server's max_payload of {limit} bytes; store large payloads elsewhere and send a reference, or raise max_payload in nats-server.conf")]
    PayloadTooLarge {
        /// Subject it was going to.
        subject: String,
        /// Size of headers plus payload in bytes.
        size: usize,
        /// The server's limit in bytes.
        limit: usize,
    },

    /// A topic that does not make a valid NATS subject token sequence.
    #[error("topic {topic:?} does not make a valid NATS subject ({reason}); use letters, digits, '-', '_' and single dots")]
    BadSubject {
        /// The message topic.
        topic: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// JetStream did not acknowledge a publish.
    #[error("publish to {subject}: {source}{hint}", hint = publish_hint(source.kind()))]
    Publish {
        /// Subject published to.
        subject: String,
        /// The client's error.
        #[source]
        source: jetstream::context::PublishError,
    },

    /// No answer within the configured time.
    #[error("{what}: no answer from NATS within {after:?}; the server may be down or overloaded")]
    Timeout {
        /// What was waited for.
        what: String,
        /// The configured timeout.
        after: Duration,
    },

    /// The client has lost its server and is reconnecting.
    #[error("{what}: not connected to NATS (connection state: {state}); the client reconnects by itself, try again shortly")]
    NotConnected {
        /// What was attempted.
        what: String,
        /// The client's connection state.
        state: String,
    },

    /// Creating or updating a stream failed.
    #[error("create or update stream {stream}: {source}")]
    Stream {
        /// Stream name.
        stream: String,
        /// The client's error.
        #[source]
        source: jetstream::context::CreateStreamError,
    },

    /// A subscriber was created for a stream the server does not have.
    #[error("stream {stream} does not exist on the NATS server {server}; start the relay first with the same --stream and --subject-prefix (it creates the stream), or call ensure_stream with the same StreamSpec before creating the subscriber")]
    StreamNotFound {
        /// Stream name asked for.
        stream: String,
        /// The server: its name and the address it reports.
        server: String,
    },

    /// A subscriber asked for subjects the stream does not capture: it
    /// would wait forever for messages that are never stored.
    #[error("stream {stream} captures the subjects {stream_subjects:?}, which do not cover {uncovered:?} asked for by durable consumer {durable}; use the --stream and --subject-prefix the relay publishes with (topic `t` is the subject `<prefix>.t`)")]
    SubjectsNotCaptured {
        /// Stream name.
        stream: String,
        /// Durable consumer name.
        durable: String,
        /// The subjects the stream captures.
        stream_subjects: Vec<String>,
        /// The subjects asked for that none of them covers.
        uncovered: Vec<String>,
    },

    /// Creating or updating a durable consumer failed.
    #[error("create durable consumer {durable} on stream {stream}: {source}")]
    Consumer {
        /// Stream name.
        stream: String,
        /// Durable consumer name.
        durable: String,
        /// The client's error.
        #[source]
        source: jetstream::stream::ConsumerError,
    },

    /// The server did not apply the consumer's subject filter (servers before
    /// 2.10 ignore a list of several filters).
    #[error("durable consumer {durable} on stream {stream}: nats-server {server_version} did not apply the subject filters {wanted:?} (it has {got:?}); several topics in one consumer need nats-server 2.10 or later, or use one subscriber per topic")]
    FilterNotApplied {
        /// Stream name.
        stream: String,
        /// Durable consumer name.
        durable: String,
        /// Server version string.
        server_version: String,
        /// The filters asked for.
        wanted: Vec<String>,
        /// The filters the server reports.
        got: Vec<String>,
    },

    /// A pull request could not be sent or its answer was an error status.
    #[error("pull from consumer {durable}: {source}")]
    Fetch {
        /// Durable consumer name.
        durable: String,
        /// The client's error.
        #[source]
        source: async_nats::Error,
    },

    /// The server did not confirm an acknowledgement.
    #[error("acknowledge stream sequence {stream_sequence}: {source}")]
    Ack {
        /// Stream sequence of the acknowledged message.
        stream_sequence: u64,
        /// The client's error.
        #[source]
        source: async_nats::RequestError,
    },

    /// Reading a stored message by sequence (`$JS.API.STREAM.MSG.GET`),
    /// done to redeliver messages in stream order, failed.
    #[error("{what}: {reason}; the subscriber retries on its next fetch")]
    DirectGet {
        /// What was read.
        what: String,
        /// What went wrong.
        reason: String,
    },

    /// Deleting or creating the durable consumer while resuming in stream
    /// order failed.
    #[error("resume durable consumer {durable} on stream {stream} at stream sequence {start_sequence}: {reason}; the subscriber retries on its next fetch")]
    Resume {
        /// Stream name.
        stream: String,
        /// Durable consumer name.
        durable: String,
        /// Where it was to resume.
        start_sequence: u64,
        /// What went wrong.
        reason: String,
    },
}

/// The cause under an async-nats connect error (e.g. the TLS verifier's
/// reason), which its own text leaves out.
fn connect_detail(e: &async_nats::ConnectError) -> String {
    let shown = e.to_string();
    match std::error::Error::source(e).map(ToString::to_string) {
        Some(cause) if !shown.contains(&cause) => format!(" ({cause})"),
        _ => String::new(),
    }
}

fn connect_hint(e: &async_nats::ConnectError) -> &'static str {
    if let Some(tls) = tls_failure(e) {
        return match tls {
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature,
            ) => "the server's TLS certificate is not signed by a trusted CA: set nats.tls-ca-file to the CA certificate that signed it (docs/SECURITY.md)",
            rustls::Error::InvalidCertificate(_) => {
                "the server's TLS certificate does not verify (host name, validity period): fix the certificate or connect with a host name it lists (docs/SECURITY.md)"
            }
            rustls::Error::InvalidMessage(_) => {
                "the server did not answer in TLS although custody requires it (require-tls or a tls-* file): configure tls in nats-server.conf, or drop require-tls and the tls-* files on a trusted network (docs/SECURITY.md)"
            }
            _ => "the TLS handshake failed: check nats.tls-ca-file, nats.tls-cert-file and nats.tls-key-file and the server's tls block (docs/SECURITY.md)",
        };
    }
    match e.kind() {
        ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
            "the server refused the credentials: check the [nats] user and password, token, nkey or creds file (docs/SECURITY.md)"
        }
        ConnectErrorKind::Tls => {
            "the TLS link could not be set up: set nats.tls-ca-file to the CA that signed the server's certificate, check the client certificate and key, or drop require-tls if the server has no TLS (docs/SECURITY.md)"
        }
        ConnectErrorKind::ServerParse | ConnectErrorKind::Dns => {
            "check the URL (nats://host:port or tls://host:port)"
        }
        _ => "check that nats-server is running there (with JetStream: -js)",
    }
}

/// The rustls error under a connect error, if the TLS handshake failed (the
/// client reports it as an I/O error).
fn tls_failure(e: &async_nats::ConnectError) -> Option<&rustls::Error> {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(tls) = c.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        cause = c.source();
    }
    None
}

fn publish_hint(kind: PublishErrorKind) -> &'static str {
    match kind {
        PublishErrorKind::StreamNotFound => {
            " (no responders: no stream captures this subject, or JetStream is unavailable; call ensure_stream)"
        }
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
            " (the server may be down, restarting or overloaded; the message may still have been stored, and a retry with the same id within the duplicate window is deduplicated)"
        }
        _ => "",
    }
}

impl NatsError {
    /// Whether a later attempt of the same operation can succeed. The one
    /// place where NATS failures are classified.
    pub fn retryable(&self) -> bool {
        match self {
            NatsError::Connect { source, .. } => {
                tls_failure(source).is_none()
                    && !matches!(
                        source.kind(),
                        ConnectErrorKind::ServerParse
                            | ConnectErrorKind::Authentication
                            | ConnectErrorKind::AuthorizationViolation
                            | ConnectErrorKind::Tls
                    )
            }
            NatsError::PayloadTooLarge { .. }
            | NatsError::BadSubject { .. }
            | NatsError::FilterNotApplied { .. }
            // a wrong --stream or --subject-prefix does not heal by waiting
            | NatsError::StreamNotFound { .. }
            | NatsError::SubjectsNotCaptured { .. } => false,
            NatsError::Publish { source, .. } => match source.kind() {
                // No responders: the stream is missing or the server is
                // unreachable / restarting; both can heal.
                PublishErrorKind::StreamNotFound
                | PublishErrorKind::TimedOut
                | PublishErrorKind::BrokenPipe => true,
                PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => false,
                PublishErrorKind::Other => match jetstream_code(source) {
                    Some(code) => transient_jetstream_code(code),
                    // Client-side failures (channel closed, reconnecting).
                    None => true,
                },
            },
            NatsError::Timeout { .. } | NatsError::NotConnected { .. } => true,
            NatsError::Stream { source, .. } => match source.kind() {
                CreateStreamErrorKind::JetStream(e) => transient_jetstream_code(e.error_code()),
                CreateStreamErrorKind::EmptyStreamName
                | CreateStreamErrorKind::InvalidStreamName
                | CreateStreamErrorKind::DomainAndExternalSet => false,
                CreateStreamErrorKind::JetStreamUnavailable
                | CreateStreamErrorKind::TimedOut
                | CreateStreamErrorKind::Response
                | CreateStreamErrorKind::NotFound
                | CreateStreamErrorKind::ResponseParse => true,
            },
            NatsError::Consumer { source, .. } => match source.kind() {
                ConsumerErrorKind::JetStream(e) => transient_jetstream_code(e.error_code()),
                ConsumerErrorKind::InvalidConsumerType | ConsumerErrorKind::InvalidName => false,
                ConsumerErrorKind::TimedOut
                | ConsumerErrorKind::Request
                | ConsumerErrorKind::Other => true,
            },
            NatsError::Fetch { .. } | NatsError::DirectGet { .. } | NatsError::Resume { .. } => {
                true
            }
            NatsError::Ack { source, .. } => match source.kind() {
                RequestErrorKind::TimedOut | RequestErrorKind::Other => true,
                // Nobody answers acks for this consumer: it was deleted, or
                // the server is restarting. The message will be redelivered
                // if the consumer comes back.
                RequestErrorKind::NoResponders => true,
            },
        }
    }

    /// Into custody's error for operation `op`.
    pub(crate) fn into_core(self, op: &'static str) -> custody_core::Error {
        let retryable = self.retryable();
        custody_core::Error::transport("nats", op, retryable, self)
    }
}

/// The JetStream API error code carried by a publish error, if any.
fn jetstream_code(e: &jetstream::context::PublishError) -> Option<ErrorCode> {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .map(|e| e.error_code())
}

/// JetStream API errors that describe a passing state of the server or
/// cluster rather than a wrong request.
fn transient_jetstream_code(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::CLUSTER_NOT_AVAILABLE
            | ErrorCode::CLUSTER_NOT_ACTIVE
            | ErrorCode::CLUSTER_NOT_LEADER
            | ErrorCode::CLUSTER_NOT_ASSIGNED
            | ErrorCode::INSUFFICIENT_RESOURCES
            | ErrorCode::STORAGE_RESOURCES_EXCEEDED
            | ErrorCode::MEMORY_RESOURCES_EXCEEDED
            | ErrorCode::STREAM_MAX_STREAM_BYTES_EXCEEDED
    )
}
