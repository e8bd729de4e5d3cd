/// A boxed error from a backend or transport library, kept as the `#[source]`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with custody's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error custody returns. Each variant says what happened; the message
/// says what to do. [`Error::retryable`] tells the relay and the consumer
/// whether trying again later can help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The message itself is invalid (empty topic, bad header name, ...).
    /// Fix the producer; retrying will not help.
    #[error("invalid message: {0}")]
    InvalidMessage(String),

    /// A payload could not be decoded into the expected type.
    #[error("cannot decode payload of message {message_id} (type {message_type}): {reason}")]
    Decode {
        /// Id of the message whose payload failed.
        message_id: uuid::Uuid,
        /// Its `type` attribute.
        message_type: String,
        /// What the decoder said.
        reason: String,
    },

    /// A database operation failed.
    #[error("{backend} store: {op} failed: {source}")]
    Store {
        /// `sqlite`, `postgres`, ...
        backend: &'static str,
        /// What custody was doing (`enqueue`, `fetch outbox batch`, ...).
        op: &'static str,
        /// Whether trying again later can succeed (connection lost, lock timeout, busy).
        retryable: bool,
        /// The driver's error.
        #[source]
        source: BoxError,
    },

    /// The store refused data a message carries (PostgreSQL SQLSTATE class
    /// 22 data exception, 23 integrity constraint, 54 limit exceeded; SQLite
    /// too big, constraint, type mismatch). The database is fine; this
    /// message cannot be stored as it is, so retrying will not help. The
    /// consumer dead-letters the message and goes on
    /// ([`Error::is_about_message`]).
    #[error("{backend} store: {op} failed: the database refused the data ({source}); retrying will not help, the data must change (a consumer dead-letters such a message and goes on)")]
    Rejected {
        /// `sqlite`, `postgres`, ...
        backend: &'static str,
        /// What custody was doing.
        op: &'static str,
        /// The driver's error.
        #[source]
        source: BoxError,
    },

    /// A transport (broker) operation failed.
    #[error("{transport} transport: {op} failed: {source}")]
    Transport {
        /// `nats`, `embedded`, ...
        transport: &'static str,
        /// What custody was doing (`publish`, `fetch`, `ack`, ...).
        op: &'static str,
        /// Whether trying again later can succeed.
        retryable: bool,
        /// The client library's error.
        #[source]
        source: BoxError,
    },

    /// Configuration is missing or wrong.
    #[error("configuration: {0}")]
    Config(String),

    /// Another relay process runs with the same relay id on this outbox
    /// (its heartbeat carries another instance token). Two processes with
    /// one id would share leases and hand out the same sequence numbers.
    #[error(
        "relay id {relay:?} is in use by another relay process (instance {other}, last heartbeat {heartbeat_at}){}; give every relay process its own id (`custody relay --id`, or none for a random one) or stop the other process",
        if *live { "" } else { "; if that process is gone, its id is free after the lease ttl" }
    )]
    RelayIdInUse {
        /// The relay id.
        relay: String,
        /// The instance token of the process holding it.
        other: String,
        /// That process's last heartbeat.
        heartbeat_at: chrono::DateTime<chrono::Utc>,
        /// Whether the holder is known to be alive (its heartbeat moved
        /// while this process waited): then waiting cannot help.
        live: bool,
    },

    /// The operation was stopped because custody is shutting down.
    #[error("shutting down")]
    Shutdown,
}

impl Error {
    /// Whether a later attempt of the same operation can succeed.
    pub fn retryable(&self) -> bool {
        match self {
            Error::Store { retryable, .. } | Error::Transport { retryable, .. } => *retryable,
            Error::Shutdown => true,
            // a crashed process's heartbeat goes stale after the lease ttl
            Error::RelayIdInUse { live, .. } => !*live,
            Error::InvalidMessage(_)
            | Error::Decode { .. }
            | Error::Rejected { .. }
            | Error::Config(_) => false,
        }
    }

    /// Whether the error is about one message rather than about the
    /// database or the broker: the message is invalid, its payload does not
    /// decode, or the store refused its data ([`Error::Rejected`]). A
    /// consumer dead-letters such a message and goes on; every other
    /// error stops it (terminal) or makes it wait (retryable). Decided
    /// here only; backends classify their errors into these variants.
    pub fn is_about_message(&self) -> bool {
        matches!(
            self,
            Error::InvalidMessage(_) | Error::Decode { .. } | Error::Rejected { .. }
        )
    }

    /// The store refused data a message carries (see [`Error::Rejected`]).
    pub fn rejected(backend: &'static str, op: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Rejected {
            backend,
            op,
            source: source.into(),
        }
    }

    /// A store error; `retryable` as classified by the backend.
    pub fn store(
        backend: &'static str,
        op: &'static str,
        retryable: bool,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Store {
            backend,
            op,
            retryable,
            source: source.into(),
        }
    }

    /// A transport error; `retryable` as classified by the transport.
    pub fn transport(
        transport: &'static str,
        op: &'static str,
        retryable: bool,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Transport {
            transport,
            op,
            retryable,
            source: source.into(),
        }
    }
}
