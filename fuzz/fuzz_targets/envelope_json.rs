//! The JSON envelope (dead letters keep it; redrive reads it back):
//! arbitrary bytes → Message must never panic; a message that validates must
//! hold nothing a store refuses (NUL, control characters in names) and
//! survive JSON and the NATS CloudEvents mapping unchanged.
#![no_main]

use custody_core::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = serde_json::from_slice::<Message>(data) else {
        return;
    };
    if msg.validate().is_err() {
        return;
    }
    // what validates can be stored by every backend: no NUL in any text
    // attribute, no control character in the names (seeds: nul_*.json,
    // control_chars_in_names.json)
    let texts = [&msg.topic, &msg.key, &msg.message_type, &msg.content_type];
    assert!(
        texts.iter().all(|t| !t.contains('\0')) && msg.headers.values().all(|v| !v.contains('\0')),
        "a message with a NUL validated"
    );
    assert!(
        [&msg.topic, &msg.message_type, &msg.content_type]
            .iter()
            .all(|t| !t.chars().any(char::is_control)),
        "a topic, type or content type with a control character validated"
    );
    let json = serde_json::to_vec(&msg).expect("a message serializes");
    let back: Message = serde_json::from_slice(&json).expect("own JSON parses");
    assert_eq!(back, msg);
    let h = custody_nats::encode_headers(&msg);
    let subject = format!("p.{}", msg.topic);
    match custody_nats::decode(&subject, Some(&h), &msg.payload, "p") {
        Ok(m) => assert_eq!(m, msg, "NATS mapping changed a valid message"),
        Err(bad) => panic!("a valid message does not survive the NATS mapping: {}", bad.reason),
    }
});
