//! The worker (IaaS mode): several handlers bound to several sources in one process.

use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use courier_core::{
    BoxError, Consumer, ConsumerOptions, Delivery, Destination, DynBroker, Error, Receipt, Result, Source,
};
use futures::future::Either;
use futures::FutureExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder, ServiceExt};
use tracing::{field, Instrument, Span};

use crate::handler::{handler_service, outcome_of_box_error, BatchHandler, BoxFuture, Handler, Incoming, Outcome};
use crate::trace::TraceParent;
use courier_core::{AfterFailure, RetryPolicy};

/// How one route consumes and retries.
///
/// At most `concurrency` handlers of the route run at once; each fetches `batch`
/// messages at a time, so at most `concurrency × batch` messages are held.
///
/// ```
/// use std::time::Duration;
/// use courier::{RetryPolicy, RouteOptions};
///
/// let options = RouteOptions::default()
///     .concurrency(4)
///     .timeout(Duration::from_secs(10))
///     .retry(RetryPolicy::default().max_attempts(3));
/// assert_eq!(options.concurrency, 4);
/// ```
#[derive(Debug, Clone)]
pub struct RouteOptions {
    /// Handlers running at once. Default 8.
    pub concurrency: usize,
    /// Messages fetched per receive by each of the `concurrency` loops. Default 10.
    ///
    /// A loop handles what it fetched one after another, so with several loops a
    /// fetched message can wait for its busy loop while another slot is idle: under load
    /// with 4 slots, waits ran 41% above the M/M/c model with batches of 10 and within 3%
    /// with 1 (`BENCHMARKS.md`, "The queueing model against the worker"). Batches save
    /// round trips where a fetch is one (SQS, SQL); for latency, use 1.
    pub batch: usize,
    /// The lease asked of the broker; extended while a handler runs long. Default 30 s.
    pub lease: Duration,
    /// Retries and dead-lettering.
    pub retry: RetryPolicy,
    /// A handler running longer than this counts as a retryable failure. Default none.
    pub timeout: Option<Duration>,
    /// Where dead letters go; default the source's `.dlq` queue.
    pub dead_letter: Option<Destination>,
}

impl Default for RouteOptions {
    fn default() -> Self {
        RouteOptions {
            concurrency: 8,
            batch: 10,
            lease: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            timeout: None,
            dead_letter: None,
        }
    }
}

impl RouteOptions {
    /// Sets how many handlers run at once.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Sets how many messages each loop fetches at a time.
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// Sets the lease.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets the retry policy.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the handler timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the dead-letter destination.
    pub fn dead_letter(mut self, destination: Destination) -> Self {
        self.dead_letter = Some(destination);
        self
    }
}

type RouteService = BoxCloneService<Incoming, Outcome, BoxError>;

type BatchFn = Arc<dyn Fn(Vec<Incoming>) -> BoxFuture<Vec<Outcome>> + Send + Sync>;

/// Runs one fetch loop of a route. The handler's type is erased here, once per loop,
/// so the per-message path inside is compiled for it: no box or indirect call per message.
type StartLoop = Arc<dyn Fn(FetchLoop) -> BoxFuture<()> + Send + Sync>;

struct Route {
    source: Source,
    options: RouteOptions,
    start: StartLoop,
}

/// How a fetch loop calls its route's handler on one message.
trait CallHandler: Send + 'static {
    /// Calls the handler; the future resolves to the message's outcome.
    fn call(&mut self, incoming: Incoming) -> impl Future<Output = Outcome> + Send;
}

/// A handler function, called directly.
struct PlainHandler<H, Args> {
    handler: H,
    _args: PhantomData<fn() -> Args>,
}

impl<H: Handler<Args>, Args: 'static> CallHandler for PlainHandler<H, Args> {
    fn call(&mut self, incoming: Incoming) -> impl Future<Output = Outcome> + Send {
        self.handler.handle(incoming)
    }
}

/// A tower service (a handler wrapped in layers): waits for readiness, maps its errors.
impl CallHandler for RouteService {
    fn call(&mut self, incoming: Incoming) -> impl Future<Output = Outcome> + Send {
        dispatch(self, incoming)
    }
}

/// Counts of what a run did, returned when the worker stops.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunReport {
    /// Messages handled successfully and acked.
    pub acked: u64,
    /// Failed deliveries sent back for another attempt.
    pub retried: u64,
    /// Messages moved to a dead-letter destination.
    pub dead_lettered: u64,
    /// Deliveries left unsettled by shutdown (handed back to the broker).
    pub interrupted: u64,
    /// Fetch loops that ended before shutdown (a panic, a closed consumer): zero in a
    /// healthy run, whatever the messages were.
    pub loops_ended_early: u64,
    /// Settlements that failed for good (after their retries): each message was handed
    /// back to the broker, to come again.
    pub settlements_failed: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    acked: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    interrupted: AtomicU64,
    loops_ended_early: AtomicU64,
    settlements_failed: AtomicU64,
    /// Fetch loops the routes asked for.
    loops_expected: AtomicU64,
    /// Fetch loops running.
    loops_alive: AtomicU64,
    /// Fetch loops whose last receive failed (the broker unreachable, say).
    loops_failing: AtomicU64,
    /// Shutting down: finishing in-flight work, taking nothing new.
    draining: AtomicBool,
}

impl Counters {
    /// `None` when the worker is ready for traffic, else why not (readiness).
    #[cfg_attr(not(feature = "observe"), allow(dead_code))]
    pub(crate) fn not_ready(&self) -> Option<String> {
        if self.draining.load(Ordering::Acquire) {
            return Some("draining: shutting down, no new messages taken".to_owned());
        }
        let (expected, alive) = (self.loops_expected.load(Ordering::Acquire), self.loops_alive.load(Ordering::Acquire));
        if alive < expected {
            return Some(format!("{alive} of {expected} fetch loops running"));
        }
        match self.loops_failing.load(Ordering::Acquire) {
            0 => None,
            n => Some(format!("{n} fetch loop(s) cannot receive from the broker")),
        }
    }

    fn report(&self) -> RunReport {
        RunReport {
            acked: self.acked.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            interrupted: self.interrupted.load(Ordering::Relaxed),
            loops_ended_early: self.loops_ended_early.load(Ordering::Relaxed),
            settlements_failed: self.settlements_failed.load(Ordering::Relaxed),
        }
    }
}

/// The worker application: routes from sources to handlers, run until a shutdown signal.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use courier::{App, Broker, Destination, Json, LocalBroker, Message, Source};
///
/// #[derive(serde::Deserialize, serde::Serialize)]
/// struct Order { id: u64 }
///
/// async fn handle_order(Json(order): Json<Order>) -> Result<(), courier::Error> {
///     println!("handling order {}", order.id);
///     Ok(())
/// }
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), courier::Error> {
/// let broker = Arc::new(LocalBroker::new());
/// broker.send(&Destination::queue("orders")?, Message::json(&Order { id: 1 })?).await?;
/// let report = App::new(broker)
///     .route(Source::queue("orders")?, handle_order)
///     .run_until(tokio::time::sleep(Duration::from_millis(200)))
///     .await?;
/// assert_eq!(report.acked, 1);
/// # Ok(()) }
/// ```
pub struct App {
    broker: DynBroker,
    routes: Vec<Route>,
    shutdown_grace: Duration,
    background: Vec<Background>,
    #[cfg(feature = "observe")]
    observe: Option<std::net::SocketAddr>,
    #[cfg(feature = "observe")]
    model_window: Duration,
}

/// Work that runs beside the routes until shutdown (an outbox relay).
type Background = Box<dyn FnOnce(CancellationToken) -> futures::future::BoxFuture<'static, ()> + Send>;

impl App {
    /// A worker on `broker` with no routes yet.
    pub fn new(broker: DynBroker) -> Self {
        App {
            broker,
            routes: Vec::new(),
            shutdown_grace: Duration::from_secs(30),
            background: Vec::new(),
            #[cfg(feature = "observe")]
            observe: None,
            #[cfg(feature = "observe")]
            model_window: Duration::from_secs(10),
        }
    }

    /// Serves, on `addr` while the worker runs, what operators watch:
    /// - `/metrics`: Prometheus text format. Per route (label `source`): messages
    ///   received, succeeded, retried and dead-lettered (`courier_messages_*_total`), in
    ///   flight, fetch loops alive, and histograms of handler time
    ///   (`courier_message_processing_seconds`) and of the wait from send to receive
    ///   (`courier_message_queue_wait_seconds`, by the message's timestamp: clocks of
    ///   producer and worker in step).
    /// - `/livez`: 200 while the process serves.
    /// - `/readyz`: 200 when every fetch loop runs and receives; 503 with the reason
    ///   while starting, while a loop cannot reach the broker, and while draining.
    ///
    /// The Prometheus recorder is installed for the whole process (a `metrics`
    /// recorder is one per process); the run fails at its start if the address is taken.
    /// The two histograms cost clock readings per message, so they are recorded only
    /// while `observe` exports them; the counters and gauges always go to the process's
    /// `metrics` recorder.
    ///
    /// ```no_run
    /// # async fn run(broker: courier::DynBroker) -> Result<(), courier::Error> {
    /// use courier::{App, Source};
    /// App::new(broker)
    ///     .observe("0.0.0.0:9090".parse().unwrap())
    ///     .route(Source::queue("orders")?, |_: courier::Message| async {})
    ///     .run()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "observe")]
    pub fn observe(mut self, addr: std::net::SocketAddr) -> Self {
        self.observe = Some(addr);
        self
    }

    /// How often the per-route queueing model is measured and published with
    /// [`observe`](Self::observe) (default 10 s): `courier_route_arrival_rate` (λ),
    /// `courier_route_service_seconds` (t), `courier_route_utilisation` (ρ, with c the
    /// route's concurrency), `courier_route_queue_wait_seconds` and
    /// `courier_route_queue_length` (measured Wq, and Lq = λ·Wq), and
    /// `courier_route_predicted_queue_wait_seconds` and `_predicted_queue_length`
    /// (M/M/c's Wq and Lq for that λ, t and c; +Inf while ρ ≥ 1).
    #[cfg(feature = "observe")]
    pub fn model_window(mut self, window: Duration) -> Self {
        self.model_window = window.max(Duration::from_millis(10));
        self
    }

    /// Routes `source` to a handler function with default options.
    pub fn route<H: Handler<Args>, Args: 'static>(self, source: Source, handler: H) -> Self {
        self.route_with(source, handler, RouteOptions::default())
    }

    /// Routes `source` to a handler function with `options`.
    pub fn route_with<H: Handler<Args>, Args: 'static>(
        mut self,
        source: Source,
        handler: H,
        options: RouteOptions,
    ) -> Self {
        if options.timeout.is_some() {
            return self.route_service(source, handler_service(handler), options);
        }
        let start: StartLoop = Arc::new(move |fetch: FetchLoop| {
            Box::pin(fetch.run_each(PlainHandler { handler: handler.clone(), _args: PhantomData }))
        });
        self.routes.push(Route { source, options, start });
        self
    }

    /// Routes `source` to a tower service, e.g. a handler wrapped in layers.
    pub fn route_service<S>(mut self, source: Source, service: S, options: RouteOptions) -> Self
    where
        S: Service<Incoming, Response = Outcome> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let service = ServiceBuilder::new()
            .option_layer(options.timeout.map(tower::timeout::TimeoutLayer::new))
            .service(service.map_err(Into::into));
        let service = BoxCloneService::new(service.map_err(Into::<BoxError>::into));
        // A boxed service is Send, not Sync: each loop clones its own under a lock, once.
        let service = std::sync::Mutex::new(service);
        let start: StartLoop = Arc::new(move |fetch: FetchLoop| {
            let service = service.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
            Box::pin(fetch.run_each(service))
        });
        self.routes.push(Route { source, options, start });
        self
    }

    /// Routes `source` to a batch handler, called with each fetched batch (up to
    /// `options.batch` messages) and settling each message by its own outcome.
    pub fn route_batch<H: BatchHandler>(mut self, source: Source, handler: H, options: RouteOptions) -> Self {
        let handler: BatchFn = Arc::new(move |batch| handler.handle(batch));
        let start: StartLoop = Arc::new(move |fetch: FetchLoop| Box::pin(fetch.run_batches(handler.clone())));
        self.routes.push(Route { source, options, start });
        self
    }

    /// Relays a database's transactional outbox while the worker runs, to whatever
    /// backend the relay was made with, and stops with the worker. See
    /// [`courier::sql::outbox`](crate::sql::outbox).
    ///
    /// ```no_run
    /// # async fn example(broker: courier::DynBroker) -> Result<(), courier::Error> {
    /// let relay = courier::sql::outbox::Relay::connect("postgres://app@db/orders", broker.clone()).await?;
    /// courier::App::new(broker).outbox_relay(relay).run().await?;
    /// # Ok(()) }
    /// ```
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    pub fn outbox_relay(mut self, relay: courier_sql::outbox::Relay) -> Self {
        self.background.push(Box::new(move |stop: CancellationToken| {
            Box::pin(async move {
                let report = relay.run(Duration::from_millis(200), stop.cancelled_owned()).await;
                tracing::info!(relayed = report.relayed, dropped = report.dead_lettered, "outbox relay stopped");
            })
        }));
        self
    }

    /// How long shutdown waits for in-flight handlers. Default 30 s.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Runs until SIGINT or SIGTERM, then shuts down gracefully.
    pub async fn run(self) -> Result<RunReport> {
        self.run_until(shutdown_signal()).await
    }

    /// Runs until `signal` completes, then shuts down gracefully: stops fetching,
    /// lets in-flight handlers finish within the grace period and settles them, and
    /// hands every unfinished delivery back to the broker for prompt redelivery.
    pub async fn run_until(self, signal: impl Future<Output = ()> + Send) -> Result<RunReport> {
        let stop = CancellationToken::new();
        let hard_stop = CancellationToken::new();
        // Checked per message: an atomic load, where the token's check takes a shared lock.
        let stopping = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        // The recorder goes in before the routes register their metrics' handles.
        #[cfg(feature = "observe")]
        let observe_stop = CancellationToken::new();
        #[cfg(feature = "observe")]
        let observer = match self.observe {
            Some(addr) => {
                let recorder = crate::observe::recorder()?;
                Some(crate::observe::serve(addr, recorder, counters.clone(), observe_stop.clone()).await?)
            }
            None => None,
        };
        #[cfg(feature = "observe")]
        let observed = observer.is_some();
        #[cfg(not(feature = "observe"))]
        let observed = false;
        let mut consumers = Vec::new();
        let mut runtimes: Vec<Arc<RouteRuntime>> = Vec::new();
        let mut tasks: JoinSet<LoopEnd> = JoinSet::new();
        for route in self.routes {
            let consumer_options = ConsumerOptions {
                lease: route.options.lease,
                retry: route.options.retry.clone(),
                dead_letter: route.options.dead_letter.clone(),
                prefetch: route.options.batch.saturating_mul(route.options.concurrency),
            };
            let consumer: Arc<dyn Consumer> = Arc::from(self.broker.consumer(&route.source, consumer_options).await?);
            consumers.push(consumer.clone());
            let shared =
                Arc::new(RouteRuntime::new(&route, self.broker.clone(), counters.clone(), hard_stop.clone(), observed));
            counters.loops_expected.fetch_add(route.options.concurrency as u64, Ordering::Release);
            runtimes.push(shared.clone());
            tracing::info!(source = %route.source, concurrency = route.options.concurrency, "route started");
            for _ in 0..route.options.concurrency {
                let loop_ = FetchLoop {
                    route: shared.clone(),
                    consumer: consumer.clone(),
                    stop: stop.clone(),
                    stopping: stopping.clone(),
                    hard_stop: hard_stop.clone(),
                };
                let (source, fetch) = (route.source.clone(), (route.start)(loop_));
                let runtime = shared.clone();
                // A panic is caught here so the loop's end still names its route.
                tasks.spawn(async move {
                    runtime.loop_alive(true);
                    let panic = AssertUnwindSafe(fetch).catch_unwind().await.err();
                    runtime.loop_alive(false);
                    LoopEnd { source, panic: panic.map(|p| panic_text(&p)) }
                });
            }
        }
        // The queueing model, measured per window while metrics are exported.
        #[cfg(feature = "observe")]
        let model_ticker = observed.then(|| {
            let window = self.model_window;
            let runtimes = std::mem::take(&mut runtimes);
            tokio::spawn(async move {
                let mut last = vec![ModelSample::default(); runtimes.len()];
                let mut at = tokio::time::Instant::now();
                loop {
                    tokio::time::sleep(window).await;
                    let elapsed = at.elapsed();
                    at = tokio::time::Instant::now();
                    for (runtime, last) in runtimes.iter().zip(last.iter_mut()) {
                        *last = runtime.publish_model(*last, elapsed);
                    }
                }
            })
        });
        drop(runtimes);
        let background_stop = CancellationToken::new();
        let mut background = JoinSet::new();
        let has_background = !self.background.is_empty();
        for task in self.background {
            background.spawn(task(background_stop.clone()));
        }
        // Fetch loops end only at shutdown: one that ends before is an error, and a
        // worker with none left stops with an error rather than as if it had finished.
        let failed = tokio::select! {
            _ = signal => None,
            failed = watch_loops(&mut tasks, &counters), if !(tasks.is_empty() && has_background) => failed,
        };
        tracing::info!(grace = ?self.shutdown_grace, "shutting down: no new fetches, finishing in-flight work");
        stopping.store(true, Ordering::Release);
        counters.draining.store(true, Ordering::Release);
        stop.cancel();
        if tokio::time::timeout(self.shutdown_grace, wait_all(&mut tasks)).await.is_err() {
            tracing::warn!("grace period over: handing unfinished deliveries back to the broker");
            hard_stop.cancel();
            wait_all(&mut tasks).await;
        }
        background_stop.cancel();
        while background.join_next().await.is_some() {}
        for consumer in consumers {
            if let Err(e) = consumer.close().await {
                tracing::warn!(error = %e, "closing a consumer failed; its unsettled messages return after their lease");
            }
        }
        #[cfg(feature = "observe")]
        if let Some(ticker) = model_ticker {
            ticker.abort();
        }
        #[cfg(feature = "observe")]
        if let Some(server) = observer {
            observe_stop.cancel();
            let _ = server.await;
        }
        let report = counters.report();
        if let Some(error) = failed {
            tracing::error!(?report, error = %error, "worker stopped: no fetch loop left");
            return Err(error);
        }
        tracing::info!(?report, "worker stopped");
        Ok(report)
    }
}

/// How a fetch loop ended: the route it served, and the panic that ended it, if one did.
struct LoopEnd {
    source: Source,
    panic: Option<String>,
}

impl LoopEnd {
    fn why(&self) -> String {
        match &self.panic {
            Some(panic) => format!("panicked: {panic}"),
            None => "stopped fetching (the consumer or broker was closed)".to_owned(),
        }
    }
}

/// While the worker runs: every fetch loop that ends is an error (loops end only at
/// shutdown). Returns once none is left, with an error naming the routes whose loops
/// ended; `None` at once when there were none (an app without routes has nothing to do).
async fn watch_loops(tasks: &mut JoinSet<LoopEnd>, counters: &Counters) -> Option<Error> {
    if tasks.is_empty() {
        return None;
    }
    let mut ended: Vec<String> = Vec::new();
    while let Some(result) = tasks.join_next().await {
        counters.loops_ended_early.fetch_add(1, Ordering::Relaxed);
        let (source, why) = match result {
            Ok(end) => (end.source.to_string(), end.why()),
            Err(e) => ("unknown".to_owned(), e.to_string()),
        };
        tracing::error!(%source, reason = %why, left = tasks.len(), "a fetch loop ended before shutdown");
        let entry = format!("{source} ({why})");
        if !ended.contains(&entry) {
            ended.push(entry);
        }
    }
    Some(Error::fatal(format!("every fetch loop ended before shutdown: {}", ended.join(", "))))
}

/// At shutdown: waits for the fetch loops to end, reporting panics.
async fn wait_all(tasks: &mut JoinSet<LoopEnd>) {
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(LoopEnd { source, panic: Some(panic) }) => {
                tracing::error!(%source, %panic, "a fetch loop panicked")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "a fetch loop ended abnormally"),
        }
    }
}

/// Completes on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Per-route state shared by its fetch loops.
struct RouteRuntime {
    source: Source,
    options: RouteOptions,
    broker: DynBroker,
    delayed_retry: bool,
    lease_extension: bool,
    counters: Arc<Counters>,
    metrics: RouteMetrics,
    /// Metrics are exported: worth a clock reading per message for the queue wait.
    observed: bool,
    model: ModelTotals,
    /// Shutdown's grace is over: settlements stop being retried.
    hard_stop: CancellationToken,
}

/// Running totals of a route for its queueing model (kept only when metrics are exported).
#[derive(Default)]
struct ModelTotals {
    received: AtomicU64,
    handled: AtomicU64,
    busy_nanos: AtomicU64,
    waited: AtomicU64,
    wait_nanos: AtomicU64,
}

/// The totals at the last tick, to take rates over a window.
#[derive(Default, Clone, Copy)]
#[cfg_attr(not(feature = "observe"), allow(dead_code))]
struct ModelSample {
    received: u64,
    handled: u64,
    busy_nanos: u64,
    waited: u64,
    wait_nanos: u64,
}

#[cfg_attr(not(feature = "observe"), allow(dead_code))]
struct RouteMetrics {
    received: metrics::Counter,
    succeeded: metrics::Counter,
    retried: metrics::Counter,
    dead_lettered: metrics::Counter,
    /// Handler plus settlement, per message.
    processing: metrics::Histogram,
    in_flight: metrics::Gauge,
    /// From the message's timestamp to its receipt.
    queue_wait: metrics::Histogram,
    loops_alive: metrics::Gauge,
    /// The queueing model, measured over each window: λ, t, ρ, Wq and the M/M/c Wq.
    arrival_rate: metrics::Gauge,
    service_time: metrics::Gauge,
    utilisation: metrics::Gauge,
    mean_wait: metrics::Gauge,
    predicted_wait: metrics::Gauge,
    queue_length: metrics::Gauge,
    predicted_length: metrics::Gauge,
}

impl RouteRuntime {
    fn new(
        route: &Route,
        broker: DynBroker,
        counters: Arc<Counters>,
        hard_stop: CancellationToken,
        observed: bool,
    ) -> Self {
        let caps = broker.capabilities();
        let label = route.source.to_string();
        // Handles are registered once so the per-message cost is an atomic add.
        let metrics = RouteMetrics {
            received: metrics::counter!("courier_messages_received_total", "source" => label.clone()),
            succeeded: metrics::counter!("courier_messages_succeeded_total", "source" => label.clone()),
            retried: metrics::counter!("courier_messages_retried_total", "source" => label.clone()),
            dead_lettered: metrics::counter!("courier_messages_dead_lettered_total", "source" => label.clone()),
            processing: metrics::histogram!("courier_message_processing_seconds", "source" => label.clone()),
            in_flight: metrics::gauge!("courier_messages_in_flight", "source" => label.clone()),
            queue_wait: metrics::histogram!("courier_message_queue_wait_seconds", "source" => label.clone()),
            loops_alive: metrics::gauge!("courier_fetch_loops_alive", "source" => label.clone()),
            arrival_rate: metrics::gauge!("courier_route_arrival_rate", "source" => label.clone()),
            service_time: metrics::gauge!("courier_route_service_seconds", "source" => label.clone()),
            utilisation: metrics::gauge!("courier_route_utilisation", "source" => label.clone()),
            mean_wait: metrics::gauge!("courier_route_queue_wait_seconds", "source" => label.clone()),
            predicted_wait: metrics::gauge!("courier_route_predicted_queue_wait_seconds", "source" => label.clone()),
            queue_length: metrics::gauge!("courier_route_queue_length", "source" => label.clone()),
            predicted_length: metrics::gauge!("courier_route_predicted_queue_length", "source" => label),
        };
        RouteRuntime {
            source: route.source.clone(),
            options: route.options.clone(),
            delayed_retry: caps.delayed_retry,
            lease_extension: caps.lease_extension,
            broker,
            counters,
            metrics,
            observed,
            model: ModelTotals::default(),
            hard_stop,
        }
    }

    /// One message's handling took `seconds`.
    fn processed(&self, seconds: f64) {
        self.metrics.processing.record(seconds);
        if self.observed {
            self.model.handled.fetch_add(1, Ordering::Relaxed);
            self.model.busy_nanos.fetch_add((seconds * 1e9) as u64, Ordering::Relaxed);
        }
    }

    /// Sets the model gauges from the totals since `last`, `window` ago; returns the totals.
    #[cfg_attr(not(feature = "observe"), allow(dead_code))]
    fn publish_model(&self, last: ModelSample, window: Duration) -> ModelSample {
        let m = &self.model;
        let now = ModelSample {
            received: m.received.load(Ordering::Relaxed),
            handled: m.handled.load(Ordering::Relaxed),
            busy_nanos: m.busy_nanos.load(Ordering::Relaxed),
            waited: m.waited.load(Ordering::Relaxed),
            wait_nanos: m.wait_nanos.load(Ordering::Relaxed),
        };
        let lambda = (now.received - last.received) as f64 / window.as_secs_f64();
        self.metrics.arrival_rate.set(lambda);
        if let Some(mean) = (now.busy_nanos - last.busy_nanos).checked_div(now.handled - last.handled) {
            let service = Duration::from_nanos(mean);
            let slots = self.options.concurrency as u32;
            let model = crate::queueing::Queue::new(lambda, service, slots);
            self.metrics.service_time.set(service.as_secs_f64());
            self.metrics.utilisation.set(model.utilisation());
            // Unstable (ρ ≥ 1): no steady state; +Inf says so in Prometheus terms.
            let predicted = model.predict();
            self.metrics.predicted_wait.set(predicted.map_or(f64::INFINITY, |p| p.queue_wait.as_secs_f64()));
            self.metrics.predicted_length.set(predicted.map_or(f64::INFINITY, |p| p.queue_length));
        }
        let waited = now.waited - last.waited;
        if waited > 0 {
            let wait = (now.wait_nanos - last.wait_nanos) as f64 / waited as f64 / 1e9;
            self.metrics.mean_wait.set(wait);
            self.metrics.queue_length.set(lambda * wait); // Little's law: Lq = λ·Wq
        }
        now
    }

    /// A fetch loop of this route started (`true`) or ended.
    fn loop_alive(&self, alive: bool) {
        if alive {
            self.counters.loops_alive.fetch_add(1, Ordering::AcqRel);
            self.metrics.loops_alive.increment(1.0);
        } else {
            self.counters.loops_alive.fetch_sub(1, Ordering::AcqRel);
            self.metrics.loops_alive.decrement(1.0);
        }
    }

    /// Counts a received message and, when metrics are exported, its wait since the send.
    fn received(&self, message: &courier_core::Message) {
        self.metrics.received.increment(1);
        if self.observed {
            self.model.received.fetch_add(1, Ordering::Relaxed);
            if let Ok(wait) = std::time::SystemTime::now().duration_since(message.timestamp) {
                self.metrics.queue_wait.record(wait);
                self.model.waited.fetch_add(1, Ordering::Relaxed);
                self.model.wait_nanos.fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
            }
        }
    }

    /// A receive of a loop succeeded: a loop that was failing no longer is.
    fn receiving(&self, failures: &mut u32) {
        if *failures > 0 {
            self.counters.loops_failing.fetch_sub(1, Ordering::AcqRel);
        }
        *failures = 0;
    }
}

struct FetchLoop {
    route: Arc<RouteRuntime>,
    consumer: Arc<dyn Consumer>,
    stop: CancellationToken,
    stopping: Arc<AtomicBool>,
    hard_stop: CancellationToken,
}

impl FetchLoop {
    /// Fetches into `batch` (empty) until it holds messages; `false` once the loop
    /// should end.
    async fn next_batch(&mut self, failures: &mut u32, batch: &mut Vec<Delivery>) -> bool {
        let fetched = self.fetch(failures, batch).await;
        if !fetched {
            self.route.receiving(failures); // an ended loop is not failing
        }
        fetched
    }

    async fn fetch(&mut self, failures: &mut u32, batch: &mut Vec<Delivery>) -> bool {
        while !self.stopping.load(Ordering::Acquire) {
            // One vector for every fetch of the loop: allocating one a fetch cost a
            // tenth of a message's handling in batches of ten.
            if self.stop.is_cancelled() {
                return false;
            }
            let mut receive = self.consumer.receive_into(self.route.options.batch, Duration::from_secs(1), batch);
            // A queue with messages ready answers on the first poll: no stop future to
            // make, poll and drop then (38 instructions a message in batches of ten).
            let received = match futures::poll!(&mut receive) {
                Poll::Ready(r) => r,
                Poll::Pending => tokio::select! {
                    biased;
                    _ = self.stop.cancelled() => return false,
                    r = &mut receive => r,
                },
            };
            match received {
                // Nothing arrived within the wait: ask again (an idle route keeps fetching).
                Ok(0) => self.route.receiving(failures),
                Ok(_) => {
                    self.route.receiving(failures);
                    return true;
                }
                Err(Error::Closed { .. }) => return false,
                Err(e) => {
                    // The adapter already retried transient faults; back off before asking again.
                    if *failures == 0 {
                        self.route.counters.loops_failing.fetch_add(1, Ordering::AcqRel);
                        // not ready
                    }
                    *failures += 1;
                    let pause = Duration::from_millis(100 * 2u64.pow((*failures).min(6)));
                    tracing::warn!(source = %self.route.source, error = %e, ?pause, "receive failed");
                    tokio::select! {
                        _ = self.stop.cancelled() => return false,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
        false
    }

    /// Handles and settles fetched messages one at a time, each through `handler`.
    async fn run_each(mut self, mut handler: impl CallHandler) {
        let mut failures = 0;
        let mut fetched = Vec::new();
        let mut acks = AckTally { counters: self.route.counters.clone(), here: 0 };
        while self.next_batch(&mut failures, &mut fetched).await {
            // Messages of a loop are handled one after another, so one clock reading
            // after each settlement ends one message's processing time and starts the next.
            // Only while metrics are exported: two clock readings cost more than a no-op
            // handler's whole call.
            let mut mark = self.route.observed.then(Instant::now);
            let mut batch = fetched.drain(..);
            while let Some(delivery) = batch.next() {
                if self.stopping.load(Ordering::Acquire) {
                    // Not started: leave unsettled; closing the consumer hands it back.
                    self.route.counters.interrupted.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                // Everything below runs right here, not in a nested async fn: passing the
                // delivery into one copies it (and the message, twice more) between future
                // states, which cost a third of the worker's overhead.
                let span = message_span(&self.route, &delivery);
                let route = &*self.route;
                route.received(&delivery);
                route.metrics.in_flight.increment(1.0);
                let attempt = delivery.attempt();
                // The message moves into the handler; the receipt stays here to settle it.
                let (message, receipt) = delivery.into_parts();
                let (source, broker) = (route.source.clone(), Some(route.broker.clone()));
                // A panic in the call itself (an extractor, or a handler that panics before
                // returning its future) fails the message as a panic in its future does.
                // `Incoming` is built inside the call: one copy of the message fewer.
                let call = || handler.call(Incoming { message, attempt, source, broker });
                let fut = match (std::panic::catch_unwind(AssertUnwindSafe(call)), &span) {
                    (Ok(fut), None) => Either::Left(Either::Left(fut)),
                    // Traced, the handler runs in its span.
                    (Ok(fut), Some(span)) => Either::Left(Either::Right(fut.instrument(span.clone()))),
                    (Err(panic), _) => Either::Right(std::future::ready(outcome_or_panic(Err(panic)))),
                };
                let mut fut = std::pin::pin!(AssertUnwindSafe(fut).catch_unwind());
                // Most handlers finish on the first poll: no timers, no boxing for them.
                let outcome = match futures::poll!(fut.as_mut()) {
                    Poll::Ready(result) => Some(outcome_or_panic(result)),
                    Poll::Pending => {
                        let fut = fut.map(outcome_or_panic);
                        let supervised = supervise(route, &self.hard_stop, fut, &receipt, batch.as_slice());
                        Box::pin(supervised.instrument(span.clone().unwrap_or_else(Span::none))).await
                    }
                };
                route.metrics.in_flight.decrement(1.0);
                if outcome == Some(Outcome::Ack) {
                    // Acked right here too: moving the receipt into `conclude`'s
                    // state costs more than the ack itself on a fast backend, and so
                    // does awaiting an ack that an in-process queue settles at once.
                    if let Some(span) = &span {
                        record_outcome(span, Outcome::Ack.kind());
                    }
                    route.metrics.succeeded.increment(1);
                    let acked = match receipt.ack_now() {
                        Some(result) => result,
                        None => receipt.ack().await,
                    };
                    match acked {
                        Ok(()) => acks.here += 1,
                        Err(e) => ack_failed(route, &receipt, e, span.unwrap_or_else(Span::none)).await,
                    }
                } else {
                    conclude(route, receipt, outcome, span.unwrap_or_else(Span::none)).await;
                }
                if let Some(since) = mark {
                    let now = Instant::now();
                    self.route.processed((now - since).as_secs_f64());
                    mark = Some(now);
                }
            }
            acks.flush();
        }
    }

    /// Hands each fetched batch whole to a batch handler.
    async fn run_batches(mut self, handler: BatchFn) {
        let mut failures = 0;
        let mut fetched = Vec::new();
        while self.next_batch(&mut failures, &mut fetched).await {
            let batch = std::mem::take(&mut fetched);
            let started = Instant::now();
            let size = batch.len().max(1);
            self.handle_batch(&handler, batch).await;
            let per_message = started.elapsed().as_secs_f64() / size as f64;
            (0..size).for_each(|_| self.route.processed(per_message));
        }
    }

    fn incoming(&self, delivery: &Delivery) -> Incoming {
        Incoming {
            message: delivery.message().clone(),
            attempt: delivery.attempt(),
            source: self.route.source.clone(),
            broker: Some(self.route.broker.clone()),
        }
    }

    async fn handle_batch(&mut self, handler: &BatchFn, batch: Vec<Delivery>) {
        let route = self.route.clone();
        let span = tracing::info_span!("courier.handle_batch", source = %route.source, size = batch.len());
        batch.iter().for_each(|d| route.received(d));
        let incoming = batch.iter().map(|d| self.incoming(d)).collect();
        // Called inside the guarded future, so a panic in the call itself is caught too.
        let call = AssertUnwindSafe(async { handler(incoming).await }).catch_unwind().map(|r| match r {
            Ok(outcomes) => outcomes,
            Err(panic) => vec![Outcome::retry(format!("batch handler panicked: {}", panic_text(&panic))); batch.len()],
        });
        let Some((first, rest)) = batch.split_first() else { return };
        let outcomes = supervise(&route, &self.hard_stop, call, first.receipt(), rest).instrument(span.clone()).await;
        let Some(mut outcomes) = outcomes else {
            route.counters.interrupted.fetch_add(batch.len() as u64, Ordering::Relaxed);
            return;
        };
        if outcomes.len() != batch.len() {
            tracing::error!(
                outcomes = outcomes.len(),
                messages = batch.len(),
                "batch handler returned the wrong number of outcomes; retrying the unanswered"
            );
            let missing = Outcome::retry(format!(
                "batch handler returned {} outcomes for {} messages",
                outcomes.len(),
                batch.len()
            ));
            outcomes.resize(batch.len(), missing);
        }
        for (delivery, outcome) in batch.into_iter().zip(outcomes) {
            settle(&route, delivery.into_parts().1, outcome).instrument(span.clone()).await;
        }
    }
}

/// The span of one message's handling; `None` when no subscriber wants it (making and
/// dropping a disabled span costs as much as a no-op handler's call).
///
/// The level is asked first, because a disabled `info_span!` is not free: with
/// tracing's `log` feature (sqlx turns it on) and no subscriber, it formats its fields
/// for the `log` crate, which cost a third of the worker's instructions per message.
/// When some subscriber takes INFO, `info_span!` applies its filters (targets, names).
fn message_span(route: &RouteRuntime, delivery: &Delivery) -> Option<Span> {
    if tracing::Level::INFO > tracing::level_filters::LevelFilter::current() {
        return None;
    }
    let span = tracing::info_span!(
        "courier.handle",
        message.id = %delivery.id,
        source = %route.source,
        attempt = delivery.attempt(),
        trace_id = field::Empty,
        outcome = field::Empty,
    );
    if span.is_disabled() {
        return None;
    }
    #[cfg(feature = "otel")]
    crate::otel::adopt_parent(&span, delivery);
    if let Some(trace) = delivery.header(courier_core::headers::TRACEPARENT).and_then(|t| t.parse::<TraceParent>().ok())
    {
        span.record("trace_id", field::display(format_args!("{:032x}", trace.trace_id)));
    }
    Some(span)
}

/// Settles a handled message from an outcome other than an ack, which the fetch loop
/// settles itself (`None`: shutdown interrupted it).
async fn conclude(route: &RouteRuntime, receipt: Receipt, outcome: Option<Outcome>, span: Span) {
    let Some(outcome) = outcome else {
        record_outcome(&span, "interrupted");
        route.counters.interrupted.fetch_add(1, Ordering::Relaxed);
        return;
    };
    record_outcome(&span, outcome.kind());
    Box::pin(settle(route, receipt, outcome).instrument(span)).await;
}

/// The acks of one fetch loop's messages, added to the route's count once a batch (and
/// when the loop ends, however it ends): an atomic add a message cost about 2% of a
/// no-op handler's throughput on the in-process backend.
struct AckTally {
    counters: Arc<Counters>,
    here: u64,
}

impl AckTally {
    fn flush(&mut self) {
        if self.here > 0 {
            self.counters.acked.fetch_add(std::mem::take(&mut self.here), Ordering::Relaxed);
        }
    }
}

impl Drop for AckTally {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Records how a message's handling ended on its span, if it has one (`record` on a
/// disabled span still goes through the `log` bridge's checks).
fn record_outcome(span: &Span, outcome: &str) {
    if !span.is_disabled() {
        span.record("outcome", outcome);
    }
}

/// After a failed ack: tries again while the failure is retryable, then counts the
/// message as acked or reports the failure.
async fn ack_failed(route: &RouteRuntime, receipt: &Receipt, error: Error, span: Span) {
    let outcome = Outcome::Ack;
    let result = if error.is_retryable() {
        // A span is never entered across an await: `instrument` it instead.
        Box::pin(with_settle_retries(&route.hard_stop, || receipt.ack()).instrument(span.clone())).await
    } else {
        Err(error)
    };
    match result {
        Ok(()) => route.counters.acked.fetch_add(1, Ordering::Relaxed),
        Err(_) => route.counters.settlements_failed.fetch_add(1, Ordering::Relaxed),
    };
    span.in_scope(|| report_settle_failure(result, &outcome));
}

/// Drives a handler future, extending the leases of its deliveries while it runs long;
/// `None` when shutdown's grace ran out first.
async fn supervise<T>(
    route: &RouteRuntime,
    hard_stop: &CancellationToken,
    fut: impl Future<Output = T>,
    current: &Receipt,
    waiting: &[Delivery],
) -> Option<T> {
    tokio::pin!(fut);
    let lease = route.options.lease;
    let extend = route.lease_extension;
    loop {
        tokio::select! {
            biased;
            outcome = &mut fut => return Some(outcome),
            _ = hard_stop.cancelled() => return None,
            _ = tokio::time::sleep(lease / 2), if extend => {
                for r in std::iter::once(current).chain(waiting.iter().map(Delivery::receipt)) {
                    if let Err(e) = r.extend_lease(lease).await {
                        tracing::warn!(message.id = %r.id(), error = %e, "could not extend the lease; the message may be redelivered while still being handled");
                    }
                }
            }
        }
    }
}

fn report_settle_failure(result: Result<()>, outcome: &Outcome) {
    match result {
        Ok(()) => {}
        // Expected after a lost connection, often for a whole prefetch at once; the
        // adapter already warned about the loss itself.
        Err(e @ Error::LeaseLost { .. }) => {
            tracing::debug!(error = %e, outcome = outcome.kind(), "settlement failed; the message will be delivered again")
        }
        Err(e) => {
            tracing::warn!(error = %e, outcome = outcome.kind(), "settlement failed; the message returns after its lease")
        }
    }
}

/// Calls the service once, turning panics and service errors into outcomes.
pub(crate) async fn dispatch<S>(service: &mut S, incoming: Incoming) -> Outcome
where
    S: Service<Incoming, Response = Outcome>,
    S::Error: Into<BoxError>,
{
    let call = async {
        match service.ready().await {
            Ok(svc) => match svc.call(incoming).await {
                Ok(outcome) => outcome,
                Err(e) => outcome_of_box_error(e.into()),
            },
            Err(e) => outcome_of_box_error(e.into()),
        }
    };
    catch_panics(call).await
}

/// A panic in a handler becomes a retryable failure of that message only.
pub(crate) async fn catch_panics(fut: impl Future<Output = Outcome>) -> Outcome {
    outcome_or_panic(AssertUnwindSafe(fut).catch_unwind().await)
}

fn outcome_or_panic(result: std::thread::Result<Outcome>) -> Outcome {
    result.unwrap_or_else(|panic| Outcome::retry(format!("handler panicked: {}", panic_text(&panic))))
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_owned())
}

/// Settles a delivery from its outcome. The receipt owns the policy: it decides retry
/// versus dead letter and builds the dead letter; the worker only counts and, on a
/// backend that cannot delay a redelivery, holds the message for its backoff.
async fn settle(route: &RouteRuntime, delivery: Receipt, outcome: Outcome) {
    // Counted once the settlement went through: one that failed for good is counted as
    // such, and its receipt, dropped unsettled, hands the message back.
    let counted = |counter: &AtomicU64, metric: &metrics::Counter, result: &Result<()>| {
        if result.is_ok() {
            counter.fetch_add(1, Ordering::Relaxed);
            metric.increment(1);
        } else {
            route.counters.settlements_failed.fetch_add(1, Ordering::Relaxed);
        }
    };
    let result = match &outcome {
        Outcome::Ack => {
            let result = with_settle_retries(&route.hard_stop, || delivery.ack()).await;
            counted(&route.counters.acked, &route.metrics.succeeded, &result);
            result
        }
        Outcome::Retry { after, reason } => match delivery.after_failure(*after) {
            AfterFailure::DeadLetter => {
                tracing::warn!(reason, attempt = delivery.attempt(), "giving up: dead-lettering");
                let result =
                    with_settle_retries(&route.hard_stop, || async { delivery.fail(reason, *after).await.map(drop) })
                        .await;
                counted(&route.counters.dead_lettered, &route.metrics.dead_lettered, &result);
                result
            }
            AfterFailure::Redeliver { delay } => {
                route.counters.retried.fetch_add(1, Ordering::Relaxed);
                route.metrics.retried.increment(1);
                tracing::info!(reason, ?delay, "retrying");
                if route.delayed_retry || delay.is_zero() {
                    with_settle_retries(&route.hard_stop, || delivery.retry_after(delay)).await
                } else {
                    // The backend cannot delay a redelivery: hold the message for the
                    // delay, then hand it back, so the backoff is still honoured.
                    let hard_stop = route.hard_stop.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        if let Err(e) = with_settle_retries(&hard_stop, || delivery.retry()).await {
                            tracing::warn!(error = %e, "retry failed; the message returns after its lease");
                        }
                    });
                    Ok(())
                }
            }
        },
        Outcome::Reject { reason } => {
            tracing::warn!(reason, "rejected: dead-lettering");
            let result = with_settle_retries(&route.hard_stop, || delivery.reject(reason)).await;
            counted(&route.counters.dead_lettered, &route.metrics.dead_lettered, &result);
            result
        }
    };
    report_settle_failure(result, &outcome);
}

/// The first pause before a failed settlement is tried again; it doubles up to
/// [`SETTLE_RETRY_MAX`].
const SETTLE_RETRY_FIRST: Duration = Duration::from_millis(50);
/// The longest pause between tries of a failed settlement.
const SETTLE_RETRY_MAX: Duration = Duration::from_secs(5);

/// Tries a settlement again, with capped exponential backoff, for as long as it fails
/// retryably: a settlement is never abandoned while the broker may still take it. It
/// ends on success, on an error that is not retryable (including a lost lease or a
/// delivery already settled), or when shutdown's grace is over (`hard_stop`). On an
/// error the receipt is left unsettled and dropped, so the broker delivers the message
/// again after its lease.
async fn with_settle_retries<'a, F, Fut>(hard_stop: &CancellationToken, mut settle: F) -> Result<()>
where
    F: FnMut() -> Fut + 'a,
    Fut: Future<Output = Result<()>> + 'a,
{
    let mut pause = SETTLE_RETRY_FIRST;
    let mut tries = 1u32;
    loop {
        match settle().await {
            Err(e) if e.is_retryable() => {
                tracing::debug!(error = %e, tries, ?pause, "settlement failed; trying again");
                tokio::select! {
                    biased;
                    _ = hard_stop.cancelled() => {
                        tracing::warn!(error = %e, tries, "shutdown's grace is over: no more tries of a failed settlement; the message returns after its lease");
                        return Err(e);
                    }
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(SETTLE_RETRY_MAX);
                tries = tries.saturating_add(1);
            }
            other => return other,
        }
    }
}
