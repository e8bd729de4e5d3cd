//! A small TCP fault proxy: put it between a client and a real server
//! (relay ↔ broker, consumer ↔ database) and cut, slow down or restore the
//! network between them while the test runs.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Bytes read per chunk before forwarding.
const CHUNK: usize = 16 * 1024;

/// A TCP proxy on `127.0.0.1:<free port>` that forwards both directions to
/// one upstream address, with faults the test turns on and off:
///
/// - [`FaultProxy::cut`]: every live connection is dropped at once and new
///   connections are accepted and closed immediately (the client sees a
///   reset / EOF, as after a network partition or a dead peer);
/// - [`FaultProxy::slow`]: every forwarded chunk is delayed;
/// - [`FaultProxy::restore`]: back to normal (connections dropped by a cut
///   stay dropped; clients reconnect).
///
/// Everything stops when the value is dropped.
///
/// ```no_run
/// # async fn t() -> anyhow::Result<()> {
/// let proxy = custody_testkit::FaultProxy::start("127.0.0.1:5432".parse()?).await?;
/// let url = format!("postgres://postgres@{}/test", proxy.addr());
/// // ... connect through `url`, then:
/// proxy.cut();      // queries fail with a retryable error
/// proxy.restore();  // a new connection works again
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    cut: watch::Sender<bool>,
    delay: Arc<Mutex<Duration>>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Listen on a free port of 127.0.0.1 and forward to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, cut_rx) = watch::channel(false);
        let delay = Arc::new(Mutex::new(Duration::ZERO));
        let accept = tokio::spawn(accept_loop(listener, upstream, cut_rx, Arc::clone(&delay)));
        Ok(FaultProxy {
            addr,
            upstream,
            cut,
            delay,
            accept,
        })
    }

    /// Start a proxy in front of the server of `url` (`postgres://u@host:port/db`,
    /// `nats://host:port`, ...) and return it with `url` rewritten to go through it.
    pub async fn for_url(url: &str) -> std::io::Result<(FaultProxy, String)> {
        let bad = |what: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{what} in {url:?}; expected scheme://[user@]host:port[/...]"),
            )
        };
        let (scheme, after) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let auth_end = after.find(['/', '?']).unwrap_or(after.len());
        let (auth, rest) = after.split_at(auth_end);
        let (user, hostport) = match auth.rsplit_once('@') {
            Some((u, h)) => (format!("{u}@"), h),
            None => (String::new(), auth),
        };
        if hostport.is_empty() {
            return Err(bad("no host"));
        }
        let hostport = if hostport.contains(':') {
            hostport.to_owned()
        } else {
            let port = match scheme {
                "postgres" | "postgresql" => 5432,
                "nats" => 4222,
                _ => return Err(bad("no port")),
            };
            format!("{hostport}:{port}")
        };
        let upstream = tokio::net::lookup_host(&hostport)
            .await?
            .next()
            .ok_or_else(|| bad("cannot resolve host"))?;
        let proxy = FaultProxy::start(upstream).await?;
        let through = format!("{scheme}://{user}{}{rest}", proxy.addr());
        Ok((proxy, through))
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Drop every live connection and refuse new ones until [`FaultProxy::restore`].
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Delay every forwarded chunk by `d` (in both directions);
    /// `Duration::ZERO` turns it off.
    pub fn slow(&self, d: Duration) {
        *self.delay.lock().unwrap_or_else(|p| p.into_inner()) = d;
    }

    /// Accept and forward again, without delay.
    pub fn restore(&self) {
        self.slow(Duration::ZERO);
        self.cut.send_replace(false);
    }

    /// Whether the proxy is cut.
    pub fn is_cut(&self) -> bool {
        *self.cut.borrow()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        // connection tasks watch `cut`; dropping the sender ends them
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    cut: watch::Receiver<bool>,
    delay: Arc<Mutex<Duration>>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // e.g. too many open files: back off instead of spinning
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if *cut.borrow() {
            drop(client); // refused: the client sees the connection closed at once
            continue;
        }
        let cut = cut.clone();
        let delay = Arc::clone(&delay);
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return; // upstream down: the client sees its connection closed
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            connection(client, server, cut, delay).await;
        });
    }
}

/// Forward both directions until either side closes or the proxy is cut.
async fn connection(
    client: TcpStream,
    server: TcpStream,
    mut cut: watch::Receiver<bool>,
    delay: Arc<Mutex<Duration>>,
) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, Arc::clone(&delay), cut.clone());
    let down = pump(sr, cw, delay, cut.clone());
    let cut_fired = async {
        loop {
            if *cut.borrow_and_update() {
                return;
            }
            if cut.changed().await.is_err() {
                return; // proxy dropped
            }
        }
    };
    // the first of: a direction ends, or a cut. Dropping the halves closes
    // both sockets (the client sees a reset or EOF mid-conversation).
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = cut_fired => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Arc<Mutex<Duration>>,
    cut: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let d = *delay.lock().unwrap_or_else(|p| p.into_inner());
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
        // a chunk read just before a cut must not get through
        if *cut.borrow() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
