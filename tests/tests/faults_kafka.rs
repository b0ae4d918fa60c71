//! Fault test: the Kafka broker goes away and comes back while a producer handle and a
//! consumer stay open. Neither is reopened: sends made during the outage fail as
//! retryable (or succeed once it is back), receives fail nothing (they hand out what was
//! read ahead, then wait), and afterwards the same handles send and receive again, and
//! every message sent before the outage arrives.
//!
//! It runs against a broker that keeps its data across a restart, as a production one
//! does: `scripts/brokers up` starts a second Tansu at 127.0.0.1:9093 that stores its log
//! in moto's S3 (`COURIER_TEST_KAFKA_DURABLE` points it elsewhere). Against Tansu's memory
//! storage a restart forgets every topic, and the topics come back with new ids; the
//! bundled librdkafka (2.12.1) can then crash with SIGSEGV in its metadata cache, which
//! the crate docs of courier-kafka describe.
//!
//! It stops that broker, so `scripts/test` runs the `faults_*` binaries in a step of their
//! own. `COURIER_TEST_KAFKA_DURABLE_STOP` and `COURIER_TEST_KAFKA_DURABLE_START` replace
//! the commands that stop and start it (by default `scripts/brokers stop kafka-durable`,
//! then `scripts/brokers up`).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use courier_contract_tests::{endpoint, kafka_durable_url, shell};
use courier_core::conformance::unique_name;
use courier_core::{Broker, Destination, Message, Source};
use courier_kafka::KafkaBroker;

/// Sent before the outage and not yet read when the broker goes away.
const BEFORE: usize = 100;
/// Sent once the broker is back.
const AFTER: usize = 200;

fn numbered(prefix: &str, n: usize) -> Vec<Message> {
    (0..n).map(|i| Message::new(format!("{prefix} {i}")).with_id(format!("{prefix}-{i}"))).collect()
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
    let filter = std::env::var("COURIER_LOG").unwrap_or_else(|_| "error".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init().ok();
    let brokers_script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/brokers");
    let start = endpoint("COURIER_TEST_KAFKA_DURABLE_START", &format!("{brokers_script} up"));
    // Up already under scripts/test; this starts it again after an earlier run stopped here.
    shell(&start).await;
    let url = kafka_durable_url();
    let broker = KafkaBroker::connect(&url).await.unwrap();
    let source = Source::queue(&unique_name("fault-kafka")).unwrap();
    broker.declare(&source).await.expect("the durable Kafka broker is up (scripts/brokers up)");
    // The producer works before the outage (on a topic of its own) ...
    let warm_up = Destination::queue(&unique_name("fault-kafka-warm")).unwrap();
    broker.send(&warm_up, Message::new("before")).await.expect("send before the outage");
    // ... the consumer has joined its group and found the queue empty ...
    let consumer = broker.consumer(&source, Default::default()).await.unwrap();
    assert!(consumer.receive(10, Duration::from_secs(5)).await.unwrap().is_empty());
    // ... and messages wait in the queue, unread, when the broker goes away.
    broker.send_batch(&source.destination(), numbered("before", BEFORE)).await.expect("send before the outage");

    shell(&endpoint("COURIER_TEST_KAFKA_DURABLE_STOP", &format!("{brokers_script} stop kafka-durable"))).await;
    // Else the rest would pass without an outage to recover from.
    let authority = url.trim_start_matches("kafka://").split(['?', '/', ',']).next().unwrap_or_default();
    let address = authority.rsplit('@').next().unwrap_or_default().to_owned();
    assert!(
        tokio::net::TcpStream::connect(&address).await.is_err(),
        "{address} still accepts connections after the stop command"
    );
    println!("broker stopped");
    let outage = Instant::now();
    // While it is down: a receive waits quietly, a send fails as retryable or waits it out.
    let during = {
        let (broker, warm_up) = (broker.clone(), warm_up.clone());
        tokio::spawn(async move { broker.send(&warm_up, Message::new("during")).await })
    };
    // What the consumer read ahead before the outage may still be handed out; nothing fails.
    let mut seen = HashSet::new();
    let during_outage = consumer.receive(100, Duration::from_secs(3)).await.expect("a receive during the outage");
    for d in during_outage {
        seen.insert(d.id.to_string());
        d.ack().await.expect("an ack during the outage is stored, to be committed later");
    }
    println!("{} messages read ahead before the outage were handed out during it", seen.len());
    shell(&start).await;
    println!("broker started again after {:?}", outage.elapsed());
    match during.await.unwrap() {
        Ok(_) => println!("the send made during the outage went through once the broker was back"),
        Err(e) => assert!(e.is_retryable(), "a send during the outage fails as retryable: {e}"),
    }

    let send_failures = send_until_accepted(&broker, &source.destination(), numbered("after", AFTER)).await;
    let expected: HashSet<String> =
        numbered("before", BEFORE).into_iter().chain(numbered("after", AFTER)).map(|m| m.id.to_string()).collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !seen.is_superset(&expected) {
        assert!(
            Instant::now() < deadline,
            "after the restart the consumer got {} of the {BEFORE} messages sent before the outage and {} of the {AFTER} sent after, within 90 s",
            seen.iter().filter(|id: &&String| id.starts_with("before")).count(),
            seen.iter().filter(|id: &&String| id.starts_with("after")).count(),
        );
        for d in consumer.receive(100, Duration::from_secs(1)).await.expect("receive after the restart") {
            seen.insert(d.id.to_string());
            d.ack().await.expect("ack after the restart");
        }
    }
    println!(
        "recovered: all {BEFORE} messages sent before the outage and {AFTER} sent after it received by the same handles {:?} after the outage began; {send_failures} failed batch sends retried",
        outage.elapsed()
    );
    consumer.close().await.unwrap();
}
