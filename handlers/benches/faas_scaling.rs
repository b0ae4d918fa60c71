//! The FaaS emulator's scaling: throughput P against n / t for n = 1, 4, 16 instances of an
//! I/O-bound handler (20 ms per record), on the in-process backend.
//!
//! `cargo bench -p courier --features trigger --bench faas_scaling`; `BENCH_RECORDS` (default 640) per n.

use std::time::Duration;

use courier::trigger::{emulator::Emulator, EventKind, Trigger};
use courier::{Message, Source};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let records: usize = std::env::var("BENCH_RECORDS").ok().and_then(|v| v.parse().ok()).unwrap_or(640);
    println!("| event | n | records | invocations | P (msg/s) | t (ms) | n / t (msg/s) | P / (n / t) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for kind in [EventKind::Sqs, EventKind::Kafka, EventKind::RabbitMq] {
        for n in [1, 4, 16] {
            let broker = courier::connect("memory://").await.unwrap();
            let source = Source::queue("orders").unwrap();
            broker.declare(&source).await.unwrap();
            for chunk in (0..records).collect::<Vec<_>>().chunks(100) {
                let batch = chunk.iter().map(|i| Message::new(format!("order {i}"))).collect();
                broker.send_batch(&source.destination(), batch).await.unwrap();
            }
            let trigger = Trigger::new(|| async { tokio::time::sleep(Duration::from_millis(20)).await }).concurrency(1);
            let report = Emulator::new(broker, source, trigger, kind)
                .batch_size(10)
                .window(Duration::from_millis(20))
                .concurrency(n)
                .run_until_idle(Duration::from_millis(500))
                .await
                .unwrap();
            println!(
                "| {kind:?} | {n} | {} | {} | {:.0} | {:.1} | {:.0} | {:.0}% |",
                report.records_ok,
                report.invocations,
                report.throughput(),
                report.mean_record_time.as_secs_f64() * 1e3,
                report.ideal_throughput(),
                report.throughput() / report.ideal_throughput() * 100.0
            );
        }
    }
}
