//! The fault proxy against a real TCP echo server and the real PostgreSQL.

use std::time::Duration;

use custody_core::InboxStore;
use custody_testkit::FaultProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn echo_server() -> anyhow::Result<std::net::SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// One round trip; Err when the connection is broken.
async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg).await?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).await?;
    Ok(got)
}

#[tokio::test]
async fn forwards_cuts_and_restores_tcp() -> anyhow::Result<()> {
    let proxy = FaultProxy::start(echo_server().await?).await?;
    let mut s = TcpStream::connect(proxy.addr()).await?;
    assert_eq!(round_trip(&mut s, b"hello").await?, b"hello");

    proxy.cut();
    assert!(proxy.is_cut());
    // the live connection is dropped: a read ends (EOF or reset), never echoes
    assert!(
        round_trip(&mut s, b"after cut").await.is_err(),
        "a cut connection still forwarded"
    );
    // new connections are closed at once
    let mut s2 = TcpStream::connect(proxy.addr()).await?;
    assert!(round_trip(&mut s2, b"new").await.is_err());

    proxy.restore();
    let mut s3 = TcpStream::connect(proxy.addr()).await?;
    assert_eq!(round_trip(&mut s3, b"again").await?, b"again");
    Ok(())
}

#[tokio::test]
async fn slow_delays_every_chunk() -> anyhow::Result<()> {
    let proxy = FaultProxy::start(echo_server().await?).await?;
    let mut s = TcpStream::connect(proxy.addr()).await?;
    proxy.slow(Duration::from_millis(150));
    let t = std::time::Instant::now();
    assert_eq!(round_trip(&mut s, b"x").await?, b"x");
    // one chunk each way: at least twice the delay (a lower bound, never flaky)
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    proxy.restore();
    assert_eq!(round_trip(&mut s, b"y").await?, b"y");
    Ok(())
}

#[tokio::test]
async fn postgres_through_the_proxy_fails_retryably_when_cut() -> anyhow::Result<()> {
    let Some(db) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let (proxy, through) = FaultProxy::for_url(&db.url).await?;
    assert!(through.contains(&proxy.addr().to_string()), "{through}");
    let pool = custody_postgres::connect(&through).await?;
    custody_postgres::migrate(&pool).await?;
    let inbox = custody_postgres::PgInbox::new(pool.clone());
    drop(inbox.begin().await?);

    proxy.cut();
    let err = match inbox.begin().await {
        Ok(_) => anyhow::bail!("begin succeeded through a cut proxy"),
        Err(e) => e,
    };
    assert!(err.retryable(), "a cut network must be retryable: {err}");

    proxy.restore();
    // the pool reconnects on its own
    let mut ok = false;
    for _ in 0..50 {
        if inbox.begin().await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "no connection after restore");
    pool.close().await;
    Ok(())
}
