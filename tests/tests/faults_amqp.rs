//! Fault test: RabbitMQ's app restarts (`rabbitmqctl stop_app`, then `start_app`) while
//! 10,000 messages flow through a worker. Every message sent is processed at least once,
//! and the same worker, never restarted, finishes the stream.
//!
//! It stops the broker for every other test, so `scripts/test` runs the `faults_*`
//! binaries in a step of their own, after the rest (see `.config/nextest.toml`). Set
//! `COURIER_TEST_AMQP_STOP` and `COURIER_TEST_AMQP_START` to other commands for a broker
//! that `rabbitmqctl` cannot reach. `faults_containers.rs` kills a RabbitMQ container
//! with SIGKILL instead.

use std::time::Duration;

use courier_contract_tests::faults::stream_through_fault;
use courier_contract_tests::{amqp_url, endpoint, shell};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_nothing() {
    // Show the reconnects in the test's output (`COURIER_LOG` filters, as in the CLI).
    let filter = std::env::var("COURIER_LOG").unwrap_or_else(|_| "warn,courier_amqp=info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init().ok();
    stream_through_fault(&amqp_url().await, 10_000, Duration::from_secs(60), || async {
        shell(&endpoint("COURIER_TEST_AMQP_STOP", "rabbitmqctl -q stop_app")).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        shell(&endpoint("COURIER_TEST_AMQP_START", "rabbitmqctl -q start_app")).await;
    })
    .await;
}
