//! Inputs the fuzz targets (fuzz/, see README "Testing") found bugs with,
//! kept as regression tests.

use custody_core::Message;

/// envelope_json: a message whose created_at has a negative year validated,
/// but RFC 3339 (CloudEvents `time`) cannot carry it, so every consumer
/// would have dead-lettered it as malformed. Now it is refused up front.
#[test]
fn envelope_with_a_year_rfc3339_cannot_carry_is_invalid() {
    let data = include_bytes!("fuzz_regressions/envelope_json-negative-year.json");
    let msg: Message = serde_json::from_slice(data).expect("the input parses as an envelope");
    let err = msg.validate().expect_err("must not validate");
    assert!(err.to_string().contains("RFC 3339"), "{err}");

    let far = chrono::DateTime::parse_from_rfc3339("9999-12-31T23:59:59Z")
        .expect("time")
        .to_utc()
        + chrono::Duration::days(2);
    assert!(Message::builder("t", "k", "T")
        .created_at(far)
        .build()
        .is_err());
}

/// Issue 11, scenario 1: envelopes with a NUL where PostgreSQL cannot store
/// one (the key, the producer stamp) or a control character in a name are
/// refused by `validate` (the fuzz seeds in fuzz/seeds/envelope_json);
/// storable control characters in a key or header value are not.
#[test]
fn envelopes_holding_what_no_store_keeps_are_invalid() {
    for (file, what) in [
        ("nul_key.json", "key holds a NUL"),
        (
            "nul_producer_stamp.json",
            "header \"custodyproducer\" holds a NUL",
        ),
        ("control_chars_in_names.json", "control character"),
    ] {
        let path = format!(
            "{}/../../fuzz/seeds/envelope_json/{file}",
            env!("CARGO_MANIFEST_DIR")
        );
        let data = std::fs::read(&path).expect("the seed exists");
        let msg: Message = serde_json::from_slice(&data).expect("the seed parses as an envelope");
        let err = msg.validate().expect_err(file).to_string();
        assert!(err.contains(what), "{file}: {err}");
    }
    let path = format!(
        "{}/../../fuzz/seeds/envelope_json/storable_controls_in_key.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let msg: Message =
        serde_json::from_slice(&std::fs::read(path).expect("seed")).expect("envelope");
    assert!(msg.validate().is_ok());
}
