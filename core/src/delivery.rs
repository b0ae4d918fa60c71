//! A received message and the means to settle it exactly once.

use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use crate::destination::Source;
use crate::error::{Error, Result};
use crate::message::{Message, MessageId};

/// How a backend settles one delivery. Adapter authors implement this; users call the
/// methods on [`Delivery`], which guarantees each delivery is settled at most once.
#[async_trait]
pub trait Acknowledger: Send + Sync {
    /// Done: never deliver this message again.
    async fn ack(&self) -> Result<()>;
    /// Deliver again, no sooner than `delay` when given. When the delivery has used
    /// the consumer's last attempt, the backend dead-letters it instead.
    async fn retry(&self, delay: Option<Duration>) -> Result<()>;
    /// Terminal failure: to the dead-letter destination now, with `reason` in its headers.
    async fn reject(&self, reason: &str) -> Result<()>;
    /// Keep the lease for another `by` from now.
    async fn extend_lease(&self, by: Duration) -> Result<()>;
}

const UNSETTLED: u8 = 0;
const SETTLING: u8 = 1;
const SETTLED: u8 = 2;

/// A message handed to a consumer, to be settled with exactly one of [`ack`](Self::ack),
/// [`retry`](Self::retry), [`retry_after`](Self::retry_after) or [`reject`](Self::reject).
///
/// Settling twice returns [`Error::AlreadySettled`]. When a settlement fails, the
/// delivery is handed back unsettled so the caller may try again; a delivery dropped
/// without settlement comes back after its lease.
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
pub struct Receipt {
    id: MessageId,
    attempt: u32,
    source: Source,
    acker: Box<dyn Acknowledger>,
    state: AtomicU8,
}

impl Delivery {
    /// Builds a delivery; for backend authors. `attempt` is 1 on first delivery.
    pub fn new(message: Message, attempt: u32, source: Source, acker: Box<dyn Acknowledger>) -> Self {
        let receipt =
            Receipt { id: message.id.clone(), attempt: attempt.max(1), source, acker, state: AtomicU8::new(UNSETTLED) };
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
        &self.receipt.source
    }

    /// Whether it has been settled.
    pub fn is_settled(&self) -> bool {
        self.receipt.is_settled()
    }

    /// Acknowledge: the message is done and is never delivered again.
    pub async fn ack(&self) -> Result<()> {
        self.receipt.ack().await
    }

    /// Redeliver as soon as possible (or dead-letter, if this was the last attempt).
    pub async fn retry(&self) -> Result<()> {
        self.receipt.retry().await
    }

    /// Redeliver no sooner than `delay` (or dead-letter, if this was the last attempt).
    pub async fn retry_after(&self, delay: Duration) -> Result<()> {
        self.receipt.retry_after(delay).await
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
        &self.source
    }

    /// Whether it has been settled.
    pub fn is_settled(&self) -> bool {
        self.state.load(Ordering::Acquire) == SETTLED
    }

    /// See [`Delivery::ack`].
    pub async fn ack(&self) -> Result<()> {
        self.settle(self.acker.ack()).await
    }

    /// See [`Delivery::retry`].
    pub async fn retry(&self) -> Result<()> {
        self.settle(self.acker.retry(None)).await
    }

    /// See [`Delivery::retry_after`].
    pub async fn retry_after(&self, delay: Duration) -> Result<()> {
        self.settle(self.acker.retry(Some(delay))).await
    }

    /// See [`Delivery::reject`].
    pub async fn reject(&self, reason: &str) -> Result<()> {
        self.settle(self.acker.reject(reason)).await
    }

    /// See [`Delivery::extend_lease`].
    pub async fn extend_lease(&self, by: Duration) -> Result<()> {
        if self.state.load(Ordering::Acquire) != UNSETTLED {
            return Err(Error::AlreadySettled { id: self.id.clone() });
        }
        self.acker.extend_lease(by).await
    }

    async fn settle(&self, op: impl std::future::Future<Output = Result<()>>) -> Result<()> {
        if self.state.compare_exchange(UNSETTLED, SETTLING, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return Err(Error::AlreadySettled { id: self.id.clone() });
        }
        match op.await {
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
            .field("source", &self.source)
            .field("attempt", &self.attempt)
            .field("settled", &self.is_settled())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    struct Flaky {
        fail_first: bool,
        calls: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl Acknowledger for Flaky {
        async fn ack(&self) -> Result<()> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail_first && n == 0 {
                Err(Error::retryable("connection dropped"))
            } else {
                Ok(())
            }
        }
        async fn retry(&self, _: Option<Duration>) -> Result<()> {
            Ok(())
        }
        async fn reject(&self, _: &str) -> Result<()> {
            Ok(())
        }
        async fn extend_lease(&self, _: Duration) -> Result<()> {
            Ok(())
        }
    }

    fn delivery(fail_first: bool) -> (Delivery, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let acker = Box::new(Flaky { fail_first, calls: calls.clone() });
        (Delivery::new(Message::new("x"), 1, Source::queue("q").unwrap(), acker), calls)
    }

    #[tokio::test]
    async fn settling_twice_is_an_error_not_a_panic() {
        let (d, calls) = delivery(false);
        d.ack().await.unwrap();
        assert!(matches!(d.reject("late").await, Err(Error::AlreadySettled { .. })));
        assert!(matches!(d.extend_lease(Duration::from_secs(1)).await, Err(Error::AlreadySettled { .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failed_ack_hands_the_delivery_back() {
        let (d, calls) = delivery(true);
        assert!(d.ack().await.unwrap_err().is_retryable());
        assert!(!d.is_settled());
        d.ack().await.unwrap();
        assert!(d.is_settled());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
