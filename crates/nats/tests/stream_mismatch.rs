//! A consumer whose stream does not exist, or whose stream does not capture
//! the subjects it asks for, is told so at once instead of waiting forever
//! (the relay and the consumer started with different `--stream` or
//! `--subject-prefix`). Against the machine's NATS server, unique names.

mod common;

use common::TestStream;
use custody_nats::{NatsSubscriber, StreamSpec};

#[tokio::test]
async fn a_stream_that_does_not_exist_is_named_with_what_to_do() -> anyhow::Result<()> {
    let Some(url) = custody_testkit::nats().await? else {
        return Ok(());
    };
    let client = custody_nats::connect(&url).await?;
    let name = custody_testkit::unique_name("CUSTODY_MISSING");
    let spec = StreamSpec::new(&name, "custody");
    let err = NatsSubscriber::new(client.clone(), &spec, "billing", &["orders".to_owned()])
        .await
        .expect_err("the stream does not exist");
    let text = error_text(&err);
    eprintln!("{text}");
    assert!(
        text.contains(&format!("stream {name} does not exist on the NATS server")),
        "{text}"
    );
    let port = client.server_info().port.to_string();
    assert!(text.contains(&port), "the server is named: {text}");
    assert!(
        text.contains("--stream") && text.contains("--subject-prefix"),
        "{text}"
    );
    assert!(text.contains("ensure_stream"), "{text}");
    assert!(!err.retryable(), "a wrong name does not heal: {err}");
    // asking did not create it
    let js = async_nats::jetstream::new(client);
    assert!(js.get_stream(&name).await.is_err(), "no stream was created");
    Ok(())
}

#[tokio::test]
async fn subjects_the_stream_does_not_capture_are_named_with_the_streams() -> anyhow::Result<()> {
    let Some(s) = TestStream::on_shared_server().await? else {
        return Ok(());
    };
    // the relay's stream captures `<its prefix>.>`; this consumer uses another prefix
    let other = StreamSpec::new(&s.spec.name, "acme");
    let err = NatsSubscriber::new(s.client.clone(), &other, "billing", &["orders".to_owned()])
        .await
        .expect_err("acme.orders is not captured by the stream");
    let text = error_text(&err);
    eprintln!("{text}");
    let captured = format!("{}.>", s.spec.subject_prefix);
    assert!(
        text.contains(&format!(
            "stream {} captures the subjects [{captured:?}], which do not cover [\"acme.orders\"]",
            s.spec.name
        )),
        "{text}"
    );
    assert!(text.contains("--subject-prefix"), "{text}");
    assert!(!err.retryable(), "{err}");

    // every topic (no filter) under a prefix the stream does not capture
    let err = NatsSubscriber::new(s.client.clone(), &other, "all", &[])
        .await
        .expect_err("acme.> is not captured");
    assert!(error_text(&err).contains("[\"acme.>\"]"), "{err}");

    // the same stream with the relay's prefix works, also for a dotted topic
    NatsSubscriber::new(s.client.clone(), &s.spec, "billing", &["orders".to_owned()]).await?;
    NatsSubscriber::new(s.client.clone(), &s.spec, "eu", &["orders.eu".to_owned()]).await?;
    NatsSubscriber::new(s.client.clone(), &s.spec, "all", &[]).await?;
    Ok(())
}

/// The error and its sources, as a user sees them.
fn error_text(e: &custody_core::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let t = s.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        source = s.source();
    }
    text
}
