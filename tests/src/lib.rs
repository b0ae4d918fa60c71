//! Broker fixtures for Courier's contract tests: how each backend under test is reached.
//!
//! Each backend has a test file in `tests/` that expands
//! [`courier_core::conformance_tests!`] with its harness from here. A fixture finds its
//! broker, in order:
//! 1. the endpoint in its environment variable (`COURIER_TEST_AMQP`, …);
//! 2. with `COURIER_TEST_BROKERS=containers`, a container started through testcontainers
//!    once per test process, from the official image or the local one `scripts/images`
//!    builds (see [`containers`]);
//! 3. else the server `scripts/brokers up` started on this machine.
//!
//! A broker that cannot be reached fails the tests: nothing is skipped.
#![forbid(unsafe_code)]

use std::sync::Arc;

use async_trait::async_trait;
use courier_core::conformance::{Harness, Timing};
use courier_core::{DynBroker, Result};

pub mod containers;
pub mod faults;
use containers::Kind;

/// The in-process backend: a fresh broker per case.
#[derive(Debug, Default, Clone)]
pub struct LocalHarness;

#[async_trait]
impl Harness for LocalHarness {
    async fn broker(&self) -> Result<DynBroker> {
        Ok(Arc::new(courier_local::LocalBroker::new()))
    }
}

/// The endpoint a fixture uses: `$variable` if set, else `default`.
pub fn endpoint(variable: &str, default: &str) -> String {
    std::env::var(variable).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_owned())
}

/// Runs `command` with `sh -c`, failing the test when it fails (fault tests stop and start
/// brokers this way).
pub async fn shell(command: &str) {
    let status = tokio::process::Command::new("sh").arg("-c").arg(command).status().await.expect("run sh");
    assert!(status.success(), "`{command}` failed: {status}");
}

/// RabbitMQ: `$COURIER_TEST_AMQP`; else in containers, a RabbitMQ container; else the
/// local server at 127.0.0.1:5672 (guest/guest).
pub async fn amqp_url() -> String {
    static URL: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    URL.get_or_init(|| async {
        if let Ok(url) = std::env::var("COURIER_TEST_AMQP") {
            if !url.is_empty() {
                return url;
            }
        }
        if containers::selected() {
            return containers::shared(Kind::RabbitMq).await;
        }
        "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()
    })
    .await
    .clone()
}

/// `url` with `settings` (`key=value&…`) added to its query, whether it has one or not.
pub fn with_settings(url: &str, settings: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{settings}")
}

/// The RabbitMQ backend; each case opens its own connection.
#[derive(Debug, Default, Clone)]
pub struct AmqpHarness;

#[async_trait]
impl Harness for AmqpHarness {
    async fn broker(&self) -> Result<DynBroker> {
        let url = amqp_url().await;
        // Each case makes uniquely named queues; let RabbitMQ drop them once unused.
        let broker =
            courier_amqp::AmqpBroker::connect(&with_settings(&url, "queue_expires_secs=300")).await.map_err(|e| {
                eprintln!("cannot reach RabbitMQ at {}: {e}; run scripts/brokers up", courier_core::redact_url(&url));
                e
            })?;
        Ok(Arc::new(broker))
    }

    fn timing(&self) -> Timing {
        // Network round trips and delay buckets: allow a little more than in process.
        Timing { quiet: std::time::Duration::from_millis(300), ..Timing::default() }
    }
}

/// SQS: `$COURIER_TEST_SQS`; else in containers, a moto container; else the moto server `scripts/brokers up` starts at 127.0.0.1:4566. Both servers accept
/// any credentials; unless the environment has some, the fixture sets dummy ones for the
/// AWS credential chain to find.
pub async fn sqs_url() -> String {
    static URL: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    URL.get_or_init(|| async {
        dummy_aws_credentials();
        if let Ok(url) = std::env::var("COURIER_TEST_SQS") {
            if !url.is_empty() {
                return url;
            }
        }
        if containers::selected() {
            return containers::shared(Kind::Sqs).await;
        }
        "sqs://us-east-1?endpoint=http://127.0.0.1:4566".to_owned()
    })
    .await
    .clone()
}

/// Sets dummy AWS credentials for the SDK's standard chain to find, unless the environment
/// has some: moto accepts any. (Test processes only.)
pub fn dummy_aws_credentials() {
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
        std::env::set_var("AWS_ACCESS_KEY_ID", "courier-test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "courier-test");
    }
}

/// Kafka: `$COURIER_TEST_KAFKA`; else in containers, a Tansu (or Apache Kafka) container;
/// else the Tansu broker `scripts/brokers up` starts at 127.0.0.1:9092.
///
/// Against Tansu, producers send one record per batch (`batch.num.messages=1`): Tansu 0.6
/// answers a fetch that starts inside a record batch with the *next* batch, so a consumer
/// resuming from a committed offset mid-batch would never see the rest of that batch.
/// Apache Kafka returns the whole batch and the client skips what it did not ask for.
pub async fn kafka_url() -> String {
    static URL: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    URL.get_or_init(|| async {
        if let Ok(url) = std::env::var("COURIER_TEST_KAFKA") {
            if !url.is_empty() {
                return url;
            }
        }
        if containers::selected() {
            return containers::shared(Kind::Kafka).await;
        }
        "kafka://127.0.0.1:9092?batch.num.messages=1".to_owned()
    })
    .await
    .clone()
}

/// A Kafka broker that keeps its data across a restart, for the broker-restart fault test:
/// `$COURIER_TEST_KAFKA_DURABLE`, else the Tansu that `scripts/brokers up` starts at
/// 127.0.0.1:9093 with its log in moto's S3. (Records go one per batch, as for
/// [`kafka_url`]'s Tansu.)
pub fn kafka_durable_url() -> String {
    endpoint("COURIER_TEST_KAFKA_DURABLE", "kafka://127.0.0.1:9093?batch.num.messages=1")
}

/// `host:port,…` of a `kafka://` URL, for a client that is not Courier's.
pub fn kafka_bootstrap(url: &str) -> String {
    let rest = url.strip_prefix("kafka://").expect("a kafka:// URL");
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    authority.rsplit_once('@').map_or(authority, |(_, hosts)| hosts).to_owned()
}

/// The endpoint and region of an `sqs://REGION?endpoint=URL` URL, for a client that is
/// not Courier's.
pub fn sqs_endpoint_and_region(url: &str) -> (String, String) {
    let region = url.trim_start_matches("sqs://").split(['/', '?']).next().unwrap_or_default().to_owned();
    let endpoint = url
        .split_once("endpoint=")
        .map(|(_, rest)| rest.split('&').next().unwrap_or_default().replace("%3A", ":").replace("%2F", "/"))
        .expect("the SQS fixture names its endpoint");
    (endpoint, region)
}

/// The Kafka backend: each case opens its own clients.
#[derive(Debug, Default, Clone)]
pub struct KafkaHarness;

#[async_trait]
impl Harness for KafkaHarness {
    async fn broker(&self) -> Result<DynBroker> {
        let url = kafka_url().await;
        let broker = courier_kafka::KafkaBroker::connect(&url).await.map_err(|e| {
            eprintln!("cannot use Kafka at {}: {e}; run scripts/brokers up", courier_core::redact_url(&url));
            e
        })?;
        Ok(Arc::new(broker))
    }

    fn timing(&self) -> Timing {
        Timing {
            // A new consumer joins its group before it reads: the first rebalance takes ~3 s.
            arrive_within: std::time::Duration::from_secs(20),
            quiet: std::time::Duration::from_millis(500),
            soak_messages: 2_000,
            soak_consumers: 4,
            // Tansu's rebalance takes ~3 s, longer on a loaded machine.
            join_within: std::time::Duration::from_secs(8),
            ..Timing::default()
        }
    }
}

/// The SQS backend against moto (slow, ~200 messages/s): a small soak, whole-second leases.
#[derive(Debug, Default, Clone)]
pub struct SqsHarness;

#[async_trait]
impl Harness for SqsHarness {
    async fn broker(&self) -> Result<DynBroker> {
        let url = sqs_url().await;
        let broker = courier_sqs::SqsBroker::connect(&url).await.map_err(|e| {
            eprintln!("cannot reach SQS at {}: {e}; run scripts/brokers up", courier_core::redact_url(&url));
            e
        })?;
        Ok(Arc::new(broker))
    }

    fn timing(&self) -> Timing {
        Timing {
            quiet: std::time::Duration::from_millis(300),
            soak_messages: 300,
            // One consumer, so no two ReceiveMessage calls run at once: moto 5.2.1's
            // `receive_message` checks that a message is visible and marks it received
            // with no lock between, so under load two concurrent receives can both take
            // one message (most often a retried one), and the soak sees it acked twice.
            // A Python client alone reproduces it against moto, so it is not the
            // adapter's. `competing_consumers_split_the_work` still runs several.
            soak_consumers: 1,
            ..Timing::default()
        }
    }
}

/// SQLite: a new file per case, in the system's temporary directory.
#[derive(Debug, Default, Clone)]
pub struct SqliteHarness;

/// A path for a new SQLite test database named after `case`, in a directory of its own
/// under the system's temporary directory (SQLite writes `-wal` and `-shm` files beside it).
///
/// A case cannot clean up after itself (the harness has no teardown), so each call first
/// removes the directories of runs more than an hour old.
pub fn sqlite_test_path(case: &str) -> std::path::PathBuf {
    let root = std::env::temp_dir().join("courier-sqlite-tests");
    if let Ok(entries) = std::fs::read_dir(&root) {
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for entry in entries.flatten() {
            let old = entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t < hour_ago);
            if old {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = root.join(courier_core::conformance::unique_name(case));
    std::fs::create_dir_all(&dir).expect("create the test database's directory");
    dir.join("queues.db")
}

#[async_trait]
impl Harness for SqliteHarness {
    async fn broker(&self) -> Result<DynBroker> {
        let url = format!("sqlite://{}", sqlite_test_path("conformance").display());
        Ok(Arc::new(courier_sql::SqlBroker::connect(&url).await?))
    }
}

/// PostgreSQL: `$COURIER_TEST_POSTGRES`; else in containers, a PostgreSQL container; else
/// the server `scripts/brokers up` started (127.0.0.1:5432, database `test`, trust
/// authentication).
pub async fn postgres_url() -> String {
    static URL: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    URL.get_or_init(|| async {
        if std::env::var("COURIER_TEST_POSTGRES").map_or(true, |v| v.is_empty()) && containers::selected() {
            return containers::shared(Kind::Postgres).await;
        }
        endpoint("COURIER_TEST_POSTGRES", "postgres://postgres@127.0.0.1:5432/test")
    })
    .await
    .clone()
}

/// PostgreSQL, shared by every case (each uses names of its own).
#[derive(Debug, Default, Clone)]
pub struct PostgresHarness;

#[async_trait]
impl Harness for PostgresHarness {
    async fn broker(&self) -> Result<DynBroker> {
        let url = postgres_url().await;
        let broker = courier_sql::SqlBroker::connect(&url).await.map_err(|e| {
            eprintln!("cannot use PostgreSQL at {}: {e}; run scripts/brokers up", courier_core::redact_url(&url));
            e
        })?;
        Ok(Arc::new(broker))
    }
}

/// The payload the worker tests send: `{"n": N}`.
#[derive(Debug, serde::Deserialize)]
struct Order {
    n: usize,
}

/// Runs `app` with one route on `source` whose handler records the `n` of every
/// `{"n": N}` it is given (anything else fails to decode and is dead-lettered), until
/// `expected` distinct numbers are seen or `within` passes, then `after` more, so the
/// last settlements (dead letters, hand-backs) finish. Returns the numbers seen and how
/// the run ended.
pub async fn run_recording_orders(
    app: courier::App,
    source: courier_core::Source,
    options: courier::RouteOptions,
    expected: usize,
    within: std::time::Duration,
    after: std::time::Duration,
) -> (std::collections::HashSet<usize>, Result<courier::RunReport>) {
    use std::sync::Mutex;
    let handled = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let seen = handled.clone();
    let handler = move |courier::Json(order): courier::Json<Order>| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().insert(order.n);
            Ok::<(), courier_core::Error>(())
        }
    };
    let watch = handled.clone();
    let started = tokio::time::Instant::now();
    let run = app
        .route_with(source, handler, options)
        .run_until(async move {
            while watch.lock().unwrap().len() < expected && started.elapsed() < within {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            tokio::time::sleep(after).await;
        })
        .await;
    let handled = std::mem::take(&mut *handled.lock().unwrap());
    (handled, run)
}
