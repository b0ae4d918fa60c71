//! Brokers in containers, started through testcontainers when `COURIER_TEST_BROKERS` is
//! `containers`.
//!
//! **Images.** Each broker has an official image and a local one that `scripts/images`
//! builds from registry packages, for machines where no registry is reachable:
//!
//! | broker | official | local (`scripts/images`) | variable |
//! |---|---|---|---|
//! | RabbitMQ | `rabbitmq:3.13` | `courier-test/rabbitmq:bookworm` | `COURIER_TEST_IMAGE_RABBITMQ` |
//! | Kafka API | `apache/kafka:3.9.1` | `courier-test/tansu:bookworm` | `COURIER_TEST_IMAGE_KAFKA` |
//! | SQS API | `motoserver/moto:5.1.4` | `courier-test/moto:bookworm` | `COURIER_TEST_IMAGE_SQS` |
//! | PostgreSQL | `postgres:17` | `courier-test/postgres:bookworm` | `COURIER_TEST_IMAGE_POSTGRES` |
//!
//! Unless its variable names one (`name:tag`), a fixture takes the official image when the
//! engine has it, else the local one when the engine has that, else the official image,
//! which testcontainers pulls. (`scripts/images` pulls the official images where a
//! registry answers, and builds the local ones where none does.)
//!
//! **Lifetimes.** The shared broker of a test process (one per broker, started on first
//! use) lives as long as the process. A container can outlive a process that ends without
//! dropping it, so each one is labelled `courier.test` and watched by a small reaper, a
//! shell that removes the container once the test process has exited, however it ended.
//! `scripts/test` checks that no labelled container is left after a run.

use std::process::Stdio;
use std::time::Duration;

use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

/// What Tansu prints once it listens.
const TANSU_READY: &str = "ready in ";

/// Whether the fixtures start brokers in containers (`COURIER_TEST_BROKERS=containers`)
/// rather than use the servers `scripts/brokers up` started on this machine.
pub fn selected() -> bool {
    match std::env::var("COURIER_TEST_BROKERS").as_deref() {
        Ok("containers") => true,
        Ok("" | "local") | Err(_) => false,
        Ok(other) => panic!("COURIER_TEST_BROKERS is {other:?}: set it to `containers` or `local` (the default)"),
    }
}

/// A broker the fixtures can start in a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// RabbitMQ (AMQP 0-9-1).
    RabbitMq,
    /// A Kafka API: Apache Kafka, or Tansu in the local image.
    Kafka,
    /// An SQS API: moto's server.
    Sqs,
    /// PostgreSQL.
    Postgres,
}

impl Kind {
    fn official(self) -> &'static str {
        match self {
            Kind::RabbitMq => "rabbitmq:3.13",
            Kind::Kafka => "apache/kafka:3.9.1",
            Kind::Sqs => "motoserver/moto:5.1.4",
            Kind::Postgres => "postgres:17",
        }
    }

    fn local(self) -> &'static str {
        match self {
            Kind::RabbitMq => "courier-test/rabbitmq:bookworm",
            Kind::Kafka => "courier-test/tansu:bookworm",
            Kind::Sqs => "courier-test/moto:bookworm",
            Kind::Postgres => "courier-test/postgres:bookworm",
        }
    }

    fn variable(self) -> &'static str {
        match self {
            Kind::RabbitMq => "COURIER_TEST_IMAGE_RABBITMQ",
            Kind::Kafka => "COURIER_TEST_IMAGE_KAFKA",
            Kind::Sqs => "COURIER_TEST_IMAGE_SQS",
            Kind::Postgres => "COURIER_TEST_IMAGE_POSTGRES",
        }
    }

    fn port(self) -> u16 {
        match self {
            Kind::RabbitMq => 5672,
            Kind::Kafka => 9092, // unused: Kafka's port is chosen per container
            Kind::Sqs => 4566,
            Kind::Postgres => 5432,
        }
    }

    /// The image to run: its variable's; else the official one, if the engine has it or a
    /// registry has it to pull; else the local one that `scripts/images` builds from
    /// registry packages, for machines that reach no container registry.
    pub fn image(self) -> String {
        if let Ok(image) = std::env::var(self.variable()) {
            if !image.is_empty() {
                return image;
            }
        }
        let (official, local) = (self.official(), self.local());
        if engine_has(official) || registry_has(official) || !engine_has(local) {
            // With neither to hand, the pull fails and its error names the variable to set.
            official.to_owned()
        } else {
            local.to_owned()
        }
    }
}

fn engine_has(image: &str) -> bool {
    docker_succeeds(&["image", "inspect", "--format", "{{.Id}}", image])
}

/// Whether a registry serves `image`: its manifest is asked for, nothing is pulled. Where
/// no registry is reachable the lookup fails at once (seen here: 40 ms).
fn registry_has(image: &str) -> bool {
    docker_succeeds(&["manifest", "inspect", image])
}

fn docker_succeeds(args: &[&str]) -> bool {
    // `timeout`: a registry that accepts the connection and then says nothing must not
    // hold up the fixture.
    std::process::Command::new("timeout")
        .arg("20")
        .arg("docker")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A port free on this machine now, for a broker whose host port must be known before it
/// starts (Kafka advertises it) or must stay the same when it is started again.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free local port").port()
}

/// A broker running in a container, on a fixed host port so that it keeps its address when
/// it is killed and started again. Dropping it removes the container and its volumes.
pub struct BrokerContainer {
    container: ContainerAsync<GenericImage>,
    /// The URL Courier connects with.
    pub url: String,
    /// What ran: the image and the host port.
    pub image: String,
    /// The host port mapped onto the broker's port.
    pub port: u16,
    /// The host name it was given, if any.
    hostname: Option<String>,
}

impl std::fmt::Debug for BrokerContainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerContainer")
            .field("id", &self.id())
            .field("image", &self.image)
            .field("url", &self.url)
            .finish()
    }
}

impl BrokerContainer {
    /// Starts `kind`'s broker and waits until it accepts clients.
    pub async fn start(kind: Kind) -> BrokerContainer {
        Self::start_with_env(kind, &[]).await
    }

    /// [`start`](Self::start), with `env` set in the container: a server setting, such as
    /// RabbitMQ's `RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS`.
    pub async fn start_with_env(kind: Kind, env: &[(&str, &str)]) -> BrokerContainer {
        Self::start_with(kind, "memory://tansu/", env).await
    }

    /// [`start`](Self::start), with Tansu's log (when Tansu is the Kafka API) in `storage`
    /// and `env` set in the container.
    async fn start_with(kind: Kind, storage: &str, env: &[(&str, &str)]) -> BrokerContainer {
        let image = kind.image();
        if kind == Kind::Sqs {
            crate::dummy_aws_credentials();
        }
        let port = free_port();
        let official = !image.starts_with("courier-test/");
        let (name, tag) = image.rsplit_once(':').unwrap_or((&image, "latest"));
        eprintln!("fixtures: starting {image} through testcontainers on 127.0.0.1:{port}");
        let base = GenericImage::new(name, tag);
        let base = match (kind, official) {
            (Kind::RabbitMq, _) => base.with_wait_for(WaitFor::message_on_stdout("Server startup complete")),
            (Kind::Kafka, false) => base.with_wait_for(WaitFor::message_on_stdout(TANSU_READY)),
            (Kind::Kafka, true) => base.with_wait_for(WaitFor::message_on_stdout("Kafka Server started")),
            (Kind::Sqs, _) => base.with_wait_for(WaitFor::message_on_stderr("Running on")),
            (Kind::Postgres, _) => {
                base.with_wait_for(WaitFor::message_on_stderr("database system is ready to accept connections"))
            }
        };
        // Kafka's port is the same inside and out, as its brokers advertise it to clients.
        let inside = if kind == Kind::Kafka { port } else { kind.port() };
        let request = base
            .with_mapped_port(port, inside.tcp())
            .with_label("courier.test", "fixture")
            .with_startup_timeout(Duration::from_secs(120));
        let request = match (kind, official) {
            (Kind::Kafka, false) => request.with_cmd(tansu_args(port, storage)),
            (Kind::Kafka, true) => request
                .with_env_var("KAFKA_NODE_ID", "1")
                .with_env_var("KAFKA_PROCESS_ROLES", "broker,controller")
                .with_env_var("KAFKA_LISTENERS", format!("PLAINTEXT://:{port},CONTROLLER://:9093"))
                .with_env_var("KAFKA_ADVERTISED_LISTENERS", format!("PLAINTEXT://127.0.0.1:{port}"))
                .with_env_var("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER")
                .with_env_var("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT")
                .with_env_var("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@localhost:9093")
                .with_env_var("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1"),
            (Kind::Sqs, true) => request.with_env_var("MOTO_PORT", "4566"),
            (Kind::Postgres, true) => {
                request.with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust").with_env_var("POSTGRES_DB", "test")
            }
            _ => request,
        };
        let request = env.iter().fold(request, |request, (name, value)| request.with_env_var(*name, *value));
        let container = request.start().await.unwrap_or_else(|e| {
            panic!(
                "the {image} container did not start: {e}. Run scripts/images to build the local images, or set {} to another image",
                kind.variable()
            )
        });
        reap_when_this_process_ends(container.id());
        let url = match kind {
            Kind::RabbitMq => format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            // One record per batch against Tansu: see `kafka_url`.
            Kind::Kafka if !official => format!("kafka://127.0.0.1:{port}?batch.num.messages=1"),
            Kind::Kafka => format!("kafka://127.0.0.1:{port}"),
            Kind::Sqs => format!("sqs://us-east-1?endpoint=http://127.0.0.1:{port}"),
            Kind::Postgres => format!("postgres://postgres@127.0.0.1:{port}/test"),
        };
        BrokerContainer { container, url, image, port, hostname: None }
    }

    /// The container's host name (inside Docker's network), which names a RabbitMQ node.
    pub fn hostname(&self) -> String {
        self.hostname.clone().unwrap_or_else(|| self.id().chars().take(12).collect())
    }

    /// The container's id, for `docker` commands.
    pub fn id(&self) -> &str {
        self.container.id()
    }

    /// Kills the broker with SIGKILL, as a crash or the kernel's OOM killer would: no clean
    /// shutdown. Its volumes stay.
    pub async fn kill(&self) {
        crate::shell(&format!("docker kill --signal KILL {} >/dev/null", self.id())).await;
    }

    /// Starts the container again, with the same volumes and the same host port.
    pub async fn restart(&self) {
        self.container.start().await.expect("start the broker's container again");
    }

    /// Freezes every process of the broker (`docker pause`): connections stay open and
    /// nothing answers on them, as behind a network cut or a half-open connection.
    ///
    /// The kernel's cgroup freezer can give up while a process is mid-call ("OCI runtime
    /// pause failed: unable to freeze", seen once in CI); runc then thaws the container, so
    /// the freeze is tried again, a few times, before the test is failed.
    pub async fn pause(&self) {
        retry_docker("pause", || self.container.pause()).await;
    }

    /// Lets the broker run again after [`pause`](Self::pause).
    pub async fn unpause(&self) {
        retry_docker("unpause", || self.container.unpause()).await;
    }

    /// Black-holes every TCP connection open now from this machine to the broker's port,
    /// until the guard is dropped: their packets are dropped both ways on the loopback
    /// interface (`iptables`, as root), with no reset, as a NAT or firewall that forgot
    /// them would. New connections go through. To its clients each such connection is
    /// half-open: they must find out by themselves (heartbeats, call timeouts) and connect
    /// again.
    pub fn black_hole_open_connections(&self) -> BlackHole {
        // Clients reach the broker at 127.0.0.1:port (docker-proxy's end of it).
        let broker = format!("127.0.0.1:{}", self.port);
        let listed = std::process::Command::new("ss")
            .args(["-tnH", "state", "established", "dst", &broker])
            .output()
            .expect("run ss (Debian's iproute2) to list the connections to the broker");
        assert!(listed.status.success(), "ss failed: {}", String::from_utf8_lossy(&listed.stderr));
        // Each line: Recv-Q Send-Q Local-Address:Port Peer-Address:Port ...
        let client_ports: Vec<String> = String::from_utf8_lossy(&listed.stdout)
            .lines()
            .filter_map(|line| line.split_whitespace().find(|field| field.contains(':')))
            .filter_map(|local| local.rsplit_once(':').map(|(_, port)| port.to_owned()))
            .collect();
        let mut hole = BlackHole { rules: Vec::new() };
        for port in &client_ports {
            for direction in ["--sport", "--dport"] {
                let rule = vec!["OUTPUT", "-o", "lo", "-p", "tcp", direction, port, "-j", "DROP"]
                    .into_iter()
                    .map(String::from)
                    .collect::<Vec<_>>();
                assert!(iptables("-I", &rule), "iptables -w -I {} failed", rule.join(" "));
                hole.rules.push(rule);
            }
        }
        hole
    }

    /// Keeps the container until this process ends (the reaper then removes it), for the
    /// broker shared by every test of a process.
    pub fn keep_for_this_process(self) -> String {
        static KEPT: std::sync::Mutex<Vec<ContainerAsync<GenericImage>>> = std::sync::Mutex::new(Vec::new());
        KEPT.lock().unwrap().push(self.container);
        self.url
    }
}

/// Connections black-holed by [`BrokerContainer::black_hole_open_connections`]; dropping
/// it lets their packets through again.
#[derive(Debug)]
pub struct BlackHole {
    rules: Vec<Vec<String>>,
}

impl BlackHole {
    /// How many connections are black-holed.
    pub fn connections(&self) -> usize {
        self.rules.len() / 2
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        for rule in &self.rules {
            // Not asserted: a drop during a panic must not panic again.
            if !iptables("-D", rule) {
                eprintln!("could not remove the iptables rule {}", rule.join(" "));
            }
        }
    }
}

/// Runs a `docker` action on a container, trying it up to five times a second apart: the
/// engine can fail one for a passing reason (the cgroup freezer's timeout). Panics with every
/// attempt's error when all fail.
async fn retry_docker<F, Fut, E>(action: &str, mut call: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Debug,
{
    const ATTEMPTS: usize = 5;
    let mut errors = Vec::new();
    for attempt in 1..=ATTEMPTS {
        match call().await {
            Ok(()) => return,
            Err(error) => {
                eprintln!("docker {action}, attempt {attempt} of {ATTEMPTS}, failed: {error:?}");
                errors.push(format!("{error:?}"));
                if attempt < ATTEMPTS {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
    panic!("could not {action} the broker's container in {ATTEMPTS} attempts: {}", errors.join("; "));
}

/// Runs `iptables -w ACTION RULE...`: whether it succeeded.
fn iptables(action: &str, rule: &[String]) -> bool {
    std::process::Command::new("iptables")
        .arg("-w")
        .arg(action)
        .args(rule)
        .status()
        .expect("run iptables (it comes with docker.io; black-holing needs root)")
        .success()
}

/// A Kafka API that keeps its data when its container is killed and started again: Tansu
/// with its log in SQLite on the container's volume, or, where `COURIER_TEST_IMAGE_KAFKA`
/// names an Apache Kafka image, that broker with its log directory in the container.
pub async fn durable_kafka() -> BrokerContainer {
    if !Kind::Kafka.image().starts_with("courier-test/") {
        return BrokerContainer::start(Kind::Kafka).await;
    }
    BrokerContainer::start_with(Kind::Kafka, "sqlite://tansu.db", &[]).await
}

/// RabbitMQ nodes clustered on a Docker network of their own, each on a host port of its
/// own. Dropping it removes the containers and the network.
#[derive(Debug)]
pub struct RabbitMqCluster {
    /// The nodes, in the order of their names (`…-1`, `…-2`, …).
    pub nodes: Vec<BrokerContainer>,
}

/// Starts `size` RabbitMQ nodes that form one cluster as they boot (peer discovery from a
/// fixed list of nodes), and waits until every node runs in it.
pub async fn rabbitmq_cluster(size: usize) -> RabbitMqCluster {
    let image = Kind::RabbitMq.image();
    let (name, tag) = image.rsplit_once(':').unwrap_or((&image, "latest"));
    let stem = courier_core::conformance::unique_name("rabbit").to_lowercase();
    let network = format!("{stem}-net");
    let hosts: Vec<String> = (1..=size).map(|i| format!("{stem}-{i}")).collect();
    let mut config = String::from(
        "loopback_users = none\nlog.console = true\nlog.console.level = info\nlog.file = false\n\
         cluster_formation.peer_discovery_backend = classic_config\n",
    );
    for (i, host) in hosts.iter().enumerate() {
        config.push_str(&format!("cluster_formation.classic_config.nodes.{} = rabbit@{host}\n", i + 1));
    }
    eprintln!("fixtures: starting a cluster of {size} {image} nodes on network {network}");
    let starts = hosts.iter().map(|host| {
        let port = free_port();
        let request = GenericImage::new(name, tag)
            .with_wait_for(WaitFor::message_on_stdout("Server startup complete"))
            .with_mapped_port(port, 5672.tcp())
            .with_label("courier.test", "fixture")
            .with_startup_timeout(Duration::from_secs(180))
            .with_network(network.clone())
            .with_container_name(host.clone())
            .with_hostname(host.clone())
            // The official image takes the cookie from here; the local one has it built in.
            .with_env_var("RABBITMQ_ERLANG_COOKIE", "courier-test-cookie")
            .with_copy_to("/etc/rabbitmq/rabbitmq.conf", config.clone().into_bytes());
        let (image, hostname) = (image.clone(), Some(host.clone()));
        async move {
            let container =
                request.start().await.unwrap_or_else(|e| panic!("a {image} cluster node did not start: {e}"));
            reap_when_this_process_ends(container.id());
            BrokerContainer {
                container,
                url: format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
                image,
                port,
                hostname,
            }
        }
    });
    let nodes = futures::future::join_all(starts).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let output = tokio::process::Command::new("docker")
            .args(["exec", nodes[0].id(), "rabbitmqctl", "-q", "cluster_status", "--formatter", "json"])
            .output()
            .await
            .expect("run docker exec");
        let status = String::from_utf8_lossy(&output.stdout);
        if running_nodes(&status) == size {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the {size} RabbitMQ nodes did not form one cluster within 120 s: {status}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    RabbitMqCluster { nodes }
}

/// How many nodes `rabbitmqctl cluster_status --formatter json` lists as running (none
/// while the node is still starting and prints something else).
fn running_nodes(status: &str) -> usize {
    serde_json::from_str::<serde_json::Value>(status)
        .ok()
        .and_then(|s| s["running_nodes"].as_array().map(Vec::len))
        .unwrap_or(0)
}

/// Tansu's arguments: listen and advertise on `port` (the same inside and out), and keep
/// the log in `storage`.
fn tansu_args(port: u16, storage: &str) -> Vec<String> {
    vec![
        "--listener-url".into(),
        format!("tcp://0.0.0.0:{port}"),
        "--advertised-listener-url".into(),
        format!("tcp://127.0.0.1:{port}"),
        "--storage-engine".into(),
        storage.into(),
    ]
}

/// Starts a shell, in a process group of its own (so a signal to the test's group spares
/// it), that removes container `id` with its volumes once this process has exited.
fn reap_when_this_process_ends(id: &str) {
    use std::os::unix::process::CommandExt;
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; docker rm --force --volumes {id} >/dev/null 2>&1",
        pid = std::process::id()
    );
    let spawned = std::process::Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn();
    if let Err(e) = spawned {
        eprintln!("fixtures: cannot start the reaper of container {id} ({e}); scripts/test removes it after the run");
    }
}

/// The broker of `kind` shared by every test of this process: started once, on first use.
pub async fn shared(kind: Kind) -> String {
    BrokerContainer::start(kind).await.keep_for_this_process()
}

#[cfg(test)]
mod tests {
    use super::retry_docker;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_docker_action_that_fails_for_a_moment_is_tried_again() {
        let calls = AtomicUsize::new(0);
        retry_docker("pause", || {
            let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if call < 3 {
                    Err("unable to freeze")
                } else {
                    Ok(())
                }
            }
        })
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "could not pause the broker's container in 5 attempts: \"unable to freeze\"")]
    async fn a_docker_action_that_keeps_failing_fails_the_test_with_its_errors() {
        retry_docker("pause", || async { Err::<(), _>("unable to freeze") }).await;
    }

    /// Four pauses between five attempts, and none after the last: a test that fails
    /// anyway fails at once.
    #[tokio::test(start_paused = true)]
    async fn a_docker_action_is_given_up_without_waiting_after_the_last_attempt() {
        let started = tokio::time::Instant::now();
        let outcome = tokio::spawn(retry_docker("pause", || async { Err::<(), _>("unable to freeze") })).await;
        assert!(outcome.is_err_and(|e| e.is_panic()), "all five attempts failed, so it panics");
        assert_eq!(started.elapsed(), std::time::Duration::from_secs(4));
    }
}
