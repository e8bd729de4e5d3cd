//! Schema evolution: upcasters bring stored event payloads of an older
//! schema version up to the current one, on read.
//!
//! An upcaster is registered for one (event type, from version) and leads to
//! a higher version of the same type. The registry is validated when it is
//! built ([`UpcasterBuilder::build`]), against the current version of each
//! type: every version from 1 up to the current one must lead to the
//! current one — no gap (a version without an upcaster), no cycle, no two
//! upcasters for one (type, version), no chain that jumps past the current
//! version, no upcaster for a type that does not exist. A mistake is found
//! at startup, with an error naming the type and the version and saying
//! what to register, not when an old event is read months later.
//!
//! ```
//! use custody_core::upcast::Upcasters;
//!
//! // Deposited v1 {"amount": 5} → v2 {"cents": 5} → v3 {"cents": 5, "currency": "EUR"}
//! let upcasters = Upcasters::builder()
//!     .upcast("Deposited", 1, 2, |mut p| {
//!         let amount = p["amount"].take();
//!         Ok(serde_json::json!({ "cents": amount }))
//!     })
//!     .upcast("Deposited", 2, 3, |mut p| {
//!         p["currency"] = "EUR".into();
//!         Ok(p)
//!     })
//!     .build(&[("Deposited", 3), ("Opened", 1)])?;
//! assert_eq!(upcasters.current_version("Deposited"), Some(3));
//!
//! // Forgetting 2 → 3 is found at startup:
//! let err = Upcasters::builder()
//!     .upcast("Deposited", 1, 2, Ok)
//!     .build(&[("Deposited", 3)])
//!     .unwrap_err();
//! assert!(err.to_string().contains("no upcaster for Deposited from version 2"));
//! # Ok::<(), custody_core::upcast::ChainError>(())
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use crate::event::RecordedEvent;
use crate::{is_json_content_type, Error, Result};

/// One upcaster: a payload of its `from` version in, a payload of its `to`
/// version out; an `Err` says why this payload cannot be upcast.
pub type UpcastFn =
    dyn Fn(serde_json::Value) -> std::result::Result<serde_json::Value, String> + Send + Sync;

/// Why an upcaster chain was refused. Each message names the event type and
/// the version, and says what to register or remove.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// A version below the current one has no upcaster.
    #[error("no upcaster for {event_type} from version {missing}: its current version is {current}, so stored {event_type} events of version {missing} could not be read; register an upcaster for {event_type} from version {missing} (to version {next})", next = missing + 1)]
    Gap {
        /// The event type.
        event_type: String,
        /// The version without an upcaster.
        missing: u32,
        /// The type's current version.
        current: u32,
    },
    /// Two upcasters for one (type, version).
    #[error("two upcasters for {event_type} from version {from} (to version {to_first} and to version {to_second}); keep one: a stored event must have exactly one way up")]
    Duplicate {
        /// The event type.
        event_type: String,
        /// The version registered twice.
        from: u32,
        /// Where the first one leads.
        to_first: u32,
        /// Where the second one leads.
        to_second: u32,
    },
    /// Following the upcasters from a version comes back to a version
    /// already passed.
    #[error("the upcasters for {event_type} form a cycle ({}); each upcaster must lead to a higher version", path.iter().map(u32::to_string).collect::<Vec<_>>().join(" → "))]
    Cycle {
        /// The event type.
        event_type: String,
        /// The versions along the cycle, the repeated one last.
        path: Vec<u32>,
    },
    /// A chain leads past the current version, so the current version is
    /// never reached from `from`.
    #[error("the upcasters for {event_type} lead from version {from} to version {reached}, past the current version {current}, so version {current} is never reached; make the upcaster that leads to {reached} end at {current} or below, or raise {event_type}'s current version to {reached}")]
    Unreachable {
        /// The event type.
        event_type: String,
        /// The version the chain starts from.
        from: u32,
        /// The version it reached, above the current one.
        reached: u32,
        /// The type's current version.
        current: u32,
    },
    /// An upcaster from the current version or above: it would never run
    /// on a version it knows, or would rewrite current events.
    #[error("an upcaster for {event_type} from version {from}, but {event_type}'s current version is {current}: events of the current version are read as they are; remove it, or raise the current version above {from}")]
    NotBelowCurrent {
        /// The event type.
        event_type: String,
        /// Its from version.
        from: u32,
        /// The type's current version.
        current: u32,
    },
    /// An upcaster for a type the events do not have.
    #[error("an upcaster for {event_type}, which is not one of the event types ({known}); check the spelling, or add {event_type} with its current version")]
    UnknownType {
        /// The type named by the upcaster.
        event_type: String,
        /// The known types, comma-separated.
        known: String,
    },
    /// A version 0 (schema versions start at 1).
    #[error(
        "{event_type}: schema versions start at 1, and version 0 was given; number versions from 1"
    )]
    ZeroVersion {
        /// The event type.
        event_type: String,
    },
}

impl From<ChainError> for Error {
    fn from(e: ChainError) -> Self {
        Error::Config(format!("upcasters: {e}"))
    }
}

struct Edge {
    event_type: String,
    from: u32,
    to: u32,
    f: Arc<UpcastFn>,
}

/// Collects upcasters; [`UpcasterBuilder::build`] validates them.
#[derive(Default)]
pub struct UpcasterBuilder {
    edges: Vec<Edge>,
}

impl UpcasterBuilder {
    /// Register `f`, which turns a payload of `event_type` at schema version
    /// `from` into one at version `to`.
    pub fn upcast<F>(mut self, event_type: impl Into<String>, from: u32, to: u32, f: F) -> Self
    where
        F: Fn(serde_json::Value) -> std::result::Result<serde_json::Value, String>
            + Send
            + Sync
            + 'static,
    {
        self.edges.push(Edge {
            event_type: event_type.into(),
            from,
            to,
            f: Arc::new(f),
        });
        self
    }

    /// Validate the chains against `current` (every event type with its
    /// current schema version, e.g. `DomainEvent::TYPES`) and build the
    /// registry. The first problem found is returned (see [`ChainError`]).
    pub fn build(self, current: &[(&str, u32)]) -> std::result::Result<Upcasters, ChainError> {
        let current: BTreeMap<String, u32> =
            current.iter().map(|(t, v)| ((*t).to_owned(), *v)).collect();
        for (t, v) in &current {
            if *v == 0 {
                return Err(ChainError::ZeroVersion {
                    event_type: t.clone(),
                });
            }
        }
        let mut edges: BTreeMap<(String, u32), (u32, Arc<UpcastFn>)> = BTreeMap::new();
        for edge in self.edges {
            if edge.from == 0 || edge.to == 0 {
                return Err(ChainError::ZeroVersion {
                    event_type: edge.event_type,
                });
            }
            let Some(&cur) = current.get(&edge.event_type) else {
                return Err(ChainError::UnknownType {
                    event_type: edge.event_type,
                    known: current.keys().cloned().collect::<Vec<_>>().join(", "),
                });
            };
            if edge.from >= cur {
                return Err(ChainError::NotBelowCurrent {
                    event_type: edge.event_type,
                    from: edge.from,
                    current: cur,
                });
            }
            let key = (edge.event_type.clone(), edge.from);
            if let Some((first, _)) = edges.get(&key) {
                return Err(ChainError::Duplicate {
                    event_type: edge.event_type,
                    from: edge.from,
                    to_first: *first,
                    to_second: edge.to,
                });
            }
            edges.insert(key, (edge.to, edge.f));
        }
        // Every version 1..current must lead to current: walk each chain.
        for (t, &cur) in &current {
            for start in 1..cur {
                let mut seen = BTreeSet::new();
                let mut path = vec![start];
                let mut v = start;
                while v != cur {
                    if v > cur {
                        return Err(ChainError::Unreachable {
                            event_type: t.clone(),
                            from: start,
                            reached: v,
                            current: cur,
                        });
                    }
                    seen.insert(v);
                    let Some((to, _)) = edges.get(&(t.clone(), v)) else {
                        return Err(ChainError::Gap {
                            event_type: t.clone(),
                            missing: v,
                            current: cur,
                        });
                    };
                    path.push(*to);
                    if seen.contains(to) {
                        // keep only the loop itself: from the first visit of `to`
                        let at = path.iter().position(|p| p == to).unwrap_or(0);
                        return Err(ChainError::Cycle {
                            event_type: t.clone(),
                            path: path[at..].to_vec(),
                        });
                    }
                    v = *to;
                }
            }
        }
        Ok(Upcasters {
            inner: Arc::new(Inner { current, edges }),
        })
    }
}

struct Inner {
    current: BTreeMap<String, u32>,
    edges: BTreeMap<(String, u32), (u32, Arc<UpcastFn>)>,
}

/// A validated upcaster registry (cheap to clone). Applied on read by
/// [`Upcasters::upcast`].
#[derive(Clone)]
pub struct Upcasters {
    inner: Arc<Inner>,
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upcasters")
            .field("current", &self.inner.current)
            .field(
                "upcasters",
                &self
                    .inner
                    .edges
                    .iter()
                    .map(|((t, from), (to, _))| format!("{t} {from}→{to}"))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Upcasters {
    /// A builder to register upcasters on.
    pub fn builder() -> UpcasterBuilder {
        UpcasterBuilder::default()
    }

    /// No upcasters: valid only when every type's current version is 1.
    pub fn none(current: &[(&str, u32)]) -> std::result::Result<Self, ChainError> {
        Self::builder().build(current)
    }

    /// The current schema version of `event_type`, if it is known.
    pub fn current_version(&self, event_type: &str) -> Option<u32> {
        self.inner.current.get(event_type).copied()
    }

    /// Bring `event` up to its type's current schema version, updating
    /// [`RecordedEvent::schema_version`]. An event already current, or of a
    /// type the registry does not know, is returned as it is. An event
    /// *newer* than the current version (written by a newer build) is an
    /// error: reading it with older code would misread it.
    pub fn upcast(&self, mut event: RecordedEvent) -> Result<RecordedEvent> {
        let Some(&current) = self.inner.current.get(&event.event_type) else {
            return Ok(event);
        };
        if event.schema_version == current {
            return Ok(event);
        }
        let fail = |event: &RecordedEvent, reason: String| Error::Decode {
            message_id: event.id,
            message_type: event.event_type.clone(),
            reason: format!(
                "event {} of stream {} (schema version {}): {reason}",
                event.version, event.stream, event.schema_version
            ),
        };
        if event.schema_version > current {
            return Err(fail(
                &event,
                format!("this build knows {} up to schema version {current}; deploy the code that writes version {} before reading these events", event.event_type, event.schema_version),
            ));
        }
        if !is_json_content_type(&event.content_type) {
            return Err(fail(
                &event,
                format!(
                    "upcasters work on JSON payloads, and this one is {:?}",
                    event.content_type
                ),
            ));
        }
        let mut payload: serde_json::Value = serde_json::from_slice(&event.payload)
            .map_err(|e| fail(&event, format!("the payload is not valid JSON: {e}")))?;
        let mut version = event.schema_version;
        // `build` checked that this walk ends at `current`.
        while version < current {
            let Some((to, f)) = self.inner.edges.get(&(event.event_type.clone(), version)) else {
                return Err(fail(
                    &event,
                    format!("no upcaster from version {version}; register one"),
                ));
            };
            payload = f(payload).map_err(|reason| {
                fail(
                    &event,
                    format!("the upcaster from version {version} to {to} failed: {reason}"),
                )
            })?;
            version = *to;
        }
        event.payload = serde_json::to_vec(&payload)
            .map_err(|e| fail(&event, format!("cannot encode the upcast payload: {e}")))?;
        event.schema_version = version;
        Ok(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap as Map;
    use std::collections::BTreeSet;

    fn recorded(
        event_type: &str,
        schema_version: u32,
        payload: serde_json::Value,
    ) -> RecordedEvent {
        RecordedEvent {
            stream: "account-1".into(),
            version: 1,
            position: 1,
            id: uuid::Uuid::now_v7(),
            event_type: event_type.into(),
            schema_version,
            content_type: crate::CONTENT_TYPE_JSON.into(),
            payload: serde_json::to_vec(&payload).unwrap_or_default(),
            headers: Map::new(),
            tags: vec![],
            recorded_at: chrono::Utc::now(),
        }
    }

    fn chain() -> UpcasterBuilder {
        Upcasters::builder()
            .upcast("Deposited", 1, 2, |mut p| {
                let amount = p["amount"].take();
                Ok(serde_json::json!({ "cents": amount }))
            })
            .upcast("Deposited", 2, 3, |mut p| {
                p["currency"] = "EUR".into();
                Ok(p)
            })
    }

    fn err(b: UpcasterBuilder, current: &[(&str, u32)]) -> ChainError {
        match b.build(current) {
            Ok(u) => panic!("expected the chain to be refused, got {u:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn v1_and_v2_events_come_up_to_v3() -> Result<()> {
        let up = chain().build(&[("Deposited", 3), ("Opened", 1)])?;
        let e = up.upcast(recorded("Deposited", 1, serde_json::json!({ "amount": 5 })))?;
        assert_eq!(e.schema_version, 3);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&e.payload).ok(),
            Some(serde_json::json!({ "cents": 5, "currency": "EUR" }))
        );
        let e = up.upcast(recorded("Deposited", 2, serde_json::json!({ "cents": 9 })))?;
        assert_eq!(e.schema_version, 3);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&e.payload).ok(),
            Some(serde_json::json!({ "cents": 9, "currency": "EUR" }))
        );
        // current and unknown types pass unchanged
        let current = recorded("Deposited", 3, serde_json::json!({ "x": 1 }));
        assert_eq!(up.upcast(current.clone())?, current);
        let other = recorded("Elsewhere", 7, serde_json::json!({}));
        assert_eq!(up.upcast(other.clone())?, other);
        Ok(())
    }

    #[test]
    fn a_newer_event_than_the_build_knows_is_an_error_not_a_misread() -> Result<()> {
        let up = chain().build(&[("Deposited", 3)])?;
        let e = up
            .upcast(recorded("Deposited", 4, serde_json::json!({})))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("knows Deposited up to schema version 3"), "{e}");
        Ok(())
    }

    #[test]
    fn a_failing_upcaster_names_the_event_and_versions() -> Result<()> {
        let up = Upcasters::builder()
            .upcast("T", 1, 2, |_| Err("no amount".into()))
            .build(&[("T", 2)])?;
        let e = up
            .upcast(recorded("T", 1, serde_json::json!({})))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("the upcaster from version 1 to 2 failed: no amount")
                && e.contains("stream account-1"),
            "{e}"
        );
        Ok(())
    }

    #[test]
    fn a_gap_is_refused_naming_the_missing_version() {
        let e = err(
            Upcasters::builder()
                .upcast("Deposited", 1, 2, Ok)
                .upcast("Deposited", 3, 4, Ok),
            &[("Deposited", 4)],
        );
        assert_eq!(
            e,
            ChainError::Gap {
                event_type: "Deposited".into(),
                missing: 2,
                current: 4
            }
        );
        assert!(e
            .to_string()
            .contains("register an upcaster for Deposited from version 2 (to version 3)"));
        // a current version above 1 with no upcaster at all is a gap at 1
        let e = err(Upcasters::builder(), &[("Opened", 2)]);
        assert!(matches!(e, ChainError::Gap { missing: 1, .. }), "{e}");
    }

    #[test]
    fn a_cycle_is_refused_showing_it() {
        let e = err(
            Upcasters::builder()
                .upcast("T", 1, 2, Ok)
                .upcast("T", 2, 1, Ok),
            &[("T", 3)],
        );
        assert_eq!(
            e,
            ChainError::Cycle {
                event_type: "T".into(),
                path: vec![1, 2, 1]
            }
        );
        assert!(e.to_string().contains("form a cycle (1 → 2 → 1)"), "{e}");
        let e = err(Upcasters::builder().upcast("T", 1, 1, Ok), &[("T", 2)]);
        assert!(matches!(e, ChainError::Cycle { .. }), "{e}");
    }

    #[test]
    fn a_duplicate_is_refused_naming_both() {
        let e = err(
            Upcasters::builder()
                .upcast("T", 1, 2, Ok)
                .upcast("T", 1, 3, Ok)
                .upcast("T", 2, 3, Ok),
            &[("T", 3)],
        );
        assert_eq!(
            e,
            ChainError::Duplicate {
                event_type: "T".into(),
                from: 1,
                to_first: 2,
                to_second: 3
            }
        );
        assert!(e.to_string().contains("keep one"), "{e}");
    }

    #[test]
    fn unreachable_and_misplaced_upcasters_are_refused() {
        // 1 → 4 jumps past the current version 3: 3 is never reached from 1
        let e = err(
            Upcasters::builder()
                .upcast("T", 1, 4, Ok)
                .upcast("T", 2, 3, Ok),
            &[("T", 3)],
        );
        assert_eq!(
            e,
            ChainError::Unreachable {
                event_type: "T".into(),
                from: 1,
                reached: 4,
                current: 3
            }
        );
        assert!(e.to_string().contains("version 3 is never reached"), "{e}");
        let e = err(Upcasters::builder().upcast("T", 3, 4, Ok), &[("T", 3)]);
        assert!(
            matches!(e, ChainError::NotBelowCurrent { from: 3, .. }),
            "{e}"
        );
        let e = err(
            Upcasters::builder().upcast("Deposit", 1, 2, Ok),
            &[("Deposited", 1)],
        );
        assert!(
            e.to_string().contains(
                "an upcaster for Deposit, which is not one of the event types (Deposited)"
            ),
            "{e}"
        );
        let e = err(Upcasters::builder().upcast("T", 0, 1, Ok), &[("T", 2)]);
        assert!(matches!(e, ChainError::ZeroVersion { .. }), "{e}");
    }

    #[test]
    fn skipping_versions_is_fine_when_every_version_leads_up() -> Result<()> {
        let up = Upcasters::builder()
            .upcast("T", 1, 3, |_| Ok(serde_json::json!({ "from": 1 })))
            .upcast("T", 2, 3, |_| Ok(serde_json::json!({ "from": 2 })))
            .build(&[("T", 3)])?;
        let e = up.upcast(recorded("T", 1, serde_json::json!({})))?;
        assert_eq!(e.schema_version, 3);
        assert_eq!(e.payload, br#"{"from":1}"#.to_vec());
        Ok(())
    }
    /// An upcaster that records its step in the payload's `trail`.
    fn step(
        from: u32,
        to: u32,
    ) -> impl Fn(serde_json::Value) -> std::result::Result<serde_json::Value, String> {
        move |mut p| {
            if let Some(trail) = p["trail"].as_array_mut() {
                trail.push(serde_json::json!([from, to]));
            }
            Ok(p)
        }
    }

    fn trail_of(up: &Upcasters, from: u32) -> Result<(u32, Vec<(u32, u32)>)> {
        let e = up.upcast(recorded("T", from, serde_json::json!({ "trail": [] })))?;
        let p: serde_json::Value = e.decode_json()?;
        let trail = p["trail"]
            .as_array()
            .map(|t| {
                t.iter()
                    .map(|s| {
                        (
                            s[0].as_u64().unwrap_or(0) as u32,
                            s[1].as_u64().unwrap_or(0) as u32,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok((e.schema_version, trail))
    }

    proptest::proptest! {
        /// Whatever upcasters are registered, the registry builds exactly
        /// when a naive walk from every stored version reaches the current
        /// one; and then upcasting brings every version up along registered
        /// steps, each version passed once.
        #[test]
        fn a_registry_builds_iff_every_version_walks_up(
            current in 1u32..7,
            picks in proptest::collection::vec((proptest::bool::weighted(0.9), 0u32..8), 8),
            extra in proptest::option::of((0u32..8, 0u32..8)),
        ) {
            // mostly one upcaster per version below the current one, to a
            // random version (up, down, past the current one), sometimes an
            // extra one anywhere (duplicates, from the current version, 0)
            let mut edges: Vec<(u32, u32)> = (1..current)
                .filter(|v| picks[*v as usize].0)
                .map(|v| (v, 1 + picks[v as usize].1 % (current + 1)))
                .collect();
            edges.extend(extra);
            let naive = edges.iter().all(|(f, t)| *f > 0 && *t > 0 && *f < current)
                && edges.iter().enumerate().all(|(i, (f, _))| edges[..i].iter().all(|(g, _)| g != f))
                && (1..current).all(|v| {
                    let mut at = v;
                    for _ in 0..=current {
                        if at == current {
                            return true;
                        }
                        match edges.iter().find(|(f, _)| *f == at) {
                            Some((_, t)) => at = *t,
                            None => return false,
                        }
                    }
                    false
                });
            let mut b = Upcasters::builder();
            for (from, to) in &edges {
                b = b.upcast("T", *from, *to, step(*from, *to));
            }
            let built = b.build(&[("T", current)]);
            proptest::prop_assert_eq!(built.is_ok(), naive, "edges {:?}, current {}: {:?}", edges, current, built.as_ref().err());
            if let Ok(up) = built {
                for v in 1..=current {
                    let (reached, trail) = trail_of(&up, v).map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
                    proptest::prop_assert_eq!(reached, current);
                    let mut at = v;
                    let mut seen = BTreeSet::new();
                    for (from, to) in trail {
                        proptest::prop_assert_eq!(from, at);
                        proptest::prop_assert!(edges.contains(&(from, to)));
                        proptest::prop_assert!(seen.insert(from), "version {} passed twice", from);
                        at = to;
                    }
                    proptest::prop_assert_eq!(at, current);
                }
            }
        }

        /// Any chain where each version below the current one leads to a
        /// higher one, at most the current one, is accepted.
        #[test]
        fn every_upward_chain_builds(current in 1u32..9, seed in proptest::collection::vec(0u32..100, 8)) {
            let mut b = Upcasters::builder();
            for v in 1..current {
                let to = v + 1 + seed[v as usize - 1] % (current - v);
                b = b.upcast("T", v, to, step(v, to));
            }
            let built = b.build(&[("T", current)]);
            proptest::prop_assert!(built.is_ok(), "{:?}", built.err());
        }
    }
}
