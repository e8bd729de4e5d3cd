//! A private PostgreSQL cluster with TLS and scram-sha-256, for tests of
//! secure links.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{free_port, unavailable, TestCerts};

/// Where the Debian packages install PostgreSQL 15's programs.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL cluster of this test's own on a free 127.0.0.1 port: `ssl =
/// on` with a certificate of [`TestCerts`], and a `pg_hba.conf` with one
/// line, `hostssl all all 127.0.0.1/32 scram-sha-256`: plaintext clients and
/// wrong passwords are refused. Superuser `postgres` with
/// [`PgCluster::password`].
///
/// PostgreSQL refuses to run as root, so the cluster runs as the `postgres`
/// OS user (`runuser`) in a directory it owns. Stopped (`pg_ctl stop -m
/// immediate`) and deleted when dropped.
#[derive(Debug)]
pub struct PgCluster {
    /// The port it listens on.
    pub port: u16,
    /// The superuser's password.
    pub password: String,
    dir: tempfile::TempDir,
}

impl PgCluster {
    /// Initialise and start a cluster serving `certs`' server certificate;
    /// skip (`Ok(None)`) when PostgreSQL 15's programs or `runuser` are not
    /// installed or this process may not switch to the `postgres` user,
    /// unless `CUSTODY_REQUIRE_SERVICES=1`.
    pub async fn start(certs: &TestCerts) -> anyhow::Result<Option<PgCluster>> {
        let initdb = Path::new(PG_BIN).join("initdb");
        if !initdb.is_file() {
            return unavailable(
                "PostgreSQL 15 programs",
                &format!("{} missing", initdb.display()),
            );
        }
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if !is_root {
            return unavailable(
                "a private PostgreSQL cluster",
                "starting one needs root (runuser -u postgres)",
            );
        }
        let dir = tempfile::Builder::new().prefix("custody-pg-").tempdir()?;
        let password = crate::unique_name("pw");
        let port = free_port()?;
        let cluster = PgCluster {
            port,
            password,
            dir,
        };
        let root = cluster.dir.path();
        let data = cluster.data_dir();
        let pwfile = root.join("pwfile");
        std::fs::write(&pwfile, format!("{}\n", cluster.password))?;
        std::fs::copy(&certs.server_cert, root.join("server.crt"))?;
        std::fs::copy(&certs.server_key, root.join("server.key"))?;
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(root))?;
        run(Command::new("chmod")
            .arg("600")
            .arg(root.join("server.key")))?;
        run(as_postgres(&initdb)
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=scram-sha-256", "--pwfile"])
            .arg(&pwfile))?;
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))?;
        use std::io::Write;
        writeln!(
            conf,
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\nssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nfsync = off\n",
            root.display(),
            root.join("server.crt").display(),
            root.join("server.key").display()
        )?;
        std::fs::write(
            data.join("pg_hba.conf"),
            "hostssl all all 127.0.0.1/32 scram-sha-256\n",
        )?;
        run(as_postgres(&Path::new(PG_BIN).join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(root.join("postgres.log"))
            .args(["-w", "-t", "30", "start"]))
        .map_err(|e| {
            anyhow::anyhow!(
                "{e}; server log:\n{}",
                std::fs::read_to_string(root.join("postgres.log")).unwrap_or_default()
            )
        })?;
        Ok(Some(cluster))
    }

    /// `postgres://postgres:<password>@127.0.0.1:<port>/<db>` with `query`
    /// (e.g. `sslmode=verify-full&sslrootcert=…`) appended when not empty.
    pub fn url(&self, db: &str, query: &str) -> String {
        let q = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{db}{q}",
            self.password, self.port
        )
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = as_postgres(&Path::new(PG_BIN).join("pg_ctl"))
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // the TempDir deletes the directory after this
    }
}

fn as_postgres(program: &Path) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(program);
    c
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let out = command.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        anyhow::bail!(
            "{command:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
