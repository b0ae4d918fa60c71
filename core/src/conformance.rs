//! The conformance kit: the contract's clauses as async test cases that every backend runs.
//!
//! A backend provides a [`Harness`] (how to connect, and timings that suit it) and
//! expands [`conformance_tests!`](crate::conformance_tests) in one of its test files, the
//! way `object_store` backends call its shared `integration` module:
//!
//! ```text
//! // tests/conformance.rs of a backend crate (needs tokio as a dev-dependency);
//! // tests/tests/local.rs in this repository is a compiled, running example.
//! use courier_core::conformance::{Harness, Timing};
//!
//! struct MyHarness;
//! #[async_trait::async_trait]
//! impl Harness for MyHarness {
//!     async fn broker(&self) -> courier_core::Result<courier_core::DynBroker> {
//!         Ok(std::sync::Arc::new(my_backend::MyBroker::connect("...").await?))
//!     }
//! }
//! courier_core::conformance_tests!(MyHarness);
//! ```
//!
//! Every case runs on every backend. A case about a feature the backend lacks does not
//! skip: it checks that the backend refuses the feature with [`Error::Unsupported`] and
//! prints `conformance: <case>: <feature> unsupported by <backend>` so the report names it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rand::{Rng, SeedableRng};

use crate::{
    headers, Capabilities, Consumer, ConsumerOptions, Delivery, Destination, DynBroker, Error, Feature, Message, Name,
    Result, Source,
};

#[doc(hidden)]
pub use tokio;

/// How the kit reaches a backend under test.
#[async_trait]
pub trait Harness: Send + Sync {
    /// A connected broker. Each case calls this once and uses that broker throughout.
    async fn broker(&self) -> Result<DynBroker>;

    /// Timings that suit the backend.
    fn timing(&self) -> Timing {
        Timing::default()
    }
}

/// Durations and sizes the cases use; slow or remote backends stretch them.
#[derive(Debug, Clone)]
pub struct Timing {
    /// A short lease, for expiry and extension cases.
    pub lease: Duration,
    /// A short delay, for delayed send and retry cases.
    pub delay: Duration,
    /// How long to wait for a message that should arrive.
    pub arrive_within: Duration,
    /// How long to watch for a message that should not arrive.
    pub quiet: Duration,
    /// Messages in the many-consumers case (the contract asks 10,000).
    pub soak_messages: usize,
    /// Consumers in the many-consumers case.
    pub soak_consumers: usize,
    /// How long a second consumer may take to get a share of a queue another consumer
    /// already reads (a Kafka consumer group rebalances first). The competing-consumers
    /// case spreads one consumer's work over at least this long, so the split it checks
    /// does not depend on who wins that race.
    pub join_within: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease: Duration::from_millis(400),
            delay: Duration::from_millis(400),
            arrive_within: Duration::from_secs(10),
            quiet: Duration::from_millis(200),
            soak_messages: 10_000,
            soak_consumers: 8,
            join_within: Duration::ZERO,
        }
    }
}

/// A name no other case or run uses, so cases can share a broker and run in parallel.
pub fn unique_name(case: &str) -> String {
    let short: String = case.chars().filter(|c| c.is_ascii_alphanumeric()).take(24).collect();
    format!("ck-{short}-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

fn note_unsupported(case: &str, caps: &Capabilities, feature: Feature) {
    println!("conformance: {case}: {feature} unsupported by {}; checked that it is refused", caps.backend);
}

fn expect_unsupported<T>(what: &str, result: Result<T>, feature: Feature) {
    match result.map(|_| "Ok(..)") {
        Err(Error::Unsupported { feature: f, .. }) if f == feature => {}
        other => panic!("{what}: expected Unsupported({feature}), got {other:?}"),
    }
}

struct Setup {
    broker: DynBroker,
    timing: Timing,
    source: Source,
    destination: Destination,
}

async fn setup(h: &dyn Harness, case: &str) -> Setup {
    let broker = h.broker().await.expect("the harness connects to the broker");
    let source = Source::queue(&unique_name(case)).expect("valid name");
    broker.declare(&source).await.expect("declare the case's queue");
    let destination = source.destination();
    Setup { broker, timing: h.timing(), source, destination }
}

impl Setup {
    fn caps(&self) -> &Capabilities {
        self.broker.capabilities()
    }

    async fn consumer(&self, options: ConsumerOptions) -> Box<dyn Consumer> {
        self.broker.consumer(&self.source, options).await.expect("open a consumer")
    }

    async fn dead_letters(&self) -> Box<dyn Consumer> {
        let dlq = Source::Queue(self.source.default_dead_letter().name().clone());
        self.broker.consumer(&dlq, ConsumerOptions::default()).await.expect("open the dead-letter consumer")
    }

    async fn send(&self, message: Message) {
        self.broker.send(&self.destination, message).await.expect("send");
    }
}

/// Receives until `n` deliveries arrived or `within` passed, each receive appending to
/// the deliveries so far with [`Consumer::receive_into`] (so every case that calls this
/// checks that it appends, counts what it appended and takes no more than asked).
pub async fn receive_n(consumer: &dyn Consumer, n: usize, within: Duration) -> Vec<Delivery> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let (before, first) = (got.len(), got.first().map(|d: &Delivery| d.id.clone()));
        let max = n - before;
        let added = consumer.receive_into(max, left.min(Duration::from_secs(5)), &mut got).await.expect("receive_into");
        assert_eq!(got.len(), before + added, "receive_into must return how many it appended");
        assert!(added <= max, "receive_into took {added} for a max of {max}");
        if let Some(first) = first {
            assert_eq!(got[0].id, first, "receive_into must append, not replace");
        }
    }
    got
}

async fn expect_nothing(consumer: &dyn Consumer, within: Duration, why: &str) {
    let got = consumer.receive(10, within).await.expect("receive");
    assert!(got.is_empty(), "{why}: got {:?}", got.iter().map(|d| d.id.clone()).collect::<Vec<_>>());
}

async fn expect_one(consumer: &dyn Consumer, within: Duration, why: &str) -> Delivery {
    receive_n(consumer, 1, within).await.pop().unwrap_or_else(|| panic!("{why}: nothing arrived within {within:?}"))
}

/// Payload bytes (every byte value, so not UTF-8), odd headers, key, content type and id survive.
pub async fn round_trip_preserves_the_message(h: &dyn Harness) {
    let s = setup(h, "roundtrip").await;
    let payload: Vec<u8> = (0..=255u8).chain([0xff, 0xfe, 0x00, 0xc3]).collect();
    let mut msg = Message::new(payload.clone())
        .with_id("id-with.odd_chars-01")
        .with_content_type("application/octet-stream")
        .with_header("X-Mixed.Case_name-1", "plain")
        .with_header("with space", "value with spaces, commas; semicolons=equals")
        .with_header("ünïcödé", "✓ emoji 🚀 and \"quotes\"")
        .with_header("empty", "");
    let keyed = s.caps().ordered_keys;
    if keyed {
        msg = msg.with_ordering_key("customer-42");
    }
    let sent_at = msg.timestamp;
    let consumer = s.consumer(ConsumerOptions::default()).await;
    let id = s.broker.send(&s.destination, msg.clone()).await.expect("send");
    assert_eq!(id.as_str(), "id-with.odd_chars-01", "send returns the message's id");
    let d = expect_one(&*consumer, s.timing.arrive_within, "the sent message").await;
    assert_eq!(d.id, msg.id);
    assert_eq!(&d.payload[..], &payload[..], "payload bytes");
    assert_eq!(d.headers, msg.headers, "headers");
    assert_eq!(d.content_type.as_deref(), Some("application/octet-stream"));
    if keyed {
        assert_eq!(d.ordering_key.as_deref(), Some("customer-42"));
    }
    assert_eq!(d.attempt(), 1, "first delivery is attempt 1");
    assert_eq!(d.source(), &s.source);
    let skew = d.timestamp.duration_since(sent_at).unwrap_or_else(|e| e.duration());
    assert!(skew < Duration::from_secs(2), "timestamp kept (off by {skew:?})");
    d.ack().await.expect("ack");

    // The smallest payload too.
    s.send(Message::new(Bytes::new())).await;
    let d = expect_one(&*consumer, s.timing.arrive_within, "the empty message").await;
    assert!(d.payload.is_empty());
    d.ack().await.expect("ack");
}

/// A generated id comes back from send and on the delivery.
pub async fn send_returns_the_id_it_delivers(h: &dyn Harness) {
    let s = setup(h, "ids").await;
    let consumer = s.consumer(ConsumerOptions::default()).await;
    let id = s.broker.send(&s.destination, Message::new("x")).await.expect("send");
    let d = expect_one(&*consumer, s.timing.arrive_within, "the message").await;
    assert_eq!(d.id, id);
    d.ack().await.expect("ack");
}

/// A batch goes out in one call and comes back complete.
pub async fn batch_send_and_receive(h: &dyn Harness) {
    let s = setup(h, "batch").await;
    let n = s.caps().max_batch.min(25);
    let messages: Vec<Message> = (0..n).map(|i| Message::new(format!("m{i}"))).collect();
    let expected: HashSet<_> = messages.iter().map(|m| m.id.clone()).collect();
    let ids = s.broker.send_batch(&s.destination, messages.clone()).await.expect("send_batch");
    assert_eq!(ids, messages.iter().map(|m| m.id.clone()).collect::<Vec<_>>(), "ids in order");
    let consumer = s.consumer(ConsumerOptions::default()).await;
    let got = receive_n(&*consumer, n, s.timing.arrive_within).await;
    let got_ids: HashSet<_> = got.iter().map(|d| d.id.clone()).collect();
    assert_eq!(got_ids, expected);
    assert_eq!(got.len(), n, "each once");
    for d in got {
        d.ack().await.expect("ack");
    }
    let too_many: Vec<Message> = (0..=s.caps().max_batch).map(|_| Message::new("x")).collect();
    match s.broker.send_batch(&s.destination, too_many).await {
        Err(Error::BatchTooLarge { size, limit, .. }) => {
            assert_eq!((size, limit), (s.caps().max_batch + 1, s.caps().max_batch))
        }
        other => panic!("a batch over max_batch must fail with BatchTooLarge, got {other:?}"),
    }
}

/// An acked message is gone for good, even after its lease would have run out: acked
/// alone or with others through `Delivery::ack_all`, which settles each once.
pub async fn ack_removes_for_good(h: &dyn Harness) {
    let s = setup(h, "ack").await;
    let consumer = s.consumer(ConsumerOptions::default().lease(s.timing.lease)).await;
    for text in ["once", "together 1", "together 2"] {
        s.send(Message::new(text)).await;
    }
    let batch = receive_n(&*consumer, 3, s.timing.arrive_within).await;
    assert_eq!(batch.len(), 3, "three messages sent, {} arrived", batch.len());
    batch[0].ack().await.expect("ack");
    let results = Delivery::ack_all(&batch).await;
    assert!(matches!(results[0], Err(Error::AlreadySettled { .. })), "acked twice: {:?}", results[0]);
    for result in &results[1..] {
        result.as_ref().expect("ack_all");
    }
    assert!(batch.iter().all(Delivery::is_settled));
    expect_nothing(&*consumer, s.timing.lease * 2 + s.timing.quiet, "an acked message came back").await;
}

/// Retry redelivers the same message with the attempt number one higher.
pub async fn retry_redelivers_with_next_attempt(h: &dyn Harness) {
    let s = setup(h, "retry").await;
    let consumer = s.consumer(ConsumerOptions::default().max_attempts(5)).await;
    s.send(Message::new("again")).await;
    let first = expect_one(&*consumer, s.timing.arrive_within, "first delivery").await;
    assert_eq!(first.attempt(), 1);
    first.retry().await.expect("retry");
    let second = expect_one(&*consumer, s.timing.arrive_within, "redelivery").await;
    assert_eq!(second.id, first.id);
    assert_eq!(second.attempt(), 2, "attempt counts up");
    assert_eq!(second.payload, first.payload);
    second.ack().await.expect("ack");
}

/// A retry with a delay stays invisible until the delay has passed.
pub async fn retry_with_delay_waits(h: &dyn Harness) {
    let case = "retry_with_delay_waits";
    let s = setup(h, "retrydelay").await;
    let consumer = s.consumer(ConsumerOptions::default()).await;
    s.send(Message::new("later")).await;
    let first = expect_one(&*consumer, s.timing.arrive_within, "first delivery").await;
    if !s.caps().delayed_retry {
        note_unsupported(case, s.caps(), Feature::DelayedRetry);
        expect_unsupported("retry_after", first.retry_after(s.timing.delay).await, Feature::DelayedRetry);
        first.ack().await.expect("an unsupported retry hands the delivery back");
        return;
    }
    let retried_at = Instant::now();
    first.retry_after(s.timing.delay).await.expect("retry_after");
    expect_nothing(&*consumer, s.timing.delay / 2, "a delayed retry came back early").await;
    let second = expect_one(&*consumer, s.timing.arrive_within, "delayed redelivery").await;
    assert!(retried_at.elapsed() >= s.timing.delay, "redelivered after {:?}", retried_at.elapsed());
    assert_eq!((second.id.clone(), second.attempt()), (first.id.clone(), 2));
    second.ack().await.expect("ack");
}

fn assert_dead_letter(d: &Delivery, origin: &Source, attempts: u32, reason_part: &str) {
    let reason = d.header(headers::DEAD_LETTER_REASON).unwrap_or_default();
    assert!(reason.contains(reason_part), "dead-letter reason {reason:?} should mention {reason_part:?}");
    assert_eq!(d.header(headers::DEAD_LETTER_ATTEMPTS), Some(attempts.to_string().as_str()), "attempts header");
    assert_eq!(d.header(headers::DEAD_LETTER_ORIGIN), Some(origin.to_string().as_str()), "origin header");
}

/// Reject sends the message straight to the dead-letter destination with reason headers.
pub async fn reject_goes_to_dead_letter(h: &dyn Harness) {
    let s = setup(h, "reject").await;
    let consumer = s.consumer(ConsumerOptions::default().lease(s.timing.lease)).await;
    let dlq = s.dead_letters().await;
    s.send(Message::new("poison").with_header("kept", "yes")).await;
    let d = expect_one(&*consumer, s.timing.arrive_within, "the message").await;
    d.reject("invalid order total").await.expect("reject");
    let dead = expect_one(&*dlq, s.timing.arrive_within, "the dead letter").await;
    assert_eq!(dead.id, d.id);
    assert_eq!(dead.payload, d.payload);
    assert_eq!(dead.header("kept"), Some("yes"), "original headers kept");
    assert_dead_letter(&dead, &s.source, 1, "invalid order total");
    dead.ack().await.expect("ack dead letter");
    expect_nothing(&*consumer, s.timing.lease * 2, "a rejected message came back").await;
}

/// An unsettled delivery comes back after its lease.
pub async fn lease_expiry_redelivers(h: &dyn Harness) {
    let case = "lease_expiry_redelivers";
    let s = setup(h, "lease").await;
    if !s.caps().lease_expiry {
        note_unsupported(case, s.caps(), Feature::LeaseExpiry);
        return;
    }
    let consumer = s.consumer(ConsumerOptions::default().lease(s.timing.lease)).await;
    s.send(Message::new("forgotten")).await;
    let first = expect_one(&*consumer, s.timing.arrive_within, "first delivery").await;
    let second = expect_one(&*consumer, s.timing.lease * 3 + s.timing.arrive_within, "redelivery after lease").await;
    assert_eq!(second.id, first.id);
    assert_eq!(second.attempt(), 2);
    second.ack().await.expect("ack");
}

/// Extending the lease keeps the message from being redelivered.
pub async fn lease_extension_prevents_redelivery(h: &dyn Harness) {
    let case = "lease_extension_prevents_redelivery";
    let s = setup(h, "extend").await;
    let consumer = s.consumer(ConsumerOptions::default().lease(s.timing.lease)).await;
    s.send(Message::new("long work")).await;
    let d = expect_one(&*consumer, s.timing.arrive_within, "the message").await;
    if !s.caps().lease_extension {
        note_unsupported(case, s.caps(), Feature::LeaseExtension);
        expect_unsupported("extend_lease", d.extend_lease(s.timing.lease).await, Feature::LeaseExtension);
        d.ack().await.expect("ack");
        return;
    }
    let other = s.consumer(ConsumerOptions::default().lease(s.timing.lease)).await;
    for _ in 0..4 {
        d.extend_lease(s.timing.lease).await.expect("extend");
        expect_nothing(&*other, s.timing.lease / 2, "an extended lease expired").await;
    }
    d.ack().await.expect("ack after extensions");
}

/// After max attempts the message is dead-lettered exactly once, with reason, attempts and origin.
pub async fn max_attempts_then_dead_letter_once(h: &dyn Harness) {
    let s = setup(h, "maxattempts").await;
    let consumer = s.consumer(ConsumerOptions::default().max_attempts(3).lease(s.timing.lease * 4)).await;
    let dlq = s.dead_letters().await;
    s.send(Message::new("always fails")).await;
    for attempt in 1..=3 {
        let d = expect_one(&*consumer, s.timing.arrive_within, "a failing delivery").await;
        assert_eq!(d.attempt(), attempt);
        d.retry().await.expect("retry");
    }
    let dead = expect_one(&*dlq, s.timing.arrive_within, "the dead letter").await;
    assert_dead_letter(&dead, &s.source, 3, "max attempts");
    dead.ack().await.expect("ack");
    expect_nothing(&*dlq, s.timing.quiet, "dead-lettered more than once").await;
    expect_nothing(&*consumer, s.timing.quiet, "a dead-lettered message came back").await;
}

/// Two consumers on one queue split the work; no message goes to both.
pub async fn competing_consumers_split_the_work(h: &dyn Harness) {
    let s = setup(h, "compete").await;
    let n = 40;
    for i in 0..n {
        s.send(Message::new(format!("job {i}"))).await;
    }
    let seen: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
    let mut tasks = Vec::new();
    for worker in 0..2 {
        // Prefetch 1: a broker that pushes ahead (RabbitMQ) would otherwise hand the
        // whole small queue to the first consumer, which is allowed but not a split.
        let consumer: Arc<dyn Consumer> = Arc::from(s.consumer(ConsumerOptions::default().prefetch(1)).await);
        let seen = seen.clone();
        let within = s.timing.arrive_within + s.timing.join_within;
        let work = (s.timing.join_within / n as u32).max(Duration::from_millis(5));
        tasks.push(tokio::spawn(async move {
            let deadline = Instant::now() + within;
            while seen.lock().unwrap().len() < n && Instant::now() < deadline {
                for d in consumer.receive(1, Duration::from_millis(200)).await.expect("receive") {
                    seen.lock().unwrap().push((worker, d.id.to_string()));
                    tokio::time::sleep(work).await;
                    d.ack().await.expect("ack");
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("worker task");
    }
    let seen = seen.lock().unwrap();
    let ids: HashSet<_> = seen.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(ids.len(), n, "every message handled");
    assert_eq!(seen.len(), n, "no message handled twice");
    for worker in 0..2 {
        assert!(seen.iter().any(|(w, _)| *w == worker), "consumer {worker} got no work: {seen:?}");
    }
}

/// Every subscription of a topic gets every message.
pub async fn every_subscription_gets_every_message(h: &dyn Harness) {
    let case = "every_subscription_gets_every_message";
    let s = setup(h, "fanout").await;
    let topic = unique_name("topic");
    let subs = [Source::subscription(&topic, "billing").unwrap(), Source::subscription(&topic, "shipping").unwrap()];
    if !s.caps().fan_out {
        note_unsupported(case, s.caps(), Feature::FanOut);
        expect_unsupported(
            "consumer on a subscription",
            s.broker.consumer(&subs[0], Default::default()).await,
            Feature::FanOut,
        );
        expect_unsupported(
            "send to a topic",
            s.broker.send(&Destination::topic(&topic).unwrap(), Message::new("x")).await,
            Feature::FanOut,
        );
        return;
    }
    for sub in &subs {
        s.broker.declare(sub).await.expect("declare subscription");
    }
    let sent: HashSet<_> = {
        let mut ids = HashSet::new();
        for i in 0..10 {
            ids.insert(s.broker.send(&subs[0].destination(), Message::new(format!("event {i}"))).await.expect("send"));
        }
        ids
    };
    for sub in &subs {
        let consumer = s.broker.consumer(sub, Default::default()).await.expect("consumer");
        let got = receive_n(&*consumer, 10, s.timing.arrive_within).await;
        let ids: HashSet<_> = got.iter().map(|d| d.id.clone()).collect();
        assert_eq!(ids, sent, "{sub} got every message");
        for d in got {
            d.ack().await.expect("ack");
        }
        expect_nothing(&*consumer, s.timing.quiet, "a subscription got extra messages").await;
    }
}

/// Per-key order holds, a key's next message waits while one is in flight, and a
/// failing key does not hold back other keys.
pub async fn per_key_order_and_failing_key_isolation(h: &dyn Harness) {
    let case = "per_key_order_and_failing_key_isolation";
    let s = setup(h, "keys").await;
    if !s.caps().ordered_keys {
        note_unsupported(case, s.caps(), Feature::OrderedKeys);
        expect_unsupported(
            "send with an ordering key",
            s.broker.send(&s.destination, Message::new("x").with_ordering_key("k")).await,
            Feature::OrderedKeys,
        );
        return;
    }
    for i in 1..=5 {
        for key in ["a", "b", "c"] {
            s.send(Message::new(format!("{key}{i}")).with_ordering_key(key)).await;
        }
    }
    let consumer = s.consumer(ConsumerOptions::default().max_attempts(5)).await;
    let mut processed: Vec<String> = Vec::new();
    let mut a1_failures = 0;
    let deadline = Instant::now() + s.timing.arrive_within * 2;
    while processed.len() < 15 && Instant::now() < deadline {
        let batch = consumer.receive(15, Duration::from_millis(500)).await.expect("receive");
        let keys: Vec<_> = batch.iter().map(|d| d.ordering_key.clone().unwrap()).collect();
        let distinct: HashSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len(), "two messages of one key in flight at once: {keys:?}");
        for d in batch {
            let body = String::from_utf8(d.payload.to_vec()).unwrap();
            if body == "a1" && a1_failures < 2 {
                a1_failures += 1;
                if s.caps().delayed_retry {
                    d.retry_after(s.timing.delay).await.expect("retry_after");
                } else {
                    d.retry().await.expect("retry");
                }
                continue;
            }
            processed.push(body);
            d.ack().await.expect("ack");
        }
    }
    assert_eq!(processed.len(), 15, "all processed: {processed:?}");
    for key in ["a", "b", "c"] {
        let order: Vec<_> = processed.iter().filter(|b| b.starts_with(key)).cloned().collect();
        let expected: Vec<_> = (1..=5).map(|i| format!("{key}{i}")).collect();
        assert_eq!(order, expected, "order of key {key}");
    }
    if s.caps().delayed_retry {
        let first_a = processed.iter().position(|b| b == "a1").unwrap();
        let others_done = processed.iter().take(first_a).filter(|b| !b.starts_with('a')).count();
        assert_eq!(others_done, 10, "keys b and c finished while a1 was failing: {processed:?}");
    }
}

/// A dedup id seen within the window is accepted and dropped.
pub async fn dedup_drops_repeats(h: &dyn Harness) {
    let case = "dedup_drops_repeats";
    let s = setup(h, "dedup").await;
    if !s.caps().dedup {
        note_unsupported(case, s.caps(), Feature::Dedup);
        expect_unsupported(
            "send with a dedup id",
            s.broker.send(&s.destination, Message::new("x").with_dedup_id("d")).await,
            Feature::Dedup,
        );
        return;
    }
    let first = s.broker.send(&s.destination, Message::new("first").with_dedup_id("order-1")).await.unwrap();
    let repeat = s.broker.send(&s.destination, Message::new("repeat").with_dedup_id("order-1")).await.unwrap();
    assert_eq!(repeat, first, "a duplicate reports the first message's id");
    s.send(Message::new("other").with_dedup_id("order-2")).await;
    let consumer = s.consumer(Default::default()).await;
    let got = receive_n(&*consumer, 3, s.timing.arrive_within.min(Duration::from_secs(3))).await;
    let bodies: Vec<_> = got.iter().map(|d| String::from_utf8_lossy(&d.payload).into_owned()).collect();
    assert_eq!(bodies.len(), 2, "the repeat was dropped: {bodies:?}");
    assert!(bodies.contains(&"first".to_owned()) && bodies.contains(&"other".to_owned()), "{bodies:?}");
    for d in got {
        d.ack().await.unwrap();
    }
}

/// A delayed send stays invisible until its delay has passed.
pub async fn delayed_send_waits(h: &dyn Harness) {
    let case = "delayed_send_waits";
    let s = setup(h, "delayed").await;
    if !s.caps().supports(Feature::DelayedSend) {
        note_unsupported(case, s.caps(), Feature::DelayedSend);
        expect_unsupported(
            "send with a delay",
            s.broker.send(&s.destination, Message::new("x").with_delay(s.timing.delay)).await,
            Feature::DelayedSend,
        );
        return;
    }
    let consumer = s.consumer(Default::default()).await;
    let sent_at = Instant::now();
    s.send(Message::new("later").with_delay(s.timing.delay)).await;
    s.send(Message::new("now")).await;
    let now = expect_one(&*consumer, s.timing.arrive_within, "the undelayed message").await;
    assert_eq!(&now.payload[..], b"now", "the delayed message came first");
    now.ack().await.unwrap();
    let later = expect_one(&*consumer, s.timing.arrive_within, "the delayed message").await;
    assert!(sent_at.elapsed() >= s.timing.delay, "delivered after {:?}", sent_at.elapsed());
    assert_eq!(&later.payload[..], b"later");
    later.ack().await.unwrap();
}

/// Thousands of messages, several consumers, random failures: every message ends acked
/// or dead-lettered exactly as its script says, and none is lost.
pub async fn many_consumers_random_failures_lose_nothing(h: &dyn Harness) {
    let s = setup(h, "soak").await;
    let n = s.timing.soak_messages;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xC0FFEE);
    // Script per message: how many times it fails before success, or rejection.
    let mut script: HashMap<String, (u32, bool)> = HashMap::new();
    let batch = s.caps().max_batch.min(100);
    let mut pending = Vec::new();
    for i in 0..n {
        let fails = if rng.gen_bool(0.2) { rng.gen_range(1..=2) } else { 0 };
        let reject = rng.gen_bool(0.05);
        let msg = Message::new(format!("{i}"));
        script.insert(msg.id.to_string(), (fails, reject));
        pending.push(msg);
        if pending.len() == batch || i + 1 == n {
            s.broker.send_batch(&s.destination, std::mem::take(&mut pending)).await.expect("send_batch");
        }
    }
    let script = Arc::new(script);
    let acked: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let rejected: Arc<Mutex<HashSet<String>>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let expected_rejects = script.values().filter(|(_, r)| *r).count();
    let mut tasks = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120).max(s.timing.arrive_within * 6);
    for _ in 0..s.timing.soak_consumers {
        let consumer: Arc<dyn Consumer> =
            Arc::from(s.consumer(ConsumerOptions::default().max_attempts(5).lease(Duration::from_secs(60))).await);
        let (script, acked, rejected, done) = (script.clone(), acked.clone(), rejected.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while done.load(std::sync::atomic::Ordering::SeqCst) < n && Instant::now() < deadline {
                for d in consumer.receive(32, Duration::from_millis(200)).await.expect("receive") {
                    let (fails, reject) = script[d.id.as_str()];
                    // `done` counts distinct messages, so a duplicate delivery is reported
                    // as one below instead of ending the run early and hiding another.
                    if reject {
                        d.reject("scripted rejection").await.expect("reject");
                        if rejected.lock().unwrap().insert(d.id.to_string()) {
                            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    } else if d.attempt() <= fails {
                        d.retry().await.expect("retry");
                    } else {
                        let first = {
                            let mut acked = acked.lock().unwrap();
                            let count = acked.entry(d.id.to_string()).or_default();
                            *count += 1;
                            *count == 1
                        };
                        d.ack().await.expect("ack");
                        if first {
                            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                }
            }
            consumer.close().await.expect("close");
        }));
    }
    for t in tasks {
        t.await.expect("consumer task");
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let expected_acks: HashSet<_> = script.iter().filter(|(_, (_, r))| !r).map(|(id, _)| id.clone()).collect();
    let got: HashSet<_> = acked.keys().cloned().collect();
    let missing: Vec<_> = expected_acks.difference(&got).take(5).collect();
    assert!(missing.is_empty(), "{} of {} messages never acked, e.g. {missing:?}", expected_acks.len() - got.len(), n);
    let twice: Vec<_> = acked.iter().filter(|(_, c)| **c > 1).take(5).collect();
    assert!(twice.is_empty(), "acked more than once: {twice:?}");
    // Settle dead letters as they come: a consumer may hold only `prefetch` unsettled.
    let dlq = s.dead_letters().await;
    let mut dead_ids: BTreeMap<String, usize> = BTreeMap::new();
    let deadline = Instant::now() + s.timing.arrive_within;
    while dead_ids.values().sum::<usize>() < expected_rejects && Instant::now() < deadline {
        for d in dlq.receive(100, Duration::from_millis(200)).await.expect("receive dead letters") {
            *dead_ids.entry(d.id.to_string()).or_default() += 1;
            d.ack().await.expect("ack dead letter");
        }
    }
    expect_nothing(&*dlq, s.timing.quiet, "more dead letters than rejections").await;
    assert_eq!(dead_ids.values().sum::<usize>(), expected_rejects, "dead letters");
    assert!(dead_ids.values().all(|c| *c == 1), "a message dead-lettered twice");
    assert!(dead_ids.keys().all(|id| script[id].1), "an unscripted dead letter");
}

/// A consumer that closes with unsettled deliveries hands them to another consumer.
pub async fn closing_a_consumer_hands_back_its_deliveries(h: &dyn Harness) {
    let s = setup(h, "handback").await;
    for i in 0..3 {
        s.send(Message::new(format!("m{i}"))).await;
    }
    let first = s.consumer(ConsumerOptions::default().lease(s.timing.lease)).await;
    let held = receive_n(&*first, 3, s.timing.arrive_within).await;
    assert_eq!(held.len(), 3);
    first.close().await.expect("close");
    let second = s.consumer(Default::default()).await;
    let got = receive_n(&*second, 3, s.timing.lease * 3 + s.timing.arrive_within).await;
    let ids = |ds: &[Delivery]| ds.iter().map(|d| d.id.clone()).collect::<HashSet<_>>();
    assert_eq!(ids(&got), ids(&held), "the other consumer got the unsettled messages");
    for d in got {
        d.ack().await.unwrap();
    }
}

/// Settling twice is an error, not a panic, and does not change the first outcome.
pub async fn double_settlement_is_an_error(h: &dyn Harness) {
    let s = setup(h, "double").await;
    let consumer = s.consumer(ConsumerOptions::default().lease(s.timing.lease)).await;
    s.send(Message::new("x")).await;
    let d = expect_one(&*consumer, s.timing.arrive_within, "the message").await;
    d.ack().await.unwrap();
    assert!(matches!(d.ack().await, Err(Error::AlreadySettled { .. })));
    assert!(matches!(d.retry().await, Err(Error::AlreadySettled { .. })));
    assert!(matches!(d.reject("late").await, Err(Error::AlreadySettled { .. })));
    expect_nothing(&*consumer, s.timing.lease * 2, "a second settlement changed the outcome").await;
}

/// A payload over the limit fails before any I/O, naming size and limit.
pub async fn oversized_payload_fails_before_io(h: &dyn Harness) {
    let s = setup(h, "oversize").await;
    let limit = s.caps().max_payload;
    let started = Instant::now();
    match s.broker.send(&s.destination, Message::new(vec![7u8; limit + 1])).await {
        Err(Error::PayloadTooLarge { size, limit: l, .. }) => assert_eq!((size, l), (limit + 1, limit)),
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    let batch = vec![Message::new("ok"), Message::new(vec![7u8; limit + 1])];
    assert!(matches!(s.broker.send_batch(&s.destination, batch).await, Err(Error::PayloadTooLarge { .. })));
    let consumer = s.consumer(Default::default()).await;
    expect_nothing(&*consumer, s.timing.quiet, "part of a refused batch was sent").await;
    // Before I/O: a refusal is a local check, far quicker than any broker round trip.
    assert!(started.elapsed() < s.timing.arrive_within, "the refusal took {:?}", started.elapsed());
}

/// Invalid names and features the backend lacks give clear errors.
pub async fn invalid_names_and_unsupported_features_are_clear_errors(h: &dyn Harness) {
    let case = "invalid_names_and_unsupported_features_are_clear_errors";
    for bad in ["", "has space", "slash/y", "ü"] {
        let err = Destination::queue(bad).unwrap_err();
        assert!(matches!(err, Error::InvalidName { .. }) && err.to_string().contains("invalid queue name"), "{err}");
    }
    assert!(Name::new("topic", &"t".repeat(crate::MAX_NAME_LEN + 1)).is_err());
    let s = setup(h, "unsupported").await;
    let caps = s.caps().clone();
    let mut refused = Vec::new();
    for feature in [Feature::Stats, Feature::Purge] {
        let result = match feature {
            Feature::Stats => s.broker.stats(&s.source).await.map(|_| ()),
            _ => s.broker.purge(&s.source).await.map(|_| ()),
        };
        if caps.supports(feature) {
            result.unwrap_or_else(|e| panic!("{feature} is advertised but failed: {e}"));
        } else {
            expect_unsupported(&feature.to_string(), result, feature);
            refused.push(feature);
        }
    }
    for f in refused {
        note_unsupported(case, &caps, f);
    }
    let err = caps.unsupported(Feature::FanOut).to_string();
    assert!(err.contains(caps.backend) && err.contains("does not support"), "{err}");
}

/// An empty source waits for the whole wait and returns nothing, without error.
pub async fn empty_source_waits_quietly(h: &dyn Harness) {
    let s = setup(h, "empty").await;
    let consumer = s.consumer(Default::default()).await;
    let wait = s.timing.quiet.max(Duration::from_millis(200));
    let started = Instant::now();
    let got = consumer.receive(10, wait).await.expect("an empty receive is not an error");
    assert!(got.is_empty());
    assert!(started.elapsed() >= wait.mul_f32(0.9), "returned after {:?} of a {wait:?} wait", started.elapsed());
}

/// Calls on closed consumers and brokers fail with `Closed`.
pub async fn closed_handles_refuse_work(h: &dyn Harness) {
    let s = setup(h, "closed").await;
    let consumer = s.consumer(Default::default()).await;
    consumer.close().await.expect("close consumer");
    assert!(matches!(consumer.receive(1, Duration::from_millis(10)).await, Err(Error::Closed { .. })));
    s.broker.close().await.expect("close broker");
    assert!(matches!(s.broker.send(&s.destination, Message::new("x")).await, Err(Error::Closed { .. })));
    assert!(matches!(s.broker.consumer(&s.source, Default::default()).await.map(|_| ()), Err(Error::Closed { .. })));
}

/// A poison message costs only itself: rejected, it goes to the dead-letter destination
/// with a reason, and the messages around it are delivered and settled as usual.
pub async fn a_poison_message_costs_only_itself(h: &dyn Harness) {
    let s = setup(h, "poison").await;
    let consumer = s.consumer(ConsumerOptions::default()).await;
    let dlq = s.dead_letters().await;
    for i in 0..5 {
        s.send(Message::new(format!("good {i}"))).await;
    }
    s.send(Message::new(vec![0xffu8, 0x00, 0xfe]).with_id("poison")).await;
    for i in 5..10 {
        s.send(Message::new(format!("good {i}"))).await;
    }
    let got = receive_n(&*consumer, 11, s.timing.arrive_within).await;
    assert_eq!(got.len(), 11, "every message delivered, the poison one among them");
    for d in got {
        if d.id.as_str() == "poison" {
            d.reject("cannot decode: not UTF-8").await.expect("reject");
        } else {
            d.ack().await.expect("ack");
        }
    }
    let dead = expect_one(&*dlq, s.timing.arrive_within, "the dead letter").await;
    assert_eq!(dead.id.as_str(), "poison");
    assert_eq!(dead.header(headers::DEAD_LETTER_REASON), Some("cannot decode: not UTF-8"));
    dead.ack().await.unwrap();
    expect_nothing(&*consumer, s.timing.quiet, "a settled message came back").await;
}

/// A delivery whose settlement failed for good is dropped unsettled: it comes back (the
/// backend hands it back, or its lease runs out), and holds up nothing meanwhile.
pub async fn a_delivery_dropped_unsettled_comes_back(h: &dyn Harness) {
    let s = setup(h, "dropped").await;
    let consumer = s.consumer(ConsumerOptions::default().lease(s.timing.lease)).await;
    s.send(Message::new("first").with_id("first")).await;
    s.send(Message::new("second").with_id("second")).await;
    let got = receive_n(&*consumer, 2, s.timing.arrive_within).await;
    assert_eq!(got.len(), 2);
    for d in got {
        if d.id.as_str() == "first" {
            drop(d); // as after a settlement that failed for good
        } else {
            d.ack().await.expect("the other one settles as usual");
        }
    }
    let again = expect_one(&*consumer, s.timing.arrive_within + s.timing.lease, "the dropped delivery").await;
    assert_eq!(again.id.as_str(), "first");
    assert!(again.attempt() >= 2, "a new attempt: {}", again.attempt());
    again.ack().await.expect("ack");
    expect_nothing(&*consumer, s.timing.quiet, "a settled message came back").await;
}

/// A send to one subscription reaches it alone, not its topic's other subscriptions:
/// redriving a subscription's dead letter must not copy it to every subscription.
pub async fn a_send_to_one_subscription_reaches_it_alone(h: &dyn Harness) {
    let case = "a_send_to_one_subscription_reaches_it_alone";
    let s = setup(h, "subsend").await;
    let topic = unique_name("topic");
    let (billing, shipping) =
        (Source::subscription(&topic, "billing").unwrap(), Source::subscription(&topic, "shipping").unwrap());
    if !s.caps().fan_out || !s.caps().subscription_send {
        note_unsupported(case, s.caps(), Feature::SubscriptionSend);
        expect_unsupported(
            "send to one subscription",
            s.broker.send_to_source(&billing, Message::new("x")).await,
            if s.caps().fan_out { Feature::SubscriptionSend } else { Feature::FanOut },
        );
        return;
    }
    for sub in [&billing, &shipping] {
        s.broker.declare(sub).await.expect("declare subscription");
    }
    let id = s.broker.send_to_source(&billing, Message::new("billing only")).await.expect("send to one subscription");
    let to_billing = s.broker.consumer(&billing, Default::default()).await.expect("consumer");
    let got = expect_one(&*to_billing, s.timing.arrive_within, "the message").await;
    assert_eq!(got.id, id);
    got.ack().await.unwrap();
    let to_shipping = s.broker.consumer(&shipping, Default::default()).await.expect("consumer");
    assert!(
        to_shipping.receive(10, s.timing.quiet).await.unwrap().is_empty(),
        "another subscription of the topic got a copy"
    );
}

/// Statistics count waiting, in-flight, delayed and dead-lettered messages.
pub async fn stats_count_what_is_held(h: &dyn Harness) {
    let case = "stats_count_what_is_held";
    let s = setup(h, "stats").await;
    if !s.caps().stats {
        note_unsupported(case, s.caps(), Feature::Stats);
        expect_unsupported("stats", s.broker.stats(&s.source).await, Feature::Stats);
        return;
    }
    for i in 0..3 {
        s.send(Message::new(format!("{i}"))).await;
    }
    let consumer = s.consumer(Default::default()).await;
    let d = expect_one(&*consumer, s.timing.arrive_within, "a message").await;
    let stats = s.broker.stats(&s.source).await.unwrap();
    assert_eq!((stats.depth, stats.in_flight), (2, 1), "{stats:?}");
    d.reject("counted").await.unwrap();
    let stats = s.broker.stats(&s.source).await.unwrap();
    assert_eq!((stats.depth, stats.in_flight, stats.dead_lettered), (2, 0, 1), "{stats:?}");
    if s.caps().purge {
        assert_eq!(s.broker.purge(&s.source).await.unwrap(), 2);
        assert_eq!(s.broker.stats(&s.source).await.unwrap().depth, 0);
    }
}

/// Expands to one `#[tokio::test]` per conformance case, each given the harness
/// expression. The calling crate needs `tokio` (with `macros` and `rt-multi-thread`) as a
/// dev-dependency.
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::conformance_tests!(@cases $harness;
            round_trip_preserves_the_message,
            send_returns_the_id_it_delivers,
            batch_send_and_receive,
            ack_removes_for_good,
            retry_redelivers_with_next_attempt,
            retry_with_delay_waits,
            reject_goes_to_dead_letter,
            lease_expiry_redelivers,
            lease_extension_prevents_redelivery,
            max_attempts_then_dead_letter_once,
            competing_consumers_split_the_work,
            every_subscription_gets_every_message,
            a_send_to_one_subscription_reaches_it_alone,
            a_poison_message_costs_only_itself,
            a_delivery_dropped_unsettled_comes_back,
            per_key_order_and_failing_key_isolation,
            dedup_drops_repeats,
            delayed_send_waits,
            many_consumers_random_failures_lose_nothing,
            closing_a_consumer_hands_back_its_deliveries,
            double_settlement_is_an_error,
            oversized_payload_fails_before_io,
            invalid_names_and_unsupported_features_are_clear_errors,
            empty_source_waits_quietly,
            closed_handles_refuse_work,
            stats_count_what_is_held,
        );
    };
    (@cases $harness:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let harness = $harness;
                $crate::conformance::$case(&harness).await;
            }
        )*
    };
}
