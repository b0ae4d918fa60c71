//! SQS visibility: unsettled messages, redrive, lease heartbeats and parallel pollers,
//! against the SQS server of the fixture (see `courier_contract_tests::sqs_url`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::{App, Context, RouteOptions};
use courier_contract_tests::sqs_url;
use courier_core::{conformance::unique_name, Broker, ConsumerOptions, Message, Source};
use courier_sqs::SqsBroker;

async fn url(options: &str) -> String {
    let base = sqs_url().await;
    if options.is_empty() {
        base
    } else {
        format!("{base}&{options}")
    }
}

#[tokio::test]
async fn a_consumer_that_stops_unsettled_hands_its_messages_on_after_the_visibility_timeout() {
    let broker = SqsBroker::connect(&url("").await).await.unwrap();
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
    let broker = SqsBroker::connect(&url("redrive_max_receives=2").await).await.unwrap();
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

#[tokio::test]
async fn a_worker_keeps_a_long_handlers_message_invisible_by_extending_its_visibility() {
    let broker = Arc::new(SqsBroker::connect(&url("").await).await.unwrap());
    let source = Source::queue(&unique_name("sqs-heartbeat")).unwrap();
    broker.declare(&source).await.unwrap();
    broker.send(&source.destination(), Message::new("slow").with_id("slow-1")).await.unwrap();
    // A 2 s visibility timeout and a 5 s handler: without heartbeats SQS would hand the
    // message to the second handler slot twice over while the first still runs.
    let attempts: Arc<std::sync::Mutex<Vec<u32>>> = Arc::default();
    let handler = {
        let attempts = attempts.clone();
        move |ctx: Context| {
            let attempts = attempts.clone();
            async move {
                attempts.lock().unwrap().push(ctx.attempt);
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    let options = RouteOptions::default().lease(Duration::from_secs(2)).concurrency(2);
    let report = App::new(broker.clone())
        .route_with(source.clone(), handler, options)
        .run_until(tokio::time::sleep(Duration::from_secs(8)))
        .await
        .unwrap();
    assert_eq!(*attempts.lock().unwrap(), vec![1], "handled once, never redelivered meanwhile: {report:?}");
    // Settled: nothing comes back after the lease.
    let consumer = broker.consumer(&source, ConsumerOptions::default()).await.unwrap();
    assert!(consumer.receive(1, Duration::from_secs(3)).await.unwrap().is_empty(), "the message was deleted");
}

#[tokio::test]
async fn several_pollers_receive_more_than_ten_in_one_call() {
    let broker = SqsBroker::connect(&url("pollers=3").await).await.unwrap();
    let source = Source::queue(&unique_name("sqs-pollers")).unwrap();
    broker.declare(&source).await.unwrap();
    let batch: Vec<Message> = (0..30).map(|i| Message::new(format!("m{i}")).with_id(format!("m{i}"))).collect();
    broker.send_batch(&source.destination(), batch).await.unwrap();
    let consumer = broker.consumer(&source, ConsumerOptions::default()).await.unwrap();
    let before = broker.api_requests();
    // A standard queue delivers at least once: parallel calls may both get one message
    // (moto's server does so now and then), so count distinct ids, not deliveries.
    let (mut got, mut ids, mut largest) = (Vec::new(), BTreeSet::new(), 0);
    let deadline = Instant::now() + Duration::from_secs(15);
    while ids.len() < 30 && Instant::now() < deadline {
        let some = consumer.receive(30, Duration::from_secs(1)).await.unwrap();
        largest = largest.max(some.len());
        ids.extend(some.iter().map(|d| d.id.to_string()));
        got.extend(some);
    }
    let receives = broker.api_requests() - before;
    let expected: BTreeSet<String> = (0..30).map(|i| format!("m{i}")).collect();
    assert_eq!(ids, expected, "every message ({} deliveries)", got.len());
    // One ReceiveMessage returns at most 10; more in one receive took parallel calls.
    assert!(largest > 10, "largest receive {largest} ({receives} ReceiveMessage calls)");
    let first = consumer.receive(30, Duration::ZERO).await.unwrap();
    assert!(first.is_empty(), "all were leased");
    for d in got {
        d.ack().await.unwrap();
    }
}
