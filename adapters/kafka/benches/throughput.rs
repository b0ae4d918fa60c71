//! Produce, then consume-and-ack, of 100-byte messages: Courier's Kafka adapter against raw
//! rdkafka doing the same work with the same settings, alternating in one run on one broker.
//!
//! `cargo bench -p courier-kafka --bench throughput` (Kafka API from `scripts/brokers up`,
//! or `$COURIER_TEST_KAFKA`). `BENCH_MESSAGES` and `BENCH_ROUNDS` change the size.
//!
//! Same work on both sides: an idempotent producer with `acks=all`, `linger.ms=5` and
//! keyless records spread per message (`sticky.partitioning.linger.ms=0`),
//! records with an id header and a timestamp, sent in batches of 1000 whose delivery
//! reports are awaited together; then a group member (range assignor, offsets stored after
//! processing and auto-committed) takes records in batches (wait for one, take what else
//! has arrived, up to 1000) and acks each: Courier through its contiguous-prefix tracking,
//! raw rdkafka by storing the offset after each record.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use courier_core::{conformance::unique_name, Broker, ConsumerOptions, Message, Source};
use courier_kafka::KafkaBroker;
use futures::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Message as _};

#[path = "../../bench_support.rs"]
mod bench_support;
use bench_support::{env, median, rate, uuid_like};

const BATCH: usize = 1000;

struct Round {
    produce: Duration,
    consume: Duration,
}

fn client(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers).set("client.id", "courier");
    c
}

async fn raw(brokers: &str, n: usize) -> Round {
    let topic = unique_name("bench-raw");
    let admin: AdminClient<DefaultClientContext> = client(brokers).create().unwrap();
    let new = NewTopic::new(&topic, 4, TopicReplication::Fixed(1));
    admin.create_topics([&new], &AdminOptions::new()).await.unwrap();
    let producer: FutureProducer = client(brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("sticky.partitioning.linger.ms", "0")
        .set("message.max.bytes", "1048576")
        .create()
        .unwrap();
    // Courier's `declare` reads the new topic's metadata through its producer until the
    // partitions show (creation is asynchronous); do the same here, so neither side's
    // timing includes connecting or waiting for the topic.
    loop {
        let (warm, name) = (producer.clone(), topic.clone());
        let ready = tokio::task::spawn_blocking(move || {
            let metadata = warm.client().fetch_metadata(Some(&name), Duration::from_secs(10)).unwrap();
            metadata.topics().iter().any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty())
        })
        .await
        .unwrap();
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let payload = [7u8; 100];
    let started = Instant::now();
    let mut sent = 0;
    while sent < n {
        let count = BATCH.min(n - sent);
        let ids: Vec<String> = (sent..sent + count).map(uuid_like).collect();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
        let sends = ids.iter().map(|id| {
            let headers = OwnedHeaders::new().insert(Header { key: "courier-id", value: Some(id.as_str()) });
            let record = FutureRecord::<(), _>::to(&topic).payload(&payload[..]).headers(headers).timestamp(now);
            producer.send(record, Duration::from_secs(30))
        });
        for result in futures::future::join_all(sends).await {
            result.unwrap();
        }
        sent += count;
    }
    let produce = started.elapsed();
    let consumer: StreamConsumer = client(brokers)
        .set("group.id", &topic)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "range")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    // Both sides start timing at the first record, after the group has formed.
    let mut started = None;
    let mut received = 0;
    while received < n {
        let first = consumer.recv().await.unwrap();
        started.get_or_insert_with(Instant::now);
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match consumer.recv().now_or_never() {
                Some(next) => batch.push(next.unwrap()),
                None => break,
            }
        }
        for m in batch {
            std::hint::black_box(m.payload());
            consumer.store_offset_from_message(&m).unwrap();
            received += 1;
        }
    }
    let consume = started.unwrap().elapsed();
    Round { produce, consume }
}

async fn courier(url: &str, n: usize) -> Round {
    let broker = KafkaBroker::connect(&format!("{url}?partitions=4")).await.unwrap();
    let source = Source::queue(&unique_name("bench-courier")).unwrap();
    broker.declare(&source).await.unwrap();
    let destination = source.destination();
    let payload = bytes::Bytes::from_static(&[7u8; 100]);
    let started = Instant::now();
    let mut sent = 0;
    while sent < n {
        let batch: Vec<Message> = (0..BATCH.min(n - sent)).map(|_| Message::new(payload.clone())).collect();
        sent += batch.len();
        broker.send_batch(&destination, batch).await.unwrap();
    }
    let produce = started.elapsed();
    let consumer = broker.consumer(&source, ConsumerOptions::default().prefetch(BATCH)).await.unwrap();
    let mut started = None;
    let mut received = 0;
    while received < n {
        let batch = consumer.receive(BATCH, Duration::from_secs(30)).await.unwrap();
        if !batch.is_empty() {
            started.get_or_insert_with(Instant::now);
        }
        for delivery in batch {
            std::hint::black_box(&delivery.payload);
            delivery.ack().await.unwrap();
            received += 1;
        }
    }
    let consume = started.unwrap().elapsed();
    consumer.close().await.unwrap();
    broker.close().await.unwrap();
    Round { produce, consume }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url = std::env::var("COURIER_TEST_KAFKA").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into());
    let brokers = url.trim_start_matches("kafka://").split(['/', '?']).next().unwrap().to_owned();
    let n = env("BENCH_MESSAGES", 50_000);
    let rounds = env("BENCH_ROUNDS", 5);
    let (mut raw_rounds, mut courier_rounds) = (Vec::new(), Vec::new());
    // Warm-up, then alternate so drift in the broker affects both sides alike.
    courier(&url, n / 10).await;
    raw(&brokers, n / 10).await;
    for round in 0..rounds {
        eprintln!("round {}/{rounds}: {n} messages each way", round + 1);
        raw_rounds.push(raw(&brokers, n).await);
        courier_rounds.push(courier(&url, n).await);
        let (r, c) = (raw_rounds.last().unwrap(), courier_rounds.last().unwrap());
        eprintln!(
            "  raw produce {:?} consume {:?}; courier produce {:?} consume {:?}",
            r.produce, r.consume, c.produce, c.consume
        );
    }
    let summary = |rs: &[Round]| {
        let produce = median(rs.iter().map(|r| rate(n, r.produce)).collect());
        let consume = median(rs.iter().map(|r| rate(n, r.consume)).collect());
        let both = median(rs.iter().map(|r| rate(n, r.produce + r.consume)).collect());
        (produce, consume, both)
    };
    let (rp, rc, rb) = summary(&raw_rounds);
    let (cp, cc, cb) = summary(&courier_rounds);
    println!("| phase | raw rdkafka (msg/s) | Courier (msg/s) | Courier / raw |");
    println!("|---|---:|---:|---:|");
    println!("| produce (delivery reports awaited) | {rp:.0} | {cp:.0} | {:.1}% |", cp / rp * 100.0);
    println!("| consume and ack | {rc:.0} | {cc:.0} | {:.1}% |", cc / rc * 100.0);
    println!("| both | {rb:.0} | {cb:.0} | {:.1}% |", cb / rb * 100.0);
    println!("\n{n} messages of 100 bytes per round, median of {rounds} alternating rounds");
}
