//! Courier's Kafka backend, on [rdkafka](https://docs.rs/rdkafka) (librdkafka).
//!
//! Open it with a `kafka://` URL: `kafka://127.0.0.1:9092`, several brokers
//! `kafka://a:9092,b:9092`, with SASL credentials `kafka://user:password@host:9093`.
//! Options: `group=PREFIX` (consumer group ids become `PREFIX.<queue>`), `partitions=N`
//! and `replication_factor=N` (topics Courier creates; 4 and 1), `create=true|false`
//! (create missing topics, default true), `rebalance_drain_ms=N` (see below),
//! `security_protocol=…`, `sasl_mechanism=…`, and any librdkafka setting by its dotted
//! name (`?fetch.min.bytes=1024`), passed to every client as it is. Any other option is
//! an error that names it; values are percent-decoded (see
//! [`UrlOptions`](courier_core::backend::UrlOptions)).
//!
//! Each clause of the contract (`docs/contract.md` in the repository) on Kafka. Core's
//! receipt decides retry versus dead letter and builds the dead letter's headers; this
//! adapter carries out what it decided.
//!
//! | Courier | Kafka |
//! |---|---|
//! | queue `q` | topic `q`, consumed by the group `q` (consumers compete for partitions) |
//! | topic `t`, subscription `s` | topic `t`, consumed by the group `t.s`; a subscription starts where the topic ended when it was declared |
//! | send, batch send | an idempotent producer, `acks=all`; send returns after the delivery report, or a retryable `Broker` error when none came within 30 s (`?message.timeout.ms=N` changes it); a batch is pipelined; a producer that hits a fatal error (fenced, out of sequence) is replaced and the record sent again |
//! | ordering key | the record key: one partition per key; one message per key in flight at a time |
//! | no ordering key | a partition picked at random per message (`sticky.partitioning.linger.ms=0`), so the consumers of a queue share even a short burst |
//! | headers, id, content type | record headers (`courier-id`, `content-type`); CloudEvents `ce_` headers are read too (`ce_id` is the id when `courier-id` is absent) |
//! | ack | the offset, committed once every earlier offset of its partition is settled |
//! | redeliver (a retry core allows, with delay) | a copy to the retry topic `<group>.retry` with `courier-attempt` and `courier-not-before`, then ack |
//! | dead letter (a reject, or a failure of the last attempt) | a copy to the dead-letter topic (`<queue>.dlq`) with core's reason, attempts and origin headers, then ack |
//! | lease | until the offset is committed or the partition is taken away (`Unsupported`: expiry, extension) |
//! | delayed send, dedup ids, stats, purge | `Unsupported` |
//!
//! # Delivery semantics
//!
//! At least once. Kafka keeps one position per partition, so an ack stores the position
//! only when every earlier message of the partition is settled (acks out of order are
//! tracked); librdkafka commits stored positions every second, when partitions are
//! revoked, and on close. After a crash, messages after the last commit are delivered
//! again.
//!
//! Kafka cannot hand one message back. A retry sends a copy to the consumer group's retry
//! topic, with the attempt number and a not-before time in headers, and acks the original,
//! so a failing message never holds its partition back. The retry topic has as many
//! partitions as the source and the copy goes to the same partition number; consumers
//! subscribe to both with the range assignor, which gives one consumer the same partition
//! numbers of both, so the copy returns to the consumer that holds its key. Copies wait in
//! memory until their time, their offsets uncommitted.
//!
//! Per-key order: a consumer hands out one message per key at a time; later messages of
//! the key wait, and so do they while the key's message is being retried, until it is
//! acked or dead-lettered. Other keys go on. Order across a retry survives as long as the
//! partition stays with one consumer; after a rebalance the new owner may start the next
//! message of a key before the retried copy comes back.
//!
//! Rebalances: when partitions are revoked, the consumer waits up to `rebalance_drain_ms`
//! (10 s) for the messages it handed out from them to be settled, commits, and lets them
//! go, so a rebalance redelivers as little as possible. Settling a message after its
//! partition was taken away fails with `LeaseLost`; its new owner delivers it again.
//!
//! Broker loss: clients reconnect by themselves. While no broker answers, receives hand out
//! what was read ahead and then wait; a send fails with a retryable error once its record
//! has waited `message.timeout.ms` (30 s) for a delivery report, or succeeds when the broker
//! returns first. The workspace's fault test restarts a broker mid-test and checks this.
//!
//! Known issue: librdkafka 2.12.1, which rdkafka 0.39 bundles, can crash the process
//! (SIGSEGV in its metadata cache) when a topic a client has used is deleted and created
//! again, so that its name comes back with a new topic id; a broker that loses its topics on
//! restart (Tansu with memory storage) does this to every topic. Close the clients that
//! used a topic before deleting and creating it again.
//!
//! ```no_run
//! # async fn example() -> Result<(), courier_core::Error> {
//! use courier_core::{Broker, Message, Source};
//!
//! let broker = courier_kafka::KafkaBroker::connect("kafka://127.0.0.1:9092").await?;
//! let orders = Source::queue("orders")?;
//! broker.declare(&orders).await?;
//! broker.send(&orders.destination(), Message::new("order 1").with_ordering_key("customer-7")).await?;
//! let consumer = broker.consumer(&orders, Default::default()).await?;
//! for delivery in consumer.receive(10, std::time::Duration::from_secs(5)).await? {
//!     delivery.ack().await?;
//! }
//! # Ok(()) }
//! ```

// No unsafe code in the crate; only its tests may use librdkafka's test hooks, one
// `#[allow]` at a time.
#![cfg_attr(not(test), forbid(unsafe_code))]
#![cfg_attr(test, deny(unsafe_code))]
#![warn(missing_docs)]

mod config;
mod consumer;
mod mapping;
mod offsets;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use courier_core::backend::{is_secret_key, BackendUrl, OpenGuard};
use courier_core::{
    Broker, Capabilities, Consumer, ConsumerOptions, Destination, Error, Feature, Message, MessageId, Result, Source,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::{Offset, TopicPartitionList};

use config::KafkaConfig;

const BACKEND: &str = "kafka";
/// Payload limit: Kafka's default `message.max.bytes` is 1 MiB for the whole record batch;
/// this leaves room for headers and framing.
const MAX_PAYLOAD: usize = 1_000_000;
/// How long a broker call may take before it fails as retryable.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the group waits to hear from a consumer before it counts the consumer dead
/// and gives its partitions to the others (`session.timeout.ms`, unless the URL sets it).
/// A process killed without leaving holds its partitions this long.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// A Kafka broker: a cheap, cloneable handle on one producer and admin client.
#[derive(Clone)]
pub struct KafkaBroker {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    config: KafkaConfig,
    /// The settings `producer` was made with, to make another after a fatal error.
    producer_config: ClientConfig,
    /// Replaced, not shared forever: after a fatal error (an idempotent producer fenced
    /// or out of sequence) librdkafka refuses every later record of that producer.
    producer: RwLock<FutureProducer>,
    admin: AdminClient<DefaultClientContext>,
    capabilities: Capabilities,
    /// Topics known to exist, with their partition counts.
    topics: Mutex<HashMap<String, i32>>,
    open: OpenGuard,
}

impl fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaBroker").field("url", &self.inner.config.redacted).finish()
    }
}

/// A Kafka error as Courier's, retryable when Kafka says so or when it is about reaching brokers.
pub(crate) fn kafka_error(what: &str, e: KafkaError) -> Error {
    let retryable = match e.rdkafka_error_code() {
        Some(code) => matches!(
            code,
            RDKafkaErrorCode::QueueFull
                | RDKafkaErrorCode::MessageTimedOut
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::NetworkException
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::NotEnoughReplicas
                | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
                | RDKafkaErrorCode::CoordinatorNotAvailable
                | RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::CoordinatorLoadInProgress
                | RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::UnknownTopicOrPartition
                // librdkafka's own view of the same thing (its metadata lacks the topic or
                // partition), e.g. while a restarted broker has not recreated the topic yet.
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::Resolve
        ),
        None => false,
    };
    Error::Broker { backend: BACKEND, message: format!("{what}: {e}"), retryable, source: Some(Box::new(e)) }
}

/// librdkafka's refusal of the settings as a configuration error about `what`.
///
/// rdkafka's own message repeats the value of the setting refused, and librdkafka's may
/// too: for a secret-looking setting (`sasl.password`, a typo such as `sasl.pasword`,
/// `ssl.key.password`…) the value is left out, and no secret-looking setting's value
/// appears anywhere in the message.
pub(crate) fn settings_error(config: &KafkaConfig, what: &str, e: KafkaError) -> Error {
    let mut message = match &e {
        KafkaError::ClientConfig(_, description, key, _) if is_secret_key(key) => {
            format!("librdkafka refused the setting {key} (its value is not shown): {description}")
        }
        KafkaError::ClientConfig(_, description, key, value) => {
            format!("librdkafka refused the setting {key}={value}: {description}")
        }
        other => other.to_string(),
    };
    for (key, value) in &config.client {
        if is_secret_key(key) && !value.is_empty() {
            message = message.replace(value.as_str(), "***");
        }
    }
    Error::config(what, message)
}

impl KafkaBroker {
    /// Connects with a `kafka://` URL (see the crate docs). Clients connect lazily, so this
    /// fails only on a malformed URL or settings librdkafka refuses.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_url(BackendUrl::parse(url)?).await
    }

    /// Connects with a parsed URL, as [`connect`](Self::connect) does with its text.
    pub async fn connect_url(url: BackendUrl) -> Result<Self> {
        let config = KafkaConfig::from_backend_url(url)?;
        let mut producer_config = config.client_config();
        producer_config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            // librdkafka's default sends a burst of keyless records to one partition, which
            // only one consumer of the group reads: spread them, so competing consumers share it.
            .set("sticky.partitioning.linger.ms", "0")
            // librdkafka's default keeps retrying a record for 5 minutes before its delivery
            // report fails; a send then waits that long while the broker is away. 30 s is
            // long enough for a broker restart and short enough to hand the caller a
            // retryable error to act on.
            .set("message.timeout.ms", "30000")
            .set("message.max.bytes", "1048576");
        for (key, value) in &config.client {
            producer_config.set(key, value); // settings in the URL win
        }
        let producer: FutureProducer =
            producer_config.create().map_err(|e| settings_error(&config, "kafka producer settings", e))?;
        let admin: AdminClient<DefaultClientContext> =
            config.client_config().create().map_err(|e| settings_error(&config, "kafka admin settings", e))?;
        let capabilities = Capabilities {
            backend: BACKEND,
            fan_out: true,
            ordered_keys: true,
            max_delay: None,
            delayed_retry: true,
            dedup: false,
            lease_expiry: false,
            lease_extension: false,
            native_dead_letter: false,
            stats: false,
            purge: false,
            subscription_send: false, // a subscription is a consumer group on the topic's one log
            max_payload: MAX_PAYLOAD,
            max_batch: 10_000,
        };
        Ok(KafkaBroker {
            inner: Arc::new(Inner {
                config,
                producer_config,
                producer: RwLock::new(producer),
                admin,
                capabilities,
                topics: Mutex::default(),
                open: OpenGuard::new("broker"),
            }),
        })
    }
}

impl Inner {
    /// The partition count of `topic`, creating it with `partitions` when missing and
    /// creation is on.
    pub(crate) async fn ensure_topic(&self, topic: &str, partitions: Option<i32>) -> Result<i32> {
        if let Some(n) = self.topics.lock().unwrap().get(topic) {
            return Ok(*n);
        }
        if let Some(n) = self.partitions_of(topic).await? {
            tracing::info!(topic, partitions = n, "using the existing topic {topic} as it is ({n} partitions)");
            self.topics.lock().unwrap().insert(topic.to_owned(), n);
            return Ok(n);
        }
        if !self.config.create {
            return Err(Error::NotFound { kind: "topic", name: topic.to_owned() });
        }
        let partitions = partitions.unwrap_or(self.config.partitions);
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(self.config.replication));
        let options = AdminOptions::new().operation_timeout(Some(CALL_TIMEOUT));
        let results = self
            .admin
            .create_topics([&new], &options)
            .await
            .map_err(|e| kafka_error(&format!("create topic {topic}"), e))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(kafka_error(&format!("create topic {name}"), KafkaError::AdminOp(code)));
                }
            }
        }
        // Creation is asynchronous in Kafka: wait until the metadata shows the partitions.
        let started = tokio::time::Instant::now();
        loop {
            if let Some(n) = self.partitions_of(topic).await? {
                self.topics.lock().unwrap().insert(topic.to_owned(), n);
                return Ok(n);
            }
            if started.elapsed() > CALL_TIMEOUT {
                return Err(Error::retryable(format!("kafka: topic {topic} was created but has no partitions yet")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The partition count of `topic`, or `None` when it does not exist.
    async fn partitions_of(&self, topic: &str) -> Result<Option<i32>> {
        let producer = self.producer();
        let name = topic.to_owned();
        let metadata = tokio::task::spawn_blocking(move || producer.client().fetch_metadata(Some(&name), CALL_TIMEOUT))
            .await
            .map_err(|e| Error::fatal(format!("kafka metadata task: {e}")))?
            .map_err(|e| kafka_error(&format!("metadata of topic {topic}"), e))?;
        Ok(metadata.topics().iter().find(|t| t.name() == topic).and_then(|t| {
            let missing = t.error().is_some() || t.partitions().is_empty();
            (!missing).then_some(t.partitions().len() as i32)
        }))
    }

    /// The producer records go through now.
    fn producer(&self) -> FutureProducer {
        self.producer.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// After a fatal error of `failed`, a new producer in its place, unless another send
    /// has replaced it already. The records `failed` still held fail with it; their
    /// senders get errors, as the record's sender does here.
    fn replace_failed_producer(&self, failed: &FutureProducer, why: &str) -> Result<()> {
        let mut current = self.producer.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if current.client().native_ptr() != failed.client().native_ptr() {
            return Ok(());
        }
        let fresh: FutureProducer =
            self.producer_config.create().map_err(|e| settings_error(&self.config, "kafka producer settings", e))?;
        tracing::warn!(error = why, "the Kafka producer hit a fatal error; a new producer replaces it");
        *current = fresh;
        Ok(())
    }

    /// Sends one record and waits for its delivery report. When the producer has hit a
    /// fatal error, a new producer replaces it and sends the record once more: one
    /// fenced producer must not stop every later send of the application.
    pub(crate) async fn produce(
        &self,
        topic: &str,
        partition: Option<i32>,
        message: &Message,
        extra: &[(&str, &str)],
    ) -> Result<()> {
        let record = || {
            let mut record = FutureRecord::to(topic)
                .payload(&message.payload[..])
                .headers(mapping::headers(message, extra))
                .timestamp(mapping::timestamp_ms(message));
            if let Some(key) = &message.ordering_key {
                record = record.key(key.as_str());
            }
            if let Some(partition) = partition {
                record = record.partition(partition);
            }
            record
        };
        let producer = self.producer();
        let error = match producer.send(record(), CALL_TIMEOUT).await {
            Ok(_) => return Ok(()),
            Err((e, _)) => e,
        };
        let Some(why) = producer_must_be_replaced(&error, producer.client().fatal_error()) else {
            return Err(kafka_error(&format!("send to topic {topic}"), error));
        };
        self.replace_failed_producer(&producer, &why)?;
        self.producer().send(record(), CALL_TIMEOUT).await.map(|_| ()).map_err(|(e, _)| {
            kafka_error(
                &format!("send to topic {topic} with a new producer, after a fatal error of the last ({why})"),
                e,
            )
        })
    }

    /// Starts a subscription's group where the topic ends now, unless it has a position.
    /// Without this, a new group would start at the topic's beginning and see messages
    /// sent before the subscription existed.
    async fn start_group_at_end(&self, topic: &str, group: &str) -> Result<()> {
        let mut client = self.config.client_config();
        client.set("group.id", group).set("enable.auto.commit", "false");
        let (topic, group, config) = (topic.to_owned(), group.to_owned(), self.config.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            let consumer: BaseConsumer =
                client.create().map_err(|e| settings_error(&config, "kafka consumer settings", e))?;
            let what = |action: &str| format!("{action} for subscription group {group}");
            let metadata =
                consumer.fetch_metadata(Some(&topic), CALL_TIMEOUT).map_err(|e| kafka_error(&what("metadata"), e))?;
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .filter(|t| t.name() == topic)
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            let mut asked = TopicPartitionList::new();
            for p in &partitions {
                asked.add_partition(&topic, *p);
            }
            let committed =
                consumer.committed_offsets(asked, CALL_TIMEOUT).map_err(|e| kafka_error(&what("read offsets"), e))?;
            if committed.elements().iter().any(|e| matches!(e.offset(), Offset::Offset(_))) {
                return Ok(()); // the group has a position already
            }
            let mut start = TopicPartitionList::new();
            for p in partitions {
                let (_, high) = consumer
                    .fetch_watermarks(&topic, p, CALL_TIMEOUT)
                    .map_err(|e| kafka_error(&what("read the topic's end"), e))?;
                start
                    .add_partition_offset(&topic, p, Offset::Offset(high))
                    .map_err(|e| kafka_error(&what("set offsets"), e))?;
            }
            consumer.commit(&start, CommitMode::Sync).map_err(|e| kafka_error(&what("commit the start"), e))
        })
        .await
        .map_err(|e| Error::fatal(format!("kafka: declaring a subscription: {e}")))?
    }
}

/// The topic a destination or source reads from.
fn topic_of(destination: &Destination) -> &str {
    destination.name().as_str()
}

#[async_trait]
impl Broker for KafkaBroker {
    fn capabilities(&self) -> &Capabilities {
        &self.inner.capabilities
    }

    async fn send(&self, destination: &Destination, message: Message) -> Result<MessageId> {
        self.inner.open.check()?;
        self.inner.capabilities.check_message(&message)?;
        mapping::check_header_names(&message)?;
        let topic = topic_of(destination);
        self.inner.ensure_topic(topic, None).await?;
        self.inner.produce(topic, None, &message, &[]).await?;
        Ok(message.id)
    }

    async fn send_batch(&self, destination: &Destination, messages: Vec<Message>) -> Result<Vec<MessageId>> {
        self.inner.open.check()?;
        self.inner.capabilities.check_batch(&messages)?;
        messages.iter().try_for_each(mapping::check_header_names)?;
        let topic = topic_of(destination);
        self.inner.ensure_topic(topic, None).await?;
        // All records are queued on the first poll, then the delivery reports are awaited
        // together: one round trip's worth of latency for the whole batch.
        futures::future::try_join_all(messages.iter().map(|m| self.inner.produce(topic, None, m, &[]))).await?;
        Ok(messages.into_iter().map(|m| m.id).collect())
    }

    async fn consumer(&self, source: &Source, options: ConsumerOptions) -> Result<Box<dyn Consumer>> {
        self.inner.open.check()?;
        self.declare(source).await?;
        Ok(Box::new(consumer::KafkaConsumer::open(self.inner.clone(), source.clone(), options).await?))
    }

    async fn declare(&self, source: &Source) -> Result<()> {
        self.inner.open.check()?;
        let topic = source.destination();
        self.inner.ensure_topic(topic_of(&topic), None).await?;
        if let Source::Subscription { .. } = source {
            self.inner.start_group_at_end(topic_of(&topic), &self.inner.config.group_id(source)).await?;
        }
        Ok(())
    }

    async fn declare_destination(&self, destination: &Destination) -> Result<()> {
        self.inner.open.check()?;
        self.inner.ensure_topic(topic_of(destination), None).await.map(|_| ())
    }

    async fn stats(&self, _source: &Source) -> Result<courier_core::Stats> {
        Err(self.inner.capabilities.unsupported(Feature::Stats))
    }

    async fn purge(&self, _source: &Source) -> Result<u64> {
        Err(self.inner.capabilities.unsupported(Feature::Purge))
    }

    async fn close(&self) -> Result<()> {
        if !self.inner.open.close() {
            return Ok(());
        }
        let producer = self.inner.producer();
        tokio::task::spawn_blocking(move || producer.flush(CALL_TIMEOUT))
            .await
            .map_err(|e| Error::fatal(format!("kafka: flushing the producer: {e}")))?
            .map_err(|e| kafka_error("flush the producer on close", e))
    }
}

/// Why a producer must give way to a new one after `error` failed a record, given the
/// producer's fatal error if librdkafka has raised one; `None` when the producer is fine
/// and the error is the record's alone.
///
/// A fenced idempotent producer can fail a record before librdkafka has raised its fatal
/// error (seen after 30 s of broker silence: `ProducerFenced` with no fatal error yet),
/// so the record's own code counts too.
fn producer_must_be_replaced(error: &KafkaError, fatal: Option<(RDKafkaErrorCode, String)>) -> Option<String> {
    let fenced = matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch)
    );
    match fatal {
        Some((code, reason)) => Some(format!("{code:?}: {reason}")),
        None if fenced => Some(error.to_string()),
        None => None,
    }
}

/// The integration tests' helpers, shared with the unit tests below.
#[cfg(test)]
#[path = "../tests/support/mod.rs"]
mod test_support;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::url as test_url;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(unsafe_code)] // librdkafka's test hook, rd_kafka_test_fatal_error
    async fn a_producer_that_hits_a_fatal_error_is_replaced_and_the_send_goes_through() {
        let broker = KafkaBroker::connect(&test_url()).await.unwrap();
        let destination = Destination::queue(&courier_core::conformance::unique_name("fatal")).unwrap();
        broker.send(&destination, Message::new("before")).await.expect("a send before the fatal error");

        // What a broker's PRODUCER_FENCED does to an idempotent producer (Tansu answered
        // one after 30 s of silence), raised through librdkafka's own test hook.
        let fenced = broker.inner.producer();
        // SAFETY: the client is alive (`fenced` holds it); the reason is a C string.
        let raised = unsafe {
            rdkafka_sys::rd_kafka_test_fatal_error(
                fenced.client().native_ptr(),
                rdkafka_sys::RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED,
                c"raised by Courier's test".as_ptr(),
            )
        };
        assert_eq!(raised, rdkafka_sys::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR);
        assert!(fenced.client().fatal_error().is_some(), "the hook raised no fatal error");

        broker.send(&destination, Message::new("after")).await.expect("the send after a fatal error");
        let now = broker.inner.producer();
        assert_ne!(now.client().native_ptr(), fenced.client().native_ptr(), "the producer was not replaced");
        assert!(now.client().fatal_error().is_none());
        // A batch, and the sends after it, go through the new producer as well.
        let batch = (0..10).map(|i| Message::new(format!("m{i}"))).collect();
        assert_eq!(broker.send_batch(&destination, batch).await.expect("a batch after").len(), 10);
        broker.close().await.unwrap();
    }

    #[tokio::test]
    async fn settings_librdkafka_refuses_do_not_echo_secrets() {
        for url in [
            // A typo in a secret's name: librdkafka knows no such setting.
            "kafka://127.0.0.1:9092?sasl.pasword=s3cret",
            "kafka://127.0.0.1:9092?ssl.key.pasword=s3cret",
            // A secret next to a setting librdkafka refuses.
            "kafka://127.0.0.1:9092?sasl.password=s3cret&security.protocol=bogus",
            "kafka://u:s3cret@127.0.0.1:9092?sasl.mechanism=bogus",
        ] {
            let err = match KafkaBroker::connect(url).await {
                Ok(_) => panic!("{url} was accepted"),
                Err(e) => e,
            };
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("s3cret"), "{url}: {shown}");
            assert!(matches!(err, Error::Config { .. }), "{url}: {err}");
        }
        // Values of other settings are still shown: they help.
        let err = KafkaBroker::connect("kafka://127.0.0.1:9092?security.protocol=bogus").await.unwrap_err();
        assert!(err.to_string().contains("bogus") && err.to_string().contains("security.protocol"), "{err}");
    }

    #[test]
    fn a_fenced_record_replaces_the_producer_even_before_librdkafka_calls_it_fatal() {
        for code in [RDKafkaErrorCode::ProducerFenced, RDKafkaErrorCode::InvalidProducerEpoch] {
            let why = producer_must_be_replaced(&KafkaError::MessageProduction(code), None);
            assert!(why.is_some_and(|why| why.contains(&code.to_string())), "{code:?} keeps the producer");
        }
    }

    #[test]
    fn a_record_error_of_its_own_keeps_the_producer_unless_it_failed_fatally() {
        let timed_out = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert_eq!(producer_must_be_replaced(&timed_out, None), None);
        let fatal = Some((RDKafkaErrorCode::OutOfOrderSequenceNumber, "sequence gap".to_owned()));
        let why = producer_must_be_replaced(&timed_out, fatal).expect("a fatal error replaces the producer");
        assert!(why.contains("OutOfOrderSequenceNumber") && why.contains("sequence gap"), "{why}");
    }
}
