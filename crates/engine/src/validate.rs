//! Validation of the engines' configuration: every value in its allowed
//! range, so that a config file or a `CUSTODY_*` override cannot make an
//! engine busy-loop (`consumer.batch-size = 0`), do nothing forever
//! (`relay.batch-size = 0`) or lose its leases while idle. The ranges are
//! listed in docs/CONFIG.md.
//!
//! ```
//! use custody_engine::{ConsumerConfig, RelayConfig};
//! let mut relay = RelayConfig::default();
//! assert!(relay.validate().is_ok());
//! relay.batch_size = 0;
//! let err = relay.validate().unwrap_err().to_string();
//! assert!(err.contains("relay.batch-size = 0"), "{err}");
//! assert!(ConsumerConfig::new("billing").validate().is_ok());
//! ```

use std::time::Duration;

use custody_core::{Backoff, CircuitBreakerConfig, Error, Result};

use crate::{ConsumerConfig, RelayConfig};

/// Largest batch either engine accepts: beyond it a batch's statements and
/// memory grow without making anything faster (docs/BENCHMARKS.md).
const MAX_BATCH: usize = 100_000;
/// Longest interval or time limit accepted where "longer" can only mean a
/// mistake (a unit slip: `"60000m"`): one day.
const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Longest retention accepted: ten years.
const MAX_RETENTION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The problems found in one section, collected so that one run names all
/// of them.
struct Problems {
    section: &'static str,
    found: Vec<String>,
}

impl Problems {
    fn new(section: &'static str) -> Self {
        Problems {
            section,
            found: Vec::new(),
        }
    }

    fn count(&mut self, key: &str, value: u64, min: u64, max: u64, why: &str) {
        if value < min || value > max {
            self.found.push(format!(
                "{}.{key} = {value}: must be between {min} and {max} ({why})",
                self.section
            ));
        }
    }

    fn duration(&mut self, key: &str, value: Duration, min: Duration, max: Duration, why: &str) {
        if value < min || value > max {
            self.found.push(format!(
                "{}.{key} = \"{}\": must be between \"{}\" and \"{}\" ({why})",
                self.section,
                show(value),
                show(min),
                show(max)
            ));
        }
    }

    fn rule(&mut self, holds: bool, text: String) {
        if !holds {
            self.found.push(format!("{}.{text}", self.section));
        }
    }

    fn backoff(&mut self, b: &Backoff) {
        self.duration(
            "backoff.base",
            b.base,
            Duration::from_millis(1),
            MAX_INTERVAL,
            "the first retry's delay; 0 retries at once, in a loop",
        );
        self.duration(
            "backoff.max",
            b.max,
            Duration::from_millis(1),
            MAX_INTERVAL,
            "the longest delay between retries",
        );
        self.rule(
            b.max >= b.base,
            format!(
                "backoff.max = \"{}\" is below backoff.base = \"{}\": the longest delay must be at least the first",
                show(b.max),
                show(b.base)
            ),
        );
    }

    fn breaker(&mut self, b: &CircuitBreakerConfig) {
        self.count(
            "breaker.failure-threshold",
            u64::from(b.failure_threshold),
            1,
            1_000_000,
            "consecutive transport failures that open the circuit",
        );
        self.duration(
            "breaker.open-for",
            b.open_for,
            Duration::from_millis(1),
            MAX_INTERVAL,
            "how long an open circuit waits before a probe",
        );
    }

    fn into_result(self) -> Result<()> {
        if self.found.is_empty() {
            return Ok(());
        }
        Err(Error::Config(format!(
            "{}. Fix the [{}] section of the config file or the CUSTODY_{}__* variable (docs/CONFIG.md lists every key and its range)",
            self.found.join("; "),
            self.section,
            self.section.to_ascii_uppercase()
        )))
    }
}

/// A duration in the config file's form, in its largest whole unit.
fn show(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0ms".into(),
        _ if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        _ if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        _ if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        _ => format!("{ms}ms"),
    }
}

fn size(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

impl RelayConfig {
    /// Check every value against its allowed range (docs/CONFIG.md).
    ///
    /// The error ([`Error::Config`]) names each key that is out of range
    /// (`relay.batch-size = 0: must be between 1 and 100000 (…)`). The
    /// binary calls this when it loads its config; library users who build
    /// a config from their own settings should too, before
    /// [`Relay::new`](crate::Relay::new).
    pub fn validate(&self) -> Result<()> {
        let mut p = Problems::new("relay");
        let max = size(MAX_BATCH);
        p.count(
            "batch-size",
            size(self.batch_size),
            1,
            max,
            "messages read per batch; 0 reads nothing, forever",
        );
        p.count(
            "max-concurrent-keys",
            size(self.max_concurrent_keys),
            1,
            max,
            "keys published at once within a batch",
        );
        p.duration(
            "lease-ttl",
            self.lease_ttl,
            Duration::from_secs(1),
            Duration::from_secs(3600),
            "how long a partition lease lasts unrenewed",
        );
        p.duration(
            "poll-interval",
            self.poll_interval,
            Duration::from_millis(1),
            Duration::from_secs(3600),
            "the longest idle wait; 0 polls in a busy loop",
        );
        p.rule(
            self.poll_interval.saturating_mul(3) <= self.lease_ttl,
            format!(
                "poll-interval = \"{}\" is more than a third of lease-ttl = \"{}\": an idle relay would lose its leases between polls",
                show(self.poll_interval),
                show(self.lease_ttl)
            ),
        );
        p.duration(
            "busy-poll-interval",
            self.busy_poll_interval,
            Duration::ZERO,
            Duration::from_secs(3600),
            "the longest wait while traffic flows",
        );
        p.count(
            "max-attempts",
            u64::from(self.max_attempts),
            1,
            1_000_000,
            "failed publishes of one message before it is dead-lettered",
        );
        p.backoff(&self.backoff);
        p.breaker(&self.breaker);
        p.duration(
            "retention",
            self.retention,
            Duration::from_secs(60),
            MAX_RETENTION,
            "how long published rows stay as history for reconcile and trace",
        );
        p.duration(
            "prune-interval",
            self.prune_interval,
            Duration::from_millis(100),
            MAX_INTERVAL,
            "how often the relay prunes; 0 prunes in a loop",
        );
        p.count(
            "prune-batch",
            size(self.prune_batch),
            1,
            max,
            "rows deleted per prune statement",
        );
        p.into_result()
    }
}

impl ConsumerConfig {
    /// Check every value against its allowed range (docs/CONFIG.md).
    ///
    /// The error ([`Error::Config`]) names each key that is out of range
    /// (`consumer.batch-size = 0: must be between 1 and 100000 (…)`). The
    /// binary calls this when it loads its config; library users who build
    /// a config from their own settings should too, before
    /// [`Consumer::new`](crate::Consumer::new).
    pub fn validate(&self) -> Result<()> {
        let mut p = Problems::new("consumer");
        let max = size(MAX_BATCH);
        p.rule(
            !self.name.trim().is_empty()
                && self.name.len() <= 200
                && !self.name.chars().any(char::is_control),
            format!(
                "name = {:?}: must be 1 to 200 characters without control characters (the consumer's identity in its inbox and dead letters)",
                self.name
            ),
        );
        p.count(
            "batch-size",
            size(self.batch_size),
            1,
            max,
            "deliveries fetched per batch; 0 fetches nothing, in a busy loop",
        );
        p.duration(
            "fetch-wait",
            self.fetch_wait,
            Duration::from_millis(1),
            Duration::from_secs(3600),
            "the longest wait for a delivery when idle; 0 polls in a busy loop",
        );
        p.count(
            "max-attempts",
            u64::from(self.max_attempts),
            1,
            1_000_000,
            "handler attempts on transient errors before the message is dead-lettered",
        );
        p.backoff(&self.backoff);
        p.duration(
            "inbox-retention",
            self.inbox_retention,
            Duration::from_secs(60),
            MAX_RETENTION,
            "how long dedupe records are kept; must exceed the transport's redelivery horizon",
        );
        p.duration(
            "prune-interval",
            self.prune_interval,
            Duration::from_millis(100),
            MAX_INTERVAL,
            "how often the inbox is pruned; 0 prunes in a loop",
        );
        p.count(
            "prune-batch",
            size(self.prune_batch),
            1,
            max,
            "inbox rows deleted per prune statement",
        );
        p.duration(
            "redrive-interval",
            self.redrive_interval,
            Duration::from_millis(10),
            MAX_INTERVAL,
            "how often redriven dead letters are looked for",
        );
        p.duration(
            "group-max-time",
            self.group_max_time,
            Duration::from_millis(1),
            Duration::from_secs(3600),
            "the longest a group transaction takes messages before it commits",
        );
        p.duration(
            "watermark-interval",
            self.watermark_interval,
            Duration::from_millis(10),
            MAX_INTERVAL,
            "how often numbered inbox rows are folded into floors",
        );
        p.duration(
            "compact-keep",
            self.compact_keep,
            Duration::ZERO,
            MAX_RETENTION,
            "how long folded numbered rows stay for id-level reconcile",
        );
        p.duration(
            "gap-grace",
            self.gap_grace,
            Duration::ZERO,
            MAX_INTERVAL,
            "how long a sequence gap may be open before a warning",
        );
        p.count(
            "poison-after",
            u64::from(self.poison_after),
            0,
            1_000,
            "unfinished runs of a message before it is dead-lettered as poison; 0 turns the detection off",
        );
        p.duration(
            "handler-timeout",
            self.handler_timeout,
            Duration::ZERO,
            Duration::from_secs(24 * 3600),
            "the longest a handler may take for one message; 0 = no limit",
        );
        p.duration(
            "gap-accept-after",
            self.gap_accept_after,
            Duration::from_secs(60),
            MAX_RETENTION,
            "how long a sequence gap stays open before the consumer accepts it as lost",
        );
        p.rule(
            self.gap_accept_after >= self.gap_grace,
            format!(
                "gap-accept-after = \"{}\" is shorter than gap-grace = \"{}\": a gap would be accepted as lost before it is even reported",
                show(self.gap_accept_after),
                show(self.gap_grace)
            ),
        );
        p.into_result()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert!(RelayConfig::default().validate().is_ok());
        assert!(ConsumerConfig::new("billing").validate().is_ok());
    }

    #[test]
    fn every_problem_is_named_with_its_range() {
        let mut r = RelayConfig {
            batch_size: 0,
            prune_batch: 0,
            ..RelayConfig::default()
        };
        r.backoff.base = Duration::from_secs(60);
        r.backoff.max = Duration::from_secs(1);
        let e = r
            .validate()
            .map(|_| "valid".to_owned())
            .unwrap_or_else(|e| e.to_string());
        assert!(
            e.contains("relay.batch-size = 0: must be between 1 and 100000"),
            "{e}"
        );
        assert!(e.contains("relay.prune-batch = 0"), "{e}");
        assert!(
            e.contains("relay.backoff.max = \"1s\" is below backoff.base = \"1m\""),
            "{e}"
        );
        let r = RelayConfig {
            poll_interval: Duration::from_secs(5),
            ..RelayConfig::default()
        };
        let e = r
            .validate()
            .map(|_| "valid".to_owned())
            .unwrap_or_else(|e| e.to_string());
        assert!(e.contains("more than a third of lease-ttl"), "{e}");

        let mut c = ConsumerConfig::new("");
        c.batch_size = 0;
        c.fetch_wait = Duration::ZERO;
        let e = c
            .validate()
            .map(|_| "valid".to_owned())
            .unwrap_or_else(|e| e.to_string());
        assert!(e.contains("consumer.batch-size = 0"), "{e}");
        assert!(
            e.contains("consumer.fetch-wait = \"0ms\": must be between \"1ms\" and \"1h\""),
            "{e}"
        );
        assert!(e.contains("consumer.name = \"\""), "{e}");
        assert!(e.contains("CUSTODY_CONSUMER__*"), "{e}");
    }
}
