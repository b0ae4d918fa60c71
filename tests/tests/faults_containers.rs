//! Fault tests that only containers can make, each on brokers of its own, started through
//! testcontainers (a Docker engine is needed: `scripts/test` starts one and builds the
//! images with `scripts/images`):
//! - a broker killed with SIGKILL (no clean shutdown) in the middle of a 10,000-message
//!   worker run, then started again on the same volume;
//! - a broker frozen for 30 s (`docker pause`): its connections stay open and nothing
//!   answers on them, as behind a network cut or a half-open connection.
//!
//! Each asserts that every message whose send was confirmed is processed by the same
//! worker, which recovers by itself, and prints how many were handled twice.

use std::time::Duration;

use courier_contract_tests::containers::{durable_kafka, BrokerContainer, Kind};
use courier_contract_tests::faults::stream_through_fault;

/// Messages through the Kafka broker that is killed.
const KAFKA_KILL_MESSAGES: usize = 10_000;

/// Long enough for a fault of 30 s and the reconnects after it.
const STALL: Duration = Duration::from_secs(90);

fn log() {
    let filter = std::env::var("COURIER_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init().ok();
}

/// Runs `n` messages through a worker on a new `kind` broker while it is frozen for 30 s.
async fn silent_for_30_s(kind: Kind, n: usize) {
    log();
    let broker = std::sync::Arc::new(BrokerContainer::start(kind).await);
    let frozen = broker.clone();
    stream_through_fault(&broker.url, n, STALL, move || async move {
        frozen.pause().await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        frozen.unpause().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_killed_with_sigkill_mid_stream_loses_nothing() {
    log();
    let broker = std::sync::Arc::new(BrokerContainer::start(Kind::RabbitMq).await);
    let killed = broker.clone();
    stream_through_fault(&broker.url, 10_000, STALL, move || async move {
        killed.kill().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        killed.restart().await;
    })
    .await;
}

/// Tansu keeps no state of its own: its log is in the S3 of a moto container beside it,
/// which lives on while the broker is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_killed_with_sigkill_mid_stream_loses_nothing() {
    log();
    let (broker, _storage) = durable_kafka().await;
    let broker = std::sync::Arc::new(broker);
    let killed = broker.clone();
    stream_through_fault(&broker.url, KAFKA_KILL_MESSAGES, STALL, move || async move {
        killed.kill().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        killed.restart().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_silent_for_30_s_mid_stream_loses_nothing() {
    silent_for_30_s(Kind::RabbitMq, 3_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_silent_for_30_s_mid_stream_loses_nothing() {
    silent_for_30_s(Kind::Kafka, 3_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_silent_for_30_s_mid_stream_loses_nothing() {
    // moto handles about 200 messages a second.
    silent_for_30_s(Kind::Sqs, 400).await;
}
