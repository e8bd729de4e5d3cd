//! encode_headers → decode round-trips exactly, for every valid message.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use custody_core::{Message, MessageKind};
use custody_nats::{decode, encode_headers};
use proptest::prelude::*;

const PREFIX: &str = "custody.test";

fn arb_text(max: usize) -> impl Strategy<Value = String> {
    // Mostly printable, with the characters that need encoding mixed in.
    prop::collection::vec(
        prop_oneof![
            8 => prop::char::range(' ', '~'),
            1 => prop::sample::select(vec!['%', '"', '\r', '\n', '\t', '\u{0}', 'é', 'к', '😀']),
            1 => any::<char>(),
        ],
        0..max,
    )
    .prop_map(|cs| cs.into_iter().collect())
}

fn arb_topic() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-zA-Z0-9_-]{1,12}", 1..4).prop_map(|tokens| tokens.join("."))
}

fn arb_message() -> impl Strategy<Value = Message> {
    let header_names = prop_oneof![
        3 => "[a-z0-9]{1,20}",
        // names taken by CloudEvents attributes must survive too
        1 => prop::sample::select(vec!["id", "type", "time", "source", "subject", "specversion", "datacontenttype", "partitionkey", "custodykind", "custodytopic", "data", "dataschema"]).prop_map(str::to_owned),
    ];
    (
        any::<u128>(),
        prop::sample::select(vec![
            MessageKind::Event,
            MessageKind::Command,
            MessageKind::Reply,
        ]),
        arb_topic(),
        arb_text(40),
        arb_text(40).prop_filter("type must not be empty", |t| !t.is_empty()),
        prop_oneof![
            Just(String::new()),
            Just("application/json".to_owned()),
            arb_text(30)
        ],
        prop::collection::vec(any::<u8>(), 0..64),
        prop::collection::btree_map(header_names, arb_text(30), 0..6),
        // 0001-01-01 .. 9999-12-31, any nanosecond
        (-62_135_596_800i64..253_402_300_799i64, 0u32..1_000_000_000),
    )
        .prop_map(
            |(
                id,
                kind,
                topic,
                key,
                message_type,
                content_type,
                payload,
                headers,
                (secs, nanos),
            )| {
                Message {
                    id: uuid::Uuid::from_u128(id),
                    kind,
                    topic,
                    key,
                    message_type,
                    content_type,
                    payload,
                    headers: headers.into_iter().collect::<BTreeMap<_, _>>(),
                    created_at: DateTime::<Utc>::from_timestamp(secs, nanos).unwrap_or_default(),
                }
            },
        )
        .prop_filter("must pass Message::validate", |m| m.validate().is_ok())
}

/// Header values as the NATS wire and server would deliver them: no CR/LF
/// allowed, surrounding whitespace trimmed.
fn over_the_wire(h: &async_nats::HeaderMap) -> async_nats::HeaderMap {
    let mut out = async_nats::HeaderMap::new();
    for (name, values) in h.iter() {
        for v in values {
            let s = v.as_str();
            assert!(!s.contains(['\r', '\n']), "{name}: {s:?} cannot travel");
            out.append(name.clone(), s.trim());
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn encode_then_decode_is_identity(m in arb_message()) {
        let headers = encode_headers(&m);
        let subject = format!("{PREFIX}.{}", m.topic);
        let wire = over_the_wire(&headers);
        let back = decode(&subject, Some(&wire), &m.payload, PREFIX);
        prop_assert_eq!(back, Ok(m.clone()));
        prop_assert_eq!(
            headers.get(async_nats::header::NATS_MESSAGE_ID).map(|v| v.as_str().to_owned()),
            Some(m.id.to_string())
        );
    }
}

#[test]
fn headers_follow_cloudevents_binary_mode() -> custody_core::Result<()> {
    let m = Message::builder("orders", "order 7", "OrderPlaced")
        .header("correlationid", "req-42")?
        .header("id", "user header named id")?
        .build()?;
    let h = encode_headers(&m);
    let get = |n: &str| h.get(n).map(|v| v.as_str().to_owned());
    assert_eq!(get("ce-specversion").as_deref(), Some("1.0"));
    assert_eq!(get("ce-id"), Some(m.id.to_string()));
    assert_eq!(get("ce-type").as_deref(), Some("OrderPlaced"));
    assert_eq!(get("ce-source").as_deref(), Some("custody"));
    assert_eq!(get("ce-subject").as_deref(), Some("order%207"));
    assert_eq!(get("ce-partitionkey").as_deref(), Some("order%207"));
    assert_eq!(get("ce-custodykind").as_deref(), Some("event"));
    assert_eq!(get("ce-custodytopic").as_deref(), Some("orders"));
    assert_eq!(get("content-type").as_deref(), Some("application/json"));
    assert_eq!(get("ce-correlationid").as_deref(), Some("req-42"));
    assert_eq!(
        get("custody-ext-id").as_deref(),
        Some("user%20header%20named%20id")
    );
    assert_eq!(
        h.get(async_nats::header::NATS_MESSAGE_ID)
            .map(|v| v.as_str().to_owned()),
        Some(m.id.to_string())
    );
    let time = get("ce-time").unwrap_or_default();
    assert!(DateTime::parse_from_rfc3339(&time).is_ok(), "{time}");
    Ok(())
}

#[test]
fn malformed_reasons_name_the_header() {
    let ok = |pairs: &[(&str, &str)]| {
        let mut h = async_nats::HeaderMap::new();
        for (n, v) in pairs {
            h.insert(*n, *v);
        }
        h
    };
    let id = uuid::Uuid::now_v7().to_string();
    let cases: Vec<(async_nats::HeaderMap, &str)> = vec![
        (
            ok(&[("ce-type", "T"), ("ce-time", "2024-01-01T00:00:00Z")]),
            "missing header ce-id",
        ),
        (
            ok(&[("ce-id", &id), ("ce-time", "2024-01-01T00:00:00Z")]),
            "missing header ce-type",
        ),
        (
            ok(&[("ce-id", &id), ("ce-type", "T")]),
            "missing header ce-time",
        ),
        (
            ok(&[("ce-id", &id), ("ce-type", "T"), ("ce-time", "yesterday")]),
            "ce-time is not an RFC 3339",
        ),
        (
            ok(&[
                ("ce-id", "42"),
                ("ce-type", "T"),
                ("ce-time", "2024-01-01T00:00:00Z"),
            ]),
            "ce-id is not a UUID",
        ),
        (
            ok(&[
                ("ce-specversion", "0.3"),
                ("ce-id", &id),
                ("ce-type", "T"),
                ("ce-time", "2024-01-01T00:00:00Z"),
            ]),
            "ce-specversion",
        ),
        (
            ok(&[
                ("ce-id", &id),
                ("ce-type", "T"),
                ("ce-time", "2024-01-01T00:00:00Z"),
                ("ce-custodykind", "query"),
            ]),
            "ce-custodykind",
        ),
        (
            ok(&[
                ("ce-id", &id),
                ("ce-type", "T"),
                ("ce-time", "2024-01-01T00:00:00Z"),
                ("ce-%FF", "x"),
            ]),
            "header",
        ),
    ];
    for (h, want) in cases {
        let bad = decode("p.orders", Some(&h), b"raw", "p").expect_err(want);
        assert!(
            bad.reason.contains(want),
            "{} does not contain {want}",
            bad.reason
        );
        assert_eq!(bad.topic, "orders");
        assert_eq!(bad.payload, b"raw");
    }
    let bad = decode("p.orders", None, b"", "p").expect_err("no headers");
    assert!(bad.reason.contains("ce-id"), "{}", bad.reason);
}

#[test]
fn foreign_cloudevent_decodes_with_defaults() {
    let id = uuid::Uuid::now_v7();
    let mut h = async_nats::HeaderMap::new();
    h.insert("Ce-Id", id.to_string());
    h.insert("Ce-Type", "com.example.thing");
    h.insert("Ce-Time", "2024-05-06T07:08:09.123+02:00");
    h.insert("Ce-Subject", "thing-1");
    h.insert("Ce-Source", "/elsewhere");
    let m = decode("p.things.created", Some(&h), b"{}", "p").expect("valid");
    assert_eq!(m.id, id);
    assert_eq!(m.topic, "things.created");
    assert_eq!(m.key, "thing-1");
    assert_eq!(m.kind, MessageKind::Event);
    assert_eq!(m.created_at.to_rfc3339(), "2024-05-06T05:08:09.123+00:00");
    assert!(m.headers.is_empty(), "{:?}", m.headers);
}
