//! The fault tests' common run: a stream of messages through one worker while something
//! happens to its broker, then a check that nothing was lost.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use courier::{App, Context, Message, RouteOptions, Source};
use courier_core::conformance::unique_name;

/// Sends `n` messages to a new queue on the broker at `url`, in paced batches of 100, while
/// one worker (concurrency 8, batches of 10) handles them; once a fifth are handled, runs
/// `fault`. A batch whose send fails is sent again, as an application would, and only a
/// batch the broker confirmed counts as sent.
///
/// Asserts that every sent message was processed at least once by the same worker, never
/// restarted, and that the queue is empty afterwards (where the broker can purge). It waits while anything moves, and
/// gives up once nothing has for `stall`.
pub async fn stream_through_fault<F, Fut>(url: &str, n: usize, stall: Duration, fault: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let source = Source::queue(&unique_name("fault-stream")).unwrap();
    stream_through_fault_on(url, source, n, stall, fault).await
}

/// [`stream_through_fault`] on `source`, which may exist already (made elsewhere, with
/// settings of its own).
pub async fn stream_through_fault_on<F, Fut>(url: &str, source: Source, n: usize, stall: Duration, fault: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let broker = courier::connect(url).await.unwrap_or_else(|e| panic!("connect to {url}: {e}"));
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

    let sent: Arc<Mutex<HashSet<String>>> = Arc::default();
    let producer = {
        let (broker, sent, destination) = (broker.clone(), sent.clone(), source.destination());
        tokio::spawn(async move {
            let mut failures = 0;
            for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
                let batch: Vec<Message> =
                    chunk.iter().map(|i| Message::new(format!("{i}")).with_id(format!("m{i}"))).collect();
                let ids: Vec<String> = batch.iter().map(|m| m.id.to_string()).collect();
                loop {
                    match broker.send_batch(&destination, batch.clone()).await {
                        Ok(_) => break,
                        Err(e) => {
                            assert!(e.is_retryable(), "a broker fault is a retryable failure: {e}");
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

    let faulted = {
        let handled = handled.clone();
        tokio::spawn(async move {
            while handled.load(Ordering::SeqCst) < n / 5 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let at = handled.load(Ordering::SeqCst);
            println!("fault begins after {at} handled");
            fault().await;
            println!("fault over");
            at
        })
    };

    let started = Instant::now();
    let report = App::new(broker.clone())
        .route_with(source.clone(), handler, RouteOptions::default().concurrency(8).batch(10))
        .run_until({
            let (processed, sent, producer, handled) = (processed.clone(), sent.clone(), &producer, handled.clone());
            async move {
                let (mut last, mut since) = (0, Instant::now());
                loop {
                    let done = producer.is_finished() && {
                        let sent = sent.lock().unwrap();
                        sent.len() == n && sent.is_subset(&processed.lock().unwrap())
                    };
                    let now = handled.load(Ordering::SeqCst) + sent.lock().unwrap().len();
                    if now != last {
                        (last, since) = (now, Instant::now());
                    }
                    if done {
                        return;
                    }
                    if since.elapsed() > stall {
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
        .expect("the worker ran through the fault");
    let took = started.elapsed();
    let fault_at = faulted.await.expect("fault task");
    let send_failures = producer.await.expect("producer task");

    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let processed = std::mem::take(&mut *processed.lock().unwrap());
    assert_eq!(sent.len(), n, "the producer got all {n} messages confirmed");
    let lost: Vec<_> = sent.difference(&processed).take(5).collect();
    assert!(lost.is_empty(), "{} messages were never processed, e.g. {lost:?}", sent.difference(&processed).count());
    let handled = handled.load(Ordering::SeqCst);
    println!(
        "fault after {fault_at} handled: {handled} handled for {n} messages ({} repeats, at least once), {send_failures} failed batch sends retried, {took:?}; {report:?}",
        handled - n
    );
    // Nothing stays behind either, where the broker can say (a Kafka log keeps everything).
    if broker.capabilities().purge {
        assert_eq!(broker.purge(&source).await.unwrap(), 0, "no unprocessed leftovers");
    }
}
