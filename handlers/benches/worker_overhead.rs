//! Runtime overhead: messages per second drained by the worker with a no-op handler,
//! against the raw local-backend receive/ack loop, from the same pre-filled queue.
//!
//! `cargo bench -p courier --bench worker_overhead` (`BENCH_MESSAGES`, default 400,000;
//! `BENCH_SHAPES`, default `foundation,1x100,8x10`, picks the rows).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::{App, DynBroker, LocalBroker, Message, RouteOptions, Source};
use tokio::sync::Notify;

async fn filled(n: usize) -> (DynBroker, Source) {
    let broker: DynBroker = Arc::new(LocalBroker::new());
    let source = Source::queue("bench").unwrap();
    let dest = source.destination();
    for start in (0..n).step_by(1000) {
        let batch = (start..(start + 1000).min(n)).map(|i| Message::new(vec![(i % 251) as u8; 100])).collect();
        broker.send_batch(&dest, batch).await.unwrap();
    }
    (broker, source)
}

async fn raw(n: usize, loops: usize, batch: usize) -> f64 {
    let (broker, source) = filled(n).await;
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    let consumer: Arc<dyn courier::Consumer> = Arc::from(broker.consumer(&source, Default::default()).await.unwrap());
    for _ in 0..loops {
        let (consumer, done) = (consumer.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while done.load(Ordering::Relaxed) < n {
                let got = consumer.receive(batch, Duration::from_millis(20)).await.unwrap();
                let k = got.len();
                for d in got {
                    d.ack().await.unwrap();
                }
                done.fetch_add(k, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

async fn worker(n: usize, loops: usize, batch: usize) -> f64 {
    let (broker, source) = filled(n).await;
    let done = Arc::new(AtomicUsize::new(0));
    let changed = Arc::new(Notify::new());
    let handler = {
        let (done, changed) = (done.clone(), changed.clone());
        move |_: Message| {
            if done.fetch_add(1, Ordering::Relaxed) + 1 == n {
                changed.notify_one();
            }
            std::future::ready(())
        }
    };
    let started = Instant::now();
    let finished = {
        let done = done.clone();
        async move {
            while done.load(Ordering::Relaxed) < n {
                changed.notified().await;
            }
        }
    };
    let report = App::new(broker)
        .route_with(source, handler, RouteOptions::default().concurrency(loops).batch(batch))
        .run_until(finished)
        .await
        .unwrap();
    // Count what was acked, not just handled: the settlement is part of the work.
    let elapsed = started.elapsed();
    assert!(report.acked as usize >= n - loops * batch, "{report:?}");
    report.acked as f64 / elapsed.as_secs_f64()
}

/// The foundation benchmark's shape: one producer sending batches of 100 while the
/// consumer side drains; `use_worker` picks the raw receive/ack loop or the worker.
async fn with_producer(n: usize, batch: usize, use_worker: bool) -> f64 {
    let broker: DynBroker = Arc::new(LocalBroker::new());
    let source = Source::queue("bench").unwrap();
    broker.declare(&source).await.unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let changed = Arc::new(Notify::new());
    let started = Instant::now();
    let producer = {
        let (broker, dest) = (broker.clone(), source.destination());
        tokio::spawn(async move {
            for start in (0..n).step_by(100) {
                let msgs = (start..(start + 100).min(n)).map(|i| Message::new(vec![(i % 251) as u8; 100])).collect();
                broker.send_batch(&dest, msgs).await.unwrap();
            }
        })
    };
    if use_worker {
        let handler = {
            let (done, changed) = (done.clone(), changed.clone());
            move |_: Message| {
                if done.fetch_add(1, Ordering::Relaxed) + 1 == n {
                    changed.notify_one();
                }
                std::future::ready(())
            }
        };
        let finished = {
            let done = done.clone();
            async move {
                while done.load(Ordering::Relaxed) < n {
                    changed.notified().await;
                }
            }
        };
        App::new(broker)
            .route_with(source, handler, RouteOptions::default().concurrency(1).batch(batch))
            .run_until(finished)
            .await
            .unwrap();
    } else {
        let consumer = broker.consumer(&source, Default::default()).await.unwrap();
        while done.load(Ordering::Relaxed) < n {
            let got = consumer.receive(batch, Duration::from_millis(20)).await.unwrap();
            let k = got.len();
            for d in got {
                d.ack().await.unwrap();
            }
            done.fetch_add(k, Ordering::Relaxed);
        }
    }
    producer.await.unwrap();
    n as f64 / started.elapsed().as_secs_f64()
}

fn best_of<F: FnMut() -> f64>(runs: usize, mut f: F) -> f64 {
    (0..runs).map(|_| f()).fold(0.0, f64::max)
}

fn main() {
    let n: usize = std::env::var("BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(400_000);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    println!("{n} 100-byte messages per run, best of 3, 2 worker threads\n");
    println!("| scenario | raw receive/ack loop (msg/s) | worker, no-op handler (msg/s) | worker / raw |");
    println!("|---|---:|---:|---:|");
    // BENCH_SHAPES=foundation,1x100,8x10 (the default) picks the rows: the foundation
    // shape, then loop count × batch for each drain row.
    let shapes = std::env::var("BENCH_SHAPES").unwrap_or_else(|_| "foundation,1x100,8x10".into());
    if shapes.split(',').any(|s| s == "foundation") {
        let raw_rate = best_of(3, || rt.block_on(with_producer(n, 100, false)));
        let worker_rate = best_of(3, || rt.block_on(with_producer(n, 100, true)));
        println!(
            "| foundation shape: 1 producer (batches of 100) and 1 consumer (batch 100) | {raw_rate:.0} | {worker_rate:.0} | {:.0}% |",
            100.0 * worker_rate / raw_rate
        );
    }
    for shape in shapes.split(',').filter(|s| *s != "foundation") {
        let (loops, batch) = shape.split_once('x').expect("shape like 1x100");
        let (loops, batch): (usize, usize) = (loops.parse().unwrap(), batch.parse().unwrap());
        let raw_rate = best_of(3, || rt.block_on(raw(n, loops, batch)));
        let worker_rate = best_of(3, || rt.block_on(worker(n, loops, batch)));
        println!(
            "| drain a pre-filled queue: {loops} loop(s) × batch {batch} | {raw_rate:.0} | {worker_rate:.0} | {:.0}% |",
            100.0 * worker_rate / raw_rate
        );
    }
}
