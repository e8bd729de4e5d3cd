//! What every tool process needs: a runtime and an error report in `main`,
//! a token cancelled on SIGINT/SIGTERM, URLs without passwords in messages.
//! (The `custody` binary has its own copies in its operations module; the
//! tools do not link it.)

use std::future::Future;
use std::process::ExitCode;

/// Run a tool's `main`: log to stderr (level from `CUSTODY_LOG`, default
/// `error`), drive `f` on a multi-threaded runtime, and turn an error into
/// `error: <message: causes>` on stderr and exit code 1.
pub fn main_with<F>(f: F) -> ExitCode
where
    F: Future<Output = anyhow::Result<ExitCode>>,
{
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        init_tracing("error");
        f.await
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CUSTODY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // colour codes only for a terminal: a log redirected to a file or
        // a pipe must read as plain text
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The error and its causes, leaving out a cause whose text the message
/// already contains (libraries often repeat their source in their message).
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}

/// A token cancelled on SIGINT or SIGTERM (the library's, shared with `custody`).
pub use custody::shutdown_token;

/// A URL without its password, for messages (the library's one redaction).
pub use custody::redact_url as redact;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_the_password_only() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("/tmp/a.db"), "/tmp/a.db");
    }

    #[test]
    fn error_chain_leaves_out_repeated_causes() {
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&e), "outer: inner");
        let e = anyhow::anyhow!("inner").context("outer: inner");
        assert_eq!(error_chain(&e), "outer: inner");
    }
}
