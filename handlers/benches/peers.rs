//! Courier's in-process backend against its peers, in one process: omniqueue 0.3's
//! `in_memory` backend, ruststream 0.7's `MemoryBroker`, and a `tokio::sync::mpsc`
//! unbounded channel as the ceiling. 100-byte messages; five rounds, each running every
//! side once and starting one side later than the round before, so none always runs
//! first; the median of the rounds, and each side's rate over Courier's in the same round.
//!
//! What a message costs each side is not the same work:
//! - courier-local keeps the contract: a message id, a lease per delivery (an expired one
//!   redelivers), attempt counting towards the dead letter, competing consumers. An ack
//!   removes the in-flight entry under the queue's lock; A acks each batch with
//!   `Delivery::ack_all`, which takes that lock once for the batch and still settles each
//!   delivery once.
//! - omniqueue wraps a tokio unbounded channel. A receive copies the payload (kept for a
//!   nack to send again) and boxes an acker; the ack only sets a flag. No leases, no
//!   redelivery of a lost consumer's messages, one consumer per queue.
//! - ruststream's bus keeps each message for the subscriptions open when it was published
//!   (none open: it is gone). The ack consumes the delivery; one dropped unsettled comes
//!   back to the same subscriber. Every subscription gets every message: no competing
//!   consumers.
//! - tokio mpsc moves the payload and acknowledges nothing.
//!
//! A, queue level: send N messages, then drain them in batches of 100, acking each, and
//! time both. Each side sends its fastest natural way: Courier in `send_batch`es of 100,
//! the others one call per message. Courier receives each batch into one reused vector
//! (`receive_into`). With 4 consumers Courier opens 4 consumers on the
//! queue; omniqueue's and ruststream's queues take one, so 4 tasks share it behind a lock
//! (a batch is taken under the lock and acked outside it), as they share the mpsc receiver.
//!
//! B, runtime level: N messages are queued, then drained through each framework's own
//! runtime with a no-op handler (it reads a byte and counts), timed until the last
//! handler call: Courier's `App` (`RouteOptions::concurrency`, default batch of 10),
//! ruststream's app (a `#[subscriber]`, `workers(8)` for 8), and for mpsc that many tasks
//! looping on `recv_many`. omniqueue has no runtime. B runs on one thread: ruststream's bus
//! delivers only to open subscriptions, so its app starts before the fill, and on one
//! thread the fill ends before any handler runs (its own benchmarks measure it so).
//!
//! `cargo bench -p courier --bench peers` (`BENCH_MESSAGES`, default 200,000).
//! Prints a Markdown table. ruststream needs Rust 1.95. For a profiler, `BENCH_ONLY=courier`
//! runs Courier's side alone and `BENCH_SCENARIO=A1` (or `A4`, `B1`, `B8`) one scenario.
//! `BENCH_TIMED=drain` times only A's drain, so that what competing consumers cost is not
//! hidden behind the single producer's send.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;

const PAYLOAD: [u8; 100] = [7; 100];
const BATCH: usize = 100;
const ROUNDS: usize = 5;
const QUEUE: &str = "peers";

/// Scenario B's handler calls, and when the last one ran. A static, so that ruststream's
/// handler, a plain `async fn`, reaches it without app state.
struct Tally {
    handled: AtomicUsize,
    target: AtomicUsize,
    finished: Mutex<Option<Instant>>,
    done: Notify,
}

static TALLY: Tally = Tally {
    handled: AtomicUsize::new(0),
    target: AtomicUsize::new(0),
    finished: Mutex::new(None),
    done: Notify::const_new(),
};

impl Tally {
    fn arm(&self, n: usize) {
        self.handled.store(0, Relaxed);
        self.target.store(n, Relaxed);
        *self.finished.lock().unwrap() = None;
    }

    /// The no-op handler, the same on every side.
    fn hit(&self, payload: &[u8]) {
        std::hint::black_box(payload[0]);
        if self.handled.fetch_add(1, Relaxed) + 1 == self.target.load(Relaxed) {
            *self.finished.lock().unwrap() = Some(Instant::now());
            self.done.notify_one();
        }
    }

    fn handled(&self) -> usize {
        self.handled.load(Relaxed)
    }

    /// When the last message was handled, once it has been.
    async fn finished(&self) -> Instant {
        loop {
            let at = *self.finished.lock().unwrap();
            if let Some(at) = at {
                return at;
            }
            self.done.notified().await;
        }
    }
}

/// Whether `BENCH_TIMED=drain` asks for A's drain alone to be timed.
fn drain_only() -> bool {
    std::env::var("BENCH_TIMED").is_ok_and(|timed| timed == "drain")
}

/// When A's timing starts: `started` (before the send), or now (after it) for
/// `BENCH_TIMED=drain`.
fn drain_clock(started: Instant) -> Instant {
    if drain_only() {
        Instant::now()
    } else {
        started
    }
}

fn rate(n: usize, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64()
}

async fn total(drains: Vec<JoinHandle<usize>>) -> usize {
    let mut n = 0;
    for drain in drains {
        n += drain.await.unwrap();
    }
    n
}

/// Waits for the drains, checks that they took all `n` messages, and returns the rate
/// since `started`.
async fn drained(drains: Vec<JoinHandle<usize>>, n: usize, started: Instant) -> f64 {
    let took = total(drains).await;
    let rate = rate(n, started.elapsed());
    assert_eq!(took, n);
    rate
}

mod courier_side {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use courier::{App, RouteOptions};
    use courier_core::{Broker, ConsumerOptions, Delivery, Destination, DynBroker, Message, Source};
    use courier_local::LocalBroker;

    use super::{BATCH, PAYLOAD, QUEUE, TALLY};

    async fn send(broker: &LocalBroker, to: &Destination, n: usize) {
        for start in (0..n).step_by(BATCH) {
            let batch = (start..n.min(start + BATCH)).map(|_| Message::new(PAYLOAD.to_vec())).collect();
            broker.send_batch(to, batch).await.unwrap();
        }
    }

    pub async fn queue(n: usize, consumers: usize) -> f64 {
        let broker = LocalBroker::new();
        let source = Source::queue(QUEUE).unwrap();
        broker.declare(&source).await.unwrap();
        let started = Instant::now();
        send(&broker, &source.destination(), n).await;
        let started = super::drain_clock(started);
        let mut drains = Vec::new();
        for _ in 0..consumers {
            let consumer = broker.consumer(&source, ConsumerOptions::default()).await.unwrap();
            drains.push(tokio::spawn(async move {
                let mut acked = 0usize;
                let mut got = Vec::with_capacity(BATCH);
                loop {
                    // No wait: all was sent before the drain, so an empty receive means done.
                    if consumer.receive_into(BATCH, Duration::ZERO, &mut got).await.unwrap() == 0 {
                        return acked;
                    }
                    for result in Delivery::ack_all(&got).await {
                        result.unwrap();
                        acked += 1;
                    }
                    got.clear();
                }
            }));
        }
        let rate = super::drained(drains, n, started).await;
        broker.close().await.unwrap();
        rate
    }

    pub async fn runtime(n: usize, concurrency: usize) -> f64 {
        let broker = LocalBroker::new();
        let source = Source::queue(QUEUE).unwrap();
        send(&broker, &source.destination(), n).await;
        TALLY.arm(n);
        let broker: DynBroker = Arc::new(broker);
        let handler = |message: Message| {
            TALLY.hit(&message.payload);
            std::future::ready(())
        };
        let started = Instant::now();
        App::new(broker.clone())
            .route_with(source, handler, RouteOptions::default().concurrency(concurrency))
            .run_until(async {
                TALLY.finished().await;
            })
            .await
            .unwrap();
        let finished = TALLY.finished().await;
        broker.close().await.unwrap();
        super::rate(n, finished - started)
    }
}

mod omni {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use omniqueue::backends::InMemoryBackend;
    use tokio::sync::Mutex;

    use super::{BATCH, PAYLOAD};

    pub async fn queue(n: usize, consumers: usize) -> f64 {
        let (producer, consumer) = InMemoryBackend::builder().build_pair().await.unwrap();
        let started = Instant::now();
        for _ in 0..n {
            producer.send_raw(&PAYLOAD).await.unwrap();
        }
        let started = super::drain_clock(started);
        // One consumer per in-memory queue (a second half is refused), so the drains share it.
        let shared = Arc::new(Mutex::new((consumer, 0)));
        let drains = (0..consumers)
            .map(|_| {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let mut acked = 0usize;
                    loop {
                        let batch = {
                            let mut guard = shared.lock().await;
                            let (consumer, taken) = &mut *guard;
                            if *taken == n {
                                return acked;
                            }
                            // Never reaches the deadline: what is left to take is queued.
                            let batch = consumer.receive_all(BATCH, Duration::from_secs(1)).await.unwrap();
                            *taken += batch.len();
                            batch
                        };
                        for delivery in batch {
                            delivery.ack().await.unwrap();
                            acked += 1;
                        }
                    }
                })
            })
            .collect();
        super::drained(drains, n, started).await
    }
}

mod rs {
    use std::num::NonZeroUsize;
    use std::pin::pin;
    use std::sync::Arc;
    use std::time::Instant;

    use futures::StreamExt;
    use ruststream::memory::prelude::*;
    use ruststream::{BatchSubscriber, OutgoingMessage};
    use tokio::sync::Mutex;

    use super::{BATCH, PAYLOAD, QUEUE, TALLY};

    /// The payload's bytes, borrowed: the lane that runs no codec.
    #[derive(Deserialized)]
    struct Frame<'a>(&'a [u8]);

    // The attribute takes a literal: "peers" is QUEUE.
    #[subscriber("peers")]
    async fn one(frame: &Frame<'_>) -> HandlerOutcome {
        TALLY.hit(frame.0);
        HandlerOutcome::ack()
    }

    #[subscriber("peers", workers(8))]
    async fn eight(frame: &Frame<'_>) -> HandlerOutcome {
        TALLY.hit(frame.0);
        HandlerOutcome::ack()
    }

    async fn publish(broker: &MemoryBroker, n: usize) {
        let publisher = broker.publisher();
        let body = PAYLOAD.to_vec();
        for _ in 0..n {
            publisher.publish(OutgoingMessage::new(QUEUE, &body), None).await.expect("in-process publish");
        }
    }

    pub async fn queue(n: usize, consumers: usize) -> f64 {
        let broker = MemoryBroker::new();
        // Opened before the sends: the bus keeps messages only for open subscriptions.
        let subscription = broker.subscribe(QUEUE);
        let started = Instant::now();
        publish(&broker, n).await;
        let started = super::drain_clock(started);
        let size = NonZeroUsize::new(BATCH).unwrap();
        let shared = Arc::new(Mutex::new((subscription, 0)));
        let drains = (0..consumers)
            .map(|_| {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let mut acked = 0usize;
                    loop {
                        let batch: Vec<_> = {
                            let mut guard = shared.lock().await;
                            let (subscription, taken) = &mut *guard;
                            // Counted under the lock, so no drain waits on an empty bus.
                            if *taken == n {
                                return acked;
                            }
                            let batch = pin!(subscription.batches(size))
                                .next()
                                .await
                                .expect("the bus is open")
                                .expect("a memory subscription never fails");
                            let batch: Vec<_> = batch.into_iter().collect();
                            *taken += batch.len();
                            batch
                        };
                        for message in batch {
                            message.ack().await.expect("ack");
                            acked += 1;
                        }
                    }
                })
            })
            .collect();
        super::drained(drains, n, started).await
    }

    pub async fn runtime(n: usize, concurrency: usize) -> f64 {
        let broker = MemoryBroker::new();
        let app = RustStream::new(AppInfo::new("peers", "0.0.0")).with_broker(broker.clone(), |b| match concurrency {
            1 => {
                b.include(one);
            }
            8 => {
                b.include(eight);
            }
            _ => unimplemented!("ruststream's worker count is in the attribute: 1 or 8"),
        });
        TALLY.arm(n);
        let running = app.start().await.expect("the app starts");
        publish(&broker, n).await;
        // On one thread the fill never yields to the handlers; should it, count only the rest.
        let early = TALLY.handled();
        if early > 0 {
            eprintln!("ruststream: {early} messages handled during the fill, left out of the rate");
        }
        let started = Instant::now();
        let finished = TALLY.finished().await;
        running.shutdown().await.expect("the app stops");
        super::rate(n - early, finished - started)
    }
}

mod chan {
    use std::sync::Arc;
    use std::time::Instant;

    use tokio::sync::{mpsc, Mutex};

    use super::{BATCH, PAYLOAD, TALLY};

    type Receiver = Arc<Mutex<mpsc::UnboundedReceiver<Vec<u8>>>>;

    /// `n` messages in a closed channel, so a drain ends when it is empty.
    fn filled(n: usize) -> Receiver {
        let (tx, rx) = mpsc::unbounded_channel();
        for _ in 0..n {
            tx.send(PAYLOAD.to_vec()).unwrap();
        }
        Arc::new(Mutex::new(rx))
    }

    fn drain(rx: &Receiver, mut each: impl FnMut(Vec<u8>) + Send + 'static) -> tokio::task::JoinHandle<usize> {
        let rx = rx.clone();
        tokio::spawn(async move {
            let (mut buf, mut received) = (Vec::with_capacity(BATCH), 0);
            while rx.lock().await.recv_many(&mut buf, BATCH).await > 0 {
                received += buf.len();
                buf.drain(..).for_each(&mut each);
            }
            received
        })
    }

    pub async fn queue(n: usize, consumers: usize) -> f64 {
        let started = Instant::now();
        let rx = filled(n);
        let started = super::drain_clock(started);
        let drains = (0..consumers).map(|_| drain(&rx, drop)).collect();
        super::drained(drains, n, started).await
    }

    pub async fn runtime(n: usize, concurrency: usize) -> f64 {
        let rx = filled(n);
        TALLY.arm(n);
        let started = Instant::now();
        let drains = (0..concurrency).map(|_| drain(&rx, |m| TALLY.hit(&m))).collect();
        let finished = TALLY.finished().await;
        assert_eq!(super::total(drains).await, n);
        super::rate(n, finished - started)
    }
}

#[derive(Clone, Copy)]
enum Side {
    Courier,
    Omniqueue,
    Ruststream,
    Mpsc,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Courier => "courier-local",
            Side::Omniqueue => "omniqueue 0.3 in_memory",
            Side::Ruststream => "ruststream 0.7 MemoryBroker",
            Side::Mpsc => "tokio mpsc (ceiling)",
        }
    }
}

/// Rates per side per round; every round runs each side once, starting one side later.
/// `BENCH_ONLY=courier` runs Courier's side alone (for a profiler); the others report 0.
fn rounds(sides: &[Side], mut run: impl FnMut(Side) -> f64) -> Vec<Vec<f64>> {
    let only = std::env::var("BENCH_ONLY").ok();
    let mut rates = vec![Vec::with_capacity(ROUNDS); sides.len()];
    for round in 0..ROUNDS {
        let mut this_round = vec![0.0; sides.len()];
        for k in 0..sides.len() {
            let i = (round + k) % sides.len();
            if only.as_deref().is_none_or(|only| sides[i].name().starts_with(only)) {
                this_round[i] = run(sides[i]);
            }
        }
        rates.iter_mut().zip(this_round).for_each(|(side, rate)| side.push(rate));
    }
    rates
}

fn median(xs: &[f64]) -> f64 {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// One table row per side; `sides[0]` is Courier, the base of the ratios.
fn report(scenario: &str, sides: &[Side], rates: &[Vec<f64>]) {
    for (side, side_rates) in sides.iter().zip(rates) {
        let ratios: Vec<f64> = side_rates.iter().zip(&rates[0]).map(|(r, c)| r / c).collect();
        let per_round: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "| {scenario} | {} | {:.0} | {:.2}× | {} |",
            side.name(),
            median(side_rates),
            median(&ratios),
            per_round.join(" ")
        );
    }
}

fn main() {
    let n: usize = std::env::var("BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let threads = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let one_thread = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    println!(
        "{n} messages of {} bytes per run, median of {ROUNDS} alternating rounds; \
         A on 2 worker threads, B on one thread\n",
        PAYLOAD.len()
    );
    println!("| scenario | side | msg/s (median) | vs Courier (median) | vs Courier, per round |");
    println!("|---|---|---:|---:|---|");

    let scenario = std::env::var("BENCH_SCENARIO").ok();
    if let Some(s) = scenario.as_deref().filter(|s| !["A1", "A4", "B1", "B8"].contains(s)) {
        eprintln!("BENCH_SCENARIO={s:?} names no scenario; use A1, A4, B1 or B8 (or leave it unset for all)");
        std::process::exit(2);
    }
    if let Some(timed) = std::env::var("BENCH_TIMED").ok().filter(|t| t != "drain") {
        eprintln!(
            "BENCH_TIMED={timed:?} is not known; use BENCH_TIMED=drain (or leave it unset to time send and drain)"
        );
        std::process::exit(2);
    }
    let wanted = |name: &str| scenario.as_deref().is_none_or(|s| s == name);
    let sides = [Side::Courier, Side::Omniqueue, Side::Ruststream, Side::Mpsc];
    for consumers in [1, 4].into_iter().filter(|c| wanted(&format!("A{c}"))) {
        let rates = rounds(&sides, |side| match side {
            Side::Courier => threads.block_on(courier_side::queue(n, consumers)),
            Side::Omniqueue => threads.block_on(omni::queue(n, consumers)),
            Side::Ruststream => threads.block_on(rs::queue(n, consumers)),
            Side::Mpsc => threads.block_on(chan::queue(n, consumers)),
        });
        let timed = if drain_only() { "drain only" } else { "send + drain" };
        report(&format!("A: {timed}, {consumers} consumer(s)"), &sides, &rates);
    }

    let sides = [Side::Courier, Side::Ruststream, Side::Mpsc];
    for concurrency in [1, 8].into_iter().filter(|c| wanted(&format!("B{c}"))) {
        let rates = rounds(&sides, |side| match side {
            Side::Courier => one_thread.block_on(courier_side::runtime(n, concurrency)),
            Side::Ruststream => one_thread.block_on(rs::runtime(n, concurrency)),
            Side::Mpsc => one_thread.block_on(chan::runtime(n, concurrency)),
            Side::Omniqueue => unreachable!("omniqueue has no runtime"),
        });
        report(&format!("B: runtime drain, concurrency {concurrency}"), &sides, &rates);
    }
}
