//! Publish-with-confirms, then consume-and-ack, of 100-byte messages on one RabbitMQ:
//! Courier's adapter against raw lapin and two peers, ruststream-lapin 0.7 and omniqueue
//! 0.3, alternating in one run (each round runs every side once, starting one side later
//! than the round before).
//!
//! `cargo bench -p courier-amqp --bench throughput` (RabbitMQ from `scripts/brokers up`,
//! or `$COURIER_TEST_AMQP`). `BENCH_MESSAGES` (20,000) and `BENCH_ROUNDS` (5) change the
//! size; `BENCH_ONLY=courier` runs one side (for a profiler).
//!
//! Every side publishes persistent messages to its own durable queue in batches of 100
//! and consumes with prefetch 100, acking each delivery. What each side does per message:
//! - Courier: `send_batch` of 100 (a message id and timestamp on each, confirms awaited
//!   together); `receive(100)` waits for one delivery and takes what else has arrived,
//!   then each delivery is acked through its receipt.
//! - raw lapin 4: the same work by hand: 100 `basic_publish`es with the same properties,
//!   then their 100 confirms; consumes as Courier does and acks through lapin's acker.
//! - ruststream-lapin 0.7: its confirms publisher, each batch of 100 in one client-side
//!   transaction whose commit publishes the batch and awaits its confirms (no id or
//!   timestamp); its subscriber's stream, one `ack` per message.
//! - omniqueue 0.3 (`rabbitmq`, on lapin 2): `send_raw` per message. It never asks for
//!   confirms, so its "landed" time is until the queue holds every message (polled each
//!   millisecond), the nearest it has to a confirm. `receive_all(100)` then one `ack`
//!   per delivery.

use std::num::NonZeroU16;
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
const PAYLOAD: [u8; 100] = [7; 100];

struct Round {
    publish: Duration,
    consume: Duration,
}

/// A fresh durable queue for one side's round, declared with raw lapin so every side
/// gets the same kind; deleted by [`drop_queue`].
async fn fresh_queue(url: &str, side: &str) -> (Connection, String) {
    let connection = Connection::connect(url, ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let queue = unique_name(&format!("bench-{side}"));
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare(queue.as_str().into(), durable, FieldTable::default()).await.unwrap();
    (connection, queue)
}

async fn drop_queue(connection: Connection, queue: &str) {
    let channel = connection.create_channel().await.unwrap();
    channel.queue_delete(queue.into(), QueueDeleteOptions::default()).await.unwrap();
    connection.close(200, "bench done".into()).await.ok();
}

async fn raw(url: &str, n: usize) -> Round {
    let (connection, queue) = fresh_queue(url, "raw").await;
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
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
                channel.basic_publish("".into(), queue.as_str().into(), mandatory, &PAYLOAD, props).await.unwrap(),
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
    let started = Instant::now();
    let mut stream = consumer_channel
        .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
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
    consumer_channel.close(200, "bench done".into()).await.ok();
    drop_queue(connection, &queue).await;
    Round { publish, consume }
}

async fn courier(url: &str, n: usize) -> Round {
    let (connection, queue) = fresh_queue(url, "courier").await;
    let broker = AmqpBroker::connect(url).await.unwrap();
    let source = Source::queue(&queue).unwrap();
    let destination = Destination::queue(&queue).unwrap();
    let payload = bytes::Bytes::from_static(&PAYLOAD);
    let started = Instant::now();
    let mut sent = 0;
    while sent < n {
        let batch: Vec<Message> = (0..BATCH.min(n - sent)).map(|_| Message::new(payload.clone())).collect();
        sent += batch.len();
        broker.send_batch(&destination, batch).await.unwrap();
    }
    let publish = started.elapsed();
    let started = Instant::now();
    let consumer = broker.consumer(&source, ConsumerOptions::default().prefetch(BATCH)).await.unwrap();
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
    broker.close().await.unwrap();
    drop_queue(connection, &queue).await;
    Round { publish, consume }
}

mod rs {
    use super::*;
    use ruststream::{
        Broker as _, ConnectedBroker as _, IncomingMessage as _, OutgoingMessage, Publisher as _, Subscriber as _,
        TransactionalPublisher as _,
    };
    use ruststream_lapin::{LapinBroker, LapinPublish, RabbitQueue};

    pub async fn run(url: &str, n: usize) -> Round {
        let (connection, queue) = fresh_queue(url, "ruststream").await;
        let prefetch = NonZeroU16::new(BATCH as u16).unwrap();
        let broker = LapinBroker::new(url).prefetch(prefetch).connect().await.unwrap();
        let publisher = broker.publisher(LapinPublish::default().confirms());
        // Its confirm channel opens on the first publish: open it before the clock starts,
        // with a message the default exchange drops (no queue has that name).
        publisher.publish(OutgoingMessage::new("bench.warm-up.nowhere", &b"x"[..]), None).await.unwrap();
        let started = Instant::now();
        let mut sent = 0;
        while sent < n {
            publisher.begin_transaction().await.unwrap();
            for _ in 0..BATCH.min(n - sent) {
                publisher.publish(OutgoingMessage::new(queue.as_str(), &PAYLOAD[..]), None).await.unwrap();
                sent += 1;
            }
            publisher.commit().await.unwrap();
        }
        let publish = started.elapsed();
        let started = Instant::now();
        let mut subscriber = broker.subscribe(RabbitQueue::new(queue.as_str())).await.unwrap();
        {
            let mut stream = std::pin::pin!(subscriber.stream());
            for _ in 0..n {
                let message = stream.next().await.unwrap().unwrap();
                std::hint::black_box(message.payload());
                message.ack().await.unwrap();
            }
        }
        let consume = started.elapsed();
        drop(subscriber);
        broker.shutdown().await.unwrap();
        drop_queue(connection, &queue).await;
        Round { publish, consume }
    }
}

mod omni {
    use super::*;
    use omniqueue::backends::rabbitmq::{
        BasicConsumeOptions, BasicProperties, BasicPublishOptions, ConnectionProperties, FieldTable,
    };
    use omniqueue::backends::{RabbitMqBackend, RabbitMqConfig};

    fn config(url: &str, queue: &str) -> RabbitMqConfig {
        RabbitMqConfig {
            uri: url.to_owned(),
            connection_properties: ConnectionProperties::default(),
            publish_exchange: String::new(),
            publish_routing_key: queue.to_owned(),
            publish_options: BasicPublishOptions::default(),
            publish_properties: BasicProperties::default().with_delivery_mode(2),
            consume_queue: queue.to_owned(),
            consumer_tag: unique_name("omniqueue"),
            consume_options: BasicConsumeOptions::default(),
            consume_arguments: FieldTable::default(),
            consume_prefetch_count: Some(BATCH as u16),
            requeue_on_nack: false,
        }
    }

    pub async fn run(url: &str, n: usize) -> Round {
        let (connection, queue) = fresh_queue(url, "omniqueue").await;
        let depth = connection.create_channel().await.unwrap();
        let producer = RabbitMqBackend::builder(config(url, &queue)).build_producer().await.unwrap();
        let started = Instant::now();
        for _ in 0..n {
            producer.send_raw(&PAYLOAD).await.unwrap();
        }
        // No confirms: landed when the queue holds them all.
        let passive = QueueDeclareOptions { passive: true, durable: true, ..Default::default() };
        let no_arguments = lapin::types::FieldTable::default;
        while (depth.queue_declare(queue.as_str().into(), passive, no_arguments()).await.unwrap()).message_count()
            as usize
            != n
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let publish = started.elapsed();
        let started = Instant::now();
        let mut consumer = RabbitMqBackend::builder(config(url, &queue)).build_consumer().await.unwrap();
        let mut received = 0;
        while received < n {
            for delivery in consumer.receive_all(BATCH, Duration::from_secs(5)).await.unwrap() {
                std::hint::black_box(delivery.borrow_payload());
                delivery.ack().await.map_err(|(e, _)| e).unwrap();
                received += 1;
            }
        }
        let consume = started.elapsed();
        drop(consumer);
        drop(producer);
        drop_queue(connection, &queue).await;
        Round { publish, consume }
    }
}

#[derive(Clone, Copy)]
enum Side {
    Courier,
    Raw,
    Ruststream,
    Omniqueue,
}

impl Side {
    const ALL: [Side; 4] = [Side::Courier, Side::Raw, Side::Ruststream, Side::Omniqueue];

    fn name(self) -> &'static str {
        match self {
            Side::Courier => "courier-amqp",
            Side::Raw => "raw lapin 4",
            Side::Ruststream => "ruststream-lapin 0.7",
            Side::Omniqueue => "omniqueue 0.3 rabbitmq (no confirms)",
        }
    }

    async fn run(self, url: &str, n: usize) -> Round {
        match self {
            Side::Courier => courier(url, n).await,
            Side::Raw => raw(url, n).await,
            Side::Ruststream => rs::run(url, n).await,
            Side::Omniqueue => omni::run(url, n).await,
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url = std::env::var("COURIER_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let n = env("BENCH_MESSAGES", 20_000);
    let rounds = env("BENCH_ROUNDS", 5);
    let only = std::env::var("BENCH_ONLY").ok();
    let sides: Vec<Side> =
        Side::ALL.into_iter().filter(|s| only.as_deref().is_none_or(|o| s.name().starts_with(o))).collect();
    if sides.is_empty() {
        let names: Vec<&str> = Side::ALL.iter().map(|s| s.name()).collect();
        eprintln!("BENCH_ONLY={only:?} starts no side's name; the sides are: {}", names.join(", "));
        std::process::exit(2);
    }
    // Warm-up, then rounds in rotating order so drift in the broker affects every side alike.
    for side in &sides {
        side.run(&url, n / 10).await;
    }
    let mut results: Vec<Vec<Round>> = sides.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}: {n} messages each way, per side", round + 1);
        for k in 0..sides.len() {
            let i = (round + k) % sides.len();
            results[i].push(sides[i].run(&url, n).await);
        }
    }
    println!("| phase | side | msg/s (median) | vs Courier (median of rounds) | vs Courier, per round |");
    println!("|---|---|---:|---:|---|");
    type Phase = fn(&Round) -> Duration;
    let phases: [(&str, Phase); 3] =
        [("publish, landed", |r| r.publish), ("consume and ack", |r| r.consume), ("both", |r| r.publish + r.consume)];
    for (phase, time) in phases {
        let base: Vec<f64> = results[0].iter().map(|r| rate(n, time(r))).collect();
        for (side, rounds) in sides.iter().zip(&results) {
            let rates: Vec<f64> = rounds.iter().map(|r| rate(n, time(r))).collect();
            let ratios: Vec<f64> = rates.iter().zip(&base).map(|(r, b)| r / b).collect();
            let per_round: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
            println!(
                "| {phase} | {} | {:.0} | {:.2}× | {} |",
                side.name(),
                median(rates),
                median(ratios.clone()),
                per_round.join(" ")
            );
        }
    }
    println!("\n{n} persistent messages of 100 bytes per side per round, median of {rounds} rotating rounds");
}
