//! The worker on the in-process backend: retries, dead-lettering, panics, timeouts,
//! concurrency, lease extension, batch handlers, tracing context and graceful shutdown.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier::{
    headers, App, Context, Destination, DynBroker, Error, Incoming, Json, LocalBroker, Message, Outcome, RetryPolicy,
    RouteOptions, Source,
};
use courier_core::Broker as _;
use tokio::sync::Notify;
use tokio::time::Instant;

fn broker() -> DynBroker {
    Arc::new(LocalBroker::new())
}

fn queue(name: &str) -> (Source, Destination) {
    let s = Source::queue(name).unwrap();
    let d = s.destination();
    (s, d)
}

/// Resolves once `count` reaches `target`.
async fn when(count: Arc<AtomicUsize>, target: usize, changed: Arc<Notify>) {
    loop {
        let notified = changed.notified();
        if count.load(Ordering::SeqCst) >= target {
            return;
        }
        notified.await;
    }
}

async fn dead_letters(broker: &DynBroker, source: &Source, n: usize) -> Vec<courier::Delivery> {
    let dlq = Source::Queue(source.default_dead_letter().name().clone());
    let consumer = broker.consumer(&dlq, Default::default()).await.unwrap();
    courier_core::conformance::receive_n(&*consumer, n, Duration::from_secs(5)).await
}

fn fast_retries(max: u32) -> RouteOptions {
    RouteOptions::default().concurrency(1).retry(
        RetryPolicy::default()
            .max_attempts(max)
            .backoff(Duration::from_millis(100), Duration::from_secs(10))
            .without_jitter(),
    )
}

#[tokio::test(start_paused = true)]
async fn retries_follow_the_backoff_then_dead_letter_with_reason() {
    let broker = broker();
    let (source, dest) = queue("orders");
    broker.send(&dest, Message::new("x")).await.unwrap();
    let seen: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
    let (count, changed) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
    let handler = {
        let (seen, count, changed) = (seen.clone(), count.clone(), changed.clone());
        move |ctx: Context| {
            let (seen, count, changed) = (seen.clone(), count.clone(), changed.clone());
            async move {
                seen.lock().unwrap().push((ctx.attempt, Instant::now()));
                count.fetch_add(1, Ordering::SeqCst);
                changed.notify_one();
                Err::<(), _>(Error::retryable("downstream unavailable"))
            }
        }
    };
    let report = App::new(broker.clone())
        .route_with(source.clone(), handler, fast_retries(4))
        .run_until(when(count, 4, changed))
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    let attempts: Vec<u32> = seen.iter().map(|(a, _)| *a).collect();
    assert_eq!(attempts, [1, 2, 3, 4]);
    let gaps: Vec<u128> = seen.windows(2).map(|w| (w[1].1 - w[0].1).as_millis()).collect();
    assert_eq!(gaps, [100, 200, 400], "exponential backoff without jitter");
    assert_eq!((report.retried, report.dead_lettered), (3, 1));
    let dead = dead_letters(&broker, &source, 1).await;
    assert_eq!(dead.len(), 1);
    let reason = dead[0].header(headers::DEAD_LETTER_REASON).unwrap();
    assert_eq!(reason, "gave up after 4 attempts: downstream unavailable");
    assert_eq!(dead[0].header(headers::DEAD_LETTER_ATTEMPTS), Some("4"));
    assert_eq!(dead[0].header(headers::DEAD_LETTER_ORIGIN), Some("queue:orders"));
}

#[derive(serde::Deserialize, serde::Serialize)]
struct Order {
    id: u64,
}

#[tokio::test]
async fn a_payload_that_does_not_decode_is_dead_lettered_at_once() {
    let broker = broker();
    let (source, dest) = queue("orders");
    broker.send(&dest, Message::new("{not json")).await.unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = calls.clone();
        move |Json(_order): Json<Order>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {}
        }
    };
    let app = App::new(broker.clone()).route_with(source.clone(), handler, fast_retries(5));
    let dead = tokio::spawn({
        let (broker, source) = (broker.clone(), source.clone());
        async move { dead_letters(&broker, &source, 1).await }
    });
    let report = app
        .run_until(async {
            while !dead.is_finished() {
                tokio::task::yield_now().await
            }
        })
        .await
        .unwrap();
    let dead = dead.await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the handler never ran");
    assert_eq!(report.retried, 0, "no retries for a permanent error");
    let reason = dead[0].header(headers::DEAD_LETTER_REASON).unwrap();
    assert!(reason.contains("could not decode payload as") && reason.contains("Order"), "{reason}");
}

#[tokio::test]
async fn reject_and_fatal_errors_skip_retries() {
    let broker = broker();
    let (source, dest) = queue("orders");
    broker.send(&dest, Message::new("reject")).await.unwrap();
    broker.send(&dest, Message::new("fatal")).await.unwrap();
    let handler = |m: Message| async move {
        match &m.payload[..] {
            b"reject" => Ok(Outcome::reject("customer blocked")),
            _ => Err(Error::fatal("account closed")),
        }
    };
    let dead = tokio::spawn({
        let (broker, source) = (broker.clone(), source.clone());
        async move { dead_letters(&broker, &source, 2).await }
    });
    let report = App::new(broker.clone())
        .route_with(source, handler, fast_retries(5))
        .run_until(async {
            while !dead.is_finished() {
                tokio::task::yield_now().await
            }
        })
        .await
        .unwrap();
    let reasons: HashSet<String> =
        dead.await.unwrap().iter().map(|d| d.header(headers::DEAD_LETTER_REASON).unwrap().to_owned()).collect();
    assert_eq!(reasons, HashSet::from(["customer blocked".to_owned(), "account closed".to_owned()]));
    assert_eq!((report.retried, report.dead_lettered), (0, 2));
}

/// Sends "ok-1", "boom", "ok-2" through a handler (built from the success counter and its
/// notifier) that panics on "boom"; the panic fails that message only, which retries and
/// is dead-lettered with `reason`, while the others are acked.
async fn a_panic_fails_only_its_message<H, Args>(handler: impl FnOnce(Arc<AtomicUsize>, Arc<Notify>) -> H, reason: &str)
where
    H: courier::Handler<Args>,
    Args: 'static,
{
    let broker = broker();
    let (source, dest) = queue("orders");
    for body in ["ok-1", "boom", "ok-2"] {
        broker.send(&dest, Message::new(body)).await.unwrap();
    }
    let (done, changed) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
    let handler = handler(done.clone(), changed.clone());
    let dead = tokio::spawn({
        let (broker, source) = (broker.clone(), source.clone());
        async move { dead_letters(&broker, &source, 1).await }
    });
    let reason = reason.to_owned();
    let report = App::new(broker.clone())
        .route_with(source, handler, fast_retries(2))
        .run_until(async move {
            when(done, 2, changed).await;
            while !dead.is_finished() {
                tokio::task::yield_now().await
            }
            let dead = dead.await.unwrap();
            assert_eq!(dead[0].header(headers::DEAD_LETTER_REASON), Some(reason.as_str()));
        })
        .await
        .unwrap();
    assert_eq!((report.acked, report.retried, report.dead_lettered), (2, 1, 1));
}

#[tokio::test]
async fn a_panicking_handler_fails_only_its_message() {
    let handler = |done: Arc<AtomicUsize>, changed: Arc<Notify>| {
        move |m: Message| {
            let (done, changed) = (done.clone(), changed.clone());
            async move {
                if &m.payload[..] == b"boom" {
                    panic!("bug in handler");
                }
                done.fetch_add(1, Ordering::SeqCst);
                changed.notify_one();
            }
        }
    };
    a_panic_fails_only_its_message(handler, "gave up after 2 attempts: handler panicked: bug in handler").await;
}

/// An extractor that panics on "boom": the panic comes from calling the handler, before
/// any future exists.
struct PanicsOnBoom;

impl courier::FromIncomingRef for PanicsOnBoom {
    fn from_incoming_ref(incoming: &Incoming) -> Result<Self, Error> {
        if &incoming.message.payload[..] == b"boom" {
            panic!("bug in extractor");
        }
        Ok(PanicsOnBoom)
    }
}

#[tokio::test]
async fn a_panic_while_calling_the_handler_fails_only_its_message() {
    let handler = |done: Arc<AtomicUsize>, changed: Arc<Notify>| {
        move |_: PanicsOnBoom, _: Message| {
            done.fetch_add(1, Ordering::SeqCst);
            changed.notify_one();
            std::future::ready(())
        }
    };
    a_panic_fails_only_its_message(handler, "gave up after 2 attempts: handler panicked: bug in extractor").await;
}

#[tokio::test(start_paused = true)]
async fn a_handler_past_its_timeout_is_retried() {
    let broker = broker();
    let (source, dest) = queue("orders");
    broker.send(&dest, Message::new("slow")).await.unwrap();
    let (calls, changed) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
    let handler = {
        let (calls, changed) = (calls.clone(), changed.clone());
        move |ctx: Context| {
            let (calls, changed) = (calls.clone(), changed.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                changed.notify_one();
                if ctx.attempt == 1 {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            }
        }
    };
    let report = App::new(broker.clone())
        .route_with(source, handler, fast_retries(3).timeout(Duration::from_secs(1)))
        .run_until(async move {
            when(calls, 2, changed).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        })
        .await
        .unwrap();
    assert_eq!((report.retried, report.acked), (1, 1), "timed out once, then succeeded");
}

#[tokio::test]
async fn no_more_handlers_run_at_once_than_the_concurrency_limit() {
    let broker = broker();
    let (source, dest) = queue("orders");
    let batch = (0..60).map(|i| Message::new(format!("{i}"))).collect();
    broker.send_batch(&dest, batch).await.unwrap();
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (done, changed) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
    let handler = {
        let (running, peak, done, changed) = (running.clone(), peak.clone(), done.clone(), changed.clone());
        move |_: Message| {
            let (running, peak, done, changed) = (running.clone(), peak.clone(), done.clone(), changed.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                done.fetch_add(1, Ordering::SeqCst);
                changed.notify_one();
            }
        }
    };
    App::new(broker)
        .route_with(source, handler, RouteOptions::default().concurrency(3).batch(4))
        .run_until(when(done, 60, changed))
        .await
        .unwrap();
    assert_eq!(peak.load(Ordering::SeqCst), 3, "three at once, never more");
}

#[tokio::test(start_paused = true)]
async fn leases_are_extended_while_a_handler_runs_long() {
    let broker = broker();
    let (source, dest) = queue("orders");
    broker.send(&dest, Message::new("long")).await.unwrap();
    let (calls, changed) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
    let handler = {
        let (calls, changed) = (calls.clone(), changed.clone());
        move |_: Message| {
            let (calls, changed) = (calls.clone(), changed.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(10)).await; // ten leases long
                changed.notify_one();
            }
        }
    };
    let report = App::new(broker.clone())
        .route_with(source.clone(), handler, RouteOptions::default().concurrency(2).lease(Duration::from_secs(1)))
        .run_until({
            let changed = changed.clone();
            async move {
                changed.notified().await;
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        })
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "never redelivered while being handled");
    assert_eq!(report.acked, 1);
}

#[tokio::test]
async fn a_batch_handler_settles_each_message_on_its_own() {
    let broker = broker();
    let (source, dest) = queue("orders");
    let batch = (0..10).map(|i| Message::new(format!("{i}"))).collect();
    broker.send_batch(&dest, batch).await.unwrap();
    let sizes: Arc<Mutex<Vec<usize>>> = Arc::default();
    let handler = {
        let sizes = sizes.clone();
        move |batch: Vec<Incoming>| {
            sizes.lock().unwrap().push(batch.len());
            async move {
                batch
                    .iter()
                    .map(|m| {
                        let n: u32 = std::str::from_utf8(&m.message.payload).unwrap().parse().unwrap();
                        if n % 5 == 0 {
                            Outcome::reject(format!("{n} is a multiple of five"))
                        } else {
                            Outcome::Ack
                        }
                    })
                    .collect()
            }
        }
    };
    let dead = tokio::spawn({
        let (broker, source) = (broker.clone(), source.clone());
        async move { dead_letters(&broker, &source, 2).await }
    });
    let report = App::new(broker.clone())
        .route_batch(source.clone(), handler, RouteOptions::default().concurrency(1).batch(10))
        .run_until(async {
            while !dead.is_finished() {
                tokio::task::yield_now().await
            }
        })
        .await
        .unwrap();
    assert_eq!((report.acked, report.dead_lettered), (8, 2));
    assert_eq!(dead.await.unwrap().len(), 2);
    assert_eq!(sizes.lock().unwrap().iter().sum::<usize>(), 10);
    assert!(sizes.lock().unwrap().iter().any(|s| *s > 1), "messages arrive in batches: {sizes:?}");
}

#[tokio::test]
async fn a_batch_handler_that_panics_retries_its_batch_and_keeps_running() {
    let broker = broker();
    let (source, dest) = queue("orders");
    broker.send_batch(&dest, (0..10).map(|i| Message::new(format!("{i}"))).collect()).await.unwrap();
    let (done, changed) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
    let handler = {
        let (calls, done, changed) = (Arc::new(AtomicUsize::new(0)), done.clone(), changed.clone());
        move |batch: Vec<Incoming>| {
            // The first call panics in the call itself, before any future exists.
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("bug in batch handler");
            }
            done.fetch_add(batch.len(), Ordering::SeqCst);
            changed.notify_one();
            std::future::ready(vec![Outcome::Ack; batch.len()])
        }
    };
    let report = App::new(broker)
        .route_batch(source, handler, fast_retries(3).batch(10))
        .run_until(when(done, 10, changed))
        .await
        .unwrap();
    assert_eq!((report.acked, report.dead_lettered), (10, 0));
    assert!(report.retried > 0, "the panicking call's batch is retried: {report:?}");
}

#[tokio::test]
async fn follow_up_messages_carry_the_trace() {
    let broker = broker();
    let (source, dest) = queue("orders");
    let (_, next) = queue("payments");
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    broker
        .send(&dest, Message::json(&Order { id: 1 }).unwrap().with_header(headers::TRACEPARENT, parent))
        .await
        .unwrap();
    let handler = {
        let next = next.clone();
        move |Json(order): Json<Order>, ctx: Context| {
            let next = next.clone();
            async move { ctx.send(&next, Message::json(&order)?).await.map(|_| ()) }
        }
    };
    let payments = broker.consumer(&Source::queue("payments").unwrap(), Default::default()).await.unwrap();
    let forwarded = tokio::spawn(async move { payments.receive_one(Duration::from_secs(5)).await.unwrap().unwrap() });
    App::new(broker)
        .route(source, handler)
        .run_until(async {
            while !forwarded.is_finished() {
                tokio::task::yield_now().await
            }
        })
        .await
        .unwrap();
    let child = forwarded.await.unwrap();
    let tp = child.header(headers::TRACEPARENT).unwrap();
    assert!(tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{tp}");
    assert_ne!(tp, parent, "a new span id");
}

#[tokio::test]
async fn tower_layers_wrap_handlers() {
    use tower::ServiceBuilder;
    let broker = broker();
    let (source, dest) = queue("orders");
    broker.send(&dest, Message::new("x")).await.unwrap();
    let seen_by_layer = Arc::new(AtomicUsize::new(0));
    let (done, changed) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
    let service = ServiceBuilder::new()
        .map_request({
            let seen = seen_by_layer.clone();
            move |incoming: Incoming| {
                seen.fetch_add(1, Ordering::SeqCst);
                incoming
            }
        })
        .concurrency_limit(2)
        .service(courier::handler_service({
            let (done, changed) = (done.clone(), changed.clone());
            move |_: Message| {
                let (done, changed) = (done.clone(), changed.clone());
                async move {
                    done.fetch_add(1, Ordering::SeqCst);
                    changed.notify_one();
                }
            }
        }));
    App::new(broker)
        .route_service(source, service, RouteOptions::default())
        .run_until(when(done, 1, changed))
        .await
        .unwrap();
    assert_eq!(seen_by_layer.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_mid_stream_then_restart_processes_everything_and_loses_nothing() {
    const N: usize = 10_000;
    let broker = broker();
    let (source, dest) = queue("orders");
    for chunk in (0..N).collect::<Vec<_>>().chunks(500) {
        let batch = chunk.iter().map(|i| Message::new(format!("{i}")).with_id(format!("m{i}"))).collect();
        broker.send_batch(&dest, batch).await.unwrap();
    }
    let processed: Arc<Mutex<HashSet<String>>> = Arc::default();
    let (count, changed) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
    let handler = {
        let (processed, count, changed) = (processed.clone(), count.clone(), changed.clone());
        move |ctx: Context| {
            let (processed, count, changed) = (processed.clone(), count.clone(), changed.clone());
            async move {
                tokio::time::sleep(Duration::from_micros(200)).await; // some I/O
                processed.lock().unwrap().insert(ctx.id.to_string());
                count.fetch_add(1, Ordering::SeqCst);
                changed.notify_one();
            }
        }
    };
    let options = RouteOptions::default().concurrency(8).batch(10);
    // First run: stop a third of the way through.
    let first = App::new(broker.clone())
        .route_with(source.clone(), handler.clone(), options.clone())
        .shutdown_grace(Duration::from_secs(5))
        .run_until(when(count.clone(), N / 3, changed.clone()))
        .await
        .unwrap();
    let after_first = processed.lock().unwrap().len();
    assert!((N / 3..N).contains(&after_first), "stopped mid-stream at {after_first}");
    let stats = broker.stats(&source).await.unwrap();
    assert_eq!(stats.in_flight, 0, "shutdown settled or handed back everything: {stats:?}");
    assert_eq!(stats.depth as usize + first.acked as usize, N, "nothing lost: {stats:?} {first:?}");
    // Second run: a new worker finishes the rest.
    let second = App::new(broker.clone())
        .route_with(source.clone(), handler, options)
        .run_until(async {
            loop {
                let notified = changed.notified();
                if processed.lock().unwrap().len() >= N {
                    break;
                }
                notified.await;
            }
        })
        .await
        .unwrap();
    let processed = std::mem::take(&mut *processed.lock().unwrap());
    let missing: Vec<_> = (0..N).map(|i| format!("m{i}")).filter(|id| !processed.contains(id)).take(5).collect();
    assert!(missing.is_empty(), "never processed: {missing:?}");
    assert_eq!(first.dead_lettered + second.dead_lettered, 0);
    let stats = broker.stats(&source).await.unwrap();
    assert_eq!((stats.depth, stats.in_flight), (0, 0), "{stats:?}");
}

#[tokio::test]
async fn the_backend_is_chosen_by_url() {
    let broker = courier::connect("memory://?capacity=5").await.unwrap();
    assert_eq!(broker.capabilities().backend, "local");
    let err = courier::connect("memory://?capacity=five").await.unwrap_err();
    assert!(err.to_string().contains("memory URL option capacity"), "{err}");
    let err = courier::connect("localhost:5672").await.unwrap_err();
    assert!(err.to_string().contains("is not a URL"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_batch_route_idle_for_seconds_keeps_fetching() {
    let broker = broker();
    let (source, dest) = queue("orders");
    let (done, changed) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
    let handler = {
        let (done, changed) = (done.clone(), changed.clone());
        move |batch: Vec<Incoming>| {
            done.fetch_add(batch.len(), Ordering::SeqCst);
            changed.notify_one();
            std::future::ready(vec![Outcome::Ack; batch.len()])
        }
    };
    // Nothing to fetch for 5 s: every receive in that time comes back empty.
    tokio::spawn({
        let broker = broker.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            broker.send_batch(&dest, (0..10).map(|i| Message::new(format!("{i}"))).collect()).await.unwrap();
        }
    });
    let app = App::new(broker).route_batch(source, handler, RouteOptions::default().concurrency(2).batch(4));
    let report = tokio::time::timeout(Duration::from_secs(60), app.run_until(when(done.clone(), 10, changed)))
        .await
        .expect("the worker handles the messages sent after the idle time")
        .unwrap();
    assert_eq!(done.load(Ordering::SeqCst), 10, "every message handled: {report:?}");
    assert_eq!(report.acked, 10);
}

#[tokio::test(start_paused = true)]
async fn run_fails_naming_the_route_when_every_fetch_loop_ends_before_shutdown() {
    let local = LocalBroker::new();
    let broker: DynBroker = Arc::new(local.clone());
    let (source, _) = queue("orders");
    // Closed under the worker: every receive fails for good and every loop ends.
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        local.close().await.unwrap();
    });
    let app = App::new(broker).route_with(source, |_: Context| async {}, RouteOptions::default().concurrency(2));
    let result = tokio::time::timeout(Duration::from_secs(60), app.run_until(std::future::pending()))
        .await
        .expect("run returns once no fetch loop is left");
    let err = result.expect_err("a worker with no fetch loop left has not finished its work");
    assert!(err.to_string().contains("queue:orders"), "{err}");
}

/// A broker whose acks fail, retryably, a given number of times before going through.
#[derive(Debug)]
struct FlakyAcks {
    inner: LocalBroker,
    failures: Arc<AtomicUsize>,
}

struct FlakyConsumer {
    inner: Box<dyn courier_core::Consumer>,
    failures: Arc<AtomicUsize>,
}

struct FlakyAcker {
    receipt: courier_core::Receipt,
    failures: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl courier_core::Broker for FlakyAcks {
    fn capabilities(&self) -> &courier_core::Capabilities {
        self.inner.capabilities()
    }
    async fn send(&self, destination: &Destination, message: Message) -> courier::Result<courier::MessageId> {
        self.inner.send(destination, message).await
    }
    async fn consumer(
        &self,
        source: &Source,
        options: courier_core::ConsumerOptions,
    ) -> courier::Result<Box<dyn courier_core::Consumer>> {
        let inner = self.inner.consumer(source, options).await?;
        Ok(Box::new(FlakyConsumer { inner, failures: self.failures.clone() }))
    }
    async fn declare(&self, source: &Source) -> courier::Result<()> {
        self.inner.declare(source).await
    }
    async fn close(&self) -> courier::Result<()> {
        self.inner.close().await
    }
}

#[async_trait::async_trait]
impl courier_core::Consumer for FlakyConsumer {
    fn source(&self) -> &Source {
        self.inner.source()
    }
    async fn receive(&self, max: usize, wait: Duration) -> courier::Result<Vec<courier::Delivery>> {
        let received = self.inner.receive(max, wait).await?;
        Ok(received
            .into_iter()
            .map(|d| {
                let attempt = d.attempt();
                let (message, receipt) = d.into_parts();
                let acker = FlakyAcker { receipt, failures: self.failures.clone() };
                courier::Delivery::new(message, attempt, Box::new(acker))
            })
            .collect())
    }
    async fn close(&self) -> courier::Result<()> {
        self.inner.close().await
    }
}

#[async_trait::async_trait]
impl courier_core::Acknowledger for FlakyAcker {
    fn policy(&self) -> &courier_core::SettlePolicy {
        self.receipt.policy()
    }
    async fn ack(&self) -> courier::Result<()> {
        if self.failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(Error::transient("flaky", "connection dropped", std::io::Error::other("reset")));
        }
        self.receipt.ack().await
    }
    async fn redeliver(&self, delay: Option<Duration>) -> courier::Result<()> {
        self.receipt.retry_after(delay.unwrap_or_default()).await
    }
    async fn dead_letter(&self, letter: &courier_core::DeadLetter) -> courier::Result<()> {
        self.receipt.reject(letter.reason()).await
    }
    async fn extend_lease(&self, by: Duration) -> courier::Result<()> {
        self.receipt.extend_lease(by).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_ack_is_retried_until_it_goes_through() {
    let local = LocalBroker::new();
    let failures = Arc::new(AtomicUsize::new(8));
    let broker: DynBroker = Arc::new(FlakyAcks { inner: local.clone(), failures: failures.clone() });
    let (source, dest) = queue("orders");
    broker.send(&dest, Message::new("x")).await.unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = calls.clone();
        move |_: Context| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {}
        }
    };
    let settled = {
        let (local, source, failures) = (local.clone(), source.clone(), failures.clone());
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let stats = local.stats(&source).await.unwrap();
                if failures.load(Ordering::SeqCst) == 0 && stats.in_flight == 0 && stats.depth == 0 {
                    return;
                }
            }
        }
    };
    let app = App::new(broker).route_with(source.clone(), handler, RouteOptions::default().concurrency(1));
    let report = tokio::time::timeout(Duration::from_secs(600), app.run_until(settled))
        .await
        .expect("the message is settled in the end")
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "handled once: its ack was retried, not abandoned to the lease");
    assert_eq!(report.acked, 1);
    let stats = local.stats(&source).await.unwrap();
    assert_eq!((stats.depth, stats.in_flight, stats.dead_lettered), (0, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_route_with_huge_batch_and_concurrency_does_not_overflow() {
    let broker = broker();
    let (source, dest) = queue("orders");
    broker.send(&dest, Message::new("x")).await.unwrap();
    let (done, changed) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
    let handler = {
        let (done, changed) = (done.clone(), changed.clone());
        move |_: Context| {
            done.fetch_add(1, Ordering::SeqCst);
            changed.notify_one();
            async {}
        }
    };
    let options = RouteOptions::default().concurrency(2).batch(usize::MAX);
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        App::new(broker).route_with(source, handler, options).run_until(when(done, 1, changed)),
    )
    .await
    .expect("the message is handled")
    .unwrap();
    assert_eq!(report.acked, 1);
}

#[tokio::test(start_paused = true)]
async fn a_settlement_that_keeps_failing_does_not_hold_up_shutdown_past_its_grace() {
    let local = LocalBroker::new();
    let failures = Arc::new(AtomicUsize::new(usize::MAX));
    let broker: DynBroker = Arc::new(FlakyAcks { inner: local.clone(), failures });
    let (source, dest) = queue("orders");
    broker.send(&dest, Message::new("x")).await.unwrap();
    let (calls, changed) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
    let handler = {
        let (calls, changed) = (calls.clone(), changed.clone());
        move |_: Context| {
            calls.fetch_add(1, Ordering::SeqCst);
            changed.notify_one();
            async {}
        }
    };
    let app = App::new(broker)
        .route_with(source.clone(), handler, RouteOptions::default().concurrency(1))
        .shutdown_grace(Duration::from_secs(3));
    let started = Instant::now();
    let report = tokio::time::timeout(Duration::from_secs(600), app.run_until(when(calls, 1, changed)))
        .await
        .expect("shutdown ends when its grace is over")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "stopped after the grace: {:?}", started.elapsed());
    assert_eq!((report.acked, report.settlements_failed), (0, 1), "counted as failed, not as acked: {report:?}");
    // Never acked: the message is handed back for another delivery, not lost.
    let stats = local.stats(&source).await.unwrap();
    assert_eq!((stats.depth, stats.in_flight), (1, 0));
}
