use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Exponential backoff with full jitter: attempt `n` (1-based) waits a random
/// time in `[base·2^(n-1)/2, base·2^(n-1)]`, capped at `max`.
///
/// The random source is passed in, so tests are deterministic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Backoff {
    /// Delay before the second attempt.
    #[serde(with = "duration_serde")]
    pub base: Duration,
    /// Longest delay.
    #[serde(with = "duration_serde")]
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The delay after failed attempt number `attempt` (1 = first failure).
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let ceiling = self
            .base
            .saturating_mul(1u32 << exp)
            .min(self.max)
            .max(Duration::from_millis(1));
        let half = ceiling / 2;
        let jitter_ms = ceiling.as_millis().saturating_sub(half.as_millis()) as u64;
        half + Duration::from_millis(rng.gen_range(0..=jitter_ms))
    }
}

/// Circuit breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct CircuitBreakerConfig {
    /// Consecutive failures that open the circuit.
    pub failure_threshold: u32,
    /// How long the circuit stays open before one probe is let through.
    #[serde(with = "duration_serde")]
    pub open_for: Duration,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            failure_threshold: 5,
            open_for: Duration::from_secs(2),
        }
    }
}

/// State of a [`CircuitBreaker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// Calls are refused until the given time.
    Open {
        /// When a probe will be let through.
        until: DateTime<Utc>,
    },
    /// One probe call is in flight; its outcome closes or reopens the circuit.
    HalfOpen,
}

/// Stops hammering a dead transport: after `failure_threshold` consecutive
/// failures it refuses calls for `open_for`, then lets one probe through.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    config: CircuitBreakerConfig,
    consecutive_failures: u32,
    state: BreakerState,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: CircuitBreakerConfig) -> Self {
        CircuitBreaker {
            config,
            consecutive_failures: 0,
            state: BreakerState::Closed,
        }
    }

    /// Current state.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether a call may be made at `now`. An open breaker whose time is up
    /// turns half-open and allows exactly one probe.
    pub fn allow(&mut self, now: DateTime<Utc>) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::HalfOpen => false,
            BreakerState::Open { until } if now >= until => {
                self.state = BreakerState::HalfOpen;
                true
            }
            BreakerState::Open { .. } => false,
        }
    }

    /// Record a successful call: closes the circuit.
    pub fn on_success(&mut self) {
        self.consecutive_failures = 0;
        self.state = BreakerState::Closed;
    }

    /// Record a failed call at `now`.
    pub fn on_failure(&mut self, now: DateTime<Utc>) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let reopen = matches!(self.state, BreakerState::HalfOpen)
            || self.consecutive_failures >= self.config.failure_threshold;
        if reopen {
            let open_for = chrono::Duration::from_std(self.config.open_for)
                .unwrap_or(chrono::Duration::seconds(1));
            self.state = BreakerState::Open {
                until: now + open_for,
            };
        }
    }
}

/// Serde helpers for human durations (`"250ms"`, `"2s"`, `"1m"`, `"1h"`) in
/// config files: `#[serde(with = "custody_core::duration_serde")]`.
pub mod duration_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialize as milliseconds (`"250ms"`).
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }

    /// Parse `"250ms"`, `"2s"`, `"1m"`, `"1h"`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }

    /// The same for `Option<Duration>`: `#[serde(with = "custody_core::duration_serde::option", default)]`.
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        /// Serialize `Some` as milliseconds (`"250ms"`), `None` as none.
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        /// Parse an optional `"250ms"`, `"2s"`, `"1m"`, `"1h"`.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|s| super::parse(&s).map_err(serde::de::Error::custom))
                .transpose()
        }
    }

    /// Parse a duration string; the error says what form is expected.
    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| {
            format!("duration {s:?} has no unit; write e.g. \"250ms\", \"2s\" or \"1m\"")
        })?;
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("duration {s:?} does not start with a whole number"))?;
        match unit {
            "ms" => Ok(Duration::from_millis(n)),
            "s" => Ok(Duration::from_secs(n)),
            // checked: "307445734561825861m" must be an error, not an overflow
            "m" | "h" => n
                .checked_mul(if unit == "m" { 60 } else { 3600 })
                .map(Duration::from_secs)
                .ok_or_else(|| format!("duration {s:?} is too long")),
            _ => Err(format!(
                "duration {s:?} has unknown unit {unit:?}; use ms, s, m or h"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{rngs::StdRng, SeedableRng};

    proptest! {
        #[test]
        fn backoff_within_bounds(attempt in 1u32..64, seed in any::<u64>()) {
            let b = Backoff::default();
            let mut rng = StdRng::seed_from_u64(seed);
            let d = b.delay(attempt, &mut rng);
            prop_assert!(d <= b.max);
            let exp = (attempt - 1).min(30);
            let ceiling = b.base.saturating_mul(1 << exp).min(b.max);
            prop_assert!(d >= ceiling / 2);
        }
    }

    #[test]
    fn backoff_grows() {
        let b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(1);
        assert!(b.delay(1, &mut rng) <= Duration::from_millis(100));
        assert!(b.delay(5, &mut rng) >= Duration::from_millis(800));
    }

    #[test]
    fn breaker_opens_probes_and_closes() {
        let t0 = chrono::DateTime::<Utc>::from_timestamp(1_000_000, 0).unwrap();
        let mut cb = CircuitBreaker::new(CircuitBreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(2),
        });
        for _ in 0..3 {
            assert!(cb.allow(t0));
            cb.on_failure(t0);
        }
        assert!(!cb.allow(t0 + chrono::Duration::seconds(1)));
        // time is up: exactly one probe
        let t1 = t0 + chrono::Duration::seconds(3);
        assert!(cb.allow(t1));
        assert!(!cb.allow(t1));
        cb.on_failure(t1);
        assert!(matches!(cb.state(), BreakerState::Open { .. }));
        let t2 = t1 + chrono::Duration::seconds(3);
        assert!(cb.allow(t2));
        cb.on_success();
        assert_eq!(cb.state(), BreakerState::Closed);
        assert!(cb.allow(t2));
    }

    #[test]
    fn durations_parse_with_clear_errors() {
        assert_eq!(
            duration_serde::parse("250ms"),
            Ok(Duration::from_millis(250))
        );
        assert!(duration_serde::parse("5").unwrap_err().contains("no unit"));
        assert!(duration_serde::parse("307445734561825861m")
            .unwrap_err()
            .contains("too long"));
        assert!(duration_serde::parse("5124095576030432h")
            .unwrap_err()
            .contains("too long"));
    }
}
