//! Send, then consume-and-delete: Courier's SQS adapter against raw aws-sdk-sqs doing the
//! same work, alternating in one run against one server, with API requests per message.
//!
//! `cargo bench -p courier-sqs --bench throughput` (moto from `scripts/brokers up`, or
//! `$COURIER_TEST_SQS`); `BENCH_MESSAGES` (default 1,000; moto handles ~200/s) and
//! `BENCH_ROUNDS` (default 3).
//!
//! Same work on both sides: 100-byte text messages sent with SendMessageBatch (10 per
//! call), received 10 at a time with long polling, and deleted: raw with one
//! DeleteMessageBatch per received batch, Courier by acking each delivery of a batch
//! together (its consumer coalesces concurrent acks into DeleteMessageBatch).

use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, SendMessageBatchRequestEntry};
use courier_core::{conformance::unique_name, Broker, ConsumerOptions, Message, Source};
use courier_sqs::SqsBroker;

#[path = "../../bench_support.rs"]
mod bench_support;
use bench_support::{env, median, rate};

struct Round {
    elapsed: Duration,
    requests: u64,
}

async fn raw(client: &aws_sdk_sqs::Client, n: usize) -> Round {
    let name = unique_name("bench-raw").replace('.', "_");
    let url = client.create_queue().queue_name(&name).send().await.unwrap().queue_url().unwrap().to_owned();
    let body = "x".repeat(100);
    let started = Instant::now();
    // Steady-state traffic only: creating the queue is not counted (nor on Courier's side).
    let mut requests = 0;
    for chunk in (0..n).collect::<Vec<_>>().chunks(10) {
        let entries = chunk
            .iter()
            .map(|i| SendMessageBatchRequestEntry::builder().id(format!("m{i}")).message_body(&body).build().unwrap())
            .collect();
        client.send_message_batch().queue_url(&url).set_entries(Some(entries)).send().await.unwrap();
        requests += 1;
    }
    let mut received = 0;
    while received < n {
        let out = client
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        requests += 1;
        let entries: Vec<_> = out
            .messages()
            .iter()
            .enumerate()
            .map(|(i, m)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(format!("d{i}"))
                    .receipt_handle(m.receipt_handle().unwrap())
                    .build()
                    .unwrap()
            })
            .collect();
        if !entries.is_empty() {
            received += entries.len();
            client.delete_message_batch().queue_url(&url).set_entries(Some(entries)).send().await.unwrap();
            requests += 1;
        }
    }
    Round { elapsed: started.elapsed(), requests }
}

async fn courier(broker: &SqsBroker, n: usize) -> Round {
    let source = Source::queue(&unique_name("bench-courier")).unwrap();
    // Steady-state traffic only: declaring the queue and opening the consumer (which
    // also makes its dead-letter queue) are not counted, as the raw side's create is not.
    broker.declare(&source).await.unwrap();
    let before = broker.api_requests();
    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(10) {
        let batch = chunk.iter().map(|_| Message::new("x".repeat(100))).collect();
        broker.send_batch(&source.destination(), batch).await.unwrap();
    }
    let sending = broker.api_requests() - before;
    let consumer = broker.consumer(&source, ConsumerOptions::default()).await.unwrap();
    let before = broker.api_requests();
    let mut received = 0;
    while received < n {
        let batch = consumer.receive(10, Duration::from_secs(1)).await.unwrap();
        received += batch.len();
        futures_join(batch.iter().map(|d| d.ack())).await;
    }
    let requests = sending + broker.api_requests() - before;
    Round { elapsed: started.elapsed(), requests }
}

async fn futures_join<F: std::future::Future<Output = courier_core::Result<()>>>(acks: impl Iterator<Item = F>) {
    let handles: Vec<_> = acks.collect();
    for r in join_all(handles).await {
        r.unwrap();
    }
}

async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..pinned.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (i, f) in pinned.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
        std::env::set_var("AWS_ACCESS_KEY_ID", "courier-bench");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "courier-bench");
    }
    let url =
        std::env::var("COURIER_TEST_SQS").unwrap_or_else(|_| "sqs://us-east-1?endpoint=http://127.0.0.1:4566".into());
    let n = env("BENCH_MESSAGES", 1000);
    let rounds = env("BENCH_ROUNDS", 3);
    let broker = SqsBroker::connect(&url).await.unwrap();
    let endpoint = url.split("endpoint=").nth(1).map(|e| e.split('&').next().unwrap().to_owned());
    let mut loader =
        aws_config::defaults(aws_config::BehaviorVersion::latest()).region(aws_config::Region::new("us-east-1"));
    if let Some(e) = endpoint {
        loader = loader.endpoint_url(e);
    }
    let client = aws_sdk_sqs::Client::new(&loader.load().await);
    let (mut raws, mut couriers) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        eprintln!("round {}/{rounds}: {n} messages each", round + 1);
        raws.push(raw(&client, n).await);
        couriers.push(courier(&broker, n).await);
    }
    let rate_of = |r: &Round| rate(n, r.elapsed);
    let (raw_rate, courier_rate) =
        (median(raws.iter().map(rate_of).collect()), median(couriers.iter().map(rate_of).collect()));
    let per = |rs: &[Round]| median(rs.iter().map(|r| r.requests as f64 / n as f64).collect());
    println!("| | raw aws-sdk-sqs | Courier | Courier / raw |");
    println!("|---|---:|---:|---:|");
    println!(
        "| send, then consume and delete (msg/s) | {raw_rate:.0} | {courier_rate:.0} | {:.1}% |",
        courier_rate / raw_rate * 100.0
    );
    println!("| API requests per message | {:.3} | {:.3} | |", per(&raws), per(&couriers));
    println!("\n{n} messages of 100 bytes per round, median of {rounds} alternating rounds");
}
