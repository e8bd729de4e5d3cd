//! Graceful stop on a signal, for binaries that run the engines.

use tokio_util::sync::CancellationToken;

/// A token cancelled on SIGINT or SIGTERM: pass it to `Relay::run` or
/// `Consumer::run` so a signal drains in-flight work and stops. Call it
/// inside a tokio runtime (it spawns the task that waits for the signal).
pub fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        t.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        t.cancel();
    });
    token
}
