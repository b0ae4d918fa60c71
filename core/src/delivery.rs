//! A received message and the means to settle it exactly once.
//!
//! Core owns settlement policy: a [`Receipt`] decides retry versus dead letter from its
//! consumer's [`SettlePolicy`], and [`DeadLetter`] builds the dead letter's headers. A
//! backend's [`Acknowledger`] is mechanism only.

use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::destination::{Destination, Source};
use crate::error::{Error, Result};
use crate::message::{headers, Headers, Message, MessageId};
use crate::retry::RetryPolicy;

/// How a backend settles one delivery: mechanism only. Users call the methods on
/// [`Delivery`] or [`Receipt`], which decide what to do (retry or dead letter, from the
/// consumer's [`SettlePolicy`]) and guarantee each delivery is settled at most once.
///
/// A failed call must leave the message where it was (still leased to this delivery),
/// so the receipt can hand the delivery back and the call can be tried again; or
/// return [`Error::LeaseLost`] when the broker has already taken the message back.
#[async_trait]
pub trait Acknowledger: Send + Sync {
    /// The policy of the consumer this delivery came from, as given to the backend by
    /// [`ConsumerOptions::settle_policy`](crate::ConsumerOptions::settle_policy).
    fn policy(&self) -> &SettlePolicy;
    /// Done: never deliver this message again.
    async fn ack(&self) -> Result<()>;
    /// [`ack`](Self::ack) done at once, for a backend that never waits to ack (an
    /// in-process queue): `Some` with its result, and `ack` is not called. The default,
    /// `None`, sends every ack through `ack`; this path only saves the boxed future.
    fn ack_now(&self) -> Option<Result<()>> {
        None
    }
    /// Deliver the message again, no sooner than `delay` when given, as its next
    /// attempt. Never dead-letters: the receipt has already decided another attempt is
    /// allowed.
    async fn redeliver(&self, delay: Option<Duration>) -> Result<()>;
    /// Moves the message to [`DeadLetter::destination`] with the dead letter's headers
    /// (see [`DeadLetter::apply`]): publish the copy, then remove the original.
    async fn dead_letter(&self, letter: &DeadLetter) -> Result<()>;
    /// Keep the lease for another `by` from now.
    async fn extend_lease(&self, by: Duration) -> Result<()>;
    /// The delivery's receipt was dropped unsettled (its settlement failed for good, or
    /// it was abandoned): hand the message back so the broker delivers it again, and free
    /// what it holds (an ordering key, a slot in the prefetch). Called from `Drop`, so it
    /// must not block; a backend spawns the I/O it needs. The default does nothing, for
    /// backends whose lease expiry hands the message back by itself.
    fn release(&self) {}
}

/// The settlement mechanism of a whole consumer, where each delivery is told apart by a
/// tag the backend chooses: the same operations as [`Acknowledger`], with the delivery's
/// tag and message id passed in. Build deliveries with [`Delivery::tagged`].
///
/// It saves the box [`Delivery::new`] costs per delivery. Worth it where nothing else
/// costs much: an in-process queue, whose whole ack is a few hundred instructions and a
/// box (allocated, then freed) about as many again. The rules of [`Acknowledger`] apply.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use async_trait::async_trait;
/// use courier_core::{
///     ConsumerOptions, DeadLetter, Delivery, Message, MessageId, Result, SettlePolicy, Source, TaggedAcknowledger,
/// };
///
/// /// Settles by printing: one per consumer, shared by its deliveries.
/// struct Printer(Arc<SettlePolicy>);
///
/// #[async_trait]
/// impl TaggedAcknowledger for Printer {
///     fn policy(&self) -> &SettlePolicy { &self.0 }
///     async fn ack(&self, tag: u64, id: &MessageId) -> Result<()> {
///         println!("ack {tag} ({id})");
///         Ok(())
///     }
///     async fn redeliver(&self, _: u64, _: &MessageId, _: Option<Duration>) -> Result<()> { Ok(()) }
///     async fn dead_letter(&self, _: u64, _: &MessageId, _: &DeadLetter) -> Result<()> { Ok(()) }
///     async fn extend_lease(&self, _: u64, _: &MessageId, _: Duration) -> Result<()> { Ok(()) }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<()> {
/// let policy = ConsumerOptions::default().settle_policy(&Source::queue("orders")?);
/// let consumer: Arc<dyn TaggedAcknowledger> = Arc::new(Printer(policy));
/// let delivery = Delivery::tagged(Message::new("order #1"), 1, consumer.clone(), 7);
/// delivery.ack().await?;
/// assert!(delivery.is_settled());
/// # Ok(()) }
/// ```
#[async_trait]
pub trait TaggedAcknowledger: Send + Sync {
    /// See [`Acknowledger::policy`].
    fn policy(&self) -> &SettlePolicy;
    /// See [`Acknowledger::ack`].
    async fn ack(&self, tag: u64, id: &MessageId) -> Result<()>;
    /// See [`Acknowledger::ack_now`].
    fn ack_now(&self, tag: u64, id: &MessageId) -> Option<Result<()>> {
        let _ = (tag, id);
        None
    }
    /// Acks several of this consumer's deliveries in one step, where the backend can
    /// (an in-process queue takes its lock once): `Some` with each one's result, in order.
    /// The default, `None`, acks each on its own. Called by [`Receipt::ack_all`].
    fn ack_all_now(&self, deliveries: &[(u64, &MessageId)]) -> Option<Vec<Result<()>>> {
        let _ = deliveries;
        None
    }
    /// See [`Acknowledger::redeliver`].
    async fn redeliver(&self, tag: u64, id: &MessageId, delay: Option<Duration>) -> Result<()>;
    /// See [`Acknowledger::dead_letter`].
    async fn dead_letter(&self, tag: u64, id: &MessageId, letter: &DeadLetter) -> Result<()>;
    /// See [`Acknowledger::extend_lease`].
    async fn extend_lease(&self, tag: u64, id: &MessageId, by: Duration) -> Result<()>;
    /// See [`Acknowledger::release`].
    fn release(&self, tag: u64, id: &MessageId) {
        let _ = (tag, id);
    }
}

/// How a receipt reaches its backend.
enum Acker {
    /// An acknowledger of the delivery's own.
    Own(Box<dyn Acknowledger>),
    /// The consumer's acknowledger, and the delivery's tag.
    Tagged(Arc<dyn TaggedAcknowledger>, u64),
}

impl Acker {
    fn policy(&self) -> &SettlePolicy {
        match self {
            Acker::Own(a) => a.policy(),
            Acker::Tagged(a, _) => a.policy(),
        }
    }

    fn ack_now(&self, id: &MessageId) -> Option<Result<()>> {
        match self {
            Acker::Own(a) => a.ack_now(),
            Acker::Tagged(a, tag) => a.ack_now(*tag, id),
        }
    }

    async fn ack(&self, id: &MessageId) -> Result<()> {
        match self {
            Acker::Own(a) => a.ack().await,
            Acker::Tagged(a, tag) => a.ack(*tag, id).await,
        }
    }

    async fn redeliver(&self, id: &MessageId, delay: Option<Duration>) -> Result<()> {
        match self {
            Acker::Own(a) => a.redeliver(delay).await,
            Acker::Tagged(a, tag) => a.redeliver(*tag, id, delay).await,
        }
    }

    async fn dead_letter(&self, id: &MessageId, letter: &DeadLetter) -> Result<()> {
        match self {
            Acker::Own(a) => a.dead_letter(letter).await,
            Acker::Tagged(a, tag) => a.dead_letter(*tag, id, letter).await,
        }
    }

    async fn extend_lease(&self, id: &MessageId, by: Duration) -> Result<()> {
        match self {
            Acker::Own(a) => a.extend_lease(by).await,
            Acker::Tagged(a, tag) => a.extend_lease(*tag, id, by).await,
        }
    }

    fn release(&self, id: &MessageId) {
        match self {
            Acker::Own(a) => a.release(),
            Acker::Tagged(a, tag) => a.release(*tag, id),
        }
    }
}

/// What every delivery of one consumer shares: where it was received from, the retry
/// policy (the one max-attempts value), and where its dead letters go.
///
/// Backends build it once per consumer with
/// [`ConsumerOptions::settle_policy`](crate::ConsumerOptions::settle_policy) and return it
/// from [`Acknowledger::policy`]. A backend that counts attempts itself (a lease that
/// expired) asks [`is_last`](Self::is_last) and dead-letters with [`gave_up`](Self::gave_up).
///
/// ```
/// use std::time::Duration;
/// use courier_core::{AfterFailure, ConsumerOptions, Source};
///
/// let source = Source::queue("orders")?;
/// let policy = ConsumerOptions::default().max_attempts(3).settle_policy(&source);
/// assert_eq!(policy.after_failure(3, None), AfterFailure::DeadLetter);
/// let letter = policy.gave_up(3, "card issuer timed out");
/// assert_eq!(letter.reason(), "gave up after 3 attempts: card issuer timed out");
/// assert_eq!(letter.destination().to_string(), "queue:orders.dlq");
/// # Ok::<(), courier_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct SettlePolicy {
    source: Source,
    retry: RetryPolicy,
    dead_letter: Destination,
}

/// What happens to a delivery that failed: core's decision, from the [`SettlePolicy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Another attempt, no sooner than `delay` (zero: at once).
    Redeliver {
        /// The backoff before the next attempt.
        delay: Duration,
    },
    /// The last attempt failed: to the dead-letter destination.
    DeadLetter,
}

impl SettlePolicy {
    /// A policy for a consumer of `source`.
    pub fn new(source: Source, retry: RetryPolicy, dead_letter: Destination) -> Self {
        SettlePolicy { source, retry, dead_letter }
    }

    /// Where the deliveries are received from.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Attempts and backoff.
    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    /// Where dead letters go.
    pub fn dead_letter(&self) -> &Destination {
        &self.dead_letter
    }

    /// Whether delivery number `attempt` is the last one allowed.
    pub fn is_last(&self, attempt: u32) -> bool {
        self.retry.is_last(attempt)
    }

    /// What to do after delivery number `attempt` failed: dead-letter it when that was the
    /// last attempt, else redeliver after `after` or, when not given, the policy's backoff.
    pub fn after_failure(&self, attempt: u32, after: Option<Duration>) -> AfterFailure {
        if self.is_last(attempt) {
            AfterFailure::DeadLetter
        } else {
            AfterFailure::Redeliver { delay: after.unwrap_or_else(|| self.retry.delay_after(attempt)) }
        }
    }

    /// The dead letter of a message whose last attempt (number `attempt`) failed because
    /// of `cause`.
    pub fn gave_up(&self, attempt: u32, cause: &str) -> DeadLetter {
        self.rejected(attempt, format!("gave up after {attempt} attempts: {cause}"))
    }

    /// The dead letter of a message rejected on delivery number `attempt`.
    pub fn rejected(&self, attempt: u32, reason: impl Into<String>) -> DeadLetter {
        DeadLetter::new(reason, attempt, self.source.clone(), self.dead_letter.clone())
    }
}

/// A message on its way to a dead-letter destination: why, after how many deliveries,
/// from where, and to where. The one place the dead-letter headers are built, used by
/// every backend, the worker and the triggers.
///
/// ```
/// use courier_core::{headers, DeadLetter, Destination, Message, Source};
///
/// let letter = DeadLetter::new("invalid total", 1, Source::queue("orders")?, Destination::queue("orders.dlq")?);
/// let dead = letter.apply(Message::new("{}").with_header("tenant", "acme"));
/// assert_eq!(dead.header(headers::DEAD_LETTER_REASON), Some("invalid total"));
/// assert_eq!(dead.header(headers::DEAD_LETTER_ATTEMPTS), Some("1"));
/// assert_eq!(dead.header(headers::DEAD_LETTER_ORIGIN), Some("queue:orders"));
/// assert_eq!(dead.header("tenant"), Some("acme")); // the original headers stay
/// # Ok::<(), courier_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    reason: String,
    attempts: u32,
    origin: Source,
    destination: Destination,
}

impl DeadLetter {
    /// A dead letter of a message delivered `attempts` times from `origin`, bound for
    /// `destination` because of `reason`.
    ///
    /// A reason longer than [`MAX_REASON_BYTES`](Self::MAX_REASON_BYTES) is cut there
    /// (ending in `…`): a handler's error text of any size must not make the dead letter
    /// too large for its broker, and so undeliverable.
    pub fn new(reason: impl Into<String>, attempts: u32, origin: Source, destination: Destination) -> Self {
        let mut reason = reason.into();
        if reason.len() > Self::MAX_REASON_BYTES {
            let mut end = Self::MAX_REASON_BYTES - '…'.len_utf8();
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
            reason.push('…');
        }
        DeadLetter { reason, attempts, origin, destination }
    }

    /// The longest reason a dead letter carries, in bytes.
    pub const MAX_REASON_BYTES: usize = 1024;

    /// Why the message was dead-lettered.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// How many deliveries it had.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Where it was received from.
    pub fn origin(&self) -> &Source {
        &self.origin
    }

    /// Where it goes.
    pub fn destination(&self) -> &Destination {
        &self.destination
    }

    /// The headers a dead letter carries besides the original ones: reason, attempts
    /// and origin.
    pub fn headers(&self) -> [(&'static str, String); 3] {
        [
            (headers::DEAD_LETTER_REASON, self.reason.clone()),
            (headers::DEAD_LETTER_ATTEMPTS, self.attempts.to_string()),
            (headers::DEAD_LETTER_ORIGIN, self.origin.to_string()),
        ]
    }

    /// Adds the dead-letter headers to `headers`, replacing earlier ones (a message
    /// dead-lettered before, redriven, and dead-lettered again).
    pub fn write_headers(&self, headers: &mut Headers) {
        for (name, value) in self.headers() {
            headers.insert(name.to_owned(), value);
        }
    }

    /// The dead letter `message` becomes: same id, payload and headers, plus the
    /// dead-letter headers.
    pub fn apply(&self, mut message: Message) -> Message {
        self.write_headers(&mut message.headers);
        message.delay = None;
        message
    }
}

/// The cause a dead letter names when a retry without a reason used the last attempt.
const RETRY_EXHAUSTED: &str = "max attempts reached on retry";

const UNSETTLED: u8 = 0;
const SETTLING: u8 = 1;
const SETTLED: u8 = 2;

/// A message handed to a consumer, to be settled with exactly one of [`ack`](Self::ack),
/// [`retry`](Self::retry), [`retry_after`](Self::retry_after), [`fail`](Self::fail) or
/// [`reject`](Self::reject).
///
/// Settling twice returns [`Error::AlreadySettled`]. When a settlement fails, or its
/// future is dropped before it completes, the delivery is handed back unsettled so the
/// caller may try again; a delivery dropped without settlement comes back after its
/// lease.
///
/// It dereferences to its [`Message`]; [`into_parts`](Self::into_parts) splits it into
/// the message and a [`Receipt`] that settles it, so the message can be moved on.
///
/// ```
/// # use courier_core::{Broker, Message, Source};
/// # async fn example(broker: &dyn Broker) -> Result<(), courier_core::Error> {
/// let source = Source::queue("orders")?;
/// let consumer = broker.consumer(&source, Default::default()).await?;
/// for delivery in consumer.receive(10, std::time::Duration::from_secs(1)).await? {
///     println!("{} (attempt {})", delivery.id, delivery.attempt());
///     delivery.ack().await?;
///     assert!(delivery.ack().await.is_err()); // settled once only
/// }
/// # Ok(()) }
/// ```
pub struct Delivery {
    message: Message,
    receipt: Receipt,
}

/// The right to settle one delivery, exactly once. Split from its message by
/// [`Delivery::into_parts`].
///
/// It owns the settlement policy: a retry of the last attempt, or a
/// [`fail`](Self::fail)ure, dead-letters the message with the reason, attempts and origin
/// headers; otherwise the backend redelivers it.
pub struct Receipt {
    id: MessageId,
    attempt: u32,
    acker: Acker,
    state: AtomicU8,
}

impl Delivery {
    /// Builds a delivery; for backend authors. `attempt` is 1 on first delivery; the
    /// source and settlement policy come from [`Acknowledger::policy`].
    pub fn new(message: Message, attempt: u32, acker: Box<dyn Acknowledger>) -> Self {
        Self::with_acker(message, attempt, Acker::Own(acker))
    }

    /// Builds a delivery settled through its consumer's shared acknowledger, as the
    /// delivery `tag`; for backend authors (see [`TaggedAcknowledger`]).
    // Inlined into a backend's receive loop, the message is built in place: a
    // `Message` is too big for the compiler to move without a `memcpy` call.
    #[inline]
    pub fn tagged(message: Message, attempt: u32, acker: Arc<dyn TaggedAcknowledger>, tag: u64) -> Self {
        Self::with_acker(message, attempt, Acker::Tagged(acker, tag))
    }

    #[inline]
    fn with_acker(message: Message, attempt: u32, acker: Acker) -> Self {
        let receipt =
            Receipt { id: message.id.clone(), attempt: attempt.max(1), acker, state: AtomicU8::new(UNSETTLED) };
        Delivery { message, receipt }
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The receipt that settles this delivery.
    pub fn receipt(&self) -> &Receipt {
        &self.receipt
    }

    /// Splits into the message and the receipt that settles it.
    pub fn into_parts(self) -> (Message, Receipt) {
        (self.message, self.receipt)
    }

    /// Which delivery this is: 1 the first time.
    pub fn attempt(&self) -> u32 {
        self.receipt.attempt
    }

    /// Where it was received from.
    pub fn source(&self) -> &Source {
        self.receipt.source()
    }

    /// Whether it has been settled.
    pub fn is_settled(&self) -> bool {
        self.receipt.is_settled()
    }

    /// Acknowledge: the message is done and is never delivered again.
    pub async fn ack(&self) -> Result<()> {
        self.receipt.ack().await
    }

    /// Acks every delivery of `deliveries`, as [`ack`](Self::ack) would one by one, but in
    /// one step where their backend can (see [`Receipt::ack_all`]); each one's result, in
    /// order.
    ///
    /// ```
    /// use std::time::Duration;
    /// use courier_core::{Consumer, Delivery};
    ///
    /// async fn drain(consumer: &dyn Consumer) -> Result<(), courier_core::Error> {
    ///     let batch = consumer.receive(100, Duration::from_secs(1)).await?;
    ///     // ... handle the batch ...
    ///     for result in Delivery::ack_all(&batch).await {
    ///         result?;
    ///     }
    ///     Ok(())
    /// }
    /// ```
    pub async fn ack_all(deliveries: &[Delivery]) -> Vec<Result<()>> {
        let receipts: Vec<&Receipt> = deliveries.iter().map(|d| &d.receipt).collect();
        Receipt::ack_all(&receipts).await
    }

    /// Redeliver as soon as possible (or dead-letter, if this was the last attempt).
    pub async fn retry(&self) -> Result<()> {
        self.receipt.retry().await
    }

    /// Redeliver no sooner than `delay` (or dead-letter, if this was the last attempt).
    pub async fn retry_after(&self, delay: Duration) -> Result<()> {
        self.receipt.retry_after(delay).await
    }

    /// A failure of this delivery because of `reason`; see [`Receipt::fail`].
    pub async fn fail(&self, reason: &str, after: Option<Duration>) -> Result<AfterFailure> {
        self.receipt.fail(reason, after).await
    }

    /// Send to the dead-letter destination now, with `reason` in its headers.
    pub async fn reject(&self, reason: &str) -> Result<()> {
        self.receipt.reject(reason).await
    }

    /// Keep the lease for another `by` from now, for long work. Not a settlement.
    pub async fn extend_lease(&self, by: Duration) -> Result<()> {
        self.receipt.extend_lease(by).await
    }

    /// The message, giving up the ability to settle (it will come back after its lease).
    pub fn into_message(self) -> Message {
        self.message
    }
}

impl Receipt {
    /// The id of the message this settles.
    pub fn id(&self) -> &MessageId {
        &self.id
    }

    /// Which delivery this is: 1 the first time.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Where the message was received from.
    pub fn source(&self) -> &Source {
        self.acker.policy().source()
    }

    /// The consumer's settlement policy.
    pub fn policy(&self) -> &SettlePolicy {
        self.acker.policy()
    }

    /// What a failure of this delivery would lead to, without settling: see
    /// [`SettlePolicy::after_failure`].
    pub fn after_failure(&self, after: Option<Duration>) -> AfterFailure {
        self.policy().after_failure(self.attempt, after)
    }

    /// Whether it has been settled.
    pub fn is_settled(&self) -> bool {
        self.state.load(Ordering::Acquire) == SETTLED
    }

    /// See [`Delivery::ack`].
    pub async fn ack(&self) -> Result<()> {
        self.claim()?;
        match self.acker.ack_now(&self.id) {
            Some(result) => self.conclude(result),
            None => self.settle_claimed(self.acker.ack(&self.id)).await,
        }
    }

    /// Acks without awaiting where the backend settles in memory (the in-process
    /// backend): `Some` with what [`ack`](Self::ack) would return. `None` where the ack
    /// needs I/O; the receipt is then left as it was, to be settled with `ack`.
    ///
    /// A runtime's per-message path calls this first: on an in-process queue an
    /// awaited `ack` costs more in its future than the ack itself.
    ///
    /// ```
    /// use std::time::Duration;
    /// use courier_core::{Broker, ConsumerOptions, Message, Source};
    ///
    /// # async fn example(broker: &dyn Broker) -> Result<(), courier_core::Error> {
    /// let source = Source::queue("orders")?;
    /// let consumer = broker.consumer(&source, ConsumerOptions::default()).await?;
    /// for delivery in consumer.receive(10, Duration::from_secs(1)).await? {
    ///     let (message, receipt) = delivery.into_parts();
    ///     // ... handle the message ...
    ///     # drop(message);
    ///     match receipt.ack_now() {
    ///         Some(result) => result?,
    ///         None => receipt.ack().await?,
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn ack_now(&self) -> Option<Result<()>> {
        if let Err(e) = self.claim() {
            return Some(Err(e));
        }
        match self.acker.ack_now(&self.id) {
            Some(result) => Some(self.conclude(result)),
            None => {
                // Nothing was sent: give the claim back.
                self.state.store(UNSETTLED, Ordering::Release);
                None
            }
        }
    }

    /// Acks every receipt of `receipts`, each settled once as [`ack`](Self::ack) would: a
    /// run of receipts that share a [`TaggedAcknowledger`] goes to the backend in one
    /// call where it can ([`TaggedAcknowledger::ack_all_now`]), the rest one by one.
    /// Each one's result, in order: one already settled gives
    /// [`Error::AlreadySettled`], one that failed is handed back unsettled, as with `ack`.
    pub async fn ack_all(receipts: &[&Receipt]) -> Vec<Result<()>> {
        let mut results = Vec::with_capacity(receipts.len());
        let mut rest = receipts;
        while let Some(first) = rest.first() {
            let run = match &first.acker {
                Acker::Tagged(shared, _) => rest
                    .iter()
                    .take_while(|r| matches!(&r.acker, Acker::Tagged(a, _) if Arc::ptr_eq(a, shared)))
                    .count(),
                Acker::Own(_) => 1,
            };
            let (group, after) = rest.split_at(run);
            rest = after;
            if run > 1 && Self::ack_run_now(group, &mut results) {
                continue;
            }
            for receipt in group {
                results.push(receipt.ack().await);
            }
        }
        results
    }

    /// Acks a run of receipts sharing one tagged acknowledger in one call, if the backend
    /// can; `false` (nothing settled, nothing claimed) if not. Claims and settles with no
    /// await between, so a cancelled caller never leaves a receipt claimed.
    fn ack_run_now(run: &[&Receipt], results: &mut Vec<Result<()>>) -> bool {
        let Acker::Tagged(shared, _) = &run[0].acker else { return false };
        let claimed: Vec<bool> = run.iter().map(|r| r.claim().is_ok()).collect();
        let tags: Vec<(u64, &MessageId)> = run
            .iter()
            .zip(&claimed)
            .filter(|(_, claimed)| **claimed)
            .map(|(r, _)| match r.acker {
                Acker::Tagged(_, tag) => (tag, &r.id),
                Acker::Own(_) => unreachable!("a run shares one tagged acknowledger"),
            })
            .collect();
        let Some(answers) = shared.ack_all_now(&tags).filter(|a| a.len() == tags.len()) else {
            for (receipt, claimed) in run.iter().zip(claimed) {
                if claimed {
                    receipt.state.store(UNSETTLED, Ordering::Release);
                }
            }
            return false;
        };
        let mut answers = answers.into_iter();
        for (receipt, claimed) in run.iter().zip(claimed) {
            results.push(match claimed {
                true => receipt.conclude(answers.next().expect("one answer per claimed receipt")),
                false => Err(Error::AlreadySettled { id: receipt.id.clone() }),
            });
        }
        true
    }

    /// See [`Delivery::retry`].
    pub async fn retry(&self) -> Result<()> {
        self.retry_or_give_up(None).await
    }

    /// See [`Delivery::retry_after`].
    pub async fn retry_after(&self, delay: Duration) -> Result<()> {
        self.retry_or_give_up(Some(delay)).await
    }

    async fn retry_or_give_up(&self, delay: Option<Duration>) -> Result<()> {
        let policy = self.policy();
        if policy.is_last(self.attempt) {
            self.settle(self.acker.dead_letter(&self.id, &policy.gave_up(self.attempt, RETRY_EXHAUSTED))).await
        } else {
            self.settle(self.acker.redeliver(&self.id, delay.filter(|d| !d.is_zero()))).await
        }
    }

    /// This delivery failed because of `reason`: the policy decides (see
    /// [`SettlePolicy::after_failure`]). After the last attempt the message is
    /// dead-lettered with the reason `gave up after N attempts: <reason>`; otherwise it is
    /// redelivered after `after` or the policy's backoff. Returns what was done.
    pub async fn fail(&self, reason: &str, after: Option<Duration>) -> Result<AfterFailure> {
        let next = self.after_failure(after);
        match next {
            AfterFailure::DeadLetter => {
                self.settle(self.acker.dead_letter(&self.id, &self.policy().gave_up(self.attempt, reason))).await?
            }
            AfterFailure::Redeliver { delay } => {
                self.settle(self.acker.redeliver(&self.id, Some(delay).filter(|d| !d.is_zero()))).await?
            }
        }
        Ok(next)
    }

    /// See [`Delivery::reject`].
    pub async fn reject(&self, reason: &str) -> Result<()> {
        self.settle(self.acker.dead_letter(&self.id, &self.policy().rejected(self.attempt, reason))).await
    }

    /// See [`Delivery::extend_lease`].
    pub async fn extend_lease(&self, by: Duration) -> Result<()> {
        if self.state.load(Ordering::Acquire) != UNSETTLED {
            return Err(Error::AlreadySettled { id: self.id.clone() });
        }
        self.acker.extend_lease(&self.id, by).await
    }

    /// Takes the right to settle: only one settlement runs, and only until one succeeds.
    fn claim(&self) -> Result<()> {
        if self.state.compare_exchange(UNSETTLED, SETTLING, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return Err(Error::AlreadySettled { id: self.id.clone() });
        }
        Ok(())
    }

    async fn settle(&self, op: impl Future<Output = Result<()>>) -> Result<()> {
        self.claim()?;
        self.settle_claimed(op).await
    }

    /// Runs a settlement whose right was [`claim`](Self::claim)ed.
    async fn settle_claimed(&self, op: impl Future<Output = Result<()>>) -> Result<()> {
        // Dropped mid-settlement (a cancelled future, a timeout): the delivery is
        // handed back unsettled, so it can be settled again or expire as a lease.
        let mut guard = HandBackOnDrop { state: &self.state, armed: true };
        let result = op.await;
        guard.armed = false;
        self.conclude(result)
    }

    /// Ends a claimed settlement with the backend's answer.
    fn conclude(&self, result: Result<()>) -> Result<()> {
        match result {
            Ok(()) => {
                self.state.store(SETTLED, Ordering::Release);
                Ok(())
            }
            // A lost lease is final: the broker already took the message back.
            Err(e @ Error::LeaseLost { .. }) => {
                self.state.store(SETTLED, Ordering::Release);
                Err(e)
            }
            Err(e) => {
                // Hand the delivery back so the caller can try again.
                self.state.store(UNSETTLED, Ordering::Release);
                Err(e)
            }
        }
    }
}

/// Returns a receipt to unsettled when its settlement future is dropped before it ends.
struct HandBackOnDrop<'a> {
    state: &'a AtomicU8,
    armed: bool,
}

/// A receipt dropped unsettled hands its message back: it is never abandoned, and what it
/// holds (a key, a prefetch slot, a partition's commit position) is freed for the others.
impl Drop for Receipt {
    fn drop(&mut self) {
        if self.state.load(Ordering::Acquire) == UNSETTLED {
            self.acker.release(&self.id);
        }
    }
}

impl Drop for HandBackOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.state.store(UNSETTLED, Ordering::Release);
        }
    }
}

impl Deref for Delivery {
    type Target = Message;
    fn deref(&self) -> &Message {
        &self.message
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery").field("message", &self.message).field("receipt", &self.receipt).finish()
    }
}

impl fmt::Debug for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receipt")
            .field("id", &self.id)
            .field("source", self.source())
            .field("attempt", &self.attempt)
            .field("settled", &self.is_settled())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_huge_reason_is_cut_so_the_dead_letter_stays_deliverable() {
        let origin = Source::queue("q").unwrap();
        let to = Destination::queue("q.dlq").unwrap();
        // Multi-byte characters across the cut: it lands on a character boundary.
        let letter = DeadLetter::new("é".repeat(1_000_000), 1, origin.clone(), to.clone());
        assert!(letter.reason().len() <= DeadLetter::MAX_REASON_BYTES, "{}", letter.reason().len());
        assert!(letter.reason().ends_with('…') && letter.reason().starts_with("éé"));
        let short = DeadLetter::new("fine", 1, origin, to);
        assert_eq!(short.reason(), "fine");
    }

    /// Records what settlement asked of the backend.
    #[derive(Default)]
    struct Recorded {
        calls: AtomicUsize,
        redelivered: Mutex<Vec<Option<Duration>>>,
        dead_letters: Mutex<Vec<DeadLetter>>,
    }

    struct Flaky {
        fail_first: bool,
        /// Never completes an ack: for cancellation.
        hang: bool,
        /// Acks through `ack_now`, as an in-process backend does.
        at_once: bool,
        policy: SettlePolicy,
        recorded: Arc<Recorded>,
    }

    #[async_trait]
    impl Acknowledger for Flaky {
        fn policy(&self) -> &SettlePolicy {
            &self.policy
        }
        async fn ack(&self) -> Result<()> {
            assert!(!self.at_once, "an ack done at once never comes here");
            if self.hang {
                self.recorded.calls.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
            }
            self.answer()
        }
        fn ack_now(&self) -> Option<Result<()>> {
            self.at_once.then(|| self.answer())
        }
        async fn redeliver(&self, delay: Option<Duration>) -> Result<()> {
            self.recorded.redelivered.lock().unwrap().push(delay);
            Ok(())
        }
        async fn dead_letter(&self, letter: &DeadLetter) -> Result<()> {
            self.recorded.dead_letters.lock().unwrap().push(letter.clone());
            Ok(())
        }
        async fn extend_lease(&self, _: Duration) -> Result<()> {
            Ok(())
        }
    }

    impl Flaky {
        fn answer(&self) -> Result<()> {
            let n = self.recorded.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail_first && n == 0 {
                Err(Error::retryable("connection dropped"))
            } else {
                Ok(())
            }
        }
    }

    fn policy(max_attempts: u32) -> SettlePolicy {
        let source = Source::queue("q").unwrap();
        let retry = RetryPolicy::default()
            .max_attempts(max_attempts)
            .backoff(Duration::from_millis(100), Duration::from_secs(1))
            .without_jitter();
        SettlePolicy::new(source.clone(), retry, source.default_dead_letter())
    }

    fn delivery_with(attempt: u32, max_attempts: u32, fail_first: bool, hang: bool) -> (Delivery, Arc<Recorded>) {
        let recorded = Arc::new(Recorded::default());
        let acker = Box::new(Flaky {
            fail_first,
            hang,
            at_once: false,
            policy: policy(max_attempts),
            recorded: recorded.clone(),
        });
        (Delivery::new(Message::new("x"), attempt, acker), recorded)
    }

    fn delivery(fail_first: bool) -> (Delivery, Arc<Recorded>) {
        delivery_with(1, 5, fail_first, false)
    }

    #[tokio::test]
    async fn settling_twice_is_an_error_not_a_panic() {
        let (d, recorded) = delivery(false);
        d.ack().await.unwrap();
        assert!(matches!(d.reject("late").await, Err(Error::AlreadySettled { .. })));
        assert!(matches!(d.extend_lease(Duration::from_secs(1)).await, Err(Error::AlreadySettled { .. })));
        assert_eq!(recorded.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_ack_done_at_once_is_settled_once_and_handed_back_when_it_fails() {
        let recorded = Arc::new(Recorded::default());
        let acker =
            Flaky { fail_first: true, hang: false, at_once: true, policy: policy(5), recorded: recorded.clone() };
        let d = Delivery::new(Message::new("x"), 1, Box::new(acker));
        assert!(d.ack().await.unwrap_err().is_retryable());
        assert!(!d.is_settled(), "a failed ack hands the delivery back");
        d.ack().await.unwrap();
        assert!(d.is_settled());
        assert!(matches!(d.ack().await, Err(Error::AlreadySettled { .. })));
        assert_eq!(recorded.calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn an_ack_now_settles_once_and_hands_a_failure_back() {
        let recorded = Arc::new(Recorded::default());
        let acker =
            Flaky { fail_first: true, hang: false, at_once: true, policy: policy(5), recorded: recorded.clone() };
        let (_, receipt) = Delivery::new(Message::new("x"), 1, Box::new(acker)).into_parts();
        assert!(receipt.ack_now().unwrap().unwrap_err().is_retryable());
        assert!(!receipt.is_settled(), "a failed ack hands the receipt back");
        receipt.ack_now().unwrap().unwrap();
        assert!(receipt.is_settled());
        assert!(matches!(receipt.ack_now(), Some(Err(Error::AlreadySettled { .. }))));
        assert_eq!(recorded.calls.load(Ordering::SeqCst), 2);
    }

    /// A backend whose ack needs I/O: `ack_now` sends nothing and leaves the receipt
    /// free to settle, by `ack` or any other way.
    #[tokio::test]
    async fn an_ack_now_that_needs_io_leaves_the_receipt_unsettled() {
        let (d, recorded) = delivery(false);
        let (_, receipt) = d.into_parts();
        assert!(receipt.ack_now().is_none());
        assert!(!receipt.is_settled());
        assert_eq!(recorded.calls.load(Ordering::SeqCst), 0, "nothing was sent");
        receipt.ack().await.unwrap();
        assert!(receipt.is_settled());
        assert!(matches!(receipt.ack_now(), Some(Err(Error::AlreadySettled { .. }))));
    }

    #[tokio::test]
    async fn a_failed_ack_hands_the_delivery_back() {
        let (d, recorded) = delivery(true);
        assert!(d.ack().await.unwrap_err().is_retryable());
        assert!(!d.is_settled());
        d.ack().await.unwrap();
        assert!(d.is_settled());
        assert_eq!(recorded.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_cancelled_settlement_hands_the_delivery_back() {
        let (d, _) = delivery_with(1, 5, false, true);
        let cancelled = tokio::time::timeout(Duration::from_millis(10), d.ack()).await;
        assert!(cancelled.is_err(), "the ack hangs, so the timeout cancels it");
        assert!(!d.is_settled());
        // Not stuck in "settling": another settlement goes through.
        d.reject("after a cancelled ack").await.expect("settle after cancellation");
        assert!(d.is_settled());
    }

    #[tokio::test]
    async fn the_receipt_decides_retry_versus_dead_letter() {
        // Not the last attempt: redelivered after the policy's backoff.
        let (d, recorded) = delivery_with(2, 3, false, false);
        assert_eq!(
            d.fail("downstream down", None).await.unwrap(),
            AfterFailure::Redeliver { delay: Duration::from_millis(200) }
        );
        assert_eq!(*recorded.redelivered.lock().unwrap(), [Some(Duration::from_millis(200))]);
        assert!(recorded.dead_letters.lock().unwrap().is_empty());

        // The last attempt: dead-lettered with the one reason text, never redelivered.
        let (d, recorded) = delivery_with(3, 3, false, false);
        assert_eq!(d.fail("downstream down", None).await.unwrap(), AfterFailure::DeadLetter);
        let letter = recorded.dead_letters.lock().unwrap()[0].clone();
        assert_eq!(letter.reason(), "gave up after 3 attempts: downstream down");
        assert_eq!(letter.attempts(), 3);
        assert_eq!(letter.destination().to_string(), "queue:q.dlq");
        assert!(recorded.redelivered.lock().unwrap().is_empty());

        // A plain retry of the last attempt dead-letters too; of an earlier one, redelivers.
        let (d, recorded) = delivery_with(3, 3, false, false);
        d.retry().await.unwrap();
        assert_eq!(
            recorded.dead_letters.lock().unwrap()[0].reason(),
            "gave up after 3 attempts: max attempts reached on retry"
        );
        let (d, recorded) = delivery_with(1, 3, false, false);
        d.retry_after(Duration::from_secs(2)).await.unwrap();
        assert_eq!(*recorded.redelivered.lock().unwrap(), [Some(Duration::from_secs(2))]);
    }

    /// A consumer-wide acknowledger: records each call with the tag and id it was given.
    struct Shared {
        policy: SettlePolicy,
        /// The first ack of each delivery fails, retryably.
        fail_first_ack: bool,
        /// Acks several at once (`ack_all_now`); the ack of tag 99 in a batch fails.
        batches: bool,
        calls: Mutex<Vec<(&'static str, u64, MessageId)>>,
    }

    impl Shared {
        fn new(max_attempts: u32, fail_first_ack: bool) -> Arc<Self> {
            Arc::new(Shared { policy: policy(max_attempts), fail_first_ack, batches: false, calls: Mutex::default() })
        }
        fn batching() -> Arc<Self> {
            Arc::new(Shared { policy: policy(5), fail_first_ack: false, batches: true, calls: Mutex::default() })
        }
        fn log(&self, op: &'static str, tag: u64, id: &MessageId) -> usize {
            let mut calls = self.calls.lock().unwrap();
            calls.push((op, tag, id.clone()));
            calls.iter().filter(|(o, t, _)| *o == op && *t == tag).count()
        }
        fn calls(&self) -> Vec<(&'static str, u64)> {
            self.calls.lock().unwrap().iter().map(|(op, tag, _)| (*op, *tag)).collect()
        }
    }

    #[async_trait]
    impl TaggedAcknowledger for Shared {
        fn policy(&self) -> &SettlePolicy {
            &self.policy
        }
        async fn ack(&self, _: u64, _: &MessageId) -> Result<()> {
            unreachable!("this acknowledger acks at once")
        }
        fn ack_now(&self, tag: u64, id: &MessageId) -> Option<Result<()>> {
            let n = self.log("ack", tag, id);
            Some(if self.fail_first_ack && n == 1 { Err(Error::retryable("lock poisoned")) } else { Ok(()) })
        }
        fn ack_all_now(&self, deliveries: &[(u64, &MessageId)]) -> Option<Vec<Result<()>>> {
            self.batches.then(|| {
                let answer = |tag| if tag == 99 { Err(Error::retryable("disk full")) } else { Ok(()) };
                deliveries.iter().map(|(tag, id)| (self.log("ack_all", *tag, id), answer(*tag)).1).collect()
            })
        }
        async fn redeliver(&self, tag: u64, id: &MessageId, _: Option<Duration>) -> Result<()> {
            self.log("redeliver", tag, id);
            Ok(())
        }
        async fn dead_letter(&self, tag: u64, id: &MessageId, _: &DeadLetter) -> Result<()> {
            self.log("dead_letter", tag, id);
            Ok(())
        }
        async fn extend_lease(&self, tag: u64, id: &MessageId, _: Duration) -> Result<()> {
            self.log("extend_lease", tag, id);
            Ok(())
        }
        fn release(&self, tag: u64, id: &MessageId) {
            self.log("release", tag, id);
        }
    }

    /// Deliveries sharing one acknowledger keep the receipt's rules each: every call names
    /// its own tag and id, a failed ack hands back, a second settlement is refused, the
    /// policy picks redelivery or dead letter, and a receipt dropped unsettled is released.
    #[tokio::test]
    async fn deliveries_sharing_a_tagged_acknowledger_are_each_settled_once() {
        let shared = Shared::new(2, true);
        let acker: Arc<dyn TaggedAcknowledger> = shared.clone();
        let (one, two, three, four) = (Message::new("1"), Message::new("2"), Message::new("3"), Message::new("4"));
        let first_id = one.id.clone();
        let first = Delivery::tagged(one, 1, acker.clone(), 10);
        assert!(first.ack().await.unwrap_err().is_retryable());
        assert!(!first.is_settled(), "a failed ack hands the delivery back");
        first.ack().await.unwrap();
        assert!(matches!(first.ack().await, Err(Error::AlreadySettled { .. })));
        assert_eq!(first.source().to_string(), "queue:q");

        let second = Delivery::tagged(two, 1, acker.clone(), 11);
        second.extend_lease(Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            second.fail("busy", None).await.unwrap(),
            AfterFailure::Redeliver { delay: Duration::from_millis(100) }
        );
        let last = Delivery::tagged(three, 2, acker.clone(), 12);
        assert_eq!(last.fail("busy", None).await.unwrap(), AfterFailure::DeadLetter);
        drop(last); // settled: nothing to release

        drop(Delivery::tagged(four, 1, acker, 13));
        assert_eq!(
            shared.calls(),
            [("ack", 10), ("ack", 10), ("extend_lease", 11), ("redeliver", 11), ("dead_letter", 12), ("release", 13)]
        );
        assert_eq!(shared.calls.lock().unwrap()[0].2, first_id, "each call names its delivery's message");
    }

    /// `ack_all` settles each receipt once: a run sharing a batching acknowledger goes in
    /// one call (without the one already settled), a failure there is handed back alone,
    /// and receipts of other acknowledgers, or of one that cannot batch, are acked alone.
    #[tokio::test]
    async fn ack_all_settles_each_receipt_once_in_as_few_calls_as_it_can() {
        let batching = Shared::batching();
        let one_by_one = Shared::new(5, false);
        let (b, o): (Arc<dyn TaggedAcknowledger>, Arc<dyn TaggedAcknowledger>) = (batching.clone(), one_by_one.clone());
        let recorded = Arc::new(Recorded::default());
        let own =
            Flaky { fail_first: false, hang: false, at_once: true, policy: policy(5), recorded: recorded.clone() };
        let deliveries = vec![
            Delivery::tagged(Message::new("1"), 1, b.clone(), 1),
            Delivery::tagged(Message::new("2"), 1, b.clone(), 2),
            Delivery::tagged(Message::new("3"), 1, b.clone(), 99),
            Delivery::tagged(Message::new("4"), 1, b.clone(), 4),
            Delivery::new(Message::new("5"), 1, Box::new(own)),
            Delivery::tagged(Message::new("6"), 1, o.clone(), 6),
            Delivery::tagged(Message::new("7"), 1, o.clone(), 7),
        ];
        deliveries[1].ack().await.unwrap();
        let results = Delivery::ack_all(&deliveries).await;
        let kinds: Vec<&str> = results
            .iter()
            .map(|r| match r {
                Ok(()) => "ok",
                Err(Error::AlreadySettled { .. }) => "already settled",
                Err(e) if e.is_retryable() => "retryable",
                Err(_) => "other",
            })
            .collect();
        assert_eq!(kinds, ["ok", "already settled", "retryable", "ok", "ok", "ok", "ok"]);
        let settled: Vec<bool> = deliveries.iter().map(Delivery::is_settled).collect();
        assert_eq!(settled, [true, true, false, true, true, true, true], "the failed one is handed back");
        assert_eq!(batching.calls(), [("ack", 2), ("ack_all", 1), ("ack_all", 99), ("ack_all", 4)]);
        assert_eq!(one_by_one.calls(), [("ack", 6), ("ack", 7)]);
        assert_eq!(recorded.calls.load(Ordering::SeqCst), 1);
        // The handed-back one settles normally afterwards; nothing else can.
        assert!(Delivery::ack_all(&deliveries[..2]).await.iter().all(|r| r.is_err()));
        deliveries[2].ack().await.unwrap();
    }

    #[test]
    fn a_dead_letter_replaces_older_dead_letter_headers() {
        let source = Source::queue("q").unwrap();
        let first = DeadLetter::new("first", 1, source.clone(), source.default_dead_letter());
        let second = DeadLetter::new("second", 4, source.clone(), source.default_dead_letter());
        let dead = second.apply(first.apply(Message::new("x")));
        assert_eq!(dead.header(headers::DEAD_LETTER_REASON), Some("second"));
        assert_eq!(dead.header(headers::DEAD_LETTER_ATTEMPTS), Some("4"));
        assert_eq!(dead.headers.len(), 3);
    }
}
