//! `custody_nats::decode`: NATS headers + payload from the broker → Message
//! or Malformed. Must never panic; a decoded message must be valid and must
//! survive encode → decode unchanged.
#![no_main]

use arbitrary::Arbitrary;
use async_nats::header::HeaderMap;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    subject: String,
    prefix: String,
    headers: Option<Vec<(u8, String, String)>>,
    payload: Vec<u8>,
}

/// Names custody reads, so the fuzzer reaches the attribute parsers instead
/// of spending its time on names that are ignored (the stamp headers too:
/// a `%00` in `ce-custodyproducer` once stopped a PostgreSQL consumer).
const NAMES: &[&str] = &[
    "ce-custodyproducer",
    "ce-custodypartition",
    "ce-custodyseq",
    "ce-id",
    "ce-type",
    "ce-time",
    "ce-specversion",
    "ce-subject",
    "ce-partitionkey",
    "ce-custodykind",
    "ce-custodytopic",
    "content-type",
    "ce-correlationid",
    "custody-ext-id",
    "Nats-Msg-Id",
];

fuzz_target!(|input: Input| {
    let headers = input.headers.map(|hs| {
        let mut h = HeaderMap::new();
        for (pick, name, value) in hs {
            // the wire format cannot carry CR/LF or ':' in names, nor CR/LF in
            // values: async-nats would not hand us such a header
            if value.contains(['\r', '\n']) {
                continue;
            }
            let name = if (pick as usize) < NAMES.len() * 2 {
                NAMES[pick as usize % NAMES.len()].to_owned()
            } else {
                name
            };
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b':')
            {
                continue;
            }
            h.append(name.as_str(), value.as_str());
        }
        h
    });
    if let Ok(msg) =
        custody_nats::decode(&input.subject, headers.as_ref(), &input.payload, &input.prefix)
    {
        // percent-decoding must not smuggle in what no store keeps: a `%00`
        // in any header, a control character in the topic, type or content
        // type, is Malformed (issue 11, scenario 1)
        let texts = [&msg.topic, &msg.key, &msg.message_type, &msg.content_type];
        assert!(
            texts.iter().all(|t| !t.contains('\0')) && msg.headers.values().all(|v| !v.contains('\0')),
            "decode returned a message with a NUL: {msg:?}"
        );
        assert!(
            [&msg.topic, &msg.message_type, &msg.content_type]
                .iter()
                .all(|t| !t.chars().any(char::is_control)),
            "decode returned a control character in a name: {msg:?}"
        );
        // whatever decodes, encodes and decodes to the same message
        let again = custody_nats::encode_headers(&msg);
        let subject = format!("p.{}", msg.topic);
        match custody_nats::decode(&subject, Some(&again), &msg.payload, "p") {
            Ok(back) => assert_eq!(back, msg, "decode ∘ encode changed a decoded message"),
            Err(bad) => panic!("a decoded message does not survive encode → decode: {}", bad.reason),
        }
    }
});
