//! Fault test: a retry whose publish meets a Kafka outage. The handler asks for a retry of
//! one message just as the durable broker (see `faults_kafka.rs`) stops; the worker keeps
//! trying the retry's publish with backoff until the broker is back, then the message
//! comes again as attempt 2, and everything sent after the recovery flows: nothing is
//! lost, nothing stalls, no fetch loop ends.
//!
//! It stops the durable broker, so it shares nextest's `durable-kafka` group (one test at
//! a time) with `faults_kafka.rs`, in `scripts/test`'s fault step.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier::{App, Incoming, Outcome, RouteOptions};
use courier_contract_tests::{endpoint, kafka_durable_url, shell};
use courier_core::conformance::unique_name;
use courier_core::{DynBroker, Message, Source};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_published_during_an_outage_arrives_after_recovery() {
    let filter = std::env::var("COURIER_LOG").unwrap_or_else(|_| "error".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init().ok();
    let brokers_script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/brokers");
    let start = endpoint("COURIER_TEST_KAFKA_DURABLE_START", &format!("{brokers_script} up"));
    let stop = endpoint("COURIER_TEST_KAFKA_DURABLE_STOP", &format!("{brokers_script} stop kafka-durable"));
    shell(&start).await;
    let broker: DynBroker = Arc::new(courier_kafka::KafkaBroker::connect(&kafka_durable_url()).await.unwrap());
    let source = Source::queue(&unique_name("fault-retry")).unwrap();
    broker.declare(&source).await.expect("the durable Kafka broker is up (scripts/brokers up)");
    let to = source.destination();
    broker.send(&to, Message::new("retry-me").with_id("retry-me").with_ordering_key("r")).await.unwrap();

    // (payload, attempt) of every call.
    let calls = Arc::new(Mutex::new(Vec::<(String, u32)>::new()));
    let record = calls.clone();
    let stop_once = Arc::new(tokio::sync::OnceCell::new());
    let handler = move |incoming: Incoming| {
        let (record, stop, stop_once) = (record.clone(), stop.clone(), stop_once.clone());
        async move {
            let text = String::from_utf8_lossy(&incoming.message.payload).into_owned();
            record.lock().unwrap().push((text.clone(), incoming.attempt));
            if text == "retry-me" && incoming.attempt == 1 {
                // The broker goes away before the retry's copy is published.
                stop_once.get_or_init(|| async { shell(&stop).await }).await;
                return Outcome::retry("try again later");
            }
            Outcome::Ack
        }
    };
    let outage = tokio::spawn({
        let start = start.clone();
        let calls = calls.clone();
        async move {
            while calls.lock().unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_secs(5)).await; // the outage
            shell(&start).await;
            println!("broker started again");
        }
    });
    let watch = calls.clone();
    let sender = broker.clone();
    let run = App::new(broker.clone())
        .route_with(source.clone(), handler, RouteOptions::default().concurrency(4))
        .run_until(async move {
            let started = tokio::time::Instant::now();
            let retried = |calls: &[(String, u32)]| calls.iter().any(|(t, a)| t == "retry-me" && *a >= 2);
            while !retried(&watch.lock().unwrap()) {
                assert!(started.elapsed() < Duration::from_secs(120), "the retried message did not come back");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // After the recovery, new messages flow.
            for i in 0..20 {
                let m = Message::new(format!("after {i}")).with_ordering_key(format!("k{}", i % 4));
                sender.send(&to, m).await.expect("send after the recovery");
            }
            let after = |calls: &[(String, u32)]| calls.iter().filter(|(t, _)| t.starts_with("after ")).count();
            while after(&watch.lock().unwrap()) < 20 {
                assert!(started.elapsed() < Duration::from_secs(180), "messages sent after the recovery stalled");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    let report = run.await.expect("the worker ran to the end");
    outage.await.unwrap();
    println!("{report:?}");
    let calls = calls.lock().unwrap();
    let retry_me: Vec<u32> = calls.iter().filter(|(t, _)| t == "retry-me").map(|(_, a)| *a).collect();
    // Once, then again after the retry went through the outage (a rebalance on the way
    // back may hand the first attempt out once more: at least once, never lost).
    assert_eq!(retry_me.first(), Some(&1), "{retry_me:?}");
    assert!(retry_me.iter().any(|a| *a >= 2), "the retry came back: {retry_me:?}");
    let after: HashSet<&str> = calls.iter().filter(|(t, _)| t.starts_with("after ")).map(|(t, _)| t.as_str()).collect();
    assert_eq!(after.len(), 20);
    assert_eq!(report.loops_ended_early, 0, "{report:?}");
    assert!(report.retried >= 1, "{report:?}");
}
