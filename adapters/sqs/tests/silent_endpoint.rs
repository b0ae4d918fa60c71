//! An SQS endpoint that accepts connections and never answers, as a half-open connection
//! or a hung server looks from the client: every call fails, retryably, within its
//! timeout (`call_timeout_secs`), and none is held forever. No SQS server is needed.

use std::time::{Duration, Instant};

use courier_core::{Broker, ConsumerOptions, Destination, Message, Source};
use courier_sqs::SqsBroker;
use tokio::net::TcpListener;

mod support;

/// A TCP server that accepts every connection and keeps it open without a byte in reply.
async fn silent_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((connection, _)) = listener.accept().await {
            held.push(connection);
        }
    });
    format!("http://{address}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_never_answers_fails_each_call_retryably_within_its_timeout() {
    support::test_credentials_unless_set();
    let endpoint = silent_server().await;
    let broker = SqsBroker::connect(&format!("sqs://us-east-1?endpoint={endpoint}&call_timeout_secs=2")).await.unwrap();
    // The SDK makes up to 3 attempts of 2 s each, with a short backoff between them.
    let bound = Duration::from_secs(20);

    let started = Instant::now();
    let sent = tokio::time::timeout(bound, broker.send(&Destination::queue("orders").unwrap(), Message::new("x")))
        .await
        .expect("a send to a silent endpoint was held for 20 s; a call must time out");
    let err = sent.expect_err("a silent endpoint accepted a send");
    assert!(err.is_retryable(), "a call that timed out is worth another try: {err}");
    println!("send failed after {:?}: {err}", started.elapsed());

    let started = Instant::now();
    let opened =
        tokio::time::timeout(bound, broker.consumer(&Source::queue("orders").unwrap(), ConsumerOptions::default()))
            .await
            .expect("opening a consumer on a silent endpoint was held for 20 s; a call must time out");
    let err = opened.err().expect("a silent endpoint opened a consumer");
    assert!(err.is_retryable(), "a call that timed out is worth another try: {err}");
    println!("opening a consumer failed after {:?}: {err}", started.elapsed());
}

#[test]
fn a_call_timeout_outside_its_range_is_refused_naming_the_option() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for bad in ["call_timeout_secs=1", "call_timeout_secs=301", "call_timeout_secs=soon"] {
        let err = runtime
            .block_on(SqsBroker::connect(&format!("sqs://us-east-1?endpoint=http://127.0.0.1:1&{bad}")))
            .expect_err(bad)
            .to_string();
        assert!(err.contains("call_timeout_secs"), "{bad}: {err}");
    }
}
