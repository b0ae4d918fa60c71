//! The SQL backends' throughput and footprint, with RabbitMQ measured in the same run.
//!
//! `cargo bench -p courier-sql --bench throughput` (PostgreSQL, RabbitMQ and Kafka from
//! `scripts/brokers up`, or `COURIER_TEST_POSTGRES`, `COURIER_TEST_AMQP`,
//! `COURIER_TEST_KAFKA`). `BENCH_MESSAGES`, `BENCH_ROUNDS` and `BENCH_QUEUED` change the
//! sizes. Prints markdown tables for BENCHMARKS.md.
//!
//! - **Queue round trip**, 100-byte messages: 4 producers send batches of 100, then 4
//!   consumers receive batches of 100 and ack each delivery (a batch's acks at once).
//!   `sqlite://` with its durable default (WAL, `synchronous=FULL`), `postgres://`, and
//!   Courier's RabbitMQ adapter on a durable queue with publisher confirms; rounds
//!   alternate between them, each figure is the median of the rounds.
//!   `BENCH_SQLITE_OPTIONS=synchronous=normal` runs the SQLite side with those URL options.
//! - **Outbox relay**: messages committed to a SQLite outbox in transactions of 100, then
//!   relayed to RabbitMQ and to Kafka.
//! - **Footprint**: `BENCH_QUEUED` (default 1,000,000) messages queued in a SQLite file:
//!   the file's size and the process's resident memory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier_core::conformance::unique_name;
use courier_core::{Broker, ConsumerOptions, Destination, DynBroker, Message, Source};
use courier_sql::SqlBroker;

#[path = "../../bench_support.rs"]
mod bench_support;
use bench_support::{env, median, rate};

const BATCH: usize = 100;
const WORKERS: usize = 4;

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("courier-sql-bench-{}", std::process::id())).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn endpoint(variable: &str, default: &str) -> String {
    std::env::var(variable).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_owned())
}

/// Sends `n` messages from 4 producers, then drains them with 4 consumers; returns
/// (send, receive-and-ack) durations.
async fn round_trip(broker: DynBroker, n: usize) -> (Duration, Duration) {
    let queue = unique_name("bench");
    let source = Source::queue(&queue).unwrap();
    broker.declare(&source).await.unwrap();
    let to = Destination::queue(&queue).unwrap();
    let started = Instant::now();
    let producers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (broker, to) = (broker.clone(), to.clone());
            tokio::spawn(async move {
                let mine = n / WORKERS + usize::from(w < n % WORKERS);
                let mut sent = 0;
                while sent < mine {
                    let k = BATCH.min(mine - sent);
                    let batch = (0..k).map(|_| Message::new(vec![7u8; 100])).collect();
                    broker.send_batch(&to, batch).await.unwrap();
                    sent += k;
                }
            })
        })
        .collect();
    for p in producers {
        p.await.unwrap();
    }
    let send = started.elapsed();
    let started = Instant::now();
    let taken = Arc::new(AtomicUsize::new(0));
    let consumers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (broker, source, taken) = (broker.clone(), source.clone(), taken.clone());
            tokio::spawn(async move {
                let options = ConsumerOptions { prefetch: BATCH, ..ConsumerOptions::default() };
                let consumer = broker.consumer(&source, options).await.unwrap();
                while taken.load(Ordering::Relaxed) < n {
                    let batch = consumer.receive(BATCH, Duration::from_millis(100)).await.unwrap();
                    taken.fetch_add(batch.len(), Ordering::Relaxed);
                    for r in futures::future::join_all(batch.iter().map(|d| d.ack())).await {
                        r.unwrap();
                    }
                }
                consumer.close().await.unwrap();
            })
        })
        .collect();
    for c in consumers {
        c.await.unwrap();
    }
    (send, started.elapsed())
}

struct Side {
    name: String,
    broker: DynBroker,
    send: Vec<f64>,
    consume: Vec<f64>,
    total: Vec<f64>,
}

impl Side {
    fn new(name: impl Into<String>, broker: DynBroker) -> Self {
        Side { name: name.into(), broker, send: vec![], consume: vec![], total: vec![] }
    }
}

async fn queue_round_trips(n: usize, rounds: usize) {
    // BENCH_SQLITE_OPTIONS=synchronous=normal measures the faster, crash-safe setting.
    let options = std::env::var("BENCH_SQLITE_OPTIONS").unwrap_or_default();
    let sqlite_url = format!("sqlite://{}?{options}", scratch("round-trip").join("queues.db").display());
    let sqlite_name = if options.is_empty() {
        "sqlite:// (WAL, synchronous=FULL)".to_owned()
    } else {
        format!("sqlite://?{options}")
    };
    let sqlite = SqlBroker::connect(&sqlite_url).await.unwrap();
    let postgres = SqlBroker::connect(&endpoint("COURIER_TEST_POSTGRES", "postgres://postgres@127.0.0.1:5432/test"))
        .await
        .unwrap();
    let amqp_url = endpoint("COURIER_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let amqp = courier_amqp::AmqpBroker::connect(&amqp_url).await.unwrap();
    let mut sides = vec![
        Side::new(sqlite_name, Arc::new(sqlite)),
        Side::new("postgres://", Arc::new(postgres)),
        Side::new("RabbitMQ (courier-amqp, durable queue, confirms)", Arc::new(amqp)),
    ];
    for side in &sides {
        round_trip(side.broker.clone(), n / 10).await; // warm-up
    }
    for round in 0..rounds {
        for side in &mut sides {
            let (send, consume) = round_trip(side.broker.clone(), n).await;
            side.send.push(rate(n, send));
            side.consume.push(rate(n, consume));
            side.total.push(rate(n, send + consume));
            eprintln!(
                "round {round}: {}: send {:.0}, receive and ack {:.0}, whole {:.0} msg/s",
                side.name,
                rate(n, send),
                rate(n, consume),
                rate(n, send + consume)
            );
        }
    }
    let rabbit = median(sides[2].total.clone());
    println!("\n| backend | send (msg/s) | receive and ack (msg/s) | whole job (msg/s) | whole job / RabbitMQ |");
    println!("|---|---:|---:|---:|---:|");
    for side in &sides {
        let total = median(side.total.clone());
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.2}× |",
            side.name,
            median(side.send.clone()),
            median(side.consume.clone()),
            total,
            total / rabbit
        );
    }
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn size_of(path: &std::path::Path) -> u64 {
    ["", "-wal", "-shm"]
        .iter()
        .filter_map(|suffix| std::fs::metadata(format!("{}{suffix}", path.display())).ok())
        .map(|m| m.len())
        .sum()
}

async fn footprint(queued: usize) {
    let file = scratch("footprint").join("queues.db");
    let broker = SqlBroker::connect(&format!("sqlite://{}", file.display())).await.unwrap();
    let to = Destination::queue("queued").unwrap();
    let rss_before = rss_bytes();
    let started = Instant::now();
    let mut sent = 0;
    while sent < queued {
        let k = 1000.min(queued - sent);
        broker.send_batch(&to, (0..k).map(|_| Message::new(vec![7u8; 100])).collect()).await.unwrap();
        sent += k;
    }
    let took = started.elapsed();
    let stats = broker.stats(&Source::queue("queued").unwrap()).await.unwrap();
    assert_eq!(stats.depth as usize, queued);
    let bytes = size_of(&file);
    println!("\n| queued 100-byte messages | file (db + wal + shm) | per message | process RSS | RSS before sending | sent in |");
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {queued} | {:.1} MB | {:.0} B | {:.1} MB | {:.1} MB | {:.1} s ({:.0} msg/s, batches of 1000) |",
        bytes as f64 / 1e6,
        bytes as f64 / queued as f64,
        rss_bytes() as f64 / 1e6,
        rss_before as f64 / 1e6,
        took.as_secs_f64(),
        rate(queued, took)
    );
}

async fn outbox_relay(n: usize) {
    use courier_sql::outbox::{self, Relay};
    let amqp_url = endpoint("COURIER_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let kafka_url = endpoint("COURIER_TEST_KAFKA", "kafka://127.0.0.1:9092");
    let targets: Vec<(&str, DynBroker)> = vec![
        ("RabbitMQ", Arc::new(courier_amqp::AmqpBroker::connect(&amqp_url).await.unwrap())),
        ("Kafka (Tansu)", Arc::new(courier_kafka::KafkaBroker::connect(&kafka_url).await.unwrap())),
    ];
    println!("\n| outbox (SQLite) relayed to | messages | relay (msg/s) |");
    println!("|---|---:|---:|");
    for (name, target) in targets {
        let file = scratch(&format!("outbox-{}", name.split(' ').next().unwrap())).join("app.db");
        let url = format!("sqlite://{}", file.display());
        let relay = Relay::connect(&url, target.clone()).await.unwrap();
        let queue = unique_name("relayed");
        target.declare(&Source::queue(&queue).unwrap()).await.unwrap();
        let to = Destination::queue(&queue).unwrap();
        let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", file.display())).await.unwrap();
        for t in 0..n / 100 {
            let mut tx = pool.begin().await.unwrap();
            for i in 0..100 {
                let message = Message::new(vec![7u8; 100]).with_id(format!("o{}", t * 100 + i));
                outbox::add(&mut *tx, &to, message).await.unwrap();
            }
            tx.commit().await.unwrap();
        }
        let started = Instant::now();
        let report = relay.drain().await.unwrap();
        let took = started.elapsed();
        assert_eq!(report.relayed as usize, n / 100 * 100);
        println!("| {name} | {} | {:.0} |", report.relayed, rate(report.relayed as usize, took));
    }
}

#[tokio::main]
async fn main() {
    let n = env("BENCH_MESSAGES", 20_000);
    let rounds = env("BENCH_ROUNDS", 5);
    let queued = env("BENCH_QUEUED", 1_000_000);
    println!("Queue round trip: {n} messages of 100 bytes per round, {rounds} rounds, medians");
    queue_round_trips(n, rounds).await;
    outbox_relay(n).await;
    footprint(queued).await;
    std::fs::remove_dir_all(std::env::temp_dir().join(format!("courier-sql-bench-{}", std::process::id()))).ok();
}
