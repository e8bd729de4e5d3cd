//! A private `nats-server` with JetStream for tests that break the broker.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, unavailable};

/// Where the Debian package installs the server.
const SYSTEM_NATS_SERVER: &str = "/usr/sbin/nats-server";

/// How long a starting server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A `nats-server -js` of this test's own, on a free port with its own store
/// directory. Tests of broker faults use it so they can kill and restart the
/// broker without disturbing the machine's shared server.
///
/// The process is killed when this value is dropped; the store directory is
/// deleted with it.
///
/// ```no_run
/// # async fn t() -> anyhow::Result<()> {
/// let Some(mut nats) = custody_testkit::NatsServer::start().await? else { return Ok(()) };
/// // connect clients to nats.url ...
/// nats.stop(); // a crash: kill -9
/// nats.restart().await?; // same port, same JetStream store
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct NatsServer {
    /// `nats://127.0.0.1:<port>`.
    pub url: String,
    /// The client port.
    pub port: u16,
    binary: PathBuf,
    store: tempfile::TempDir,
    child: Option<Child>,
    /// Extra `nats-server.conf` text (TLS, authorization); `None`: flags only.
    config: Option<String>,
}

impl NatsServer {
    /// Start a private server, or skip (`Ok(None)`) when no `nats-server`
    /// binary is installed, unless `CUSTODY_REQUIRE_SERVICES=1`.
    pub async fn start() -> anyhow::Result<Option<NatsServer>> {
        Self::start_inner(None).await
    }

    /// Start a private server from a configuration file: `config` is
    /// `nats-server.conf` text (e.g. a `tls { … }` block and an
    /// `authorization { … }` block) that the listen address and the
    /// JetStream store directory are added to. Skips like [`NatsServer::start`].
    ///
    /// ```no_run
    /// # async fn t() -> anyhow::Result<()> {
    /// let conf = r#"authorization { user: "relay", password: "s3cret" }"#;
    /// let Some(nats) = custody_testkit::NatsServer::start_with_config(conf).await? else { return Ok(()) };
    /// # Ok(()) }
    /// ```
    pub async fn start_with_config(config: &str) -> anyhow::Result<Option<NatsServer>> {
        Self::start_inner(Some(config.to_owned())).await
    }

    async fn start_inner(config: Option<String>) -> anyhow::Result<Option<NatsServer>> {
        let Some(binary) = find_binary() else {
            return unavailable(
                "nats-server binary",
                &format!("neither {SYSTEM_NATS_SERVER} nor nats-server on PATH"),
            );
        };
        let store = tempfile::Builder::new()
            .prefix("custody-nats-test-")
            .tempdir()?;
        let port = free_port()?;
        let mut server = NatsServer {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            binary,
            store,
            child: None,
            config,
        };
        server.spawn().await?;
        Ok(Some(server))
    }

    /// Replace the configuration text of a server started with
    /// [`NatsServer::start_with_config`]; it takes effect at the next
    /// [`NatsServer::restart`] (e.g. a changed password: clients that
    /// reconnect with the old one are refused).
    pub fn set_config(&mut self, config: &str) {
        self.config = Some(config.to_owned());
    }

    /// The JetStream store directory (`-sd`).
    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// Kill the server with SIGKILL, as a crash would, and reap it.
    /// Does nothing when it is already stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Child::kill sends SIGKILL on Unix: no graceful JetStream shutdown.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the server again on the same port with the same store directory,
    /// so streams and messages written before [`NatsServer::stop`] are back.
    /// Stops it first if it is running.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn().await
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn log_path(&self) -> PathBuf {
        self.store.path().join("nats-server.log")
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut command = Command::new(&self.binary);
        match &self.config {
            None => {
                command
                    .args(["-a", "127.0.0.1", "-p"])
                    .arg(self.port.to_string())
                    .arg("-js")
                    .arg("-sd")
                    .arg(self.store.path().join("data"));
            }
            Some(extra) => {
                let file = self.store.path().join("nats-server.conf");
                std::fs::write(
                    &file,
                    format!(
                        "listen: \"127.0.0.1:{}\"\njetstream {{ store_dir: {:?} }}\n{extra}\n",
                        self.port,
                        self.store.path().join("data")
                    ),
                )?;
                command.arg("-c").arg(file);
            }
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", self.binary.display()))?;
        self.child = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    anyhow::bail!(
                        "nats-server on port {} exited at start ({status}); its log:\n{}",
                        self.port,
                        std::fs::read_to_string(self.log_path()).unwrap_or_default()
                    );
                }
            }
            let connect = tokio::net::TcpStream::connect(("127.0.0.1", self.port));
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), connect).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                anyhow::bail!(
                    "nats-server on port {} did not accept connections within {START_TIMEOUT:?}; its log:\n{}",
                    self.port,
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn find_binary() -> Option<PathBuf> {
    let system = Path::new(SYSTEM_NATS_SERVER);
    if system.is_file() {
        return Some(system.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
}
