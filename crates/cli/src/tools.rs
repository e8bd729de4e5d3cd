//! `custody demo|chaos|bench ARGS…`: the development tools are separate
//! binaries (tools/demo, tools/chaos, tools/bench; not part of the operations
//! tool). `custody` runs them the way cargo and git run external
//! subcommands: `custody-<name>` beside the `custody` executable first, else
//! on `PATH`, with the same arguments and its exit code passed through.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

/// Look for the tools in this directory instead of beside the `custody`
/// executable (`PATH` is still searched after it).
pub const TOOLS_DIR_ENV: &str = "CUSTODY_TOOLS_DIR";

/// Everything after `custody <tool>`, handed to the tool unchanged
/// (including `--help`).
#[derive(Debug, Clone, Args)]
pub struct ToolArgs {
    /// Arguments of the tool (see `custody-<tool> --help`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    pub args: Vec<OsString>,
}

/// Run `custody-<name>` with `args`; its exit code is ours. If it cannot be
/// found (or started), say how to run or install it and exit with 2.
pub fn forward(name: &str, args: ToolArgs) -> ExitCode {
    let exe = format!("custody-{name}{}", std::env::consts::EXE_SUFFIX);
    let Some(path) = find(&exe) else {
        eprintln!(
            "error: custody {name} is a separate tool (tools/{name}) and {exe} was found neither beside custody nor on PATH; \
             run it with `cargo run --release -p custody-{name} -- …` \
             or install it beside custody with `cargo install --path tools/{name}`"
        );
        return ExitCode::from(2);
    };
    let mut cmd = std::process::Command::new(&path);
    cmd.args(&args.args);
    run(cmd, &path)
}

#[cfg(unix)]
fn run(mut cmd: std::process::Command, path: &Path) -> ExitCode {
    use std::os::unix::process::CommandExt;
    // like cargo: the tool replaces this process (signals, exit code and
    // terminal go to it directly); `exec` returns only if it failed
    let e = cmd.exec();
    eprintln!("error: cannot run {}: {e}", path.display());
    ExitCode::from(2)
}

#[cfg(not(unix))]
fn run(mut cmd: std::process::Command, path: &Path) -> ExitCode {
    match cmd.status() {
        Ok(status) => match status.code() {
            Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
            None => ExitCode::FAILURE,
        },
        Err(e) => {
            eprintln!("error: cannot run {}: {e}", path.display());
            ExitCode::from(2)
        }
    }
}

/// `exe` in `$CUSTODY_TOOLS_DIR` (if set) or else beside the running
/// executable, then in each directory of `PATH`.
fn find(exe: &str) -> Option<PathBuf> {
    let first = match std::env::var_os(TOOLS_DIR_ENV) {
        Some(dir) => Some(PathBuf::from(dir)),
        None => std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf)),
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    first
        .into_iter()
        .chain(std::env::split_paths(&path))
        .map(|dir| dir.join(exe))
        .find(|p| is_executable(p))
}

#[cfg(unix)]
fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(p: &Path) -> bool {
    p.is_file()
}
