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

pub mod kafka;
pub mod rabbitmq;
pub mod sqs;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use courier_core::{headers, Destination, DynBroker, Error};
use futures::FutureExt;

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
        let handler: HandlerFn = Arc::new(move |incoming| handler.handle(incoming));
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
        match AssertUnwindSafe((self.handler)(incoming)).catch_unwind().await {
            Ok(outcome) => outcome,
            Err(panic) => Outcome::retry(format!("handler panicked: {}", crate::worker::panic_text(&panic))),
        }
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
            Outcome::Reject { reason } => match &self.dead_letter {
                None => {
                    tracing::warn!(%id, %reason, "record rejected; no dead-letter destination set, so the platform's redrive policy decides");
                    Err(reason)
                }
                Some((broker, destination)) => {
                    let dead = message
                        .with_header(headers::DEAD_LETTER_REASON, reason.clone())
                        .with_header(headers::DEAD_LETTER_ATTEMPTS, attempt.to_string())
                        .with_header(headers::DEAD_LETTER_ORIGIN, source.to_string());
                    match broker.send(destination, dead).await {
                        Ok(_) => Ok(()),
                        Err(e) => Err(format!("{reason}; and dead-lettering failed: {e}")),
                    }
                }
            },
        }
    }
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
