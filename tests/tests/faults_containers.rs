//! Fault tests that only containers can make, each on brokers of its own, started through
//! testcontainers (a Docker engine is needed: `scripts/test` starts one and builds the
//! images with `scripts/images`):
//! - a broker killed with SIGKILL (no clean shutdown) in the middle of a 10,000-message
//!   worker run, then started again on the same volume;
//! - one node of a three-node RabbitMQ cluster, the leader of a quorum queue, killed
//!   with SIGKILL and left down: every message whose publish was confirmed is delivered;
//! - a broker frozen for 30 s (`docker pause`): its connections stay open and nothing
//!   answers on them, as behind a network cut (for Kafka, once within the group session
//!   and once beyond it; the second is ignored: see its docs);
//! - half-open connections: every connection open to the broker black-holed for the rest
//!   of the run (`iptables` drops their packets both ways, with no reset), while new
//!   connections go through.
//!
//! Each asserts that every message whose send was confirmed is processed by the same
//! worker, which recovers by itself, and prints how many were handled twice.
//!
//! One more test checks a warning, not a loss: on a RabbitMQ server with heartbeats off,
//! where a dead connection would go unnoticed, connecting warns and says how to turn them
//! on.

use std::time::Duration;

use courier::Source;
use courier_contract_tests::containers::{durable_kafka, rabbitmq_cluster, BrokerContainer, Kind};
use courier_contract_tests::faults::{stream_through_fault, stream_through_fault_on};
use courier_contract_tests::with_settings;
use courier_core::conformance::unique_name;

/// Long enough for a fault of 30 s and the reconnects after it.
const STALL: Duration = Duration::from_secs(90);

fn log() {
    let filter = std::env::var("COURIER_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init().ok();
}

/// Runs `n` messages through a worker on a new `kind` broker while it is frozen for 30 s.
async fn silent_for_30_s(kind: Kind, n: usize) {
    silent_for_30_s_with(kind, None, n).await
}

/// [`silent_for_30_s`], with `settings` (`key=value&…`) added to the broker's URL.
async fn silent_for_30_s_with(kind: Kind, settings: Option<&str>, n: usize) {
    log();
    let broker = std::sync::Arc::new(BrokerContainer::start(kind).await);
    let frozen = broker.clone();
    let url = settings.map_or_else(|| broker.url.clone(), |settings| with_settings(&broker.url, settings));
    stream_through_fault(&url, n, STALL, move || async move {
        frozen.pause().await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        frozen.unpause().await;
    })
    .await;
}

/// Runs `n` messages through a worker on a new `kind` broker, with `settings` added to its
/// URL; a fifth of the way in, every connection open to the broker is black-holed for the
/// rest of the run (half-open: no packet either way, no reset), so the worker and the
/// producer must notice by themselves and connect again.
async fn half_open_with(kind: Kind, settings: &str, n: usize) {
    log();
    let broker = std::sync::Arc::new(BrokerContainer::start(kind).await);
    let hole = std::sync::Arc::new(std::sync::Mutex::new(None));
    let (target, kept) = (broker.clone(), hole.clone());
    stream_through_fault(&with_settings(&broker.url, settings), n, STALL, move || async move {
        let black_hole = target.black_hole_open_connections();
        println!("{} connections black-holed", black_hole.connections());
        assert!(black_hole.connections() > 0, "no connection to the broker was open");
        *kept.lock().unwrap() = Some(black_hole);
    })
    .await;
    drop(hole.lock().unwrap().take());
}

/// Runs `n` messages through a worker on `broker` while it is killed with SIGKILL and, 2 s
/// later, started again on the same volumes.
async fn killed_and_restarted(broker: BrokerContainer, n: usize) {
    let broker = std::sync::Arc::new(broker);
    let killed = broker.clone();
    stream_through_fault(&broker.url, n, STALL, move || async move {
        killed.kill().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        killed.restart().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_killed_with_sigkill_mid_stream_loses_nothing() {
    log();
    killed_and_restarted(BrokerContainer::start(Kind::RabbitMq).await, 10_000).await;
}

/// Tansu's log, groups and committed offsets are in SQLite on the container's volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_killed_with_sigkill_mid_stream_loses_nothing() {
    log();
    killed_and_restarted(durable_kafka().await, 10_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_silent_for_30_s_mid_stream_loses_nothing() {
    silent_for_30_s(Kind::RabbitMq, 3_000).await;
}

/// The group session outlasts the silence (45 s, Kafka's own default), so the consumer
/// keeps its partitions and goes on once the broker answers again.
///
/// The producer is Courier's default, idempotent. In one of three runs, Tansu 0.6 answered
/// a send after the silence with PRODUCER_FENCED, whose text names a transactional id
/// (Kafka keeps that error for transactional producers). librdkafka takes it as fatal, so
/// that producer can send nothing more: the broker replaces it and sends again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_silent_for_30_s_mid_stream_loses_nothing() {
    silent_for_30_s_with(Kind::Kafka, Some("session.timeout.ms=45000"), 3_000).await;
}

/// The same silence with Courier's default group session of 10 s, which it outlasts: the
/// consumer loses its partitions, as it should, and must join the group again. Against
/// Tansu 0.6 it never gets them back, because of Tansu's group coordinator. A capture of
/// the traffic after the silence (tshark) shows the consumer asking to join every 3 s:
/// each JoinGroup answer names as the group's leader the member the consumer was before
/// its session expired, a member that is no longer in the group, so the consumer is a
/// follower and each SyncGroup is answered REBALANCE_IN_PROGRESS, forever. Ignored
/// (reported as ignored, not passed) until Tansu is fixed or the Kafka image is Apache
/// Kafka's (`COURIER_TEST_IMAGE_KAFKA`). Run it with
/// `cargo test -p courier-contract-tests --all-features --test faults_containers -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Tansu 0.6's group coordinator never completes a rejoin after an expired session; see the test's docs"]
async fn kafka_silent_for_longer_than_its_group_session_loses_nothing() {
    silent_for_30_s(Kind::Kafka, 3_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_silent_for_30_s_mid_stream_loses_nothing() {
    // moto handles about 200 messages a second.
    silent_for_30_s(Kind::Sqs, 400).await;
}

/// lapin notices a silent connection by its heartbeat: 5 s here (RabbitMQ proposes 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_half_open_connections_lose_nothing() {
    half_open_with(Kind::RabbitMq, "heartbeat=5", 3_000).await;
}

/// librdkafka drops a connection whose request has no answer within `socket.timeout.ms`
/// (10 s here, 60 s by default); the group session (45 s) outlasts that and the reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_half_open_connections_lose_nothing() {
    half_open_with(Kind::Kafka, "socket.timeout.ms=10000&session.timeout.ms=45000", 3_000).await;
}

/// Each SQS call's attempt times out (`call_timeout_secs`, 10 s here, 30 s by default) and
/// the SDK tries again on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_half_open_connections_lose_nothing() {
    half_open_with(Kind::Sqs, "call_timeout_secs=10", 400).await;
}

/// A quorum queue is declared through node 1, which then leads it (RabbitMQ places a new
/// quorum queue's leader on the node the client is connected to); the worker and the
/// producer use node 2. Node 1 is killed and stays down: the other two elect a new leader,
/// and every message whose publish was confirmed is still delivered (the set of confirmed
/// ids minus the set of processed ones is empty).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_cluster_leader_killed_loses_no_confirmed_message() {
    log();
    let cluster = std::sync::Arc::new(rabbitmq_cluster(3).await);
    let quorum = |i: usize| format!("{}?queue_type=quorum", cluster.nodes[i].url);
    let source = Source::queue(&unique_name("quorum")).unwrap();
    let node1 = courier::connect(&quorum(0)).await.expect("connect to node 1");
    node1.declare(&source).await.expect("declare the quorum queue through node 1");
    drop(node1);
    let queue = source.to_string().trim_start_matches("queue:").to_owned();
    let node = |i: usize| format!("rabbit@{}", cluster.nodes[i].hostname());
    let (leader, members) = leader_and_members(&cluster.nodes[1], &queue).await;
    assert_eq!(leader, node(0), "node 1 leads the queue it declared");
    assert_eq!(members.len(), 3, "the queue has a replica on every node: {members:?}");
    let killed = cluster.clone();
    stream_through_fault_on(&quorum(1), source, 5_000, STALL, move || async move {
        killed.nodes[0].kill().await;
    })
    .await;
    let (after, _) = leader_and_members(&cluster.nodes[1], &queue).await;
    assert_ne!(after, node(0), "another node took the lead");
    println!("the quorum queue's leader moved from {leader} to {after}");
}

/// The leader and members of quorum queue `queue`, as `rabbitmqctl` on `node` lists them.
async fn leader_and_members(node: &BrokerContainer, queue: &str) -> (String, Vec<String>) {
    let output = tokio::process::Command::new("docker")
        .args([
            "exec",
            node.id(),
            "rabbitmqctl",
            "-q",
            "list_queues",
            "name",
            "leader",
            "members",
            "--formatter",
            "json",
        ])
        .output()
        .await
        .expect("run rabbitmqctl in the container");
    let listing = String::from_utf8_lossy(&output.stdout);
    let queues: Vec<serde_json::Value> =
        serde_json::from_str(&listing).unwrap_or_else(|e| panic!("rabbitmqctl list_queues printed {listing:?}: {e}"));
    let entry = queues.iter().find(|q| q["name"] == queue).unwrap_or_else(|| panic!("no queue {queue} in {listing}"));
    let members = entry["members"].as_array().map(|m| m.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect());
    (entry["leader"].as_str().unwrap_or_default().to_owned(), members.unwrap_or_default())
}

/// Warnings logged on this thread, as text.
#[derive(Clone, Default)]
struct Warnings(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Warnings {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Warnings {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A server whose heartbeat is 0 (some managed setups turn it off) leaves a dead
/// connection unnoticed, with its prefetched messages unacked on the server: connecting
/// warns of it and names the fix. With `heartbeat=N` in the URL, lapin keeps heartbeats
/// on and nothing is said.
// One thread: the warnings are caught by a subscriber set for this thread only.
#[tokio::test(flavor = "current_thread")]
async fn rabbitmq_with_heartbeats_off_is_warned_of() {
    let warnings = Warnings::default();
    let writer = warnings.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _scope = tracing::subscriber::set_default(subscriber);
    let server = BrokerContainer::start_with_env(
        Kind::RabbitMq,
        &[("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", "-rabbit heartbeat 0")],
    )
    .await;

    let on = courier_amqp::AmqpBroker::connect(&with_settings(&server.url, "heartbeat=10")).await.unwrap();
    assert!(!warnings.text().contains("heartbeat"), "warned with heartbeats on: {}", warnings.text());
    courier_core::Broker::close(&on).await.unwrap();

    let off = courier_amqp::AmqpBroker::connect(&server.url).await.unwrap();
    let text = warnings.text();
    assert!(
        text.contains("RabbitMQ heartbeats are off (the negotiated heartbeat is 0)") && text.contains("heartbeat=N"),
        "no warning, or one that does not name the fix: {text:?}"
    );
    assert!(!text.contains("guest:guest"), "the warning shows the password: {text}");
    courier_core::Broker::close(&off).await.unwrap();
}
