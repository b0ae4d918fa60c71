//! Fault test: RabbitMQ's app restarts (`rabbitmqctl stop_app`, then `start_app`) while
//! 10,000 messages flow through a worker. Every message sent is processed at least once,
//! and the same worker, never restarted, finishes the stream.
//!
//! It stops the broker for every other test, so `scripts/test` runs the `faults_*`
//! binaries in a step of their own, after the rest (see `.config/nextest.toml`). Set
//! `COURIER_TEST_AMQP_STOP` and `COURIER_TEST_AMQP_START` to other commands for a broker
//! that `rabbitmqctl` cannot reach.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use courier::{App, Context, Message, RouteOptions, Source};
use courier_contract_tests::{amqp_url, endpoint, shell};
use courier_core::conformance::unique_name;

const N: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_nothing() {
    // Show the reconnects in the test's output (`COURIER_LOG` filters, as in the CLI).
    let filter = std::env::var("COURIER_LOG").unwrap_or_else(|_| "warn,courier_amqp=info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init().ok();
    let broker = courier::connect(&amqp_url().await).await.expect("RabbitMQ is up (scripts/brokers up)");
    let source = Source::queue(&unique_name("fault-restart")).unwrap();
    broker.declare(&source).await.unwrap();

    let processed: Arc<Mutex<HashSet<String>>> = Arc::default();
    let handled = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (processed, handled) = (processed.clone(), handled.clone());
        move |ctx: Context| {
            let (processed, handled) = (processed.clone(), handled.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(2)).await; // some I/O, so work is in flight at the fault
                processed.lock().unwrap().insert(ctx.id.to_string());
                handled.fetch_add(1, Ordering::SeqCst);
            }
        }
    };

    // Producer: paced batches, so messages are still flowing when the broker goes away.
    // A batch whose send fails is sent again, as an application would; only a batch that
    // send confirmed counts as sent.
    let sent: Arc<Mutex<HashSet<String>>> = Arc::default();
    let producer = {
        let (broker, sent, destination) = (broker.clone(), sent.clone(), source.destination());
        tokio::spawn(async move {
            let mut failures = 0;
            for chunk in (0..N).collect::<Vec<_>>().chunks(100) {
                let batch: Vec<Message> =
                    chunk.iter().map(|i| Message::new(format!("{i}")).with_id(format!("m{i}"))).collect();
                let ids: Vec<String> = batch.iter().map(|m| m.id.to_string()).collect();
                loop {
                    match broker.send_batch(&destination, batch.clone()).await {
                        Ok(_) => break,
                        Err(e) => {
                            assert!(e.is_retryable(), "a broker restart is a retryable fault: {e}");
                            failures += 1;
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
                sent.lock().unwrap().extend(ids);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            failures
        })
    };

    // The fault: once a fifth of the stream is through, stop the broker's app for a while.
    let restart = {
        let handled = handled.clone();
        tokio::spawn(async move {
            while handled.load(Ordering::SeqCst) < N / 5 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let at = handled.load(Ordering::SeqCst);
            shell(&endpoint("COURIER_TEST_AMQP_STOP", "rabbitmqctl -q stop_app")).await;
            println!("broker stopped after {at} handled");
            tokio::time::sleep(Duration::from_secs(3)).await;
            shell(&endpoint("COURIER_TEST_AMQP_START", "rabbitmqctl -q start_app")).await;
            println!("broker started again");
            at
        })
    };

    let started = Instant::now();
    let report = App::new(broker.clone())
        .route_with(source.clone(), handler, RouteOptions::default().concurrency(8).batch(10))
        .run_until({
            let (processed, sent, producer, handled) = (processed.clone(), sent.clone(), &producer, handled.clone());
            async move {
                // Until every sent message is processed, or nothing moved for a minute.
                let (mut last, mut since) = (0, Instant::now());
                loop {
                    let done = producer.is_finished() && {
                        let sent = sent.lock().unwrap();
                        sent.len() == N && sent.is_subset(&processed.lock().unwrap())
                    };
                    let now = handled.load(Ordering::SeqCst) + sent.lock().unwrap().len();
                    if now != last {
                        (last, since) = (now, Instant::now());
                    }
                    if done {
                        return;
                    }
                    if since.elapsed() > Duration::from_secs(60) {
                        let sent = sent.lock().unwrap();
                        let processed = processed.lock().unwrap();
                        let missing: Vec<_> = sent.difference(&processed).take(10).collect();
                        eprintln!(
                            "stalled: producer finished {}, {} sent, {} processed, missing e.g. {missing:?}",
                            producer.is_finished(),
                            sent.len(),
                            processed.len()
                        );
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        })
        .await
        .expect("the worker ran through the restart");
    let restarted_at = restart.await.expect("restart task");
    let send_failures = producer.await.expect("producer task");

    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let processed = std::mem::take(&mut *processed.lock().unwrap());
    assert_eq!(sent.len(), N, "the producer got all {N} messages confirmed");
    let lost: Vec<_> = sent.difference(&processed).take(5).collect();
    assert!(lost.is_empty(), "{} messages were never processed, e.g. {lost:?}", sent.difference(&processed).count());
    println!(
        "restart after {restarted_at} handled: {} handled for {N} messages ({} repeats, at least once), {send_failures} failed batch sends retried, {:?}; {report:?}",
        handled.load(Ordering::SeqCst),
        handled.load(Ordering::SeqCst) - N,
        started.elapsed()
    );
    // Nothing stays behind either: the queue is empty once the stream is through.
    assert_eq!(broker.purge(&source).await.unwrap(), 0, "no unprocessed leftovers");
}
