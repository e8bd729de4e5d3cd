//! `custody-chaos --help` shows what a user runs, not the internal worker
//! processes the tool starts.

use std::process::Command;

#[test]
fn help_shows_no_internal_role() -> anyhow::Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_custody-chaos"))
        .arg("--help")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let usage = text
        .lines()
        .find(|l| l.starts_with("Usage:"))
        .unwrap_or_default();
    assert_eq!(usage, "Usage: custody-chaos [OPTIONS]", "{text}");
    for internal in ["worker", "--role", "Commands:"] {
        assert!(
            !text.contains(internal),
            "{internal} in user-facing help:\n{text}"
        );
    }
    Ok(())
}
