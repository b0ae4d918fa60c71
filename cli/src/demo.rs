//! The demo: an order pipeline that shows handlers, retries and dead-lettering on
//! whichever backend is configured (`courier demo`).
//!
//! A producer sends orders to `…orders`; `validate_order` rejects an invalid order
//! (straight to the dead-letter queue) and forwards the rest to `…payments`;
//! `charge_payment` fails for one order every time, so it retries with backoff and
//! then dead-letters. A third route watches both dead-letter queues. A repeat delivery
//! (queues such as SQS and Kafka deliver at least once) charges nothing twice: charges
//! are kept by order.
//!
//! It uses only the public API of the `courier` library, as an application would.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use courier::{
    headers, App, Context, Destination, DynBroker, Error, Json, Message, MessageId, Result, RetryPolicy, RouteOptions,
    RunReport, Source,
};
use tokio::sync::Notify;

/// Order number whose payment always fails (retried, then dead-lettered).
pub const FLAKY_ORDER: u64 = 7;
/// Order number with an invalid total (dead-lettered at once).
pub const INVALID_ORDER: u64 = 9;

/// An order as the producer sends it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Order {
    /// Order number.
    pub id: u64,
    /// Total in cents.
    pub total_cents: i64,
}

/// A payment request derived from a valid order.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Payment {
    /// The order it pays for.
    pub order_id: u64,
    /// Amount in cents.
    pub amount_cents: i64,
}

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How many orders to send (at least 10, so both failure cases occur).
    pub orders: u64,
    /// Print nothing while running.
    pub quiet: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions { orders: 20, quiet: false }
    }
}

/// What the demo saw.
#[derive(Debug, Clone)]
pub struct DemoSummary {
    /// Orders sent.
    pub orders: u64,
    /// Payments charged.
    pub charged: u64,
    /// Dead letters: message id, reason, attempts.
    pub dead_letters: Vec<DeadLetterLine>,
    /// The worker's counts.
    pub report: RunReport,
    /// How long it took.
    pub elapsed: Duration,
}

/// One dead letter as the demo reports it.
#[derive(Debug, Clone)]
pub struct DeadLetterLine {
    /// Where it came from.
    pub origin: String,
    /// Why.
    pub reason: String,
    /// Deliveries it had.
    pub attempts: String,
}

/// What has been settled. A queue may deliver a message more than once (SQS and Kafka
/// deliver at least once), so both are kept by key, not counted: a payment by its
/// order, as a payment provider's idempotency key would, and a dead letter by its id.
#[derive(Default)]
struct Progress {
    charged: Mutex<HashSet<u64>>,
    dead: Mutex<DeadLetters>,
    changed: Notify,
    quiet: bool,
}

impl Progress {
    fn say(&self, line: impl AsRef<str>) {
        if !self.quiet {
            println!("  {}", line.as_ref());
        }
    }
    fn settled(&self) -> u64 {
        self.charged.lock().unwrap().len() as u64 + self.dead.lock().unwrap().lines.len() as u64
    }
}

/// The dead letters shown, in the order they came, and the ids that keep a repeat out.
#[derive(Default)]
struct DeadLetters {
    ids: HashSet<MessageId>,
    lines: Vec<DeadLetterLine>,
}

/// Runs the pipeline on `broker` until every order is charged or dead-lettered.
pub async fn run(broker: DynBroker, options: DemoOptions) -> Result<DemoSummary> {
    let started = Instant::now();
    let orders_total = options.orders.max(10);
    // Names unique to this run, so leftovers of an earlier run on a real broker never mix in.
    let run = format!("demo-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let orders = Source::queue(&format!("{run}.orders"))?;
    let payments = Source::queue(&format!("{run}.payments"))?;
    let progress = Arc::new(Progress { quiet: options.quiet, ..Default::default() });
    for source in [&orders, &payments] {
        broker.declare(source).await?;
        broker.declare(&Source::Queue(source.default_dead_letter().name().clone())).await?;
    }

    let validate_order = {
        let (payments, progress) = (payments.destination(), progress.clone());
        move |Json(order): Json<Order>, ctx: Context| {
            let (payments, progress) = (payments.clone(), progress.clone());
            async move {
                if order.total_cents <= 0 {
                    progress.say(format!("order {:>2}: invalid total {}; rejecting", order.id, order.total_cents));
                    return Err(Error::fatal(format!("order {} has a non-positive total", order.id)));
                }
                let payment = Payment { order_id: order.id, amount_cents: order.total_cents };
                ctx.send(&payments, Message::json(&payment)?.with_id(format!("payment-{}", order.id))).await?;
                Ok(())
            }
        }
    };
    let max_attempts = 3;
    let charge_payment = {
        let progress = progress.clone();
        move |Json(payment): Json<Payment>, ctx: Context| {
            let progress = progress.clone();
            async move {
                if payment.order_id == FLAKY_ORDER {
                    progress.say(format!(
                        "order {:>2}: card issuer timed out (attempt {} of {max_attempts})",
                        payment.order_id, ctx.attempt
                    ));
                    return Err(Error::retryable("card issuer timed out"));
                }
                if !progress.charged.lock().unwrap().insert(payment.order_id) {
                    progress
                        .say(format!("order {:>2}: already charged; a repeat delivery is ignored", payment.order_id));
                    return Ok(());
                }
                progress.changed.notify_one();
                Ok(())
            }
        }
    };
    let watch_dead_letters = {
        let progress = progress.clone();
        move |message: Message| {
            let progress = progress.clone();
            async move {
                let mut dead = progress.dead.lock().unwrap();
                if !dead.ids.insert(message.id.clone()) {
                    return; // a repeat delivery of a dead letter already shown
                }
                let line = DeadLetterLine {
                    origin: message.header(headers::DEAD_LETTER_ORIGIN).unwrap_or("?").to_owned(),
                    reason: message.header(headers::DEAD_LETTER_REASON).unwrap_or("?").to_owned(),
                    attempts: message.header(headers::DEAD_LETTER_ATTEMPTS).unwrap_or("?").to_owned(),
                };
                progress.say(format!("dead letter from {}: {}", line.origin, line.reason));
                dead.lines.push(line);
                drop(dead);
                progress.changed.notify_one();
            }
        }
    };

    let retry = RetryPolicy::default()
        .max_attempts(max_attempts)
        .backoff(Duration::from_millis(100), Duration::from_secs(1))
        .without_jitter();
    let route = RouteOptions::default().concurrency(4).retry(retry);
    let app = App::new(broker.clone())
        .route_with(orders.clone(), validate_order, route.clone())
        .route_with(payments.clone(), charge_payment, route.clone())
        .route_with(
            Source::Queue(orders.default_dead_letter().name().clone()),
            watch_dead_letters.clone(),
            route.clone(),
        )
        .route_with(Source::Queue(payments.default_dead_letter().name().clone()), watch_dead_letters, route)
        .shutdown_grace(Duration::from_secs(5));

    let batch: Vec<Message> = (1..=orders_total)
        .map(|id| {
            let total_cents = if id == INVALID_ORDER { -500 } else { 1_000 + id as i64 * 25 };
            Message::json(&Order { id, total_cents }).map(|m| m.with_id(format!("order-{id}")))
        })
        .collect::<Result<_>>()?;
    let to: Destination = orders.destination();
    for chunk in batch.chunks(broker.capabilities().max_batch.clamp(1, 100)) {
        broker.send_batch(&to, chunk.to_vec()).await?;
    }
    progress.say(format!("sent {orders_total} orders to {orders}"));

    let done = {
        let progress = progress.clone();
        async move {
            while progress.settled() < orders_total {
                progress.changed.notified().await;
            }
        }
    };
    let report = app.run_until(done).await?;
    let charged = progress.charged.lock().unwrap().len() as u64;
    let dead_letters = progress.dead.lock().unwrap().lines.clone();
    Ok(DemoSummary { orders: orders_total, charged, dead_letters, report, elapsed: started.elapsed() })
}

impl std::fmt::Display for DemoSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "Summary")?;
        writeln!(f, "  orders sent     {:>4}", self.orders)?;
        writeln!(f, "  charged         {:>4}", self.charged)?;
        writeln!(f, "  dead-lettered   {:>4}", self.dead_letters.len())?;
        for d in &self.dead_letters {
            writeln!(f, "    from {} after {} attempt(s): {}", d.origin, d.attempts, d.reason)?;
        }
        let r = &self.report;
        writeln!(
            f,
            "  worker          {} acked, {} retried, {} dead-lettered, {} interrupted",
            r.acked, r.retried, r.dead_lettered, r.interrupted
        )?;
        write!(f, "  took            {:.2} s", self.elapsed.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use async_trait::async_trait;
    use courier::{
        Broker, Capabilities, Consumer, ConsumerOptions, Destination, DynBroker, Message, MessageId, Result, Source,
    };

    /// A broker that sends every message twice, as an at-least-once queue (SQS, Kafka,
    /// moto under parallel receives) may deliver it.
    #[derive(Debug)]
    struct EverythingTwice(DynBroker);

    #[async_trait]
    impl Broker for EverythingTwice {
        fn capabilities(&self) -> &Capabilities {
            self.0.capabilities()
        }
        async fn send(&self, destination: &Destination, message: Message) -> Result<MessageId> {
            self.0.send(destination, message.clone()).await?;
            self.0.send(destination, message).await
        }
        async fn send_batch(&self, destination: &Destination, messages: Vec<Message>) -> Result<Vec<MessageId>> {
            self.0.send_batch(destination, messages.clone()).await?;
            self.0.send_batch(destination, messages).await
        }
        async fn consumer(&self, source: &Source, options: ConsumerOptions) -> Result<Box<dyn Consumer>> {
            self.0.consumer(source, options).await
        }
        async fn declare(&self, source: &Source) -> Result<()> {
            self.0.declare(source).await
        }
        async fn close(&self) -> Result<()> {
            self.0.close().await
        }
    }

    async fn summary_on(broker: DynBroker) -> super::DemoSummary {
        let run = super::run(broker, super::DemoOptions { orders: 12, quiet: true });
        tokio::time::timeout(Duration::from_secs(60), run).await.expect("the demo ends").unwrap()
    }

    /// The dead letters' attempts and reasons, sorted.
    fn dead_letters(summary: &super::DemoSummary) -> Vec<(String, String)> {
        let mut reasons: Vec<_> = summary.dead_letters.iter().map(|d| (d.attempts.clone(), d.reason.clone())).collect();
        reasons.sort();
        reasons
    }

    const THE_TWO_BAD_ORDERS: [(&str, &str); 2] =
        [("1", "order 9 has a non-positive total"), ("3", "gave up after 3 attempts: card issuer timed out")];

    /// Every order and payment arrives twice: still ten orders charged, and the two bad
    /// ones dead-lettered once each, the flaky one after all its attempts.
    #[tokio::test]
    async fn repeat_deliveries_charge_nothing_twice() {
        let broker: DynBroker = Arc::new(EverythingTwice(courier::connect("memory://").await.unwrap()));
        let summary = summary_on(broker).await;
        assert_eq!(summary.charged, 10);
        assert_eq!(dead_letters(&summary), THE_TWO_BAD_ORDERS.map(|(a, r)| (a.to_owned(), r.to_owned())));
        assert!(summary.report.acked > 20, "the repeats were delivered: {:?}", summary.report);
    }

    #[tokio::test]
    async fn the_demo_charges_good_orders_and_dead_letters_the_two_bad_ones() {
        let broker = courier::connect("memory://").await.unwrap();
        let summary = summary_on(broker).await;
        assert_eq!(summary.charged, 10);
        assert_eq!(dead_letters(&summary), THE_TWO_BAD_ORDERS.map(|(a, r)| (a.to_owned(), r.to_owned())));
    }
}
