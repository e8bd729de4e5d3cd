//! Aggregates: the domain side of event sourcing, separate from storage.
//!
//! An [`Aggregate`] is a state folded from its events ([`Aggregate::apply`])
//! that decides what a command means ([`Aggregate::handle`]): new events, or
//! a typed rejection. Its events are a [`DomainEvent`]: each has a type name
//! and a current schema version, and maps to and from a JSON payload.
//! Nothing here touches a store: `custody_engine::repository::Repository`
//! loads, decides and appends on an [`EventStore`](crate::event::EventStore),
//! and [`testing`] checks domain logic in plain unit tests.
//!
//! ```
//! use custody_core::aggregate::{testing::given, Aggregate, DomainEvent};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
//! #[serde(tag = "type", content = "data")]
//! enum CounterEvent { Incremented { by: u32 } }
//!
//! impl DomainEvent for CounterEvent {
//!     const TYPES: &'static [(&'static str, u32)] = &[("Incremented", 1)];
//!     fn event_type(&self) -> &'static str { "Incremented" }
//!     fn to_payload(&self) -> custody_core::Result<serde_json::Value> {
//!         custody_core::aggregate::encode_tagged(self)
//!     }
//!     fn from_payload(event_type: &str, payload: serde_json::Value) -> custody_core::Result<Self> {
//!         custody_core::aggregate::decode_tagged(event_type, payload)
//!     }
//! }
//!
//! #[derive(Debug, Default, Serialize, Deserialize)]
//! struct Counter { value: u32 }
//!
//! impl Aggregate for Counter {
//!     const TYPE: &'static str = "counter";
//!     type Event = CounterEvent;
//!     type Command = u32;
//!     type Rejection = String;
//!     fn handle(&self, by: &u32) -> Result<Vec<CounterEvent>, String> {
//!         match self.value.checked_add(*by) {
//!             Some(_) => Ok(vec![CounterEvent::Incremented { by: *by }]),
//!             None => Err(format!("{} + {by} overflows", self.value)),
//!         }
//!     }
//!     fn apply(&mut self, CounterEvent::Incremented { by }: &CounterEvent) {
//!         self.value += by;
//!     }
//! }
//!
//! given::<Counter>([CounterEvent::Incremented { by: 2 }])
//!     .when(3)
//!     .then([CounterEvent::Incremented { by: 3 }]);
//! given::<Counter>([CounterEvent::Incremented { by: u32::MAX }])
//!     .when(1)
//!     .then_rejected(format!("{} + 1 overflows", u32::MAX));
//! ```

use std::fmt::{Debug, Display};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Error, Result};

/// The events of one aggregate: each variant has a type name, a current
/// schema version, and a JSON payload it maps to and from.
///
/// Older schema versions of a payload are brought up to the current one by
/// upcasters ([`crate::upcast`]) before [`DomainEvent::from_payload`] sees
/// them, so `from_payload` only ever reads current shapes.
pub trait DomainEvent: Sized + Clone + Debug + PartialEq + Send + Sync + 'static {
    /// Every event type, with its current schema version (1 for a type
    /// whose payload never changed). The upcaster chain of each type is
    /// validated against it, and appended events carry it.
    const TYPES: &'static [(&'static str, u32)];

    /// This event's type name (one of [`DomainEvent::TYPES`]).
    fn event_type(&self) -> &'static str;

    /// The payload, in the current schema version of its type.
    fn to_payload(&self) -> Result<serde_json::Value>;

    /// The event of `event_type` from a payload in the type's current
    /// schema version. An unknown type is an error naming it.
    fn from_payload(event_type: &str, payload: serde_json::Value) -> Result<Self>;

    /// The current schema version of `event_type`, if it is one of
    /// [`DomainEvent::TYPES`].
    fn schema_version_of(event_type: &str) -> Option<u32> {
        Self::TYPES
            .iter()
            .find(|(t, _)| *t == event_type)
            .map(|(_, v)| *v)
    }
}

/// A consistency boundary: a state folded from its events, which decides
/// what a command means.
///
/// `handle` must be a pure function of the state and the command: the
/// repository calls it again after a conflict (on the newer state), and a
/// re-run of a command must decide the same way for its events to keep
/// their ids.
pub trait Aggregate: Default + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The aggregate type: the stream category (`account` for
    /// `account-42`) and the snapshot's aggregate name. Lowercase letters,
    /// digits and `_`; no `-` (the category ends at the first `-`).
    const TYPE: &'static str;

    /// The schema version of the state's snapshot encoding (serde JSON of
    /// `Self`). Raise it when the state's shape changes: snapshots of
    /// another version are then ignored (the state is folded from the
    /// events), never misread.
    const SNAPSHOT_VERSION: u32 = 1;

    /// Its events.
    type Event: DomainEvent;

    /// What it is asked to do.
    type Command: Debug + Send + Sync;

    /// Why a command is refused (a business outcome, not an error).
    type Rejection: Debug + Display + PartialEq + Send + Sync + 'static;

    /// Decide: the events `command` produces on this state (none is fine),
    /// or why it is refused.
    fn handle(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Rejection>;

    /// Evolve: the state after `event`. Must not fail: an event is a fact.
    fn apply(&mut self, event: &Self::Event);
}

/// The state after `events`, from the default state.
pub fn fold<A: Aggregate>(events: impl IntoIterator<Item = A::Event>) -> A {
    let mut state = A::default();
    for event in events {
        state.apply(&event);
    }
    state
}

/// The stream of aggregate `id` of type `A`: `<A::TYPE>-<id>` (`account-42`),
/// after checking the type and the id.
pub fn stream_name<A: Aggregate>(id: &str) -> Result<String> {
    validate_aggregate_type(A::TYPE)?;
    if id.is_empty() {
        return Err(Error::InvalidMessage(format!(
            "the id of a {} aggregate is empty; give every aggregate a non-empty id",
            A::TYPE
        )));
    }
    let stream = format!("{}-{id}", A::TYPE);
    crate::event::validate_stream_name(&stream)?;
    Ok(stream)
}

/// Check an aggregate type name: 1 to 64 bytes of `[a-z0-9_]`, so that it is
/// exactly the category of its streams.
pub fn validate_aggregate_type(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "aggregate type {name:?} must be 1 to 64 characters of a-z, 0-9 and _ (it is the category of its streams, which ends at the first '-'); rename Aggregate::TYPE"
        )))
    }
}

/// The payload of an event enum that serde tags adjacently
/// (`#[serde(tag = "type", content = "data")]`): its `data` (`null` for a
/// unit variant). With [`decode_tagged`], a one-line
/// [`DomainEvent::to_payload`].
pub fn encode_tagged<E: Serialize>(event: &E) -> Result<serde_json::Value> {
    let value = serde_json::to_value(event)
        .map_err(|e| Error::InvalidMessage(format!("cannot encode event as JSON: {e}")))?;
    match value {
        serde_json::Value::Object(mut map) if map.contains_key("type") => {
            Ok(map.remove("data").unwrap_or(serde_json::Value::Null))
        }
        other => Err(Error::InvalidMessage(format!(
            "event encodes as {other}, not as {{\"type\": …, \"data\": …}}; tag the enum with #[serde(tag = \"type\", content = \"data\")] or write to_payload by hand"
        ))),
    }
}

/// The event of `event_type` with `payload` as its `data`, for an enum that
/// serde tags adjacently (see [`encode_tagged`]).
pub fn decode_tagged<E: DeserializeOwned>(
    event_type: &str,
    payload: serde_json::Value,
) -> Result<E> {
    let mut map = serde_json::Map::new();
    map.insert("type".into(), event_type.into());
    if !payload.is_null() {
        map.insert("data".into(), payload);
    }
    serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| Error::Decode {
        message_id: uuid::Uuid::nil(),
        message_type: event_type.to_owned(),
        reason: format!("the payload does not match the current schema of {event_type}: {e}"),
    })
}

/// Given/when/then for domain logic, without a store:
/// `given(events).when(command).then(expected_events)` or
/// `.then_rejected(rejection)`. A mismatch panics with the events given,
/// the command, what was expected and what the aggregate did.
///
/// `then` also checks that each produced event survives its JSON round
/// trip ([`DomainEvent::to_payload`] then [`DomainEvent::from_payload`]),
/// which is how the repository stores it.
pub mod testing {
    use super::{Aggregate, DomainEvent};

    /// The aggregate after `events` (applied in order to the default state).
    pub fn given<A: Aggregate>(events: impl IntoIterator<Item = A::Event>) -> Given<A> {
        let events: Vec<A::Event> = events.into_iter().collect();
        let state = super::fold::<A>(events.iter().cloned());
        Given { events, state }
    }

    /// A state built from events, waiting for a command.
    pub struct Given<A: Aggregate> {
        events: Vec<A::Event>,
        state: A,
    }

    impl<A: Aggregate> Given<A> {
        /// Handle `command` on the state.
        pub fn when(self, command: A::Command) -> When<A> {
            let outcome = self.state.handle(&command);
            When {
                given: self.events,
                command,
                state: self.state,
                outcome,
            }
        }

        /// The state the given events produced.
        pub fn state(&self) -> &A {
            &self.state
        }
    }

    /// The outcome of a command, waiting for what it should be.
    pub struct When<A: Aggregate> {
        given: Vec<A::Event>,
        command: A::Command,
        state: A,
        outcome: Result<Vec<A::Event>, A::Rejection>,
    }

    impl<A: Aggregate> When<A> {
        fn scene(&self) -> String {
            format!(
                "{} aggregate\n  given: {:?}\n  when:  {:?}",
                A::TYPE,
                self.given,
                self.command
            )
        }

        /// Assert the command produced exactly `expected` (in order);
        /// returns the state after applying them.
        #[track_caller]
        pub fn then(self, expected: impl IntoIterator<Item = A::Event>) -> A {
            let expected: Vec<A::Event> = expected.into_iter().collect();
            let scene = self.scene();
            match self.outcome {
                Ok(events) if events == expected => {
                    for event in &events {
                        round_trip::<A>(&scene, event);
                    }
                    let mut state = self.state;
                    for event in &events {
                        state.apply(event);
                    }
                    state
                }
                Ok(events) => panic!(
                    "{scene}\n  then:  expected events {expected:?}\n  but the command produced {events:?}"
                ),
                Err(rejection) => panic!(
                    "{scene}\n  then:  expected events {expected:?}\n  but the command was rejected: {rejection} ({rejection:?})"
                ),
            }
        }

        /// Assert the command was rejected with `expected`.
        #[track_caller]
        pub fn then_rejected(self, expected: A::Rejection) {
            let scene = self.scene();
            match self.outcome {
                Err(rejection) if rejection == expected => {}
                Err(rejection) => panic!(
                    "{scene}\n  then:  expected the rejection {expected:?}\n  but it was rejected with {rejection:?} ({rejection})"
                ),
                Ok(events) => panic!(
                    "{scene}\n  then:  expected the rejection {expected:?}\n  but the command produced {events:?}"
                ),
            }
        }

        /// The raw outcome, for assertions of your own.
        pub fn outcome(self) -> Result<Vec<A::Event>, A::Rejection> {
            self.outcome
        }
    }

    #[track_caller]
    fn round_trip<A: Aggregate>(scene: &str, event: &A::Event) {
        let event_type = event.event_type();
        if <A::Event as DomainEvent>::schema_version_of(event_type).is_none() {
            panic!("{scene}\n  the event {event:?} has type {event_type:?}, which is not in its DomainEvent::TYPES; add it with its schema version");
        }
        let back = event
            .to_payload()
            .and_then(|payload| <A::Event as DomainEvent>::from_payload(event_type, payload));
        match back {
            Ok(back) if &back == event => {}
            Ok(back) => panic!("{scene}\n  the event {event:?} reads back from its payload as {back:?}; fix to_payload/from_payload"),
            Err(e) => panic!("{scene}\n  the event {event:?} does not survive its JSON round trip: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::given;
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "type", content = "data")]
    enum Ev {
        Opened,
        Added { n: u32 },
    }

    impl DomainEvent for Ev {
        const TYPES: &'static [(&'static str, u32)] = &[("Opened", 1), ("Added", 1)];
        fn event_type(&self) -> &'static str {
            match self {
                Ev::Opened => "Opened",
                Ev::Added { .. } => "Added",
            }
        }
        fn to_payload(&self) -> Result<serde_json::Value> {
            encode_tagged(self)
        }
        fn from_payload(event_type: &str, payload: serde_json::Value) -> Result<Self> {
            decode_tagged(event_type, payload)
        }
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    struct Tally {
        open: bool,
        total: u32,
    }

    #[derive(Debug)]
    enum Cmd {
        Open,
        Add(u32),
    }

    #[derive(Debug, PartialEq)]
    enum No {
        NotOpen,
        AlreadyOpen,
    }
    impl std::fmt::Display for No {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{self:?}")
        }
    }

    impl Aggregate for Tally {
        const TYPE: &'static str = "tally";
        type Event = Ev;
        type Command = Cmd;
        type Rejection = No;
        fn handle(&self, c: &Cmd) -> Result<Vec<Ev>, No> {
            match (c, self.open) {
                (Cmd::Open, false) => Ok(vec![Ev::Opened]),
                (Cmd::Open, true) => Err(No::AlreadyOpen),
                (Cmd::Add(_), false) => Err(No::NotOpen),
                (Cmd::Add(n), true) => Ok(vec![Ev::Added { n: *n }]),
            }
        }
        fn apply(&mut self, e: &Ev) {
            match e {
                Ev::Opened => self.open = true,
                Ev::Added { n } => self.total += n,
            }
        }
    }

    #[test]
    fn given_when_then_passes_and_returns_the_new_state() {
        let state = given::<Tally>([Ev::Opened, Ev::Added { n: 2 }])
            .when(Cmd::Add(3))
            .then([Ev::Added { n: 3 }]);
        assert_eq!(state.total, 5);
        given::<Tally>([])
            .when(Cmd::Add(1))
            .then_rejected(No::NotOpen);
    }

    #[test]
    #[should_panic(
        expected = "expected events [Added { n: 4 }]\n  but the command produced [Added { n: 3 }]"
    )]
    fn then_panics_with_expected_and_actual() {
        given::<Tally>([Ev::Opened])
            .when(Cmd::Add(3))
            .then([Ev::Added { n: 4 }]);
    }

    #[test]
    #[should_panic(
        expected = "expected the rejection NotOpen\n  but it was rejected with AlreadyOpen"
    )]
    fn then_rejected_panics_with_the_other_rejection() {
        given::<Tally>([Ev::Opened])
            .when(Cmd::Open)
            .then_rejected(No::NotOpen);
    }

    #[test]
    #[should_panic(
        expected = "expected events [Opened]\n  but the command was rejected: AlreadyOpen"
    )]
    fn then_panics_on_an_unexpected_rejection() {
        given::<Tally>([Ev::Opened])
            .when(Cmd::Open)
            .then([Ev::Opened]);
    }

    #[test]
    fn tagged_payloads_round_trip_including_unit_variants() {
        assert_eq!(
            encode_tagged(&Ev::Opened).ok(),
            Some(serde_json::Value::Null)
        );
        let p = encode_tagged(&Ev::Added { n: 7 }).unwrap_or_default();
        assert_eq!(p, serde_json::json!({ "n": 7 }));
        assert_eq!(
            decode_tagged::<Ev>("Added", p).ok(),
            Some(Ev::Added { n: 7 })
        );
        assert_eq!(
            decode_tagged::<Ev>("Opened", serde_json::Value::Null).ok(),
            Some(Ev::Opened)
        );
        let err = decode_tagged::<Ev>("Closed", serde_json::Value::Null)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("Closed"), "{err}");
    }

    #[test]
    fn stream_names_and_types_are_checked() {
        assert_eq!(stream_name::<Tally>("7").ok().as_deref(), Some("tally-7"));
        assert!(stream_name::<Tally>("").is_err());
        let err = validate_aggregate_type("bank-account")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("rename Aggregate::TYPE"), "{err}");
        assert!(validate_aggregate_type("bank_account").is_ok());
    }
}
