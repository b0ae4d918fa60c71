//! # courier-local
//!
//! Courier's in-process backend. Not a test double: it keeps every clause of the
//! contract with every capability on — competing consumers, topics with subscriptions,
//! ack/retry/reject, leases that expire and can be extended, attempt counting and
//! dead-lettering, delayed messages, per-key FIFO, a dedup window, bounded capacity
//! with backpressure, purge and statistics. The contract is `docs/contract.md` in the
//! repository; core's receipt decides retry versus dead letter, and this backend counts
//! the attempts only it sees (a lease that expired) against the same policy.
//!
//! ```
//! use std::time::Duration;
//! use courier_core::{Broker, ConsumerOptions, Destination, Message, Source};
//! use courier_local::LocalBroker;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), courier_core::Error> {
//! let broker = LocalBroker::new();
//! let source = Source::queue("orders")?;
//! let consumer = broker.consumer(&source, ConsumerOptions::default()).await?;
//!
//! broker.send(&Destination::queue("orders")?, Message::new("order #1")).await?;
//! let delivery = consumer.receive_one(Duration::from_secs(1)).await?.expect("a message");
//! assert_eq!(&delivery.payload[..], b"order #1");
//! delivery.ack().await?;
//! # Ok(()) }
//! ```
//!
//! Timers (delays, leases) run on one task per queue that sleeps until the next
//! deadline, so the broker must be used inside a tokio runtime.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod entry;
mod lane;
mod queue;
mod tag_table;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use courier_core::backend::{BackendUrl, OpenGuard};
use courier_core::{
    Broker, Capabilities, Consumer, ConsumerOptions, DeadLetter, Delivery, Destination, Error, Message, MessageId,
    Name, Result, SettlePolicy, Source, Stats, TaggedAcknowledger,
};
use tokio::time::Instant;

use entry::{Entry, IdTimes};
use lane::Lane;
use queue::{DeadEntry, Queue};

/// What a send does when a destination with a capacity is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhenFull {
    /// Wait for room (backpressure).
    #[default]
    Wait,
    /// Fail at once with the retryable [`Error::Full`].
    Error,
}

/// Settings of a [`LocalBroker`].
///
/// ```
/// use courier_local::{LocalConfig, WhenFull};
///
/// let config = LocalConfig::from_url("memory://?capacity=1000&when_full=error")?;
/// assert_eq!(config.capacity, Some(1000));
/// assert_eq!(config.when_full, WhenFull::Error);
/// # Ok::<(), courier_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Most messages each queue or subscription holds (ready, in flight and delayed);
    /// `None`: unbounded. Dead letters always get in.
    pub capacity: Option<usize>,
    /// What a send to a full destination does.
    pub when_full: WhenFull,
    /// How long a dedup id is remembered.
    pub dedup_window: Duration,
    /// The largest payload accepted, in bytes.
    pub max_payload: usize,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            capacity: None,
            when_full: WhenFull::Wait,
            dedup_window: Duration::from_secs(300),
            max_payload: 64 * 1024 * 1024,
        }
    }
}

impl LocalConfig {
    /// Reads settings from a `memory://` URL's query: `capacity` (messages),
    /// `when_full` (`wait` or `error`), `dedup_window_secs`, `max_payload` (bytes).
    /// Other options are errors, as are a host, credentials or a path.
    pub fn from_url(url: &str) -> Result<Self> {
        Self::from_backend_url(BackendUrl::parse(url)?)
    }

    /// Reads settings from a parsed `memory://` URL (see [`from_url`](Self::from_url)).
    pub fn from_backend_url(mut url: BackendUrl) -> Result<Self> {
        url.expect_scheme("in-process", &["memory"])?;
        if url.user().is_some() || !url.hosts().is_empty() || url.path().is_some_and(|p| !p.is_empty()) {
            return Err(url.error(format!(
                "{} names a host, credentials or a path, which the in-process backend does not take; write memory://?options",
                url.redacted()
            )));
        }
        let defaults = LocalConfig::default();
        let options = url.options();
        let config = LocalConfig {
            capacity: options.take_number("capacity", ..)?,
            when_full: options
                .take_enum("when_full", &[("wait", WhenFull::Wait), ("error", WhenFull::Error)])?
                .unwrap_or(defaults.when_full),
            dedup_window: options.take_secs("dedup_window_secs", ..)?.unwrap_or(defaults.dedup_window),
            max_payload: options.take_number("max_payload", ..)?.unwrap_or(defaults.max_payload),
        };
        options.finish()?;
        Ok(config)
    }
}

/// The in-process broker. Cheap to clone: clones share the same queues.
#[derive(Clone, Debug)]
pub struct LocalBroker {
    inner: Arc<BrokerInner>,
}

type Subscriptions = Arc<RwLock<BTreeMap<Name, Arc<Queue>>>>;

pub(crate) struct BrokerInner {
    caps: Capabilities,
    config: LocalConfig,
    queues: RwLock<HashMap<Name, Arc<Queue>>>,
    topics: RwLock<HashMap<Name, Subscriptions>>,
    dedup: Mutex<DedupWindows>,
    open: OpenGuard,
    me: std::sync::Weak<BrokerInner>,
}

impl std::fmt::Debug for BrokerInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBroker").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Default for LocalBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalBroker {
    /// A broker with default settings: unbounded queues, a 5-minute dedup window.
    pub fn new() -> Self {
        Self::with_config(LocalConfig::default())
    }

    /// A broker with `config`.
    pub fn with_config(config: LocalConfig) -> Self {
        let caps = Capabilities { max_payload: config.max_payload, ..Capabilities::all("local") };
        let inner = Arc::new_cyclic(|me| BrokerInner {
            caps,
            config,
            queues: RwLock::default(),
            topics: RwLock::default(),
            dedup: Mutex::default(),
            open: OpenGuard::new("broker"),
            me: me.clone(),
        });
        LocalBroker { inner }
    }

    /// A broker configured by a `memory://` URL (see [`LocalConfig::from_url`]).
    pub fn from_url(url: &str) -> Result<Self> {
        Ok(Self::with_config(LocalConfig::from_url(url)?))
    }

    /// A broker configured by a parsed `memory://` URL (see [`LocalConfig::from_url`]).
    pub fn from_backend_url(url: BackendUrl) -> Result<Self> {
        Ok(Self::with_config(LocalConfig::from_backend_url(url)?))
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

impl BrokerInner {
    fn new_queue(&self, source: Source) -> Arc<Queue> {
        Queue::start(source, self.config.capacity, self.config.when_full, self.me.clone())
    }

    fn queue(&self, name: &Name) -> Arc<Queue> {
        if let Some(q) = read(&self.queues).get(name) {
            return q.clone();
        }
        write(&self.queues).entry(name.clone()).or_insert_with(|| self.new_queue(Source::Queue(name.clone()))).clone()
    }

    fn topic(&self, name: &Name) -> Subscriptions {
        if let Some(t) = read(&self.topics).get(name) {
            return t.clone();
        }
        write(&self.topics).entry(name.clone()).or_default().clone()
    }

    /// The queue a source reads, created if missing.
    fn source_queue(&self, source: &Source) -> Arc<Queue> {
        match source {
            Source::Queue(name) => self.queue(name),
            Source::Subscription { topic, subscription } => {
                let subs = self.topic(topic);
                if let Some(q) = read(&subs).get(subscription) {
                    return q.clone();
                }
                let mut subs = write(&subs);
                subs.entry(subscription.clone()).or_insert_with(|| self.new_queue(source.clone())).clone()
            }
        }
    }

    /// The queues a send to `destination` lands in.
    fn targets(&self, destination: &Destination) -> Vec<Arc<Queue>> {
        match destination {
            Destination::Queue(name) => vec![self.queue(name)],
            Destination::Topic(name) => read(&self.topic(name)).values().cloned().collect(),
        }
    }

    /// Drops messages whose dedup id was seen within the window; returns the ids to
    /// report for every message (a duplicate reports the first one's id), and the
    /// dedup ids recorded by this send, to be forgotten if the send does not complete.
    ///
    /// Ids are recorded here, before room is reserved, so that two sends of the same id
    /// racing for room cannot both get in; [`DedupRecord`] takes them back out when the
    /// send fails or is cancelled, so a retried send is not taken for a duplicate.
    fn dedup(
        &self,
        destination: &Destination,
        messages: &mut Vec<Message>,
    ) -> Option<(Vec<MessageId>, DedupRecord<'_>)> {
        if messages.iter().all(|m| m.dedup_id.is_none()) {
            return None;
        }
        let mut windows = self.dedup.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        windows.sweep(now, self.config.dedup_window);
        let window = windows.by_destination.entry(destination.clone()).or_default();
        window.expire(now, self.config.dedup_window);
        let mut ids = Vec::with_capacity(messages.len());
        let mut recorded = Vec::new();
        messages.retain(|m| {
            let Some(dedup_id) = &m.dedup_id else {
                ids.push(m.id.clone());
                return true;
            };
            match window.seen.get(dedup_id) {
                Some(first) => {
                    ids.push(first.clone());
                    false
                }
                None => {
                    window.seen.insert(dedup_id.clone(), m.id.clone());
                    window.order.push_back((now, dedup_id.clone()));
                    recorded.push((dedup_id.clone(), m.id.clone()));
                    ids.push(m.id.clone());
                    true
                }
            }
        });
        let record = DedupRecord { broker: self, destination: destination.clone(), at: now, recorded, kept: false };
        Some((ids, record))
    }

    async fn send_all(&self, destination: &Destination, mut messages: Vec<Message>) -> Result<Vec<MessageId>> {
        self.open.check()?;
        self.caps.check_batch(&messages)?;
        let (ids, record) = match self.dedup(destination, &mut messages) {
            Some((ids, record)) => (ids, Some(record)),
            None => (messages.iter().map(|m| m.id.clone()).collect(), None),
        };
        if messages.is_empty() {
            return Ok(ids);
        }
        let targets = self.targets(destination);
        // All or nothing: reserve room in every target before adding anywhere. A failed
        // or cancelled reservation drops `record`, which forgets this send's dedup ids.
        let mut reserved = Reserved { targets: &targets, done: 0, n: messages.len() };
        for q in &targets {
            q.reserve(messages.len()).await?;
            reserved.done += 1;
        }
        reserved.done = 0;
        if let Some(record) = record {
            record.keep();
        }
        if let Some((last, others)) = targets.split_last() {
            let mut times = IdTimes::default();
            for q in others {
                q.push(messages.iter().map(|m| (Entry::from_message(m.clone(), &mut times), m.delay)));
            }
            last.push(messages.into_iter().map(|m| {
                let delay = m.delay;
                (Entry::from_message(m, &mut times), delay)
            }));
        }
        Ok(ids)
    }

    pub(crate) fn deliver_dead_letter(&self, dead: DeadEntry) -> Result<()> {
        let to = dead.letter.destination().clone();
        let mut entry = queue::dead_letter_entry(dead);
        let targets = self.targets(&to);
        if let Some((last, others)) = targets.split_last() {
            for q in others {
                q.push_dead_letter(entry.share());
            }
            last.push_dead_letter(entry);
        }
        Ok(())
    }

    fn existing_queue(&self, source: &Source) -> Result<Arc<Queue>> {
        let missing = |kind, name: &Name| Error::NotFound { kind, name: name.to_string() };
        match source {
            Source::Queue(name) => read(&self.queues).get(name).cloned().ok_or_else(|| missing("queue", name)),
            Source::Subscription { topic, subscription } => {
                let subs = read(&self.topics).get(topic).cloned().ok_or_else(|| missing("topic", topic))?;
                let q = read(&subs).get(subscription).cloned();
                q.ok_or_else(|| missing("subscription", subscription))
            }
        }
    }
}

/// Room reserved in the first `done` targets, given back unless the send completes
/// (a reservation that failed, or a send cancelled while it waited for room).
struct Reserved<'a> {
    targets: &'a [Arc<Queue>],
    done: usize,
    n: usize,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        for q in &self.targets[..self.done] {
            q.unreserve(self.n);
        }
    }
}

/// The dedup ids a send recorded; forgotten when dropped before [`keep`](Self::keep), so
/// a send that failed (`Full`) or was cancelled can be retried with the same id.
struct DedupRecord<'a> {
    broker: &'a BrokerInner,
    destination: Destination,
    at: Instant,
    recorded: Vec<(String, MessageId)>,
    kept: bool,
}

impl DedupRecord<'_> {
    /// The messages are stored: their dedup ids stay for the window.
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for DedupRecord<'_> {
    fn drop(&mut self) {
        if self.kept || self.recorded.is_empty() {
            return;
        }
        let mut windows = self.broker.dedup.lock().unwrap_or_else(|p| p.into_inner());
        let Some(window) = windows.by_destination.get_mut(&self.destination) else { return };
        for (dedup_id, id) in &self.recorded {
            if window.seen.get(dedup_id) == Some(id) {
                window.seen.remove(dedup_id);
            }
        }
        // Their place in the expiry order goes too, so it cannot expire a later record.
        let at = self.at;
        let recorded = &self.recorded;
        window.order.retain(|(t, dedup_id)| *t != at || !recorded.iter().any(|(d, _)| d == dedup_id));
    }
}

/// The dedup ids remembered per destination. Bounded: ids leave when their window
/// ends, for every destination (not only those sent to again), and a destination keeps
/// at most [`MAX_DEDUP_IDS`] (the oldest go first: past that rate, the window is shorter).
#[derive(Default)]
struct DedupWindows {
    by_destination: HashMap<Destination, DedupWindow>,
    last_sweep: Option<Instant>,
}

/// Dedup ids one destination remembers at most (about 100 MB of ids of 64 bytes).
const MAX_DEDUP_IDS: usize = 1_000_000;

impl DedupWindows {
    /// Expires every destination's old ids, at most once a second, and forgets
    /// destinations left with none.
    fn sweep(&mut self, now: Instant, window: Duration) {
        if self.last_sweep.is_some_and(|at| now.duration_since(at) < Duration::from_secs(1)) {
            return;
        }
        self.last_sweep = Some(now);
        self.by_destination.retain(|_, w| {
            w.expire(now, window);
            !w.order.is_empty()
        });
    }
}

#[derive(Default)]
struct DedupWindow {
    seen: HashMap<String, MessageId>,
    order: VecDeque<(Instant, String)>,
}

impl DedupWindow {
    fn expire(&mut self, now: Instant, window: Duration) {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < window && self.order.len() <= MAX_DEDUP_IDS {
                break;
            }
            let (_, id) = self.order.pop_front().expect("peeked");
            self.seen.remove(&id);
        }
    }
}

#[async_trait]
impl Broker for LocalBroker {
    fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    async fn send(&self, destination: &Destination, message: Message) -> Result<MessageId> {
        let mut ids = self.inner.send_all(destination, vec![message]).await?;
        Ok(ids.pop().expect("one id per message"))
    }

    async fn send_batch(&self, destination: &Destination, messages: Vec<Message>) -> Result<Vec<MessageId>> {
        self.inner.send_all(destination, messages).await
    }

    async fn consumer(&self, source: &Source, options: ConsumerOptions) -> Result<Box<dyn Consumer>> {
        self.inner.open.check()?;
        let queue = self.inner.source_queue(source);
        let settle = options.settle_policy(source);
        let lane = queue.open_lane(options.lease, settle);
        let handle = Arc::new(ConsumerHandle { queue, lane });
        Ok(Box::new(LocalConsumer { handle, source: source.clone(), open: OpenGuard::new("consumer") }))
    }

    async fn declare(&self, source: &Source) -> Result<()> {
        self.inner.open.check()?;
        self.inner.source_queue(source);
        Ok(())
    }

    async fn send_to_source(&self, source: &Source, message: Message) -> Result<MessageId> {
        if let Source::Queue(name) = source {
            return self.send(&Destination::Queue(name.clone()), message).await;
        }
        self.inner.open.check()?;
        self.inner.caps.check_message(&message)?;
        let queue = self.inner.existing_queue(source)?;
        queue.reserve(1).await?;
        let (id, delay) = (message.id.clone(), message.delay);
        queue.push(std::iter::once((Entry::from_message(message, &mut IdTimes::default()), delay)));
        Ok(id)
    }

    async fn stats(&self, source: &Source) -> Result<Stats> {
        self.inner.open.check()?;
        Ok(self.inner.existing_queue(source)?.stats())
    }

    async fn purge(&self, source: &Source) -> Result<u64> {
        self.inner.open.check()?;
        Ok(self.inner.existing_queue(source)?.purge())
    }

    async fn close(&self) -> Result<()> {
        self.inner.open.close();
        let mut queues: Vec<Arc<Queue>> = read(&self.inner.queues).values().cloned().collect();
        for subs in read(&self.inner.topics).values() {
            queues.extend(read(subs).values().cloned());
        }
        for q in queues {
            q.close();
        }
        Ok(())
    }
}

/// What a consumer's deliveries point to. Each delivery clones this `Arc` rather than
/// the queue's: the queue's reference count shares a cache line with its lock, which
/// producers take, and per-delivery count updates there slow both sides down.
struct ConsumerHandle {
    queue: Arc<Queue>,
    /// The consumer's own part of the queue: its deliveries, their leases and the
    /// consumer's settle policy.
    lane: Arc<Lane>,
}

struct LocalConsumer {
    handle: Arc<ConsumerHandle>,
    source: Source,
    open: OpenGuard,
}

#[async_trait]
impl Consumer for LocalConsumer {
    fn source(&self) -> &Source {
        &self.source
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let mut batch = Vec::new();
        self.receive_into(max, wait, &mut batch).await?;
        Ok(batch)
    }

    async fn receive_into(&self, max: usize, wait: Duration, into: &mut Vec<Delivery>) -> Result<usize> {
        let handle = &self.handle;
        let deliver = |tag, attempt, message| Delivery::tagged(message, attempt, handle.clone(), tag);
        handle.queue.take(&handle.lane, max, wait, &self.open, into, deliver).await
    }

    async fn close(&self) -> Result<()> {
        if self.open.close() {
            self.handle.queue.release_lane(&self.handle.lane);
        }
        Ok(())
    }
}

/// One acknowledger for all of a consumer's deliveries, each told apart by its tag: no
/// box per delivery.
#[async_trait]
impl TaggedAcknowledger for ConsumerHandle {
    fn policy(&self) -> &SettlePolicy {
        &self.lane.settle
    }

    async fn ack(&self, tag: u64, id: &MessageId) -> Result<()> {
        self.queue.ack(&self.lane, tag, id)
    }

    fn ack_now(&self, tag: u64, id: &MessageId) -> Option<Result<()>> {
        Some(self.queue.ack(&self.lane, tag, id))
    }

    fn ack_all_now(&self, deliveries: &[(u64, &MessageId)]) -> Option<Vec<Result<()>>> {
        Some(self.queue.ack_all(&self.lane, deliveries))
    }

    async fn redeliver(&self, tag: u64, id: &MessageId, delay: Option<Duration>) -> Result<()> {
        self.queue.redeliver(&self.lane, tag, id, delay)
    }

    async fn dead_letter(&self, tag: u64, id: &MessageId, letter: &DeadLetter) -> Result<()> {
        self.queue.dead_letter_now(&self.lane, tag, id, letter)
    }

    async fn extend_lease(&self, tag: u64, id: &MessageId, by: Duration) -> Result<()> {
        self.queue.extend(&self.lane, tag, id, by)
    }

    fn release(&self, tag: u64, id: &MessageId) {
        // Back to the queue now rather than after its lease; a delivery already settled
        // or expired is not in flight, and there is nothing to do.
        let _ = self.queue.redeliver(&self.lane, tag, id, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Consumers dropped without closing leave no lane behind once they hold nothing,
    /// and one that still holds a delivery keeps its lane for the timer until then.
    #[tokio::test]
    async fn lanes_of_consumers_dropped_unclosed_do_not_pile_up() {
        let broker = LocalBroker::new();
        let source = Source::queue("q").unwrap();
        broker.send(&source.destination(), Message::new("held")).await.unwrap();
        let holder = broker.consumer(&source, ConsumerOptions::default()).await.unwrap();
        let held = holder.receive_one(Duration::from_secs(1)).await.unwrap().expect("delivered");
        drop(holder);
        for _ in 0..100 {
            drop(broker.consumer(&source, ConsumerOptions::default()).await.unwrap());
        }
        let queue = broker.inner.existing_queue(&source).unwrap();
        assert_eq!(queue.lane_count(), 2, "the holder's lane and the last one opened");
        held.ack().await.unwrap();
        drop(held);
        drop(broker.consumer(&source, ConsumerOptions::default()).await.unwrap());
        assert_eq!(queue.lane_count(), 1, "only the last one opened");
    }

    /// Dedup ids leave with their window for every destination, not only for those sent
    /// to again: a stream of one-off destinations does not grow the map for ever.
    #[tokio::test]
    async fn dedup_ids_of_destinations_never_sent_to_again_are_freed() {
        let config = LocalConfig { dedup_window: Duration::from_millis(10), ..LocalConfig::default() };
        let broker = LocalBroker::with_config(config);
        for i in 0..100 {
            let to = Destination::queue(&format!("once-{i}")).unwrap();
            broker.declare(&Source::Queue(to.name().clone())).await.unwrap();
            broker.send(&to, Message::new("x").with_dedup_id(format!("d{i}"))).await.unwrap();
        }
        assert_eq!(broker.inner.dedup.lock().unwrap().by_destination.len(), 100);
        tokio::time::sleep(Duration::from_millis(1100)).await; // past the window and the sweep interval
        let last = Destination::queue("last").unwrap();
        broker.declare(&Source::queue("last").unwrap()).await.unwrap();
        broker.send(&last, Message::new("x").with_dedup_id("d")).await.unwrap();
        assert_eq!(broker.inner.dedup.lock().unwrap().by_destination.len(), 1, "only the live window is left");
    }
}
