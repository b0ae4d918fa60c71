//! The traits every backend implements.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::capabilities::{Capabilities, Feature};
use crate::delivery::{Delivery, SettlePolicy};
use crate::destination::{Destination, Source};
use crate::error::Result;
use crate::message::{Message, MessageId};
use crate::retry::RetryPolicy;

/// A message broker: sends to destinations and opens consumers on sources.
///
/// Used through generics or as `Arc<dyn Broker>` (see [`DynBroker`]) when the backend
/// is chosen from configuration at run time. Handles are cheap to clone and safe to
/// share across tasks.
///
/// Implementations check every message with [`Capabilities::check_message`] before any
/// I/O, and return [`Error::Unsupported`](crate::Error::Unsupported) for what they lack.
///
/// ```
/// # use courier_core::{Broker, Destination, Message};
/// # async fn example(broker: &dyn Broker) -> Result<(), courier_core::Error> {
/// let orders = Destination::queue("orders")?;
/// let id = broker.send(&orders, Message::new(&b"\x00binary ok"[..])).await?;
/// println!("sent {id}");
/// # Ok(()) }
/// ```
#[async_trait]
pub trait Broker: Send + Sync + fmt::Debug + 'static {
    /// What this backend supports.
    fn capabilities(&self) -> &Capabilities;

    /// Sends one message; returns its id once the broker has accepted it.
    async fn send(&self, destination: &Destination, message: Message) -> Result<MessageId>;

    /// Sends several messages; returns their ids in order once all are accepted.
    /// Takes at most [`Capabilities::max_batch`] messages.
    async fn send_batch(&self, destination: &Destination, messages: Vec<Message>) -> Result<Vec<MessageId>> {
        self.capabilities().check_batch(&messages)?;
        let mut ids = Vec::with_capacity(messages.len());
        for m in messages {
            ids.push(self.send(destination, m).await?);
        }
        Ok(ids)
    }

    /// Opens a consumer; creates the queue or subscription if it does not exist.
    async fn consumer(&self, source: &Source, options: ConsumerOptions) -> Result<Box<dyn Consumer>>;

    /// Creates a queue or subscription ahead of time, so messages sent before any
    /// consumer opens are kept. Idempotent.
    async fn declare(&self, source: &Source) -> Result<()>;

    /// Creates a destination ahead of time: a queue, as [`declare`](Self::declare) does,
    /// or a topic with no subscription yet, for backends whose topics exist apart from
    /// their subscriptions (a RabbitMQ exchange, a Kafka topic). Idempotent. Backends
    /// without topics return `Unsupported`; the default creates queues through `declare`
    /// and takes topics as existing once a subscription does.
    ///
    /// ```
    /// # use courier_core::{Broker, Destination};
    /// # async fn example(broker: &dyn Broker) -> Result<(), courier_core::Error> {
    /// broker.declare_destination(&Destination::topic("events")?).await?;
    /// # Ok(()) }
    /// ```
    async fn declare_destination(&self, destination: &Destination) -> Result<()> {
        match destination {
            Destination::Queue(queue) => self.declare(&Source::Queue(queue.clone())).await,
            Destination::Topic(_) => self.capabilities().require(Feature::FanOut),
        }
    }

    /// Sends a message to one source alone: a queue, or one subscription of a topic,
    /// where a send to the topic would give every subscription a copy. This is how a
    /// subscription's dead letters go back to it and nowhere else. Backends that cannot
    /// address one subscription (Kafka, whose subscriptions are consumer groups reading
    /// one log) return `Unsupported` for subscriptions.
    ///
    /// ```
    /// # use courier_core::{Broker, Message, Source};
    /// # async fn example(broker: &dyn Broker) -> Result<(), courier_core::Error> {
    /// let billing = Source::subscription("orders", "billing")?;
    /// broker.send_to_source(&billing, Message::new("only billing sees this")).await?;
    /// # Ok(()) }
    /// ```
    async fn send_to_source(&self, source: &Source, message: Message) -> Result<MessageId> {
        match source {
            Source::Queue(queue) => self.send(&Destination::Queue(queue.clone()), message).await,
            Source::Subscription { .. } => {
                self.capabilities().require(Feature::FanOut)?;
                Err(self.capabilities().unsupported(Feature::SubscriptionSend))
            }
        }
    }

    /// Counts for a source. Backends without counts return `Unsupported`.
    async fn stats(&self, source: &Source) -> Result<Stats> {
        let _ = source;
        Err(self.capabilities().unsupported(Feature::Stats))
    }

    /// Removes every message waiting in a source (in-flight ones stay until settled).
    /// Returns how many were removed where the backend knows.
    async fn purge(&self, source: &Source) -> Result<u64> {
        let _ = source;
        Err(self.capabilities().unsupported(Feature::Purge))
    }

    /// Closes the broker connection; later calls fail with `Closed`.
    async fn close(&self) -> Result<()>;
}

/// A broker chosen at run time.
pub type DynBroker = Arc<dyn Broker>;

/// Receives deliveries from one source. Safe to share across tasks: several tasks may
/// call [`receive`](Self::receive) on one consumer at once.
#[async_trait]
pub trait Consumer: Send + Sync {
    /// Where this consumer reads.
    fn source(&self) -> &Source;

    /// Waits up to `wait` for at least one message and returns up to `max`. An empty
    /// source waits (never busy-polls) and then returns an empty vector, not an error.
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>>;

    /// As [`receive`](Self::receive), but appends the deliveries to `into` and returns
    /// how many: a caller that receives in a loop reuses one vector, where `receive`
    /// allocates one a call (on the in-process backend, about a tenth of a message's
    /// cost in batches of ten). The default calls `receive`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use courier_core::{Consumer, Delivery};
    ///
    /// async fn drain(consumer: &dyn Consumer) -> Result<(), courier_core::Error> {
    ///     let mut batch = Vec::with_capacity(10);
    ///     while consumer.receive_into(10, Duration::ZERO, &mut batch).await? > 0 {
    ///         for result in Delivery::ack_all(&batch).await {
    ///             result?;
    ///         }
    ///         batch.clear();
    ///     }
    ///     Ok(())
    /// }
    /// ```
    async fn receive_into(&self, max: usize, wait: Duration, into: &mut Vec<Delivery>) -> Result<usize> {
        let batch = self.receive(max, wait).await?;
        let received = batch.len();
        into.extend(batch);
        Ok(received)
    }

    /// One delivery, or `None` after `wait`.
    async fn receive_one(&self, wait: Duration) -> Result<Option<Delivery>> {
        Ok(self.receive(1, wait).await?.pop())
    }

    /// Stops receiving. Unsettled deliveries of this consumer go back to the source for
    /// other consumers (where the backend can; otherwise after their lease).
    ///
    /// Close a consumer before its program ends. One only dropped gives back what it read
    /// ahead in the background, which a process that exits next never runs: those messages
    /// then wait out their lease before anyone else gets them.
    async fn close(&self) -> Result<()>;
}

/// How a consumer handles leases and failures.
///
/// ```
/// use std::time::Duration;
/// use courier_core::ConsumerOptions;
///
/// let options = ConsumerOptions::default().lease(Duration::from_secs(60)).max_attempts(3);
/// assert_eq!(options.retry.max_attempts, 3);
/// ```
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// How long a delivery is leased before it is redelivered. Default 30 s.
    pub lease: Duration,
    /// How many deliveries a message gets, and the backoff between them; after the
    /// last, a retry or lease expiry dead-letters the message. Default 5 attempts.
    pub retry: RetryPolicy,
    /// Where dead letters go; default [`Source::default_dead_letter`].
    pub dead_letter: Option<Destination>,
    /// How many messages the backend may fetch ahead of `receive` calls. Default 100.
    pub prefetch: usize,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            lease: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            dead_letter: None,
            prefetch: 100,
        }
    }
}

impl ConsumerOptions {
    /// Sets the lease.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets the maximum number of deliveries.
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.retry = self.retry.max_attempts(max_attempts);
        self
    }

    /// Retries forever.
    pub fn unlimited_attempts(mut self) -> Self {
        self.retry = self.retry.unlimited_attempts();
        self
    }

    /// Sets the retry policy (attempts and backoff).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the dead-letter destination.
    pub fn dead_letter(mut self, destination: Destination) -> Self {
        self.dead_letter = Some(destination);
        self
    }

    /// Sets the prefetch bound.
    pub fn prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// The dead-letter destination for `source`.
    pub fn dead_letter_for(&self, source: &Source) -> Destination {
        self.dead_letter.clone().unwrap_or_else(|| source.default_dead_letter())
    }

    /// The settlement policy every delivery of a consumer of `source` shares; backends
    /// build it once per consumer and hand it to [`Delivery::new`](crate::Delivery::new).
    pub fn settle_policy(&self, source: &Source) -> Arc<SettlePolicy> {
        Arc::new(SettlePolicy::new(source.clone(), self.retry.clone(), self.dead_letter_for(source)))
    }
}

/// Counts for one source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages ready or waiting their turn (not in flight, not delayed).
    pub depth: u64,
    /// Delivered and not yet settled.
    pub in_flight: u64,
    /// Held back by a delay.
    pub delayed: u64,
    /// Moved to the dead-letter destination since the source was created.
    pub dead_lettered: u64,
    /// Age of the oldest waiting message.
    pub oldest_age: Option<Duration>,
}
