use std::time::Duration;

use async_nats::jetstream::stream::{Config, StorageType};
use custody_core::{Error, Result};

use crate::NatsError;

/// Connect to the NATS server at `url` (e.g. `nats://127.0.0.1:4222`)
/// anonymously, or with the credentials in the URL: [`crate::connect_with`]
/// with default [`crate::ConnectOptions`].
///
/// A server that is down at this moment is an error naming the URL (the
/// client does not retry the first connection). Once connected, the client
/// reconnects by itself after losing the server; operations during the gap
/// fail with retryable errors.
pub async fn connect(url: &str) -> Result<async_nats::Client> {
    crate::connect_with(url, &crate::ConnectOptions::default()).await
}

/// The JetStream stream that carries custody messages: every topic `t` is
/// the subject `<subject_prefix>.<t>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    /// Stream name, e.g. `CUSTODY`.
    pub name: String,
    /// First subject token(s), e.g. `custody`; the stream captures `<prefix>.>`.
    pub subject_prefix: String,
    /// How long JetStream remembers message ids to drop duplicates
    /// (`Nats-Msg-Id`). A relay that retries a publish after a lost ack
    /// within this window does not create a second copy. Default 2 minutes.
    pub duplicate_window: Duration,
    /// How long messages are kept; zero keeps them until deleted. Default zero.
    pub max_age: Duration,
}

impl StreamSpec {
    /// A spec with a 2-minute duplicate window and no age limit.
    pub fn new(name: &str, subject_prefix: &str) -> Self {
        StreamSpec {
            name: name.to_owned(),
            subject_prefix: subject_prefix.to_owned(),
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::ZERO,
        }
    }

    /// The subject a topic is published on: `<prefix>.<topic>`.
    pub fn subject(&self, topic: &str) -> String {
        format!("{}.{topic}", self.subject_prefix)
    }

    fn check(&self) -> Result<()> {
        if self.name.is_empty()
            || self.name.contains(|c: char| {
                c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control()
            })
        {
            return Err(Error::Config(format!(
                "stream name {:?} is not a valid JetStream name; use letters, digits, '-' and '_'",
                self.name
            )));
        }
        if let Err(reason) = check_subject(&self.subject_prefix) {
            return Err(Error::Config(format!(
                "subject prefix {:?} is not a valid NATS subject ({reason}); use tokens of letters, digits, '-' and '_' joined by single dots",
                self.subject_prefix
            )));
        }
        if self.subject_prefix.contains(['*', '>']) {
            return Err(Error::Config(format!(
                "subject prefix {:?} contains a wildcard; custody appends '.>' itself",
                self.subject_prefix
            )));
        }
        Ok(())
    }
}

/// Check that `s` is a literal NATS subject: non-empty tokens separated by
/// single dots, no whitespace or control characters.
pub(crate) fn check_subject(s: &str) -> std::result::Result<(), &'static str> {
    if s.is_empty() {
        return Err("it is empty");
    }
    if s.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err("it contains whitespace or a control character");
    }
    if s.split('.').any(str::is_empty) {
        return Err("it has an empty token: a leading, trailing or double dot");
    }
    Ok(())
}

/// Whether the subject pattern `pattern` (as in a stream's subjects, with
/// `*` and `>` wildcards) matches every subject `wanted` can match
/// (`wanted` may be a pattern itself, e.g. `custody.>`).
pub(crate) fn subject_covers(pattern: &str, wanted: &str) -> bool {
    let mut p = pattern.split('.');
    let mut w = wanted.split('.');
    loop {
        match (p.next(), w.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(t)) if t != ">" => {}
            // a literal token covers only itself (a `*` in `wanted` needs
            // `*` or `>` in the pattern, matched above)
            (Some(a), Some(b)) if a == b && a != "*" => {}
            _ => return false,
        }
    }
}

/// Create the stream described by `spec`, or update it to match: subjects
/// `["<prefix>.>"]`, file storage, the spec's duplicate window and max age.
/// Safe to call at every start of every process.
pub async fn ensure_stream(client: &async_nats::Client, spec: &StreamSpec) -> Result<()> {
    spec.check()?;
    let js = async_nats::jetstream::new(client.clone());
    let config = Config {
        name: spec.name.clone(),
        subjects: vec![format!("{}.>", spec.subject_prefix)],
        storage: StorageType::File,
        duplicate_window: spec.duplicate_window,
        max_age: spec.max_age,
        ..Default::default()
    };
    js.create_or_update_stream(config).await.map_err(|source| {
        NatsError::Stream {
            stream: spec.name.clone(),
            source,
        }
        .into_core("ensure stream")
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::subject_covers;

    #[test]
    fn subject_coverage_follows_nats_wildcards() {
        assert!(subject_covers("custody.>", "custody.orders"));
        assert!(subject_covers("custody.>", "custody.orders.eu"));
        assert!(subject_covers("custody.>", "custody.>"));
        assert!(subject_covers("custody.*", "custody.orders"));
        assert!(subject_covers("custody.orders", "custody.orders"));
        assert!(subject_covers(">", "acme.orders"));
        assert!(!subject_covers("custody.>", "acme.orders"));
        assert!(!subject_covers("custody.>", "custody"));
        assert!(!subject_covers("custody.*", "custody.orders.eu"));
        assert!(!subject_covers("custody.*", "custody.>"));
        assert!(!subject_covers("custody.orders", "custody.>"));
        assert!(!subject_covers("custody.orders", "custody.orders.eu"));
        assert!(!subject_covers("custody.orders.eu", "custody.orders"));
    }
}
