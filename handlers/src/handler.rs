//! Handlers: plain async functions (or tower services) that turn a message into an
//! [`Outcome`]. The same handler runs under the worker and under every trigger.

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use courier_core::{BoxError, Destination, DynBroker, Error, Headers, Message, MessageId, Source};

use crate::trace::TraceParent;

/// A message as a handler sees it, whatever delivered it: a worker, a Lambda event, an
/// HTTP push.
#[derive(Clone, Debug)]
pub struct Incoming {
    /// The message.
    pub message: Message,
    /// Which delivery this is: 1 the first time.
    pub attempt: u32,
    /// Where it came from.
    pub source: Source,
    /// A broker for sending follow-up messages, when the runtime has one.
    pub broker: Option<DynBroker>,
}

impl Incoming {
    /// An incoming message with no outbound broker, e.g. for tests.
    pub fn new(message: Message, attempt: u32, source: Source) -> Self {
        Incoming { message, attempt, source, broker: None }
    }
}

/// What a handler decided. Every runtime and trigger settles a message from this.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done: acknowledge.
    Ack,
    /// Failed, may succeed later: redeliver (after `after`, or the retry policy's backoff).
    Retry {
        /// A delay the handler asks for; `None` uses the backoff.
        after: Option<Duration>,
        /// Why, for logs and the dead letter if attempts run out.
        reason: String,
    },
    /// Will never succeed: dead-letter now.
    Reject {
        /// Why, written into the dead letter's headers.
        reason: String,
    },
}

impl Outcome {
    /// A retry using the backoff.
    pub fn retry(reason: impl Into<String>) -> Self {
        Outcome::Retry { after: None, reason: reason.into() }
    }

    /// A retry no sooner than `after`.
    pub fn retry_after(after: Duration, reason: impl Into<String>) -> Self {
        Outcome::Retry { after: Some(after), reason: reason.into() }
    }

    /// Dead-letter now.
    pub fn reject(reason: impl Into<String>) -> Self {
        Outcome::Reject { reason: reason.into() }
    }

    /// The outcome an error stands for: retryable errors retry, others dead-letter.
    pub fn from_error(error: &Error) -> Self {
        if error.is_retryable() {
            Outcome::retry(error.to_string())
        } else {
            Outcome::reject(error.to_string())
        }
    }

    /// A short name for logs and metrics: "ack", "retry" or "reject".
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Ack => "ack",
            Outcome::Retry { .. } => "retry",
            Outcome::Reject { .. } => "reject",
        }
    }
}

/// What a handler may return: `()`, an [`Outcome`], or a `Result` of either with a
/// Courier [`Error`] (retryable errors retry, the rest dead-letter) or a [`BoxError`]
/// (a Courier error inside keeps its kind; any other error retries).
pub trait IntoOutcome {
    /// The outcome.
    fn into_outcome(self) -> Outcome;
}

impl IntoOutcome for () {
    fn into_outcome(self) -> Outcome {
        Outcome::Ack
    }
}

impl IntoOutcome for Outcome {
    fn into_outcome(self) -> Outcome {
        self
    }
}

impl<T: IntoOutcome> IntoOutcome for Result<T, Error> {
    fn into_outcome(self) -> Outcome {
        match self {
            Ok(t) => t.into_outcome(),
            Err(e) => Outcome::from_error(&e),
        }
    }
}

impl<T: IntoOutcome> IntoOutcome for Result<T, BoxError> {
    fn into_outcome(self) -> Outcome {
        match self {
            Ok(t) => t.into_outcome(),
            Err(e) => outcome_of_box_error(e),
        }
    }
}

pub(crate) fn outcome_of_box_error(e: BoxError) -> Outcome {
    match e.downcast::<Error>() {
        Ok(e) => Outcome::from_error(&e),
        Err(e) if e.is::<tower::timeout::error::Elapsed>() => Outcome::retry("handler timed out"),
        Err(e) => Outcome::retry(e.to_string()),
    }
}

/// Pulls a typed argument out of an incoming message by reference. Any number of
/// handler arguments may use it. A failure becomes the message's outcome: an
/// [`Error::Decode`] dead-letters it.
pub trait FromIncomingRef: Sized {
    /// Extracts `Self`.
    fn from_incoming_ref(incoming: &Incoming) -> Result<Self, Error>;
}

/// Pulls a typed argument out of an incoming message, taking it. Only a handler's last
/// argument uses this, so `Message` or `Incoming` there is moved, not copied. Every
/// [`FromIncomingRef`] type is one too.
pub trait FromIncoming: Sized {
    /// Extracts `Self`.
    fn from_incoming(incoming: Incoming) -> Result<Self, Error>;
}

impl<T: FromIncomingRef> FromIncoming for T {
    fn from_incoming(incoming: Incoming) -> Result<Self, Error> {
        T::from_incoming_ref(&incoming)
    }
}

/// The payload decoded as JSON.
///
/// ```
/// use courier::{Json, Outcome};
///
/// #[derive(serde::Deserialize)]
/// struct Order { id: u64 }
///
/// async fn handle(Json(order): Json<Order>) -> Outcome {
///     println!("order {}", order.id);
///     Outcome::Ack
/// }
/// # let _ = courier::handler_service(handle);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Json<T>(pub T);

impl<T: serde::de::DeserializeOwned> FromIncomingRef for Json<T> {
    fn from_incoming_ref(incoming: &Incoming) -> Result<Self, Error> {
        incoming.message.decode_json().map(Json)
    }
}

/// The message (as the last argument: it is moved, not copied).
impl FromIncoming for Message {
    // Inlined into each handler's `handle`: a copy of the message fewer.
    #[inline]
    fn from_incoming(incoming: Incoming) -> Result<Self, Error> {
        Ok(incoming.message)
    }
}

/// As the last argument, the incoming message itself.
impl FromIncoming for Incoming {
    #[inline]
    fn from_incoming(incoming: Incoming) -> Result<Self, Error> {
        Ok(incoming)
    }
}

impl FromIncomingRef for Bytes {
    fn from_incoming_ref(incoming: &Incoming) -> Result<Self, Error> {
        Ok(incoming.message.payload.clone())
    }
}

impl FromIncomingRef for Headers {
    fn from_incoming_ref(incoming: &Incoming) -> Result<Self, Error> {
        Ok(incoming.message.headers.clone())
    }
}

/// About the message being handled, and a way to send follow-ups that carry its trace.
#[derive(Clone, Debug)]
pub struct Context {
    /// The message's id.
    pub id: MessageId,
    /// Which delivery this is.
    pub attempt: u32,
    /// Where the message came from.
    pub source: Source,
    /// The trace this message belongs to (from its `traceparent` header, or new).
    pub trace: TraceParent,
    broker: Option<DynBroker>,
}

impl Context {
    /// Sends `message` to `destination` as part of this message's trace.
    ///
    /// Fails with a configuration error when the runtime has no outbound broker (for
    /// example a Lambda trigger built without one).
    pub async fn send(&self, destination: &Destination, mut message: Message) -> Result<MessageId, Error> {
        let broker = self.broker.as_ref().ok_or_else(|| {
            Error::config("broker", "this runtime has no broker to send with; give the trigger one with `with_broker`")
        })?;
        message.headers.insert(courier_core::headers::TRACEPARENT.to_owned(), self.trace.child().to_string());
        broker.send(destination, message).await
    }
}

impl FromIncomingRef for Context {
    fn from_incoming_ref(incoming: &Incoming) -> Result<Self, Error> {
        Ok(Context {
            id: incoming.message.id.clone(),
            attempt: incoming.attempt,
            source: incoming.source.clone(),
            trace: TraceParent::of(&incoming.message),
            broker: incoming.broker.clone(),
        })
    }
}

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// An async function usable as a handler: it takes up to four arguments, the last
/// [`FromIncoming`] and the others [`FromIncomingRef`], and returns something [`IntoOutcome`].
///
/// The call's future is a named type, not a box, so a runtime that knows the handler's
/// type polls it with no allocation per message. A type of your own can be a handler too
/// (`Args` is then any marker type you choose):
///
/// ```
/// use std::future::{ready, Ready};
/// use std::sync::Arc;
/// use std::time::Duration;
/// use courier::{App, Broker, Handler, Incoming, LocalBroker, Message, Outcome, Source};
///
/// /// Dead-letters empty messages, acks the rest.
/// #[derive(Clone)]
/// struct RejectEmpty;
///
/// impl Handler<Incoming> for RejectEmpty {
///     type Future = Ready<Outcome>;
///
///     fn handle(&self, incoming: Incoming) -> Self::Future {
///         ready(if incoming.message.payload.is_empty() { Outcome::reject("empty") } else { Outcome::Ack })
///     }
/// }
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), courier::Error> {
/// let broker = Arc::new(LocalBroker::new());
/// let source = Source::queue("uploads")?;
/// broker.send(&source.destination(), Message::new("a file")).await?;
/// broker.send(&source.destination(), Message::new("")).await?;
/// let report = App::new(broker)
///     .route(source, RejectEmpty)
///     .run_until(tokio::time::sleep(Duration::from_millis(200)))
///     .await?;
/// assert_eq!((report.acked, report.dead_lettered), (1, 1));
/// # Ok(()) }
/// ```
pub trait Handler<Args>: Clone + Send + Sync + 'static {
    /// The future of one call: the message's outcome.
    type Future: Future<Output = Outcome> + Send + 'static;

    /// Runs the handler on one message.
    fn handle(&self, incoming: Incoming) -> Self::Future;
}

pin_project_lite::pin_project! {
    /// The future of a handler function's call (see [`Handler`]): the function's own
    /// future with its result turned into an [`Outcome`], or the outcome of an argument
    /// that could not be extracted.
    pub struct HandlerFuture<Fut> {
        #[pin]
        state: CallState<Fut>,
    }
}

pin_project_lite::pin_project! {
    #[project = CallStateProj]
    enum CallState<Fut> {
        // An argument failed to extract; the function was not called.
        Extraction { outcome: Option<Outcome> },
        // The function is running.
        Running { #[pin] fut: Fut },
    }
}

impl<Fut> HandlerFuture<Fut> {
    fn running(fut: Fut) -> Self {
        HandlerFuture { state: CallState::Running { fut } }
    }

    fn failed(error: &Error) -> Self {
        HandlerFuture { state: CallState::Extraction { outcome: Some(Outcome::from_error(error)) } }
    }
}

impl<Fut> Future for HandlerFuture<Fut>
where
    Fut: Future,
    Fut::Output: IntoOutcome,
{
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Outcome> {
        match self.project().state.project() {
            CallStateProj::Extraction { outcome } => {
                Poll::Ready(outcome.take().expect("HandlerFuture polled after it completed"))
            }
            CallStateProj::Running { fut } => fut.poll(cx).map(IntoOutcome::into_outcome),
        }
    }
}

macro_rules! impl_handler {
    ($($arg:ident),*; $last:ident) => {
        #[allow(non_snake_case, unused_variables)]
        impl<F, Fut, R, $($arg,)* $last> Handler<($($arg,)* $last,)> for F
        where
            F: Fn($($arg,)* $last) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = R> + Send + 'static,
            R: IntoOutcome,
            $($arg: FromIncomingRef + Send + 'static,)*
            $last: FromIncoming + Send + 'static,
        {
            type Future = HandlerFuture<Fut>;

            fn handle(&self, incoming: Incoming) -> Self::Future {
                $(
                    let $arg = match $arg::from_incoming_ref(&incoming) {
                        Ok(v) => v,
                        Err(e) => return HandlerFuture::failed(&e),
                    };
                )*
                let $last = match $last::from_incoming(incoming) {
                    Ok(v) => v,
                    Err(e) => return HandlerFuture::failed(&e),
                };
                HandlerFuture::running((self)($($arg,)* $last))
            }
        }
    };
}

impl<F, Fut, R> Handler<()> for F
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
    R: IntoOutcome,
{
    type Future = HandlerFuture<Fut>;

    fn handle(&self, _incoming: Incoming) -> Self::Future {
        HandlerFuture::running((self)())
    }
}

impl_handler!(; A);
impl_handler!(A; B);
impl_handler!(A, B; C);
impl_handler!(A, B, C; D);

/// A handler of whole batches that settles each message on its own: it returns one
/// [`Outcome`] per message, in order. This is the shape of Lambda's partial batch
/// failure, and useful for bulk writes.
///
/// ```
/// use courier::{Incoming, Outcome};
///
/// async fn store_all(batch: Vec<Incoming>) -> Vec<Outcome> {
///     batch.iter().map(|m| if m.message.payload.is_empty() { Outcome::reject("empty") } else { Outcome::Ack }).collect()
/// }
/// # fn check<H: courier::BatchHandler>(_: H) {}
/// # check(store_all);
/// ```
pub trait BatchHandler: Clone + Send + Sync + 'static {
    /// Runs the handler on a batch; returns one outcome per message.
    fn handle(&self, batch: Vec<Incoming>) -> BoxFuture<Vec<Outcome>>;
}

impl<F, Fut> BatchHandler for F
where
    F: Fn(Vec<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Vec<Outcome>> + Send + 'static,
{
    fn handle(&self, batch: Vec<Incoming>) -> BoxFuture<Vec<Outcome>> {
        Box::pin((self)(batch))
    }
}

/// A handler as a tower [`Service`](tower::Service), so tower layers (timeout,
/// concurrency limit, tracing, your own) wrap it.
///
/// ```
/// use std::time::Duration;
/// use tower::ServiceBuilder;
/// use courier::{handler_service, Json, Outcome};
///
/// async fn handle(Json(n): Json<u32>) -> Outcome { Outcome::Ack }
///
/// let service = ServiceBuilder::new()
///     .timeout(Duration::from_secs(5))
///     .concurrency_limit(4)
///     .service(handler_service(handle));
/// # let _ = service;
/// ```
pub fn handler_service<H: Handler<Args>, Args>(handler: H) -> HandlerService<H, Args> {
    HandlerService { handler, _args: PhantomData }
}

/// See [`handler_service`].
pub struct HandlerService<H, Args> {
    handler: H,
    _args: PhantomData<fn() -> Args>,
}

impl<H: Clone, Args> Clone for HandlerService<H, Args> {
    fn clone(&self) -> Self {
        HandlerService { handler: self.handler.clone(), _args: PhantomData }
    }
}

impl<H: Handler<Args>, Args> tower::Service<Incoming> for HandlerService<H, Args> {
    type Response = Outcome;
    type Error = Infallible;
    type Future = futures::future::Map<H::Future, fn(Outcome) -> Result<Outcome, Infallible>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, incoming: Incoming) -> Self::Future {
        futures::FutureExt::map(self.handler.handle(incoming), Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Order {
        total: i64,
    }

    async fn check(Json(order): Json<Order>, ctx: Context) -> Result<(), Error> {
        match order.total {
            t if t < 0 => Err(Error::fatal("negative total")),
            0 => Err(Error::retryable("price service down")),
            _ if ctx.attempt > 0 => Ok(()),
            _ => unreachable!(),
        }
    }

    fn incoming(payload: &str) -> Incoming {
        Incoming::new(Message::new(payload.to_owned()), 1, Source::queue("orders").unwrap())
    }

    #[tokio::test]
    async fn errors_map_onto_outcomes() {
        assert_eq!(check.handle(incoming(r#"{"total": 5}"#)).await, Outcome::Ack);
        assert_eq!(check.handle(incoming(r#"{"total": -1}"#)).await, Outcome::reject("negative total"));
        assert_eq!(check.handle(incoming(r#"{"total": 0}"#)).await, Outcome::retry("price service down"));
        match check.handle(incoming("not json")).await {
            Outcome::Reject { reason } => assert!(reason.contains("could not decode payload as"), "{reason}"),
            other => panic!("a decode error dead-letters, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn box_errors_keep_a_courier_error_kind_and_retry_otherwise() {
        let fatal: Result<(), BoxError> = Err(Box::new(Error::fatal("bad")));
        assert_eq!(fatal.into_outcome(), Outcome::reject("bad"));
        let io: Result<(), BoxError> = Err(Box::new(std::io::Error::other("reset")));
        assert_eq!(io.into_outcome(), Outcome::retry("reset"));
    }
}
