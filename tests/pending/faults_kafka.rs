// PENDING (not built): move back to tests/tests/ once it passes. Against Tansu 0.6 with
// memory storage, after the broker restarts the test process either died with SIGSEGV
// (inside librdkafka, not yet located) or the consumer received nothing for over 60 s
// (under gdb). See issue 5's note of 2026-11-24.
//! Fault test: the Kafka broker goes away and comes back while a producer handle and a
//! consumer stay open. Neither is reopened: sends made during the outage fail as
//! retryable (or succeed once it is back), receives wait quietly, and afterwards the same
//! handles send and receive again.
//!
//! Tansu's memory storage forgets everything when it stops, so this test checks that the
//! clients recover (reconnect, rejoin the group, pick up recreated topics), not that the
//! broker kept data; the consumer reads nothing before the outage, so no position from
//! the broker's earlier life applies to the new one.
//!
//! It stops the broker for every other test, so `scripts/test` runs the `faults_*`
//! binaries in a step of their own. `COURIER_TEST_KAFKA_STOP` and `COURIER_TEST_KAFKA_START`
//! replace the commands that stop and start it (by default: kill the local Tansu, then
//! `scripts/brokers up`).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use courier_contract_tests::{endpoint, kafka_url};
use courier_core::conformance::unique_name;
use courier_core::{Broker, Destination, Message, Source};
use courier_kafka::KafkaBroker;

const N: usize = 200;

async fn shell(command: &str) {
    let status = tokio::process::Command::new("sh").arg("-c").arg(command).status().await.expect("run sh");
    assert!(status.success(), "`{command}` failed: {status}");
}

/// Sends `messages`, sending again while the failure is retryable, for up to a minute.
async fn send_until_accepted(broker: &KafkaBroker, destination: &Destination, messages: Vec<Message>) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut failures = 0;
    loop {
        match broker.send_batch(destination, messages.clone()).await {
            Ok(_) => return failures,
            Err(e) => {
                assert!(e.is_retryable(), "a broker outage is a retryable fault: {e}");
                assert!(Instant::now() < deadline, "sends still failing a minute after the broker came back: {e}");
                failures += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_recover_by_themselves_after_the_broker_restarts() {
    let filter = std::env::var("COURIER_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init().ok();
    let url = kafka_url().await;
    let broker = KafkaBroker::connect(&url).await.unwrap();
    let source = Source::queue(&unique_name("fault-kafka")).unwrap();
    broker.declare(&source).await.expect("Kafka is up (scripts/brokers up)");
    // The producer works before the outage (on a topic of its own) ...
    let warm_up = Destination::queue(&unique_name("fault-kafka-warm")).unwrap();
    broker.send(&warm_up, Message::new("before")).await.expect("send before the outage");
    // ... and the consumer has joined its group and found the queue empty.
    let consumer = broker.consumer(&source, Default::default()).await.unwrap();
    assert!(consumer.receive(10, Duration::from_secs(5)).await.unwrap().is_empty());

    let brokers_script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/brokers");
    shell(&endpoint("COURIER_TEST_KAFKA_STOP", "pkill -x tansu; while pgrep -x tansu >/dev/null; do sleep 0.2; done"))
        .await;
    println!("broker stopped");
    let outage = Instant::now();
    // While it is down: a receive waits quietly, a send fails as retryable or waits it out.
    let during = {
        let (broker, warm_up) = (broker.clone(), warm_up.clone());
        tokio::spawn(async move { broker.send(&warm_up, Message::new("during")).await })
    };
    let quiet = consumer.receive(10, Duration::from_secs(3)).await;
    assert!(matches!(&quiet, Ok(batch) if batch.is_empty()), "a receive during the outage: {quiet:?}");
    shell(&endpoint("COURIER_TEST_KAFKA_START", &format!("{brokers_script} up"))).await;
    println!("broker started again after {:?}", outage.elapsed());
    match during.await.unwrap() {
        Ok(_) => println!("the send made during the outage went through once the broker was back"),
        Err(e) => assert!(e.is_retryable(), "a send during the outage fails as retryable: {e}"),
    }

    // The restarted broker has forgotten its topics; recreate the queue's (a new handle,
    // as an operator's tooling would), then the old handles carry on.
    let admin = KafkaBroker::connect(&url).await.unwrap();
    admin.declare(&source).await.expect("declare the queue again");
    let retry_topic = Destination::queue(&format!("{}.retry", source.destination().name())).unwrap();
    admin.send(&retry_topic, Message::new("recreates the retry topic")).await.unwrap();
    let messages: Vec<Message> = (0..N).map(|i| Message::new(format!("{i}")).with_id(format!("m{i}"))).collect();
    let send_failures = send_until_accepted(&broker, &source.destination(), messages).await;

    let all: HashSet<String> = (0..N).map(|i| format!("m{i}")).collect();
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !seen.is_superset(&all) {
        assert!(
            Instant::now() < deadline,
            "the consumer got {} of {N} messages sent after the restart within 90 s",
            seen.intersection(&all).count()
        );
        for d in consumer.receive(100, Duration::from_secs(1)).await.expect("receive after the restart") {
            seen.insert(d.id.to_string());
            // The retry topic's marker message is not ours to count; ack everything.
            d.ack().await.expect("ack after the restart");
        }
    }
    println!(
        "recovered: {N} sent and received by the same handles {:?} after the outage began; {send_failures} failed batch sends retried",
        outage.elapsed()
    );
    consumer.close().await.unwrap();
}
