//! Send, receive and ack of 100-byte messages through the in-process backend, against
//! `tokio::sync::mpsc` moving the same messages (the in-process ceiling), in one run.
//!
//! `cargo bench -p courier-local --bench throughput` (set `BENCH_MESSAGES` to change the
//! count, 400,000 by default). Prints a Markdown table for BENCHMARKS.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use courier_core::{Broker, ConsumerOptions, Destination, Message, Source};
use courier_local::LocalBroker;

const PAYLOAD: usize = 100;
const BATCH: usize = 100;

fn message(i: usize) -> Message {
    let mut payload = vec![0u8; PAYLOAD];
    payload[..8].copy_from_slice(&(i as u64).to_le_bytes());
    Message::new(payload)
}

/// Messages per second for `total` messages split over `producers` and `consumers`.
async fn mpsc_rate(total: usize, producers: usize, consumers: usize, batch: usize) -> f64 {
    let (tx, rx) = tokio::sync::mpsc::channel::<Message>(4096);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let started = Instant::now();
    let per_producer = total / producers;
    let mut tasks = Vec::new();
    for p in 0..producers {
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_producer {
                tx.send(message(p * per_producer + i)).await.unwrap();
            }
        }));
    }
    drop(tx);
    let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..consumers {
        let (rx, received) = (rx.clone(), received.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = Vec::with_capacity(batch);
            loop {
                let n = rx.lock().await.recv_many(&mut buf, batch).await;
                if n == 0 {
                    return;
                }
                received.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                buf.clear();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(received.load(std::sync::atomic::Ordering::Relaxed), per_producer * producers);
    (per_producer * producers) as f64 / started.elapsed().as_secs_f64()
}

async fn courier_rate(total: usize, producers: usize, consumers: usize, batch: usize) -> f64 {
    let broker = LocalBroker::new();
    let source = Source::queue("bench").unwrap();
    let dest: Destination = source.destination();
    broker.declare(&source).await.unwrap();
    let per_producer = total / producers;
    let expected = per_producer * producers;
    let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..producers {
        let (broker, dest) = (broker.clone(), dest.clone());
        tasks.push(tokio::spawn(async move {
            if batch == 1 {
                for i in 0..per_producer {
                    broker.send(&dest, message(p * per_producer + i)).await.unwrap();
                }
            } else {
                for chunk in (0..per_producer).collect::<Vec<_>>().chunks(batch) {
                    let msgs = chunk.iter().map(|i| message(p * per_producer + i)).collect();
                    broker.send_batch(&dest, msgs).await.unwrap();
                }
            }
        }));
    }
    for _ in 0..consumers {
        let consumer = broker.consumer(&source, ConsumerOptions::default()).await.unwrap();
        let received = received.clone();
        tasks.push(tokio::spawn(async move {
            while received.load(std::sync::atomic::Ordering::Relaxed) < expected {
                let got = consumer.receive(batch, Duration::from_millis(20)).await.unwrap();
                let n = got.len();
                for d in got {
                    d.ack().await.unwrap();
                }
                received.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    expected as f64 / started.elapsed().as_secs_f64()
}

fn best_of<F: FnMut() -> f64>(runs: usize, mut f: F) -> f64 {
    (0..runs).map(|_| f()).fold(0.0, f64::max)
}

fn main() {
    let total: usize = std::env::var("BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(400_000);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    println!("{total} messages of {PAYLOAD} bytes per scenario, best of 3, 2 worker threads\n");
    println!("| scenario | tokio mpsc (msg/s) | courier-local (msg/s) | courier / mpsc |");
    println!("|---|---:|---:|---:|");
    for (producers, consumers) in [(1, 1), (4, 4)] {
        for batch in [1, BATCH] {
            let ceiling = best_of(3, || rt.block_on(mpsc_rate(total, producers, consumers, batch)));
            let ours = best_of(3, || rt.block_on(courier_rate(total, producers, consumers, batch)));
            let mode = if batch == 1 { "single".to_owned() } else { format!("batch {batch}") };
            println!(
                "| {producers} producer / {consumers} consumer, {mode} | {:.0} | {:.0} | {:.0}% |",
                ceiling,
                ours,
                100.0 * ours / ceiling
            );
        }
    }
}
