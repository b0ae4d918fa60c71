//! The queueing model checked against Courier's own runtime: Poisson arrivals and
//! exponential handler times through a worker route with c slots on `memory://`; the
//! measured mean queue length Lq (time average of the queue's depth, sampled) and mean
//! wait Wq (send to receive) beside the M/M/1 and M/M/c predictions of
//! `courier::queueing`.
//!
//! It runs on tokio's paused clock: time moves only when every task waits for a timer, so
//! arrival gaps and handler times are exact and a run of many virtual hours takes
//! seconds. What it validates is the runtime's queueing discipline (a free slot takes the
//! next waiting message at once, no slot idles while one waits, no message is held
//! back); the CPU time of Courier's own code is not in the figures (it is in
//! `worker_overhead`). The mean handler time is 1 s, far above the clock's 1 ms tick.
//!
//! `cargo bench -p courier --bench queueing_model` (`QUEUEING_SCALE=0.1` for a tenth of
//! the messages). The confidence interval is by batch means: 20 batches of the measured
//! messages after a warm-up tenth, Student t with 19 degrees of freedom.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier::queueing::Queue;
use courier::{App, DynBroker, LocalBroker, Message, Outcome, RouteOptions, Source};
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

const SERVICE: Duration = Duration::from_secs(1);
const BATCHES: usize = 20;
/// Student t, 97.5% quantile, 19 degrees of freedom.
const T_19: f64 = 2.093;

fn exponential(rng: &mut impl Rng, mean: f64) -> Duration {
    let u: f64 = rng.gen_range(f64::EPSILON..1.0);
    Duration::from_secs_f64(-u.ln() * mean)
}

/// Mean and 95% half-width by batch means.
fn batch_means(values: &[f64]) -> (f64, f64) {
    let size = values.len() / BATCHES;
    let means: Vec<f64> = values.chunks(size).take(BATCHES).map(|b| b.iter().sum::<f64>() / b.len() as f64).collect();
    let mean = means.iter().sum::<f64>() / BATCHES as f64;
    let variance = means.iter().map(|m| (m - mean).powi(2)).sum::<f64>() / (BATCHES - 1) as f64;
    (mean, T_19 * (variance / BATCHES as f64).sqrt())
}

/// Marks a handler slot free again when the handler ends.
struct Done(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

struct Measured {
    /// Samples that saw a message waiting while a slot was free.
    idle_while_waiting: (usize, usize),
    arrival_rate: f64,
    service_time: f64,
    queue_length: (f64, f64),
    queue_wait: (f64, f64),
}

async fn scenario(servers: u32, batch: usize, rho: f64, messages: usize) -> Measured {
    let lambda = rho * f64::from(servers) / SERVICE.as_secs_f64();
    let broker: DynBroker = Arc::new(LocalBroker::new());
    let source = Source::queue("model").unwrap();
    broker.declare(&source).await.unwrap();
    let start = Instant::now();
    let warm_up = messages / 10;

    // The handler: the wait since the send (the payload carries its virtual send time),
    // then an exponential handling time.
    let waits = Arc::new(Mutex::new(Vec::with_capacity(messages)));
    let services = Arc::new(Mutex::new(Vec::with_capacity(messages)));
    let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handler = {
        let (waits, services, busy) = (waits.clone(), services.clone(), busy.clone());
        move |message: Message| {
            let (waits, services, busy) = (waits.clone(), services.clone(), busy.clone());
            async move {
                busy.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _done = Done(busy);
                let sent = u64::from_le_bytes(message.payload[..8].try_into().unwrap());
                let wait = start.elapsed().as_nanos() as u64 - sent;
                waits.lock().unwrap().push(wait as f64 / 1e9);
                let service = exponential(&mut rand::thread_rng(), SERVICE.as_secs_f64());
                services.lock().unwrap().push(service.as_secs_f64());
                tokio::time::sleep(service).await;
                Outcome::Ack
            }
        }
    };

    // The arrivals: exponential gaps.
    let producer = {
        let (broker, to) = (broker.clone(), source.destination());
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(servers) * 1_000 + (rho * 100.0) as u64);
            let mut last = Instant::now();
            for _ in 0..messages {
                tokio::time::sleep(exponential(&mut rng, 1.0 / lambda)).await;
                let sent = start.elapsed().as_nanos() as u64;
                broker.send(&to, Message::new(sent.to_le_bytes().to_vec())).await.unwrap();
                last = Instant::now();
            }
            last
        })
    };

    // The depth, sampled every 100 ms of virtual time once the warm-up has arrived.
    let depths = Arc::new(Mutex::new(Vec::new()));
    let idle_while_waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sampler = {
        let (broker, source, depths, waits) = (broker.clone(), source.clone(), depths.clone(), waits.clone());
        let (busy, idle) = (busy.clone(), idle_while_waiting.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let handled = waits.lock().unwrap().len();
                if handled >= messages {
                    return;
                }
                if handled >= warm_up {
                    // Waiting: in the queue, or fetched (in flight) but in no handler yet.
                    let stats = broker.stats(&source).await.unwrap();
                    let busy = busy.load(std::sync::atomic::Ordering::SeqCst);
                    let waiting = stats.depth as usize + (stats.in_flight as usize).saturating_sub(busy);
                    if waiting > 0 && busy < servers as usize {
                        idle.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    depths.lock().unwrap().push(waiting as f64);
                }
            }
        })
    };

    let watch = waits.clone();
    App::new(broker)
        .route_with(source, handler, RouteOptions::default().concurrency(servers as usize).batch(batch))
        .run_until(async move {
            while watch.lock().unwrap().len() < messages {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
        .await
        .unwrap();
    let last_send = producer.await.unwrap();
    sampler.await.unwrap();
    let waits = waits.lock().unwrap();
    let services = services.lock().unwrap();
    let depths = depths.lock().unwrap();
    let samples = depths.len();
    Measured {
        idle_while_waiting: (idle_while_waiting.load(std::sync::atomic::Ordering::SeqCst), samples),
        arrival_rate: messages as f64 / (last_send - start).as_secs_f64(),
        service_time: services.iter().sum::<f64>() / services.len() as f64,
        queue_length: batch_means(&depths),
        queue_wait: batch_means(&waits[warm_up..]),
    }
}

fn main() {
    let scale: f64 = std::env::var("QUEUEING_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    println!("Queueing model vs. Courier's worker on memory:// (paused clock; mean handler time {SERVICE:?})");
    println!(
        "| c | batch | ρ | messages | λ measured (/s) | t measured (s) | Lq measured (95% CI) | Lq model | error | Wq measured (95% CI) | Wq model | error | samples with a slot idle while a message waited |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let scenarios = [
        (1u32, 1usize, 0.5, 200_000usize),
        (1, 1, 0.8, 400_000),
        (1, 1, 0.9, 1_000_000),
        (4, 1, 0.8, 400_000),
        // The worker's default batch (10): a loop holds what it fetched while it handles
        // them one by one, even when another slot is free.
        (4, 10, 0.8, 400_000),
        (1, 10, 0.8, 400_000),
    ];
    for (servers, batch, rho, messages) in scenarios {
        let messages = ((messages as f64 * scale) as usize).max(BATCHES * 100);
        let started = std::time::Instant::now();
        let m = runtime.block_on(scenario(servers, batch, rho, messages));
        let model = Queue::new(rho * f64::from(servers), SERVICE, servers).predict().unwrap();
        let (lq, wq) = (model.queue_length, model.queue_wait.as_secs_f64());
        let pct = |measured: f64, model: f64| 100.0 * (measured - model) / model;
        println!(
            "| {servers} | {batch} | {rho} | {messages} | {:.4} | {:.4} | {:.3} ± {:.3} | {lq:.3} | {:+.1}% | {:.3} s ± {:.3} | {wq:.3} s | {:+.1}% | {:.3}% |",
            m.arrival_rate,
            m.service_time,
            m.queue_length.0,
            m.queue_length.1,
            pct(m.queue_length.0, lq),
            m.queue_wait.0,
            m.queue_wait.1,
            pct(m.queue_wait.0, wq),
            100.0 * m.idle_while_waiting.0 as f64 / m.idle_while_waiting.1.max(1) as f64,
        );
        eprintln!("  (c = {servers}, batch {batch}, ρ = {rho}: {:.1} s of wall time)", started.elapsed().as_secs_f64());
    }
}
