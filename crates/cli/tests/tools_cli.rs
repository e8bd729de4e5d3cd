//! `custody demo|chaos|bench ARGS…` runs the separate tool `custody-<name>`
//! (beside `custody`, else on PATH) with the same arguments and passes its
//! exit code through; without the tool it says how to get it and exits 2.

use std::path::Path;
use std::process::{Command, Output};

/// `custody <args>` with `PATH` = `path` and the beside-the-executable
/// lookup pointed at `tools_dir` (an empty directory: bypassed).
fn custody(args: &[&str], tools_dir: &Path, path: &Path) -> anyhow::Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_custody"))
        .args(args)
        .env("CUSTODY_TOOLS_DIR", tools_dir)
        .env("PATH", path)
        .output()?)
}

#[cfg(unix)]
fn fake_tool(dir: &Path, name: &str, exit: i32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!("#!/bin/sh\necho \"{name} got:\" \"$@\"\nexit {exit}\n"),
    )?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

#[cfg(unix)]
#[test]
fn a_tool_on_path_gets_the_arguments_and_its_exit_code_is_custodys() -> anyhow::Result<()> {
    let empty = tempfile::tempdir()?;
    let bin = tempfile::tempdir()?;
    fake_tool(bin.path(), "custody-demo", 7)?;
    fake_tool(bin.path(), "custody-bench", 0)?;
    let out = custody(
        &["demo", "--messages", "500", "--help", "--seed", "42"],
        empty.path(),
        bin.path(),
    )?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "custody-demo got: --messages 500 --help --seed 42"
    );
    assert_eq!(out.status.code(), Some(7));
    let out = custody(&["bench", "outbox", "--quick"], empty.path(), bin.path())?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "custody-bench got: outbox --quick"
    );
    assert_eq!(out.status.code(), Some(0));
    Ok(())
}

#[cfg(unix)]
#[test]
fn the_tools_directory_comes_before_path() -> anyhow::Result<()> {
    let first = tempfile::tempdir()?;
    let later = tempfile::tempdir()?;
    fake_tool(first.path(), "custody-chaos", 3)?;
    fake_tool(later.path(), "custody-chaos", 4)?;
    let out = custody(&["chaos", "--duration", "1s"], first.path(), later.path())?;
    assert_eq!(out.status.code(), Some(3));
    Ok(())
}

#[test]
fn a_missing_tool_is_explained_and_exits_2() -> anyhow::Result<()> {
    let empty = tempfile::tempdir()?;
    for name in ["demo", "chaos", "bench"] {
        let out = custody(&[name, "--seed", "1"], empty.path(), empty.path())?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(
            stderr.contains(&format!("custody {name} is a separate tool (tools/{name})")),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!("cargo run --release -p custody-{name} -- …")),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!("cargo install --path tools/{name}")),
            "{stderr}"
        );
        assert!(out.stdout.is_empty());
    }
    Ok(())
}

#[test]
fn help_lists_the_tools_as_separate() -> anyhow::Result<()> {
    let empty = tempfile::tempdir()?;
    let out = custody(&["--help"], empty.path(), empty.path())?;
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for name in ["demo", "chaos", "bench"] {
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_default();
        assert!(
            line.contains(&format!("(separate tool: custody-{name})")),
            "{name}: {line:?}"
        );
    }
    Ok(())
}
