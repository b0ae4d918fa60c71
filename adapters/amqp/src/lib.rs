//! Courier's RabbitMQ backend: AMQP 0-9-1 on [lapin](https://docs.rs/lapin).
//!
//! Open it with an `amqp://` or `amqps://` URL, directly or through `courier::connect`
//! (feature `amqp` of the `courier` crate):
//!
//! ```no_run
//! use courier_amqp::AmqpBroker;
//! use courier_core::{Broker, ConsumerOptions, Destination, Message, Source};
//! use std::time::Duration;
//!
//! # async fn run() -> courier_core::Result<()> {
//! let broker = AmqpBroker::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//! let orders = Source::queue("orders")?;
//! broker.declare(&orders).await?;
//! broker.send(&Destination::queue("orders")?, Message::new("order 1")).await?;
//!
//! let consumer = broker.consumer(&orders, ConsumerOptions::default()).await?;
//! for delivery in consumer.receive(10, Duration::from_secs(1)).await? {
//!     delivery.ack().await?;
//! }
//! # Ok(()) }
//! ```
//!
//! # How the contract maps onto RabbitMQ
//!
//! Each clause of the contract (`docs/contract.md` in the repository) on RabbitMQ. Core's
//! receipt decides retry versus dead letter and builds the dead letter's headers; this
//! adapter carries out what it decided.
//!
//! | Courier | RabbitMQ |
//! |---|---|
//! | queue `q` | queue `q` as it exists (made by another application: transient or durable, classic or quorum, its own arguments kept); else created durable (classic, or quorum with `?queue_type=quorum`; transient with `?durable=false`) |
//! | topic `t` | exchange `t` as it exists (a `topic` exchange is bound with `#`); else created as a durable fanout exchange |
//! | subscription `t/s` | queue `t.s`, adopted or created as a queue is, bound to exchange `t` |
//! | send | persistent, `mandatory` publish awaiting its publisher confirm: an unroutable message (no such queue, or a topic without subscriptions) or a nack is an error, never a silent loss; batches pipeline their confirms |
//! | receive | `basic.consume` with `basic.qos` prefetch |
//! | ack | `basic.ack` |
//! | redeliver (a retry core allows) | a confirmed republish with the attempt header one higher (through a [delay bucket](#delays) for `retry_after`), then `basic.ack` of the original |
//! | dead letter (a reject, or a failure of the last attempt) | a confirmed publish to the dead-letter destination (default queue `<source>.dlq`, declared with the consumer) with core's reason, attempts and origin headers, then `basic.ack` |
//! | attempt number | Courier's `x-courier-attempt` header, plus one if the broker redelivered (plus `x-delivery-count` on quorum queues) |
//! | delayed send, delayed retry | [delay buckets](#delays), up to 7 days |
//! | lease | held until settled or the channel closes (RabbitMQ's `consumer_timeout` still applies); no lease expiry or extension: they return `Unsupported` |
//! | ordered keys, dedup, stats | `Unsupported` |
//! | purge | `queue.purge` |
//!
//! Message properties map both ways: `message_id`, `content_type` and `timestamp` are the
//! message's own; `correlation_id`, `reply_to`, `type` and `app_id` appear as the headers
//! `amqp-correlation-id`, `amqp-reply-to`, `amqp-type` and `amqp-app-id`; headers are a
//! table of long strings, and header values of other AMQP types sent by plain clients are
//! rendered as text. Broker bookkeeping (`x-death`, `x-delivery-count`) stays hidden.
//! The message id, the content type, header names and the values of those `amqp-*` headers
//! are AMQP short strings: a send with one over 255 bytes fails before any I/O, with a
//! non-retryable error naming it.
//!
//! # Queues and exchanges that already exist
//!
//! With `declare=adopt`, the default, the adapter declares with its own settings and,
//! when RabbitMQ answers that the queue or exchange exists with others (406
//! PRECONDITION_FAILED), uses it as it is and logs the difference at `info`. A queue a
//! Python program made with `queue_declare(queue='hello')` is consumed with no option
//! set. `declare=create` insists on Courier's settings instead, and `declare=verify`
//! creates nothing. The dead-letter queue is declared when the consumer opens, so a
//! missing one fails the route at start, naming it, and never in the middle of a run.
//!
//! # Delays
//!
//! RabbitMQ has no built-in delay. A delayed message waits in a durable bucket queue
//! `courier.delay.<ms>` with one TTL, which dead-letters it back to its queue when the
//! time is up. Delays round up to the next bucket (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6 or
//! 8 × 10ⁿ ms): never early, at most a third late.
//!
//! # Faults
//!
//! A lost connection or channel is reopened with exponential backoff for up to
//! `reconnect_timeout_secs` (30 s) before calls fail with a retryable error; consumers
//! re-subscribe by themselves. A publish whose confirm did not arrive is published again
//! (at least once: handlers must be idempotent). Deliveries held when their channel died
//! return [`Error::LeaseLost`] on settlement: RabbitMQ has already put them back.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod config;
mod consumer;
mod delay;
mod mapping;
mod session;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use courier_core::backend::BackendUrl;
use courier_core::{
    Broker, Capabilities, Consumer, ConsumerOptions, Destination, Error, Message, MessageId, Result, Source,
};
use lapin::options::{
    BasicPublishOptions, ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, ExchangeKind};

pub use config::{AmqpConfig, DeclareMode, QueueType};
pub use consumer::AmqpConsumer;

use session::{lapin_error, retryable, Session};

/// The backend's name in capabilities and errors.
pub const BACKEND: &str = "rabbitmq";

/// The largest payload the adapter sends. RabbitMQ accepts up to 128 MiB by default, but
/// messages that large stall a channel; 16 MiB keeps the broker healthy.
pub const MAX_PAYLOAD: usize = 16 * 1024 * 1024;

/// A RabbitMQ broker: a cheap, cloneable handle on one connection.
///
/// Clone it freely; every clone shares the connection, its publishing channel, and the
/// reconnect logic. Each consumer has a channel of its own.
#[derive(Clone)]
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

struct Inner {
    session: Arc<Session>,
    capabilities: Capabilities,
    /// Delay buckets and topic return bindings known to exist.
    delay_topology: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBroker").field("url", &self.inner.session.config.redacted()).finish_non_exhaustive()
    }
}

/// Where a publish goes.
struct Route {
    exchange: ShortString,
    routing_key: ShortString,
}

const MANDATORY: BasicPublishOptions = BasicPublishOptions { mandatory: true, immediate: false };

impl AmqpBroker {
    /// Connects to the broker an `amqp://` or `amqps://` URL names; see [`AmqpConfig`]
    /// for Courier's options in the URL.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::with_config(AmqpConfig::from_url(url)?).await
    }

    /// Connects with a parsed URL, as [`connect`](Self::connect) does with its text.
    pub async fn connect_url(url: BackendUrl) -> Result<Self> {
        Self::with_config(AmqpConfig::from_backend_url(url)?).await
    }

    /// Connects with explicit settings.
    pub async fn with_config(config: AmqpConfig) -> Result<Self> {
        let session = Session::connect(config).await?;
        let capabilities = Capabilities {
            backend: BACKEND,
            fan_out: true,
            ordered_keys: false,
            max_delay: Some(delay::MAX_DELAY),
            delayed_retry: true,
            dedup: false,
            lease_expiry: false,
            lease_extension: false,
            native_dead_letter: false,
            stats: false,
            purge: true,
            subscription_send: true, // to the subscription's queue by the default exchange
            max_payload: MAX_PAYLOAD,
            max_batch: 1000,
        };
        Ok(AmqpBroker { inner: Arc::new(Inner { session, capabilities, delay_topology: Mutex::default() }) })
    }

    /// The settings this broker was opened with.
    pub fn config(&self) -> &AmqpConfig {
        &self.inner.session.config
    }
}

impl Inner {
    /// The route for a message, declaring delay topology it needs.
    async fn route(&self, destination: &Destination, delay: Option<Duration>) -> Result<Route> {
        let (exchange, routing_key, is_topic) = match destination {
            Destination::Queue(q) => ("", q.as_str(), false),
            Destination::Topic(t) => (t.as_str(), "", true),
        };
        match delay.filter(|d| !d.is_zero()) {
            None => Ok(Route { exchange: exchange.into(), routing_key: routing_key.into() }),
            Some(delay) => {
                let bucket = delay::bucket_name(delay::bucket_ms(delay), is_topic);
                self.ensure_delay_bucket(&bucket, delay::bucket_ms(delay), is_topic).await?;
                if is_topic {
                    self.ensure_topic_return(exchange).await?;
                    Ok(Route { exchange: bucket.into(), routing_key: exchange.into() })
                } else {
                    Ok(Route { exchange: bucket.into(), routing_key: routing_key.into() })
                }
            }
        }
    }

    fn known(&self, name: &str) -> bool {
        self.delay_topology.lock().unwrap().contains(name)
    }

    async fn ensure_delay_bucket(&self, bucket: &str, ms: u64, for_topic: bool) -> Result<()> {
        if self.known(bucket) {
            return Ok(());
        }
        let channel = self.session.channel().await?;
        let return_exchange = if for_topic { delay::TOPIC_RETURN_EXCHANGE } else { "" };
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ms as i64));
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(LongString::from(return_exchange)));
        let result = async {
            if for_topic {
                channel
                    .exchange_declare(
                        delay::TOPIC_RETURN_EXCHANGE.into(),
                        ExchangeKind::Direct,
                        durable_exchange(),
                        FieldTable::default(),
                    )
                    .await?;
            }
            channel
                .exchange_declare(bucket.into(), ExchangeKind::Fanout, durable_exchange(), FieldTable::default())
                .await?;
            channel.queue_declare(bucket.into(), durable_queue(), args).await?;
            channel
                .queue_bind(bucket.into(), bucket.into(), "".into(), QueueBindOptions::default(), FieldTable::default())
                .await
        }
        .await;
        close_quietly(&channel).await;
        result.map_err(|e| lapin_error(&format!("declare the delay bucket {bucket}"), e))?;
        self.delay_topology.lock().unwrap().insert(bucket.to_owned());
        Ok(())
    }

    async fn ensure_topic_return(&self, topic: &str) -> Result<()> {
        let key = format!("return:{topic}");
        if self.known(&key) {
            return Ok(());
        }
        let channel = self.session.channel().await?;
        let result = channel
            .exchange_bind(
                topic.into(),
                delay::TOPIC_RETURN_EXCHANGE.into(),
                topic.into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await;
        close_quietly(&channel).await;
        result.map_err(|e| lapin_error(&format!("bind topic {topic} for delayed messages"), e))?;
        self.delay_topology.lock().unwrap().insert(key);
        Ok(())
    }

    /// Publishes messages and waits for every confirm, publishing again what a lost
    /// connection left unconfirmed. Confirms are pipelined: all publishes go out before
    /// the first confirm is awaited. Properties are borrowed: lapin takes its own copy at
    /// each publish, and a message published again needs them again.
    async fn publish_confirmed(&self, route: &Route, messages: &[(&[u8], &BasicProperties)]) -> Result<()> {
        let deadline = Instant::now() + self.session.config.reconnect_timeout;
        let mut pending: Vec<usize> = (0..messages.len()).collect();
        loop {
            let live = self.session.live().await?;
            let mut confirms = Vec::with_capacity(pending.len());
            let mut again = Vec::new();
            let mut last_error = None;
            for (n, &i) in pending.iter().enumerate() {
                let (payload, props) = &messages[i];
                let published = tokio::time::timeout(
                    session::CALL_TIMEOUT,
                    publish(&live.publisher, route, payload, (*props).clone()),
                );
                match published.await.unwrap_or_else(|_| Err(lapin::ErrorKind::MissingHeartbeatError.into())) {
                    Ok(confirm) => confirms.push((i, confirm)),
                    Err(e) if retryable(&e) => {
                        again.extend_from_slice(&pending[n..]);
                        last_error = Some(e);
                        break;
                    }
                    Err(e) => return Err(self.publish_error(route, e)),
                }
            }
            let mut failure = None;
            // One deadline for the whole batch: the confirms arrive together, and lost ones
            // must not cost the timeout once each.
            let confirms_due = tokio::time::Instant::now() + session::CALL_TIMEOUT;
            for (i, confirm) in confirms {
                // A confirm lost with its connection may never resolve: count it as unconfirmed.
                let Ok(confirmed) = tokio::time::timeout_at(confirms_due, confirm).await else {
                    again.push(i);
                    continue;
                };
                match confirmed {
                    Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => {}
                    Ok(Confirmation::Ack(Some(returned))) => {
                        failure.get_or_insert(unroutable(route, returned.reply_code, returned.reply_text.as_str()));
                    }
                    Ok(Confirmation::Nack(_)) => again.push(i),
                    Err(e) if retryable(&e) => {
                        again.push(i);
                        last_error = Some(e);
                    }
                    Err(e) => {
                        failure.get_or_insert(self.publish_error(route, e));
                    }
                }
            }
            if let Some(failure) = failure {
                return Err(failure);
            }
            if again.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let why = last_error.map(|e| e.to_string()).unwrap_or_else(|| "the broker nacked them".into());
                return Err(Error::Broker {
                    backend: BACKEND,
                    message: format!(
                        "{} of {} messages to {} were not confirmed within {:?} ({why}); they may or may not have arrived, send them again",
                        again.len(),
                        messages.len(),
                        route_name(route),
                        self.session.config.reconnect_timeout
                    ),
                    retryable: true,
                    source: None,
                });
            }
            again.sort_unstable();
            tracing::debug!(count = again.len(), "publishing unconfirmed messages again");
            pending = again;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn publish_error(&self, route: &Route, e: lapin::Error) -> Error {
        if matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404) {
            // The delay topology may have been deleted behind our back: declare it again next time.
            self.delay_topology.lock().unwrap().clear();
            if !route.exchange.as_str().starts_with("courier.delay") {
                return Error::NotFound { kind: "topic", name: route.exchange.to_string() };
            }
        }
        lapin_error(&format!("publish to {}", route_name(route)), e)
    }

    /// Declares what `source` reads from, as the URL's `declare` option says: the topic's
    /// exchange, the queue, and the binding between them.
    async fn declare_source(&self, source: &Source) -> Result<()> {
        let queue = queue_name(source);
        let Source::Subscription { topic, .. } = source else {
            self.declare_entity(Entity::Queue { name: &queue, kind: "queue" }).await?;
            return Ok(());
        };
        let found = self.declare_entity(Entity::Exchange(topic.as_str())).await?;
        self.declare_entity(Entity::Queue { name: &queue, kind: "subscription" }).await?;
        if self.session.config.declare == DeclareMode::Verify {
            return Ok(());
        }
        // A topic exchange another application made routes by pattern: `#` takes every
        // message, as binding a fanout exchange does. Other kinds ignore or match "".
        let key = if found.is_some_and(|f| f.exchange_type() == Some("topic")) { "#" } else { "" };
        let channel = self.session.channel().await?;
        let bound = session::within(
            &format!("bind {queue} to topic {topic}"),
            channel.queue_bind(
                queue.as_str().into(),
                topic.as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await;
        close_quietly(&channel).await;
        bound?.map_err(|e| lapin_error(&format!("bind {queue} to topic {topic}"), e))
    }

    /// Declares one exchange or queue. In adopt mode, one that exists with settings other
    /// than Courier's is used as it is: the broker's answer names the setting, which is
    /// logged and returned.
    async fn declare_entity(&self, entity: Entity<'_>) -> Result<Option<OtherSettings>> {
        let config = &self.session.config;
        let doing = format!("declare {} {}", entity.kind(), entity.name());
        let channel = self.session.channel().await?;
        let result = session::within(&doing, entity.declare(&channel, config)).await;
        // A refused declare closes the channel; closing it again is harmless.
        close_quietly(&channel).await;
        let error = match result? {
            Ok(()) => return Ok(None),
            Err(e) => e,
        };
        match protocol_error(&error) {
            Some((404, _)) => Err(Error::NotFound { kind: entity.kind(), name: entity.name().to_owned() }),
            Some((406, text)) if config.declare == DeclareMode::Adopt => {
                let found = OtherSettings(text.to_owned());
                tracing::info!(
                    kind = entity.kind(),
                    name = entity.name(),
                    "using the existing {} {} as it is; its settings differ from Courier's: {}",
                    entity.kind(),
                    entity.name(),
                    found.0
                );
                Ok(Some(found))
            }
            _ => Err(lapin_error(&doing, error)),
        }
    }
}

/// An exchange or queue the adapter declares.
#[derive(Clone, Copy)]
enum Entity<'a> {
    Exchange(&'a str),
    Queue { name: &'a str, kind: &'static str },
}

impl Entity<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Entity::Exchange(_) => "topic",
            Entity::Queue { kind, .. } => kind,
        }
    }

    fn name(&self) -> &str {
        match self {
            Entity::Exchange(name) | Entity::Queue { name, .. } => name,
        }
    }

    /// One declare on `channel`: passive in verify mode, else with Courier's settings.
    async fn declare(&self, channel: &Channel, config: &AmqpConfig) -> lapin::Result<()> {
        let passive = config.declare == DeclareMode::Verify;
        match *self {
            Entity::Exchange(name) => {
                let options = ExchangeDeclareOptions { passive, durable: config.durable, ..Default::default() };
                channel.exchange_declare(name.into(), ExchangeKind::Fanout, options, FieldTable::default()).await
            }
            Entity::Queue { name, .. } => {
                let mut args = FieldTable::default();
                if config.queue_type == QueueType::Quorum && !passive {
                    args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
                }
                if let Some(expires) = config.queue_expires.filter(|_| !passive) {
                    let millis = expires.as_millis().min(u32::MAX as u128) as i64;
                    args.insert("x-expires".into(), AMQPValue::LongLongInt(millis));
                }
                let options = QueueDeclareOptions { passive, durable: config.durable, ..Default::default() };
                channel.queue_declare(name.into(), options, args).await.map(|_| ())
            }
        }
    }
}

/// RabbitMQ's account of how an existing queue or exchange differs from what Courier
/// declared, e.g. `inequivalent arg 'durable' for queue 'hello' in vhost '/': received
/// 'true' but current is 'false'`.
struct OtherSettings(String);

impl OtherSettings {
    /// The type of an existing exchange, when that is what differs.
    fn exchange_type(&self) -> Option<&str> {
        let text = &self.0;
        if !text.contains("arg 'type'") {
            return None;
        }
        let rest = &text[text.find("current is '")? + "current is '".len()..];
        Some(&rest[..rest.find('\'')?])
    }
}

/// The reply code and text of a channel or connection error from the broker.
fn protocol_error(e: &lapin::Error) -> Option<(u16, &str)> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some((amqp.get_id(), amqp.get_message().as_str())),
        _ => None,
    }
}

async fn publish(
    channel: &Channel,
    route: &Route,
    payload: &[u8],
    props: BasicProperties,
) -> lapin::Result<lapin::PublisherConfirm> {
    channel.basic_publish(route.exchange.clone(), route.routing_key.clone(), MANDATORY, payload, props).await
}

fn route_name(route: &Route) -> String {
    match (route.exchange.as_str(), route.routing_key.as_str()) {
        ("", queue) => format!("queue {queue}"),
        (exchange, "") => format!("topic {exchange}"),
        (exchange, key) => format!("exchange {exchange} (routing key {key})"),
    }
}

fn unroutable(route: &Route, code: u16, text: &str) -> Error {
    let (kind, name, what) = match (route.exchange.as_str(), route.routing_key.as_str()) {
        ("", queue) => ("queue", queue, "declare the queue first (Broker::declare) or send to one that exists"),
        (topic, _) => ("topic", topic, "declare a subscription first, or the message would be lost"),
    };
    Error::Broker {
        backend: BACKEND,
        message: format!(
            "RabbitMQ returned the message as unroutable ({code} {text}): no queue receives {kind} {name:?}; {what}"
        ),
        retryable: false,
        source: None,
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions { durable: true, ..Default::default() }
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions { durable: true, ..Default::default() }
}

/// The queue a source reads from: the queue itself, or `topic.subscription`.
pub(crate) fn queue_name(source: &Source) -> String {
    match source {
        Source::Queue(q) => q.to_string(),
        Source::Subscription { topic, subscription } => format!("{topic}.{subscription}"),
    }
}

async fn close_quietly(channel: &Channel) {
    if channel.status().connected() {
        session::within("close a channel", channel.close(200, "done".into())).await.ok();
    }
}

#[async_trait]
impl Broker for AmqpBroker {
    fn capabilities(&self) -> &Capabilities {
        &self.inner.capabilities
    }

    async fn send(&self, destination: &Destination, message: Message) -> Result<MessageId> {
        self.inner.session.open.check()?;
        self.inner.capabilities.check_message(&message)?;
        let props = mapping::properties(&message, 1)?;
        let route = self.inner.route(destination, message.delay).await?;
        self.inner.publish_confirmed(&route, &[(&message.payload, &props)]).await?;
        Ok(message.id)
    }

    async fn send_batch(&self, destination: &Destination, messages: Vec<Message>) -> Result<Vec<MessageId>> {
        self.inner.session.open.check()?;
        self.inner.capabilities.check_batch(&messages)?;
        // Every message's properties before any I/O: one that cannot be sent fails the batch.
        let props = messages.iter().map(|m| mapping::properties(m, 1)).collect::<Result<Vec<_>>>()?;
        // One pipelined round per distinct delay; most batches have none.
        let mut ids = Vec::with_capacity(messages.len());
        let mut start = 0;
        while start < messages.len() {
            let delay = messages[start].delay;
            let end = messages[start..].iter().position(|m| m.delay != delay).map_or(messages.len(), |n| start + n);
            let route = self.inner.route(destination, delay).await?;
            let chunk: Vec<(&[u8], &BasicProperties)> =
                messages[start..end].iter().zip(&props[start..end]).map(|(m, p)| (&m.payload[..], p)).collect();
            self.inner.publish_confirmed(&route, &chunk).await?;
            start = end;
        }
        ids.extend(messages.into_iter().map(|m| m.id));
        Ok(ids)
    }

    async fn consumer(&self, source: &Source, options: ConsumerOptions) -> Result<Box<dyn Consumer>> {
        self.inner.session.open.check()?;
        self.inner.declare_source(source).await?;
        let policy = options.settle_policy(source);
        // The dead-letter queue exists before the first message fails, or the route fails
        // here, naming it: never in the middle of a run.
        if let Destination::Queue(dlq) = policy.dead_letter() {
            self.inner.declare_entity(Entity::Queue { name: dlq.as_str(), kind: "dead-letter queue" }).await?;
        }
        let settle = consumer::Settle::new(self.clone(), policy)?;
        let prefetch =
            self.inner.session.config.prefetch.unwrap_or(options.prefetch.clamp(1, u16::MAX as usize) as u16);
        let consumer = AmqpConsumer::open(self.inner.session.clone(), source.clone(), prefetch, settle).await?;
        Ok(Box::new(consumer))
    }

    async fn declare(&self, source: &Source) -> Result<()> {
        self.inner.session.open.check()?;
        self.inner.declare_source(source).await
    }

    async fn send_to_source(&self, source: &Source, message: Message) -> Result<MessageId> {
        // A subscription is the queue `topic.subscription`: the default exchange reaches it alone.
        let queue = courier_core::Name::new("queue", &queue_name(source))?;
        self.send(&Destination::Queue(queue), message).await
    }

    async fn declare_destination(&self, destination: &Destination) -> Result<()> {
        self.inner.session.open.check()?;
        match destination {
            Destination::Queue(queue) => self.inner.declare_source(&Source::Queue(queue.clone())).await,
            Destination::Topic(topic) => self.inner.declare_entity(Entity::Exchange(topic.as_str())).await.map(|_| ()),
        }
    }

    async fn purge(&self, source: &Source) -> Result<u64> {
        self.inner.session.open.check()?;
        let channel = self.inner.session.channel().await?;
        let queue = queue_name(source);
        let result = channel.queue_purge(queue.as_str().into(), QueuePurgeOptions::default()).await;
        close_quietly(&channel).await;
        result.map(u64::from).map_err(|e| lapin_error(&format!("purge {queue}"), e))
    }

    async fn close(&self) -> Result<()> {
        self.inner.session.close().await
    }
}

impl AmqpBroker {
    /// Publishes a copy of a received message (a retry or a dead letter) and waits for
    /// its confirm.
    pub(crate) async fn republish(
        &self,
        destination: &Destination,
        delay: Option<Duration>,
        payload: &[u8],
        props: BasicProperties,
    ) -> Result<()> {
        let route = self.inner.route(destination, delay).await?;
        self.inner.publish_confirmed(&route, &[(payload, &props)]).await
    }
}
