//! Programs under test as child processes: what they print captured line by
//! line, waits bounded by a deadline, and a graceful stop (SIGTERM) whose exit
//! status must be 0.
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use custody_testkit::process::Proc;
//! let mut cmd = tokio::process::Command::new("my-service");
//! cmd.arg("--listen").arg("127.0.0.1:0");
//! let mut service = Proc::spawn("service", cmd)?;
//! let line = service.wait_line("listening on ", Duration::from_secs(60)).await?;
//! // … use the service …
//! service.terminate().await?; // SIGTERM, then exit status 0 or an error
//! # Ok(()) }
//! ```

use std::future::Future;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// How long [`Proc::terminate`] waits for the exit after SIGTERM.
pub const STOP_WITHIN: Duration = Duration::from_secs(30);

/// A started program and what it printed so far (stdout and stderr, one list
/// in arrival order). Killed (SIGKILL) when dropped, so a failing test leaves
/// no process behind.
pub struct Proc {
    name: String,
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Start `cmd` with its stdout and stderr captured; `name` says which
    /// program an error is about. Whatever `cmd` says about stdout, stderr and
    /// kill-on-drop is replaced.
    pub fn spawn(name: &str, mut cmd: Command) -> anyhow::Result<Proc> {
        let program = cmd.as_std().get_program().to_string_lossy().into_owned();
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {name} ({program})"))?;
        let output = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            collect(out, output.clone());
        }
        if let Some(err) = child.stderr.take() {
            collect(err, output.clone());
        }
        Ok(Proc {
            name: name.to_owned(),
            child,
            output,
        })
    }

    /// Start the program `exe` with `args` and the environment variables
    /// `envs` added to this process's (see [`Proc::spawn`]).
    pub fn start(
        name: &str,
        exe: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> anyhow::Result<Proc> {
        let mut cmd = Command::new(exe);
        cmd.args(args).envs(envs.iter().copied());
        Proc::spawn(name, cmd)
    }

    /// The lines printed so far, stdout and stderr in arrival order.
    pub fn lines(&self) -> Vec<String> {
        self.output.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The lines printed so far as one text, for a failure message.
    pub fn output(&self) -> String {
        self.lines().join("\n")
    }

    /// The first line starting with `prefix`, waiting at most `within`; an
    /// error (with everything printed) if the program exits first or the
    /// time runs out.
    pub async fn wait_line(&mut self, prefix: &str, within: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| l.starts_with(prefix)) {
                return Ok(l);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before printing {prefix:?}:\n{}",
                    self.name,
                    self.output()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} printed no {prefix:?} within {within:?}:\n{}",
                    self.name,
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Send SIGTERM and wait (at most [`STOP_WITHIN`]) for the exit; the
    /// status must be 0 (a graceful stop).
    pub async fn terminate(&mut self) -> anyhow::Result<()> {
        let pid = self
            .child
            .id()
            .with_context(|| format!("{} has already been reaped", self.name))?;
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("cannot run kill(1)")?;
        anyhow::ensure!(sent.success(), "kill -TERM {pid} ({}) failed", self.name);
        let status = tokio::time::timeout(STOP_WITHIN, self.child.wait())
            .await
            .with_context(|| {
                format!(
                    "{} did not stop within {STOP_WITHIN:?} of SIGTERM",
                    self.name
                )
            })??;
        // let the readers take the last lines
        tokio::time::sleep(Duration::from_millis(100)).await;
        anyhow::ensure!(
            status.success(),
            "{} exited with {status} after SIGTERM, not 0:\n{}",
            self.name,
            self.output()
        );
        Ok(())
    }

    /// Kill the program (SIGKILL, no chance to clean up) and reap it.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child
            .kill()
            .await
            .with_context(|| format!("cannot kill {}", self.name))
    }
}

/// Read `reader` line by line into `into` until it closes.
fn collect<R: AsyncRead + Unpin + Send + 'static>(reader: R, into: Arc<Mutex<Vec<String>>>) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(mut v) = into.lock() {
                v.push(line);
            }
        }
    });
}

/// Call `probe` every `every` until `done` holds for its value or `within`
/// has passed, and return the last value either way: the caller asserts on
/// it with its own message. An error from `probe` ends the wait.
pub async fn poll_until<T, F, Fut>(
    within: Duration,
    every: Duration,
    mut probe: F,
    done: impl Fn(&T) -> bool,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        let value = probe().await?;
        if done(&value) || Instant::now() >= deadline {
            return Ok(value);
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shell that prints `ready`, then on SIGTERM stops its sleep and
    /// exits with `code`.
    fn shell(code: u8) -> anyhow::Result<Proc> {
        let script = format!("trap 'kill $!; exit {code}' TERM; echo ready; sleep 30 & wait");
        Proc::start("shell", "sh", &["-c", &script], &[])
    }

    #[tokio::test]
    async fn terminate_accepts_exit_0_and_refuses_any_other_status() -> anyhow::Result<()> {
        let mut good = shell(0)?;
        good.wait_line("ready", Duration::from_secs(10)).await?;
        good.terminate().await?;

        let mut bad = shell(3)?;
        bad.wait_line("ready", Duration::from_secs(10)).await?;
        let err = bad.terminate().await.err().context("exit 3 was accepted")?;
        assert!(err.to_string().contains("after SIGTERM, not 0"), "{err:#}");
        Ok(())
    }

    #[tokio::test]
    async fn wait_line_fails_when_the_program_exits_or_the_time_runs_out() -> anyhow::Result<()> {
        let mut quiet = Proc::start("quiet", "sh", &["-c", "echo one; exit 0"], &[])?;
        let err = quiet
            .wait_line("two", Duration::from_secs(10))
            .await
            .err()
            .context("a line never printed was found")?;
        assert!(err.to_string().contains("exited"), "{err:#}");

        let mut slow = shell(0)?;
        let err = slow
            .wait_line("never", Duration::from_millis(200))
            .await
            .err()
            .context("a line never printed was found")?;
        assert!(err.to_string().contains("within"), "{err:#}");
        slow.terminate().await?;
        Ok(())
    }

    #[tokio::test]
    async fn poll_until_returns_the_last_value_at_the_deadline() -> anyhow::Result<()> {
        let mut n = 0;
        let reached = poll_until(
            Duration::from_secs(10),
            Duration::from_millis(1),
            || {
                n += 1;
                let v = n;
                async move { Ok(v) }
            },
            |v| *v >= 3,
        )
        .await?;
        assert_eq!(reached, 3);
        let last = poll_until(
            Duration::from_millis(50),
            Duration::from_millis(5),
            || async { Ok(0) },
            |v| *v > 0,
        )
        .await?;
        assert_eq!(last, 0, "the deadline ends the wait with the last value");
        Ok(())
    }
}
