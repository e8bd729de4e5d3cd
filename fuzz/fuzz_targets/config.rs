//! Configuration text (TOML file, `CUSTODY_*` values, durations like "250ms"):
//! errors are fine, panics are not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = custody_core::duration_serde::parse(text);
    if let Ok(table) = text.parse::<toml::Table>() {
        let _ = toml::Value::Table(table.clone()).try_into::<custody_engine::RelayConfig>();
        let _ = toml::Value::Table(table).try_into::<custody_engine::ConsumerConfig>();
    }
});
