//! Consuming: one channel per consumer, `basic.consume` with prefetch, and settlement.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use courier_core::{
    Acknowledger, Broker, Consumer, DeadLetter, Delivery, Destination, Error, Feature, MessageId, Name, Result,
    SettlePolicy, Source,
};
use futures::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Acker;
use lapin::{BasicProperties, Channel};

use crate::session::{lapin_error, within, Session, CALL_TIMEOUT};
use crate::{mapping, queue_name, AmqpBroker};

/// How often a waiting `receive` checks that its channel is still open.
const STATUS_CHECK_EVERY: Duration = Duration::from_millis(250);

/// What settling a delivery needs, shared by all of a consumer's deliveries.
pub(crate) struct Settle {
    broker: AmqpBroker,
    /// Retries go straight back to the consumer's own queue (for a subscription, not
    /// through the topic, which would reach every other subscription too).
    retry_to: Destination,
    policy: Arc<SettlePolicy>,
}

impl Settle {
    pub(crate) fn new(broker: AmqpBroker, policy: Arc<SettlePolicy>) -> Result<Self> {
        let retry_to = Destination::Queue(Name::new("queue", &queue_name(policy.source()))?);
        Ok(Settle { broker, retry_to, policy })
    }
}

/// A consumer of one queue or subscription, on its own channel.
///
/// Messages are pushed by RabbitMQ up to the prefetch count and handed out by
/// [`receive`](Consumer::receive). When the channel or connection is lost, the next
/// `receive` subscribes again (reconnecting if needed); deliveries held from the lost
/// channel answer settlement with [`Error::LeaseLost`], since RabbitMQ requeued them.
pub struct AmqpConsumer {
    session: Arc<Session>,
    source: Source,
    queue: String,
    prefetch: u16,
    settle: Arc<Settle>,
    subscription: tokio::sync::Mutex<Option<Subscription>>,
    open: courier_core::backend::OpenGuard,
}

struct Subscription {
    channel: Channel,
    connection: Arc<lapin::Connection>,
    stream: lapin::Consumer,
}

impl Subscription {
    fn healthy(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }
}

impl AmqpConsumer {
    pub(crate) async fn open(session: Arc<Session>, source: Source, prefetch: u16, settle: Settle) -> Result<Self> {
        let consumer = AmqpConsumer {
            queue: queue_name(&source),
            session,
            source,
            prefetch,
            settle: Arc::new(settle),
            subscription: tokio::sync::Mutex::new(None),
            open: courier_core::backend::OpenGuard::new("consumer"),
        };
        // Subscribe now so competing consumers share the queue from the start.
        *consumer.subscription.lock().await = Some(consumer.subscribe().await?);
        Ok(consumer)
    }

    async fn subscribe(&self) -> Result<Subscription> {
        let (channel, connection) = self.session.channel_and_connection().await?;
        let doing = format!("consume from {}", self.queue);
        // Under the call timeout: a broker that accepted the channel and then went silent
        // would otherwise hold the consumer's start (or its resubscribe) for ever.
        within(&doing, channel.basic_qos(self.prefetch, BasicQosOptions::default()))
            .await?
            .map_err(|e| lapin_error(&doing, e))?;
        let consume = channel.basic_consume(
            self.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        );
        let stream = within(&doing, consume).await?.map_err(|e| lapin_error(&doing, e))?;
        Ok(Subscription { channel, connection, stream })
    }

    fn delivery(&self, d: lapin::message::Delivery, connection: &Arc<lapin::Connection>) -> Delivery {
        let lapin::message::Delivery { data, properties, redelivered, acker, .. } = d;
        let payload = Bytes::from(data);
        let (message, attempt) = mapping::message(payload.clone(), &properties, redelivered);
        let acker = Box::new(AmqpAcker {
            settle: self.settle.clone(),
            connection: connection.clone(),
            acker,
            id: message.id.clone(),
            attempt,
            payload,
            properties,
        });
        Delivery::new(message, attempt, acker)
    }
}

#[async_trait]
impl Consumer for AmqpConsumer {
    fn source(&self) -> &Source {
        &self.source
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = Vec::new();
        let mut subscription = self.subscription.lock().await;
        loop {
            self.open.check()?;
            if subscription.is_none() {
                // `subscribe` reconnects with backoff for up to the reconnect timeout
                // before it gives up with a retryable error.
                match self.subscribe().await {
                    Ok(s) => *subscription = Some(s),
                    Err(_) if !out.is_empty() => return Ok(out),
                    Err(e) => return Err(e),
                }
            }
            let live = subscription.as_mut().expect("subscribed above");
            if !live.healthy() {
                // lapin does not always end a consumer's stream when its connection dies.
                tracing::warn!(queue = %self.queue, "RabbitMQ channel lost; subscribing again");
                *subscription = None;
                continue;
            }
            let connection = live.connection.clone();
            let stream = &mut live.stream;
            let next = if out.is_empty() {
                // Wait in slices, checking the channel in between, so a dead connection
                // that never ends the stream is noticed within one slice.
                let slice = (tokio::time::Instant::now() + STATUS_CHECK_EVERY).min(deadline);
                match tokio::time::timeout_at(slice, stream.next()).await {
                    Ok(next) => next,
                    Err(_) if slice < deadline => continue,
                    Err(_) => return Ok(out),
                }
            } else {
                // Take what has already arrived, without waiting for more.
                match stream.next().now_or_never() {
                    Some(next) => next,
                    None => return Ok(out),
                }
            };
            match next {
                Some(Ok(delivery)) => {
                    out.push(self.delivery(delivery, &connection));
                    if out.len() >= max {
                        return Ok(out);
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(queue = %self.queue, error = %e, "RabbitMQ consumer lost; subscribing again");
                    *subscription = None;
                    if !out.is_empty() {
                        return Ok(out);
                    }
                }
                None => {
                    tracing::warn!(queue = %self.queue, "RabbitMQ cancelled the consumer; subscribing again");
                    *subscription = None;
                    if !out.is_empty() {
                        return Ok(out);
                    }
                }
            }
        }
    }

    async fn close(&self) -> Result<()> {
        if !self.open.close() {
            return Ok(());
        }
        if let Some(s) = self.subscription.lock().await.take() {
            cancel(s).await;
        }
        Ok(())
    }
}

/// Cancels the subscription and closes its channel: RabbitMQ requeues what was unsettled.
async fn cancel(s: Subscription) {
    if s.channel.status().connected() {
        within("cancel a consumer", s.channel.basic_cancel(s.stream.tag(), BasicCancelOptions::default())).await.ok();
        within("close a channel", s.channel.close(200, "consumer closed".into())).await.ok();
    }
}

impl Drop for AmqpConsumer {
    fn drop(&mut self) {
        if !self.open.close() {
            return;
        }
        // Closing the channel hands prefetched messages back now rather than when the
        // connection ends.
        if let (Some(s), Ok(rt)) = (self.subscription.get_mut().take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(cancel(s));
        }
    }
}

impl std::fmt::Debug for AmqpConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConsumer").field("queue", &self.queue).field("prefetch", &self.prefetch).finish()
    }
}

/// Settles one delivery.
struct AmqpAcker {
    settle: Arc<Settle>,
    connection: Arc<lapin::Connection>,
    acker: Acker,
    id: MessageId,
    attempt: u32,
    payload: Bytes,
    properties: BasicProperties,
}

impl AmqpAcker {
    async fn ack_original(&self) -> Result<()> {
        let ack = self.acker.ack(BasicAckOptions::default());
        tokio::pin!(ack);
        // Usually done at once; only a slow ack pays for a watch on its connection.
        let acked = match futures::poll!(&mut ack) {
            std::task::Poll::Ready(acked) => acked,
            std::task::Poll::Pending => tokio::select! {
                acked = &mut ack => acked,
                // An ack caught in a dying connection may never complete; RabbitMQ
                // requeues the message when the channel goes, so it is lost as a lease.
                _ = self.connection_gone() => {
                    tracing::debug!(id = %self.id, "an ack did not complete before its connection went");
                    return Err(Error::LeaseLost { id: self.id.clone() });
                }
            },
        };
        match acked {
            Ok(true) => Ok(()),
            // The channel is gone: RabbitMQ has requeued the message.
            Ok(false) => Err(Error::LeaseLost { id: self.id.clone() }),
            Err(e) if crate::session::retryable(&e) => Err(Error::LeaseLost { id: self.id.clone() }),
            Err(e) => Err(lapin_error("ack", e)),
        }
    }

    fn lost(&self) -> bool {
        !self.acker.usable()
    }

    /// Completes when the delivery's connection is gone, or after the call timeout.
    async fn connection_gone(&self) {
        let started = tokio::time::Instant::now();
        while self.connection.status().connected() && started.elapsed() < CALL_TIMEOUT {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[async_trait]
impl Acknowledger for AmqpAcker {
    fn policy(&self) -> &SettlePolicy {
        &self.settle.policy
    }

    async fn ack(&self) -> Result<()> {
        self.ack_original().await
    }

    async fn redeliver(&self, delay: Option<Duration>) -> Result<()> {
        if self.lost() {
            return Err(Error::LeaseLost { id: self.id.clone() });
        }
        let props = mapping::republished(&self.properties, &self.id, self.attempt + 1, &[])?;
        self.settle.broker.republish(&self.settle.retry_to, delay, &self.payload, props).await?;
        self.ack_original().await
    }

    async fn dead_letter(&self, letter: &DeadLetter) -> Result<()> {
        if self.lost() {
            return Err(Error::LeaseLost { id: self.id.clone() });
        }
        let props = mapping::republished(&self.properties, &self.id, 1, &letter.headers())?;
        self.settle.broker.republish(letter.destination(), None, &self.payload, props).await?;
        self.ack_original().await
    }

    async fn extend_lease(&self, _by: Duration) -> Result<()> {
        Err(self.settle.broker.capabilities().unsupported(Feature::LeaseExtension))
    }

    fn release(&self) {
        // Requeued now, not when the channel closes: a delivery whose settlement failed
        // for good would otherwise hold its prefetch slot for the channel's life.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (acker, id) = (self.acker.clone(), self.id.clone());
        runtime.spawn(async move {
            let nack = acker.nack(BasicNackOptions { requeue: true, ..Default::default() });
            if let Ok(Err(e)) = within("hand a delivery back", nack).await {
                tracing::debug!(%id, error = %e, "handing a delivery back failed; RabbitMQ requeues it when its channel closes");
            }
        });
    }
}
