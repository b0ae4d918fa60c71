//! Triggers: the same handler run from a FaaS platform's event instead of a worker.
//!
//! A trigger turns a platform event (an AWS Lambda SQS, Kafka or RabbitMQ event) into
//! [`Incoming`] messages, runs the handler on each (the same [`Handler`] and [`Outcome`]
//! as the worker), and builds the answer the platform expects:
//!
//! | event | order | answer |
//! |---|---|---|
//! | [SQS](sqs) standard | concurrent, up to [`Trigger::concurrency`] | failed records as `batchItemFailures`; successes unlisted |
//! | [SQS](sqs) FIFO | in order | the first failure and every record after it |
//! | [Kafka](kafka) (MSK, self-managed) | each partition in order, partitions concurrently | all or nothing: any failure fails the invocation |
//! | [RabbitMQ](rabbitmq) (Amazon MQ) | in order | all or nothing: any failure fails the invocation |
//!
//! A handler that panics fails its own record only. A malformed event is an
//! [`Error::Decode`] naming the field, never a panic.
//!
//! Settlement under a platform: [`Outcome::Ack`] succeeds; [`Outcome::Retry`] fails the
//! record so the platform redelivers it (a requested delay cannot be honoured: the
//! platform's visibility timeout or retry policy decides); [`Outcome::Reject`] is
//! dead-lettered through [`Trigger::dead_letter`] when one is set, and reported as
//! a failure otherwise, leaving it to the queue's redrive policy. The platform's
//! retry policy owns retries, as the contract asks of exactly one owner.

pub mod emulator;
#[cfg(feature = "http")]
pub mod http;
pub mod kafka;
pub mod rabbitmq;
pub mod sqs;

use std::sync::Arc;

use courier_core::{DeadLetter, Destination, DynBroker, Error, Message, Source, MAX_NAME_LEN};

use crate::handler::{BoxFuture, Handler, Incoming, Outcome};

type HandlerFn = Arc<dyn Fn(Incoming) -> BoxFuture<Outcome> + Send + Sync>;

/// A handler ready to run under a platform trigger.
///
/// ```
/// use courier::trigger::Trigger;
/// use courier::Json;
///
/// #[derive(serde::Deserialize)]
/// struct Order { id: u64 }
///
/// async fn handle_order(Json(order): Json<Order>) -> Result<(), courier::Error> {
///     println!("order {}", order.id);
///     Ok(())
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), courier::Error> {
/// let trigger = Trigger::new(handle_order);
/// let event = r#"{"Records":[{"messageId":"m-1","body":"{\"id\":7}",
///     "attributes":{"ApproximateReceiveCount":"1"},
///     "eventSourceARN":"arn:aws:sqs:eu-west-1:123456789012:orders"}]}"#;
/// let response = trigger.sqs_json(event.as_bytes()).await?;
/// assert!(response.batch_item_failures.is_empty());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Trigger {
    handler: HandlerFn,
    concurrency: usize,
    dead_letter: Option<(DynBroker, Destination)>,
}

impl std::fmt::Debug for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trigger")
            .field("concurrency", &self.concurrency)
            .field("dead_letter", &self.dead_letter.as_ref().map(|(_, d)| d.to_string()))
            .finish_non_exhaustive()
    }
}

impl Trigger {
    /// A trigger running `handler`, the same function a worker route takes.
    pub fn new<H: Handler<Args>, Args: 'static>(handler: H) -> Self {
        let handler: HandlerFn = Arc::new(move |incoming| Box::pin(handler.handle(incoming)));
        Trigger { handler, concurrency: 10, dead_letter: None }
    }

    /// How many records of one event run at once where order does not matter (default 10).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Where rejected messages go, with the reason, attempts and origin headers. Without
    /// one, a rejection fails the record and the platform's redrive policy dead-letters it.
    pub fn dead_letter(mut self, broker: DynBroker, destination: Destination) -> Self {
        self.dead_letter = Some((broker, destination));
        self
    }

    /// Runs the handler on one message; a panic becomes a retry of that message only.
    pub(crate) async fn run(&self, incoming: Incoming) -> Outcome {
        use tracing::Instrument as _;
        // The same span as the worker's, so a record's handling joins its producer's trace.
        let span = tracing::info_span!(
            "courier.handle",
            message.id = %incoming.message.id,
            source = %incoming.source,
            attempt = incoming.attempt,
        );
        #[cfg(feature = "otel")]
        if !span.is_disabled() {
            crate::otel::adopt_parent(&span, &incoming.message);
        }
        // Called inside the guarded future, so a panic in the call itself (an extractor,
        // or a handler that panics before returning its future) is caught as well.
        crate::worker::catch_panics(async { (self.handler)(incoming).await }).instrument(span).await
    }

    /// Runs the handler and settles the way a platform can: `Ok` when the record is done
    /// (acked, or dead-lettered by us), `Err(reason)` when the platform must redeliver it.
    pub(crate) async fn process(&self, incoming: Incoming) -> std::result::Result<(), String> {
        let id = incoming.message.id.clone();
        let (message, attempt, source) = (incoming.message.clone(), incoming.attempt, incoming.source.clone());
        match self.run(incoming).await {
            Outcome::Ack => Ok(()),
            Outcome::Retry { reason, .. } => {
                tracing::debug!(%id, attempt, %reason, "record failed; the platform redelivers it");
                Err(reason)
            }
            Outcome::Reject { reason } => {
                match self.settle_rejection(Incoming::new(message, attempt, source), reason.clone()).await {
                    Some(Ok(())) => Ok(()),
                    Some(Err(e)) => Err(format!("{reason}; and dead-lettering failed: {e}")),
                    None => {
                        tracing::warn!(%id, %reason, "record rejected; no dead-letter destination set, so the platform's redrive policy decides");
                        Err(reason)
                    }
                }
            }
        }
    }

    /// A record the trigger cannot turn into a message (a value that is not base64, say):
    /// dead-lettered as it came, its raw text the payload, with the reason, when a
    /// destination is set; otherwise a failure of that record alone, for the platform's
    /// redrive policy. Either way the records around it go on.
    pub(crate) async fn settle_undecodable(
        &self,
        id: String,
        raw: Option<&str>,
        origin: Source,
        error: Error,
    ) -> std::result::Result<(), String> {
        let reason = format!("undecodable record: {error}");
        tracing::warn!(%id, %origin, %reason, "record cannot be decoded");
        let message = Message::new(raw.unwrap_or_default().as_bytes().to_vec()).with_id(id);
        match self.settle_rejection(Incoming::new(message, 1, origin), reason.clone()).await {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(format!("{reason}; and dead-lettering failed: {e}")),
            None => Err(reason),
        }
    }

    /// Dead-letters a rejected message with the reason, attempts and origin headers;
    /// `None` when the trigger has no dead-letter destination.
    pub(crate) async fn settle_rejection(
        &self,
        incoming: Incoming,
        reason: String,
    ) -> Option<courier_core::Result<()>> {
        let (broker, destination) = self.dead_letter.as_ref()?;
        let letter = DeadLetter::new(reason, incoming.attempt, incoming.source, destination.clone());
        Some(broker.send(destination, letter.apply(incoming.message)).await.map(|_| ()))
    }
}

/// The source a platform names, as a Courier source. Platforms allow names Courier's
/// portable names do not (a RabbitMQ queue `orders:v2`, a Kafka topic of 249
/// characters): other characters become `_` and the name is cut at 200, so the origin
/// header still says where a record came from, and no name fails every invocation.
pub(crate) fn origin(name: &str) -> Source {
    Source::queue(name).unwrap_or_else(|_| {
        let clean: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
            .take(MAX_NAME_LEN)
            .collect();
        Source::queue(if clean.is_empty() { "unnamed" } else { &clean }).expect("only allowed characters remain")
    })
}

/// A malformed event: what it is and where it went wrong.
pub(crate) fn malformed(what: &'static str, e: impl Into<courier_core::BoxError>) -> Error {
    Error::Decode { type_name: what, source: e.into() }
}

/// Header values arrive as text; bytes that are not UTF-8 are kept as base64.
pub(crate) fn text_or_base64(bytes: &[u8]) -> String {
    use base64::Engine;
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => base64::engine::general_purpose::STANDARD.encode(bytes),
    }
}

pub(crate) fn decode_base64(what: &'static str, field: &str, text: &str) -> courier_core::Result<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| malformed(what, format!("{field} is not base64: {e}")))
}

/// Which platform event a JSON document is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// An SQS event (`Records` from `aws:sqs`).
    Sqs,
    /// An MSK (`aws:kafka`) or self-managed Kafka event.
    Kafka,
    /// An Amazon MQ for RabbitMQ event (`aws:rmq`).
    RabbitMq,
}

impl EventKind {
    /// Recognises an event by its shape; `None` for anything else.
    pub fn detect(event: &serde_json::Value) -> Option<Self> {
        if event.get("Records").is_some_and(|r| {
            r.as_array().is_some_and(|rs| rs.iter().all(|r| r.get("eventSource").is_none_or(|s| s == "aws:sqs")))
        }) {
            return Some(EventKind::Sqs);
        }
        if event.get("rmqMessagesByQueue").is_some() {
            return Some(EventKind::RabbitMq);
        }
        if event.get("records").is_some_and(serde_json::Value::is_object) {
            return Some(EventKind::Kafka);
        }
        None
    }
}

impl Trigger {
    /// Runs the handler over any supported event and returns the platform's answer: the
    /// `batchItemFailures` document for SQS, `null` for Kafka and RabbitMQ, whose failures
    /// are errors (the platform then retries the batch).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), courier::Error> {
    /// let trigger = courier::trigger::Trigger::new(|| async {});
    /// let answer = trigger.event(br#"{"Records":[{"messageId":"m","body":"hi"}]}"#).await?;
    /// assert_eq!(answer, serde_json::json!({"batchItemFailures": []}));
    /// let err = trigger.event(br#"{"hello":"world"}"#).await.unwrap_err();
    /// assert!(err.to_string().contains("not an SQS, Kafka or RabbitMQ event"));
    /// # Ok(()) }
    /// ```
    pub async fn event(&self, event: &[u8]) -> courier_core::Result<serde_json::Value> {
        let value: serde_json::Value = serde_json::from_slice(event).map_err(|e| malformed("Lambda event", e))?;
        self.event_value(value).await
    }

    /// [`event`](Self::event) from parsed JSON.
    pub async fn event_value(&self, event: serde_json::Value) -> courier_core::Result<serde_json::Value> {
        match EventKind::detect(&event) {
            Some(EventKind::Sqs) => {
                let event = serde_json::from_value(event).map_err(|e| malformed("SQS event", e))?;
                let answer = self.sqs(event).await;
                serde_json::to_value(answer).map_err(|e| Error::Encode { type_name: "SqsBatchResponse", source: e.into() })
            }
            Some(EventKind::Kafka) => {
                let event = serde_json::from_value(event).map_err(|e| malformed("Kafka event", e))?;
                self.kafka(event).await.map_err(|f| Error::Other { message: f.to_string(), retryable: true })?;
                Ok(serde_json::Value::Null)
            }
            Some(EventKind::RabbitMq) => {
                let event = serde_json::from_value(event).map_err(|e| malformed("RabbitMQ event", e))?;
                self.rabbitmq(event).await?;
                Ok(serde_json::Value::Null)
            }
            None => Err(malformed(
                "Lambda event",
                "not an SQS, Kafka or RabbitMQ event: expected Records (SQS), records (Kafka) or rmqMessagesByQueue (RabbitMQ)",
            )),
        }
    }
}

/// The AWS Lambda entry point (feature `lambda`): one binary serves SQS, Kafka and
/// RabbitMQ event sources with the worker's handler.
///
/// ```no_run
/// # async fn handle_order(_: courier::Json<serde_json::Value>) {}
/// #[tokio::main]
/// async fn main() -> Result<(), lambda_runtime::Error> {
///     courier::trigger::lambda::run(courier::trigger::Trigger::new(handle_order)).await
/// }
/// ```
#[cfg(feature = "lambda")]
pub mod lambda {
    use super::Trigger;

    /// Serves invocations from the Lambda Runtime API until the process ends.
    pub async fn run(trigger: Trigger) -> Result<(), lambda_runtime::Error> {
        lambda_runtime::run(lambda_runtime::service_fn(move |event: lambda_runtime::LambdaEvent<serde_json::Value>| {
            let trigger = trigger.clone();
            async move {
                trigger.event_value(event.payload).await.map_err(|e| lambda_runtime::Diagnostic {
                    error_type: if e.is_retryable() { "Courier.Retry" } else { "Courier.Error" }.to_owned(),
                    error_message: e.to_string(),
                })
            }
        }))
        .await
    }
}
