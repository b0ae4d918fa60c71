//! Unsettled messages and redrive, against the SQS-API server `scripts/brokers up` starts
//! (moto at 127.0.0.1:4566, or `$COURIER_TEST_SQS`).

use std::time::{Duration, Instant};

use courier_core::{conformance::unique_name, Broker, ConsumerOptions, Message, Source};
use courier_sqs::SqsBroker;

fn url(options: &str) -> String {
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
        std::env::set_var("AWS_ACCESS_KEY_ID", "courier-test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "courier-test");
    }
    let base =
        std::env::var("COURIER_TEST_SQS").unwrap_or_else(|_| "sqs://us-east-1?endpoint=http://127.0.0.1:4566".into());
    if options.is_empty() {
        base
    } else {
        format!("{base}&{options}")
    }
}

#[tokio::test]
async fn a_consumer_that_stops_unsettled_hands_its_messages_on_after_the_visibility_timeout() {
    let broker = SqsBroker::connect(&url("")).await.unwrap();
    let source = Source::queue(&unique_name("sqs-crash")).unwrap();
    broker.declare(&source).await.unwrap();
    for i in 0..3 {
        broker.send(&source.destination(), Message::new(format!("job {i}"))).await.unwrap();
    }
    let lease = Duration::from_secs(1);
    let crashed = broker.consumer(&source, ConsumerOptions::default().lease(lease)).await.unwrap();
    let mut held = Vec::new();
    while held.len() < 3 {
        held.extend(crashed.receive(3, Duration::from_secs(2)).await.unwrap());
    }
    let taken = Instant::now();
    drop(held); // the process "dies": nothing is settled
    drop(crashed);
    let survivor = broker.consumer(&source, ConsumerOptions::default()).await.unwrap();
    let mut processed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while processed.len() < 3 && Instant::now() < deadline {
        for d in survivor.receive(3, Duration::from_secs(2)).await.unwrap() {
            assert_eq!(d.attempt(), 2, "the second receive of {}", d.id);
            processed.push(d.id.clone());
            d.ack().await.unwrap();
        }
    }
    assert_eq!(processed.len(), 3, "every unsettled message came back");
    assert!(taken.elapsed() >= lease, "not before the visibility timeout");
}

#[tokio::test]
async fn with_a_redrive_policy_a_poison_message_lands_in_the_dead_letter_queue() {
    let broker = SqsBroker::connect(&url("redrive_max_receives=2")).await.unwrap();
    let source = Source::queue(&unique_name("sqs-poison")).unwrap();
    broker.declare(&source).await.unwrap();
    broker.send(&source.destination(), Message::new("poison").with_id("p-1")).await.unwrap();
    // A consumer that crashes on it every time: receive, never settle.
    let lease = Duration::from_secs(1);
    for receive in 1..=2 {
        let consumer = broker.consumer(&source, ConsumerOptions::default().lease(lease)).await.unwrap();
        let d = consumer.receive_one(Duration::from_secs(5)).await.unwrap().expect("delivered");
        assert_eq!((d.id.as_str(), d.attempt()), ("p-1", receive));
        tokio::time::sleep(lease + Duration::from_millis(200)).await;
    }
    // The third receive finds SQS has moved it to <queue>_dlq (Courier's <queue>.dlq).
    let consumer = broker.consumer(&source, ConsumerOptions::default()).await.unwrap();
    assert!(consumer.receive(1, Duration::from_secs(2)).await.unwrap().is_empty(), "redriven away");
    let dlq = Source::Queue(source.default_dead_letter().name().clone());
    let dead = broker.consumer(&dlq, ConsumerOptions::default()).await.unwrap();
    let d = dead.receive_one(Duration::from_secs(5)).await.unwrap().expect("in the dead-letter queue");
    assert_eq!(d.id.as_str(), "p-1");
    d.ack().await.unwrap();
}
