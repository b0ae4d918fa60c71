//! Publish-with-confirms, then consume-and-ack, of 100-byte messages: Courier's RabbitMQ
//! adapter against raw lapin doing the same work, alternating in one run on one broker.
//!
//! `cargo bench -p courier-amqp --bench throughput` (RabbitMQ from `scripts/brokers up`,
//! or `$COURIER_TEST_AMQP`). `BENCH_MESSAGES` and `BENCH_ROUNDS` change the size.
//!
//! Same work on both sides: persistent messages with a message id and timestamp,
//! published in batches of 100 whose confirms are awaited together, then consumed with
//! prefetch 100 in batches (wait for one delivery, take up to 99 more that have arrived)
//! and acked one by one.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use courier_amqp::AmqpBroker;
use courier_core::{conformance::unique_name, Broker, ConsumerOptions, Destination, Message, Source};
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

#[path = "../../bench_support.rs"]
mod bench_support;
use bench_support::{env, median, rate, uuid_like};

const BATCH: usize = 100;

struct Round {
    publish: Duration,
    consume: Duration,
}

async fn raw(url: &str, n: usize) -> Round {
    let connection = Connection::connect(url, ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let queue = unique_name("bench-raw");
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare(queue.as_str().into(), durable, FieldTable::default()).await.unwrap();
    let payload = [7u8; 100];
    let started = Instant::now();
    let mut sent = 0;
    while sent < n {
        let mut confirms = Vec::with_capacity(BATCH);
        for _ in 0..BATCH.min(n - sent) {
            let id = uuid_like(sent);
            let secs = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
            let props =
                BasicProperties::default().with_message_id(id.into()).with_timestamp(secs).with_delivery_mode(2);
            let mandatory = BasicPublishOptions { mandatory: true, ..Default::default() };
            confirms.push(
                channel.basic_publish("".into(), queue.as_str().into(), mandatory, &payload, props).await.unwrap(),
            );
            sent += 1;
        }
        for c in confirms {
            assert!(c.await.unwrap().is_ack());
        }
    }
    let publish = started.elapsed();
    let consumer_channel = connection.create_channel().await.unwrap();
    consumer_channel.basic_qos(BATCH as u16, BasicQosOptions::default()).await.unwrap();
    let mut stream = consumer_channel
        .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let started = Instant::now();
    let mut received = 0;
    let mut batch = Vec::with_capacity(BATCH);
    while received < n {
        // As Courier's receive(100) does: wait for one, take what else has arrived.
        batch.push(stream.next().await.unwrap().unwrap());
        while batch.len() < BATCH {
            match stream.next().now_or_never() {
                Some(next) => batch.push(next.unwrap().unwrap()),
                None => break,
            }
        }
        for delivery in batch.drain(..) {
            std::hint::black_box(&delivery.data);
            delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
            received += 1;
        }
    }
    let consume = started.elapsed();
    channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    connection.close(200, "bench done".into()).await.ok();
    Round { publish, consume }
}

async fn courier(url: &str, n: usize) -> Round {
    let broker = AmqpBroker::connect(url).await.unwrap();
    let source = Source::queue(&unique_name("bench-courier")).unwrap();
    broker.declare(&source).await.unwrap();
    let destination = Destination::Queue(match &source {
        Source::Queue(q) => q.clone(),
        _ => unreachable!(),
    });
    let payload = bytes::Bytes::from_static(&[7u8; 100]);
    let started = Instant::now();
    let mut sent = 0;
    while sent < n {
        let batch: Vec<Message> = (0..BATCH.min(n - sent)).map(|_| Message::new(payload.clone())).collect();
        sent += batch.len();
        broker.send_batch(&destination, batch).await.unwrap();
    }
    let publish = started.elapsed();
    let consumer = broker.consumer(&source, ConsumerOptions::default().prefetch(BATCH)).await.unwrap();
    let started = Instant::now();
    let mut received = 0;
    while received < n {
        for delivery in consumer.receive(BATCH, Duration::from_secs(5)).await.unwrap() {
            std::hint::black_box(&delivery.payload);
            delivery.ack().await.unwrap();
            received += 1;
        }
    }
    let consume = started.elapsed();
    consumer.close().await.unwrap();
    broker.purge(&source).await.unwrap();
    broker.close().await.unwrap();
    Round { publish, consume }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url = std::env::var("COURIER_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let n = env("BENCH_MESSAGES", 20_000);
    let rounds = env("BENCH_ROUNDS", 5);
    let (mut raw_rounds, mut courier_rounds) = (Vec::new(), Vec::new());
    // Warm-up, then alternate so drift in the broker affects both sides alike.
    courier(&url, n / 10).await;
    raw(&url, n / 10).await;
    for round in 0..rounds {
        eprintln!("round {}/{rounds}: {n} messages each way", round + 1);
        raw_rounds.push(raw(&url, n).await);
        courier_rounds.push(courier(&url, n).await);
    }
    let summary = |rs: &[Round]| {
        let publish = median(rs.iter().map(|r| rate(n, r.publish)).collect());
        let consume = median(rs.iter().map(|r| rate(n, r.consume)).collect());
        let both = median(rs.iter().map(|r| rate(n, r.publish + r.consume)).collect());
        (publish, consume, both)
    };
    let (rp, rc, rb) = summary(&raw_rounds);
    let (cp, cc, cb) = summary(&courier_rounds);
    println!("| phase | raw lapin (msg/s) | Courier (msg/s) | Courier / raw |");
    println!("|---|---:|---:|---:|");
    println!("| publish with confirms | {rp:.0} | {cp:.0} | {:.1}% |", cp / rp * 100.0);
    println!("| consume and ack | {rc:.0} | {cc:.0} | {:.1}% |", cc / rc * 100.0);
    println!("| both | {rb:.0} | {cb:.0} | {:.1}% |", cb / rb * 100.0);
    println!("\n{n} messages of 100 bytes per round, median of {rounds} alternating rounds");
}
