//! A local FaaS emulator: plays a Lambda event source mapping on any backend.
//!
//! `n` function instances each pull up to `batch_size` messages (waiting at most the
//! batching `window`), build the platform's event from them (SQS, Kafka or RabbitMQ
//! form), invoke the handler through the same trigger code a real Lambda runs (after an
//! optional simulated cold start on an instance's first invocation), and settle the
//! source from the trigger's answer: the records an SQS answer lists as failed, or every
//! record of a failed Kafka or RabbitMQ invocation, are retried; the rest are acked.
//!
//! The report sets the observed throughput P beside n / t, where t is the mean time an
//! instance spent per record: for an I/O-bound handler P follows n / t as n grows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use base64::Engine;
use courier_core::{ConsumerOptions, Delivery, DynBroker, Result, Source};
use serde_json::{json, Value};

use super::{EventKind, Trigger};

/// Settings and entry point of the emulator.
///
/// ```
/// use std::time::Duration;
/// use courier::trigger::{emulator::Emulator, EventKind, Trigger};
///
/// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
/// # async fn main() -> Result<(), courier::Error> {
/// let broker = courier::connect("memory://").await?;
/// let orders = courier::Source::queue("orders")?;
/// broker.declare(&orders).await?;
/// for i in 0..20 {
///     broker.send(&orders.destination(), courier::Message::new(format!("order {i}"))).await?;
/// }
/// let trigger = Trigger::new(|| async { tokio::time::sleep(Duration::from_millis(5)).await });
/// let report = Emulator::new(broker, orders, trigger, EventKind::Sqs)
///     .concurrency(4)
///     .run_until_idle(Duration::from_millis(300))
///     .await?;
/// assert_eq!(report.records_ok, 20);
/// # Ok(()) }
/// ```
pub struct Emulator {
    broker: DynBroker,
    source: Source,
    trigger: Trigger,
    kind: EventKind,
    batch_size: usize,
    window: Duration,
    concurrency: usize,
    cold_start: Duration,
}

/// What an emulator run did.
#[derive(Debug, Clone, Default)]
pub struct EmulatorReport {
    /// Function invocations.
    pub invocations: u64,
    /// Records that succeeded (acked).
    pub records_ok: u64,
    /// Records that failed and went back to the source.
    pub records_failed: u64,
    /// Instances (n).
    pub concurrency: usize,
    /// Wall time from the first pull to the last settlement.
    pub elapsed: Duration,
    /// Mean time an instance spent per record, cold starts excluded (t).
    pub mean_record_time: Duration,
}

impl EmulatorReport {
    /// Observed throughput P, in records per second.
    pub fn throughput(&self) -> f64 {
        (self.records_ok + self.records_failed) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The throughput n instances of per-record time t could reach: n / t.
    pub fn ideal_throughput(&self) -> f64 {
        self.concurrency as f64 / self.mean_record_time.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for EmulatorReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} invocations, {} records ok, {} failed, in {:.2} s: P = {:.0} msg/s; n / t = {} / {:.1} ms = {:.0} msg/s",
            self.invocations,
            self.records_ok,
            self.records_failed,
            self.elapsed.as_secs_f64(),
            self.throughput(),
            self.concurrency,
            self.mean_record_time.as_secs_f64() * 1e3,
            self.ideal_throughput()
        )
    }
}

#[derive(Default)]
struct Counters {
    invocations: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    busy_nanos: AtomicU64,
}

impl Emulator {
    /// An emulator feeding `source` of `broker` to `trigger` as `kind` events. Defaults:
    /// batch size 10, window 100 ms, one instance, no cold start.
    pub fn new(broker: DynBroker, source: Source, trigger: Trigger, kind: EventKind) -> Self {
        Emulator {
            broker,
            source,
            trigger,
            kind,
            batch_size: 10,
            window: Duration::from_millis(100),
            concurrency: 1,
            cold_start: Duration::ZERO,
        }
    }

    /// Records per invocation at most (Lambda's `BatchSize`).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// How long an instance waits to fill a batch (Lambda's `MaximumBatchingWindowInSeconds`).
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// Function instances running at once (Lambda's maximum concurrency), n.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// A delay before each instance's first invocation, as a cold start.
    pub fn cold_start(mut self, delay: Duration) -> Self {
        self.cold_start = delay;
        self
    }

    /// Runs until the source has been empty for `idle` (every instance found nothing).
    pub async fn run_until_idle(self, idle: Duration) -> Result<EmulatorReport> {
        let counters = Arc::new(Counters::default());
        let options = ConsumerOptions::default().prefetch(self.batch_size);
        let started = Instant::now();
        let last_activity = Arc::new(std::sync::Mutex::new(Instant::now()));
        let mut instances = tokio::task::JoinSet::new();
        for _ in 0..self.concurrency {
            let consumer = self.broker.consumer(&self.source, options.clone()).await?;
            let (trigger, counters, last) = (self.trigger.clone(), counters.clone(), last_activity.clone());
            let (kind, batch, window, cold, source) =
                (self.kind, self.batch_size, self.window, self.cold_start, self.source.clone());
            instances.spawn(async move {
                let mut warm = false;
                loop {
                    let deliveries = consumer.receive(batch, window).await?;
                    if deliveries.is_empty() {
                        if last.lock().unwrap().elapsed() >= idle {
                            break;
                        }
                        continue;
                    }
                    if !warm {
                        tokio::time::sleep(cold).await;
                        warm = true;
                    }
                    let invoked = Instant::now();
                    let event = build_event(kind, &source, &deliveries);
                    let failed = match trigger.event_value(event).await {
                        Ok(answer) => failed_ids(&answer),
                        Err(_) => deliveries.iter().map(|d| d.id.to_string()).collect(),
                    };
                    counters.busy_nanos.fetch_add(invoked.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    counters.invocations.fetch_add(1, Ordering::Relaxed);
                    for d in deliveries {
                        if failed.iter().any(|f| f == d.id.as_str()) {
                            counters.failed.fetch_add(1, Ordering::Relaxed);
                            d.retry().await?;
                        } else {
                            counters.ok.fetch_add(1, Ordering::Relaxed);
                            d.ack().await?;
                        }
                    }
                    *last.lock().unwrap() = Instant::now();
                }
                consumer.close().await
            });
        }
        while let Some(result) = instances.join_next().await {
            result.map_err(|e| courier_core::Error::Other {
                message: format!("an instance failed: {e}"),
                retryable: false,
            })??;
        }
        let (ok, failed) = (counters.ok.load(Ordering::Relaxed), counters.failed.load(Ordering::Relaxed));
        let records = (ok + failed).max(1);
        let elapsed = last_activity.lock().unwrap().duration_since(started);
        Ok(EmulatorReport {
            invocations: counters.invocations.load(Ordering::Relaxed),
            records_ok: ok,
            records_failed: failed,
            concurrency: self.concurrency,
            elapsed,
            mean_record_time: Duration::from_nanos(counters.busy_nanos.load(Ordering::Relaxed) / records),
        })
    }
}

fn failed_ids(answer: &Value) -> Vec<String> {
    answer["batchItemFailures"]
        .as_array()
        .map(|fs| fs.iter().filter_map(|f| f["itemIdentifier"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn millis(d: &Delivery) -> u64 {
    d.timestamp.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// The platform event a Lambda would receive for these deliveries.
pub fn build_event(kind: EventKind, source: &Source, deliveries: &[Delivery]) -> Value {
    let queue = match source {
        Source::Queue(q) => q.to_string(),
        Source::Subscription { topic, subscription } => format!("{topic}.{subscription}"),
    };
    match kind {
        EventKind::Sqs => {
            let records: Vec<Value> = deliveries
                .iter()
                .map(|d| {
                    let mut attributes = json!({"ApproximateReceiveCount": d.attempt().to_string(), "SentTimestamp": millis(d).to_string()});
                    if let Some(k) = &d.ordering_key {
                        attributes["MessageGroupId"] = json!(k);
                    }
                    let mut message_attributes: serde_json::Map<String, Value> = d
                        .headers
                        .iter()
                        .map(|(k, v)| (k.clone(), json!({"stringValue": v, "dataType": "String"})))
                        .collect();
                    let body = match std::str::from_utf8(&d.payload) {
                        Ok(text) => text.to_owned(),
                        Err(_) => {
                            message_attributes.insert(super::sqs::ENCODING_ATTRIBUTE.into(), json!({"stringValue": "base64", "dataType": "String"}));
                            b64(&d.payload)
                        }
                    };
                    json!({"messageId": d.id.as_str(), "receiptHandle": d.id.as_str(), "body": body,
                           "attributes": attributes, "messageAttributes": message_attributes,
                           "eventSource": "aws:sqs", "eventSourceARN": format!("arn:aws:sqs:local:000000000000:{queue}"),
                           "awsRegion": "local"})
                })
                .collect();
            json!({ "Records": records })
        }
        EventKind::Kafka => {
            let records: Vec<Value> = deliveries
                .iter()
                .enumerate()
                .map(|(offset, d)| {
                    let headers: Vec<Value> = d
                        .headers
                        .iter()
                        .map(|(k, v)| json!({ k.as_str(): v.as_bytes().iter().map(|b| *b as i8).collect::<Vec<i8>>() }))
                        .chain(std::iter::once(json!({"courier-attempt": d.attempt().to_string().bytes().map(|b| b as i8).collect::<Vec<i8>>()})))
                        .collect();
                    json!({"topic": queue, "partition": 0, "offset": offset, "timestamp": millis(d), "timestampType": "CREATE_TIME",
                           "key": d.ordering_key.as_ref().map(|k| b64(k.as_bytes())), "value": b64(&d.payload), "headers": headers})
                })
                .collect();
            json!({"eventSource": "SelfManagedKafka", "bootstrapServers": "local", "records": { format!("{queue}-0"): records }})
        }
        EventKind::RabbitMq => {
            let messages: Vec<Value> = deliveries
                .iter()
                .map(|d| {
                    let mut headers: serde_json::Map<String, Value> =
                        d.headers.iter().map(|(k, v)| (k.clone(), json!({"bytes": v.as_bytes()}))).collect();
                    // The attempt as the RabbitMQ adapter carries it: the next delivery's number.
                    headers.insert("x-courier-attempt".into(), json!(d.attempt()));
                    json!({"basicProperties": {"contentType": d.content_type, "headers": headers, "deliveryMode": 2,
                           "priority": null, "messageId": d.id.as_str(), "timestamp": null, "bodySize": d.payload.len()},
                           "redelivered": false, "data": b64(&d.payload)})
                })
                .collect();
            json!({"eventSource": "aws:rmq", "rmqMessagesByQueue": { format!("{queue}::/"): messages }})
        }
    }
}
