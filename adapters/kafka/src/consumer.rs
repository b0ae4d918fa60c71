//! Consumers: a group member reading the source topic and its retry topic, handing out
//! messages one per key at a time, and committing only what is settled.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use courier_core::{
    Acknowledger, Consumer, ConsumerOptions, DeadLetter, Delivery, Error, Feature, Message, MessageId, Result,
    SettlePolicy, Source,
};
use futures::FutureExt;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::{ClientContext, Message as _, Offset, TopicPartitionList};
use tokio::time::Instant;

use crate::mapping::{self, Received};
use crate::offsets::PartitionOffsets;
use crate::{kafka_error, settings_error, Inner};

/// How long a key stays held for a retried message whose copy does not come back (its
/// retry partition went to another consumer): the copy's due time plus this.
const LOCK_GRACE: Duration = Duration::from_secs(30);
/// Records read ahead of the handlers, at most, before reading pauses.
const READ_AHEAD: usize = 10_000;
/// Bytes of records read ahead, at most, before reading pauses: 10,000 records of 1 MB
/// would otherwise be 10 GB. (librdkafka's own queue has its bound too:
/// `queued.max.messages.kbytes`, 64 MiB by default.)
const READ_AHEAD_BYTES: usize = 64 * 1024 * 1024;
/// The longest a retry copy waits on the retry topic. The copy waits in this consumer's
/// memory and holds its retry partition's commit position meanwhile, so a longer
/// `retry_after` is cut to this, and a retry-topic record due later (not written by
/// Courier) is due after this.
pub(crate) const MAX_RETRY_DELAY: Duration = Duration::from_secs(15 * 60);

type StreamHandle = StreamConsumer<Rebalancer>;

/// A record received and not yet handed out.
struct Pending {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    received: Received,
    from_retry: bool,
}

/// Who holds a key: its message in flight or being retried.
struct KeyLock {
    holder: MessageId,
    /// Set while the holder is away on the retry topic: the key frees itself after this.
    expires: Option<Instant>,
}

#[derive(Default)]
struct State {
    /// Bumped when partitions are revoked: settlements of older deliveries no longer count.
    generation: u64,
    partitions: HashMap<(Arc<str>, i32), PartitionOffsets>,
    ready: VecDeque<Pending>,
    /// Messages waiting for their key, per (partition, key).
    parked: HashMap<(i32, String), VecDeque<Pending>>,
    locks: HashMap<(i32, String), KeyLock>,
    /// Retry copies waiting for their time.
    delayed: Vec<(Instant, Pending)>,
    /// Handed out and unsettled, per partition and in all.
    handed_out: HashMap<(Arc<str>, i32), usize>,
    in_flight: usize,
    /// Bytes held in `ready`, `parked` and `delayed`.
    buffered_bytes: usize,
}

impl State {
    fn buffered(&self) -> usize {
        self.ready.len() + self.delayed.len() + self.parked.values().map(VecDeque::len).sum::<usize>()
    }

    /// Whether to read more records: the buffer has room in records and in bytes.
    fn wants_more(&self) -> bool {
        self.buffered() < READ_AHEAD && self.buffered_bytes < READ_AHEAD_BYTES
    }

    /// Recounts `buffered_bytes` after records were dropped wholesale.
    fn recount_bytes(&mut self) {
        let ready = self.ready.iter().map(|p| p.received.size()).sum::<usize>();
        let delayed = self.delayed.iter().map(|(_, p)| p.received.size()).sum::<usize>();
        let parked = self.parked.values().flatten().map(|p| p.received.size()).sum::<usize>();
        self.buffered_bytes = ready + delayed + parked;
    }

    fn next_due(&self) -> Option<Instant> {
        self.delayed.iter().map(|(due, _)| *due).min()
    }

    /// Moves retry copies whose time has come to the front of the queue.
    fn release_due(&mut self, now: Instant) {
        let mut due: Vec<(Instant, Pending)> = Vec::new();
        let mut i = 0;
        while i < self.delayed.len() {
            if self.delayed[i].0 <= now {
                due.push(self.delayed.swap_remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
        for (_, p) in due {
            self.ready.push_front(p);
        }
    }

    /// Whether `p` may go out now (taking its key), or must wait behind its key.
    fn take_key(&mut self, p: &Pending, now: Instant) -> bool {
        let Some(key) = &p.received.message.ordering_key else { return true };
        let slot = (p.partition, key.clone());
        let id = &p.received.message.id;
        let free = match self.locks.get(&slot) {
            None => true,
            Some(lock) => &lock.holder == id || p.from_retry || lock.expires.is_some_and(|at| at <= now),
        };
        if free {
            self.locks.insert(slot, KeyLock { holder: id.clone(), expires: None });
        }
        free
    }

    /// Frees `key` if `id` holds it, and readies the key's next waiting message.
    fn release_key(&mut self, partition: i32, key: &str, id: &MessageId) {
        let slot = (partition, key.to_owned());
        if self.locks.get(&slot).is_some_and(|l| &l.holder == id) {
            self.locks.remove(&slot);
            if let Some(waiting) = self.parked.get_mut(&slot) {
                if let Some(next) = waiting.pop_front() {
                    self.ready.push_front(next);
                }
                if waiting.is_empty() {
                    self.parked.remove(&slot);
                }
            }
        }
    }

    /// Forgets everything of `revoked` partitions (all, for `None`), returning the
    /// positions to commit for them.
    fn revoke(&mut self, revoked: Option<&[(String, i32)]>) -> Vec<(Arc<str>, i32, i64)> {
        let hit = |topic: &str, partition: i32| {
            revoked.is_none_or(|list| list.iter().any(|(t, p)| t == topic && *p == partition))
        };
        self.generation += 1;
        let mut positions = Vec::new();
        self.partitions.retain(|(topic, partition), offsets| {
            if !hit(topic, *partition) {
                return true;
            }
            if let Some(position) = offsets.position() {
                positions.push((topic.clone(), *partition, position));
            }
            false
        });
        self.ready.retain(|p| !hit(&p.topic, p.partition));
        self.delayed.retain(|(_, p)| !hit(&p.topic, p.partition));
        self.parked.retain(|_, q| {
            q.retain(|p| !hit(&p.topic, p.partition));
            !q.is_empty()
        });
        self.recount_bytes();
        // Keys are per partition number, shared by the source and its retry topic; a
        // lock left behind would park the key's messages for good once it comes back.
        self.locks.retain(|(partition, _), _| revoked.is_some_and(|list| list.iter().all(|(_, p)| p != partition)));
        let mut dropped = 0;
        self.handed_out.retain(|(topic, partition), n| {
            if hit(topic, *partition) {
                dropped += *n;
                false
            } else {
                true
            }
        });
        self.in_flight -= dropped.min(self.in_flight);
        positions
    }
}

/// What consumers, their deliveries and the rebalance callback share.
pub(crate) struct ConsumerShared {
    broker: Arc<Inner>,
    /// Core's policy: the source, the attempt limit and the dead-letter destination.
    policy: Arc<SettlePolicy>,
    retry_topic: String,
    /// Partitions of the retry topic (copies go to `partition % this`).
    retry_partitions: i32,
    prefetch: usize,
    state: Mutex<State>,
    /// Wakes a receive waiting for room under `prefetch` or for a key to free up.
    settled: tokio::sync::Notify,
    closing: AtomicBool,
    stream: OnceLock<Weak<StreamHandle>>,
    /// Held from reading a record until it is taken in: with several `receive` calls at
    /// once (a worker runs one per concurrency slot), records of a partition would
    /// otherwise be taken in out of order, and with them keys and committed positions.
    reading: tokio::sync::Mutex<()>,
}

impl ConsumerShared {
    /// Settles the delivery at `offset`: the offset may be committed once the ones before it are.
    fn settle(&self, d: &KafkaAcker, release_key: bool) -> Result<()> {
        let position = {
            let mut st = self.state.lock().unwrap();
            if d.generation != st.generation || self.closing.load(Ordering::Acquire) {
                return Err(Error::LeaseLost { id: d.message.id.clone() });
            }
            st.in_flight = st.in_flight.saturating_sub(1);
            if let Some(n) = st.handed_out.get_mut(&(d.topic.clone(), d.partition)) {
                *n = n.saturating_sub(1);
            }
            if release_key {
                if let Some(key) = &d.message.ordering_key {
                    st.release_key(d.partition, key, &d.message.id);
                }
            }
            st.partitions.get_mut(&(d.topic.clone(), d.partition)).and_then(|p| p.settled(d.offset))
        };
        if let Some(position) = position {
            if let Some(stream) = self.stream.get().and_then(Weak::upgrade) {
                // librdkafka commits stored positions every second, on revoke and on close.
                // A partition already revoked refuses the store; its new owner redelivers.
                // `store_offsets` takes the position to resume from, as committed; the
                // older `store_offset` takes the last processed offset and adds one.
                let mut store = TopicPartitionList::new();
                let _ = store.add_partition_offset(&d.topic, d.partition, Offset::Offset(position));
                if let Err(e) = stream.store_offsets(&store) {
                    tracing::debug!(topic = %d.topic, partition = d.partition, error = %e, "could not store an offset");
                }
            }
        }
        self.settled.notify_one();
        Ok(())
    }

    /// Takes back a delivery dropped unsettled (its settlement failed for good): its
    /// offset stays unsettled, so commits do not pass it; its prefetch slot is freed; the
    /// record comes again after a backoff that grows with its attempts (100 ms doubling,
    /// at most 30 s), still holding its key so that the key's later messages do not
    /// overtake it, while the partition's other keys flow on.
    fn hand_back(&self, d: &KafkaAcker) {
        let mut st = self.state.lock().unwrap();
        if d.generation != st.generation || self.closing.load(Ordering::Acquire) {
            return; // revoked or closing: the partition's next owner redelivers it
        }
        st.in_flight = st.in_flight.saturating_sub(1);
        if let Some(n) = st.handed_out.get_mut(&(d.topic.clone(), d.partition)) {
            *n = n.saturating_sub(1);
        }
        let backoff = Duration::from_millis(100).saturating_mul(1 << d.attempt.min(9)).min(Duration::from_secs(30));
        let received = Received {
            message: d.message.clone(),
            attempt: d.attempt.saturating_add(1),
            not_before: None,
            control: Vec::new(),
        };
        st.buffered_bytes += received.size();
        let from_retry = *d.topic == *self.retry_topic;
        let pending =
            Pending { topic: d.topic.clone(), partition: d.partition, offset: d.offset, received, from_retry };
        tracing::warn!(id = %d.message.id, topic = %d.topic, partition = d.partition, offset = d.offset, ?backoff, "an unsettled delivery was handed back; it comes again");
        st.delayed.push((Instant::now() + backoff, pending));
        drop(st);
        self.settled.notify_one();
    }

    /// Hands out up to `max` ready messages, within `prefetch`.
    fn take(self: &Arc<Self>, max: usize) -> Vec<Delivery> {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap();
        st.release_due(now);
        let room = self.prefetch.saturating_sub(st.in_flight).min(max);
        let mut out = Vec::new();
        let mut waiting = Vec::new();
        while out.len() < room {
            let Some(p) = st.ready.pop_front() else { break };
            if !st.take_key(&p, now) {
                waiting.push(p);
                continue;
            }
            st.in_flight += 1;
            st.buffered_bytes = st.buffered_bytes.saturating_sub(p.received.size());
            *st.handed_out.entry((p.topic.clone(), p.partition)).or_default() += 1;
            let acker = KafkaAcker {
                shared: self.clone(),
                topic: p.topic,
                partition: p.partition,
                offset: p.offset,
                generation: st.generation,
                attempt: p.received.attempt,
                message: p.received.message.clone(),
            };
            out.push(Delivery::new(p.received.message, p.received.attempt, Box::new(acker)));
        }
        for p in waiting {
            let key = p.received.message.ordering_key.clone().expect("only keyed messages wait");
            st.parked.entry((p.partition, key)).or_default().push_back(p);
        }
        out
    }

    /// Takes in a record just read.
    fn accept(&self, topic: &str, partition: i32, offset: i64, mut received: Received) {
        let mut st = self.state.lock().unwrap();
        let topic: Arc<str> = match st.partitions.keys().find(|(t, p)| &**t == topic && *p == partition) {
            Some((t, _)) => t.clone(),
            None => Arc::from(topic),
        };
        st.partitions.entry((topic.clone(), partition)).or_default().received(offset);
        let from_retry = *topic == *self.retry_topic;
        if !from_retry {
            received.as_data();
        }
        tracing::trace!(id = %received.message.id, %topic, partition, offset, generation = st.generation, "read");
        let due = received
            .not_before
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .filter(|wait| !wait.is_zero())
            .map(|wait| Instant::now() + wait.min(MAX_RETRY_DELAY));
        st.buffered_bytes += received.size();
        let pending = Pending { topic, partition, offset, received, from_retry };
        match due {
            Some(due) => st.delayed.push((due, pending)),
            None => st.ready.push_back(pending),
        }
    }
}

/// The group member's callbacks: on revoke, let handed-out messages finish, then commit.
pub(crate) struct Rebalancer {
    shared: Weak<ConsumerShared>,
    drain: Duration,
}

impl ClientContext for Rebalancer {
    // librdkafka's own log lines go to tracing, under this crate's target.
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        use RDKafkaLogLevel::*;
        match level {
            Emerg | Alert | Critical | Error => tracing::error!(facility, "librdkafka: {message}"),
            Warning => tracing::warn!(facility, "librdkafka: {message}"),
            Notice | Info => tracing::info!(facility, "librdkafka: {message}"),
            Debug => tracing::debug!(facility, "librdkafka: {message}"),
        }
    }
}

impl ConsumerContext for Rebalancer {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            tracing::debug!(partitions = ?list.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect::<Vec<_>>(), "partitions assigned");
        }
        let Rebalance::Revoke(list) = rebalance else { return };
        let Some(shared) = self.shared.upgrade() else { return };
        let revoked: Vec<(String, i32)> =
            list.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
        // Runs on the thread reading records, so handlers elsewhere can still settle.
        if !shared.closing.load(Ordering::Acquire) {
            let started = std::time::Instant::now();
            loop {
                let busy: usize = {
                    let st = shared.state.lock().unwrap();
                    st.handed_out
                        .iter()
                        .filter(|((t, p), _)| revoked.iter().any(|(rt, rp)| **t == **rt && p == rp))
                        .map(|(_, n)| *n)
                        .sum()
                };
                if busy == 0 {
                    break;
                }
                if started.elapsed() >= self.drain {
                    tracing::warn!(unsettled = busy, "partitions revoked with messages still being handled; they will be delivered again to the partitions' new owner");
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let positions = shared.state.lock().unwrap().revoke(Some(&revoked));
        // Partitions lost (the session timed out, say behind a network cut) belong to the
        // group no more: a commit for them cannot succeed, and a synchronous one would
        // block this thread, and with it the rejoin, until the coordinator answers, which
        // may be never. Their next owner redelivers what was not committed.
        if consumer.assignment_lost() {
            tracing::warn!(
                ?revoked,
                "partitions lost (the group session timed out); their next owner redelivers what was not committed"
            );
        } else {
            tracing::debug!(?revoked, ?positions, "partitions revoked");
            commit_positions(
                consumer,
                positions,
                "committing revoked partitions failed; their new owner may deliver some messages again",
            );
        }
        shared.settled.notify_one();
    }
}

/// A consumer of one queue or subscription.
pub(crate) struct KafkaConsumer {
    shared: Arc<ConsumerShared>,
    stream: Mutex<Option<Arc<StreamHandle>>>,
    open: courier_core::backend::OpenGuard,
}

impl KafkaConsumer {
    pub async fn open(broker: Arc<Inner>, source: Source, options: ConsumerOptions) -> Result<Self> {
        let topic = source.destination().name().to_string();
        let group = broker.config.group_id(&source);
        let retry_topic = format!("{group}.retry");
        let partitions = broker.ensure_topic(&topic, None).await?;
        // As many retry partitions as the source has: a copy keeps its partition number.
        let retry_partitions = broker.ensure_topic(&retry_topic, Some(partitions)).await?;
        // The dead-letter topic exists before the first message fails, or the consumer
        // fails here, naming it: never in the middle of a run.
        let policy = options.settle_policy(&source);
        broker.ensure_topic(policy.dead_letter().name().as_str(), None).await?;
        let shared = Arc::new(ConsumerShared {
            broker: broker.clone(),
            policy,
            retry_topic: retry_topic.clone(),
            retry_partitions,
            prefetch: options.prefetch.max(1),
            state: Mutex::default(),
            settled: tokio::sync::Notify::new(),
            closing: AtomicBool::new(false),
            stream: OnceLock::new(),
            reading: tokio::sync::Mutex::new(()),
        });
        let mut client = broker.config.client_config();
        client
            .set("group.id", &group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // Range gives one member the same partition numbers of the source and its
            // retry topic, so a retried copy returns to the consumer holding its key.
            .set("partition.assignment.strategy", "range")
            .set("session.timeout.ms", crate::SESSION_TIMEOUT.as_millis().to_string())
            .set("heartbeat.interval.ms", "1000");
        for (key, value) in &broker.config.client {
            client.set(key, value); // settings in the URL win
        }
        let context = Rebalancer { shared: Arc::downgrade(&shared), drain: broker.config.rebalance_drain };
        let stream: StreamHandle = client
            .create_with_context(context)
            .map_err(|e| settings_error(&broker.config, "kafka consumer settings", e))?;
        stream
            .subscribe(&[topic.as_str(), retry_topic.as_str()])
            .map_err(|e| kafka_error(&format!("subscribe group {group} to {topic}"), e))?;
        let stream = Arc::new(stream);
        let _ = shared.stream.set(Arc::downgrade(&stream));
        let open = courier_core::backend::OpenGuard::new("consumer");
        Ok(KafkaConsumer { shared, stream: Mutex::new(Some(stream)), open })
    }

    fn stream(&self) -> Result<Arc<StreamHandle>> {
        self.open.check()?;
        self.shared.broker.open.check()?;
        self.stream.lock().unwrap().clone().ok_or(Error::Closed { what: "consumer" })
    }
}

/// A record read off the stream, owned.
type Read = std::result::Result<(String, i32, i64, Received), rdkafka::error::KafkaError>;

fn read(record: std::result::Result<rdkafka::message::BorrowedMessage<'_>, rdkafka::error::KafkaError>) -> Read {
    record.map(|m| (m.topic().to_owned(), m.partition(), m.offset(), mapping::received(&m)))
}

#[async_trait]
impl Consumer for KafkaConsumer {
    fn source(&self) -> &Source {
        self.shared.policy.source()
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let stream = self.stream()?;
        let deadline = Instant::now() + wait;
        loop {
            let out = self.shared.take(max.max(1));
            if !out.is_empty() {
                return Ok(out);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let (wake_at, read_more) = {
                let st = self.shared.state.lock().unwrap();
                let wake = st.next_due().map_or(deadline, |due| due.min(deadline));
                (wake, st.wants_more())
            };
            // No await between the read and the last `accept` below, so a cancelled
            // receive never drops a record it has read.
            let first = tokio::select! {
                got = async {
                    let reading = self.shared.reading.lock().await;
                    (reading, read(stream.recv().await))
                }, if read_more => Some(got),
                _ = tokio::time::sleep_until(wake_at) => None,
                _ = self.shared.settled.notified() => None,
            };
            let Some((_reading, first)) = first else { continue };
            let mut next = Some(first);
            // Take what else is already here without waiting, so a batch fills in one go.
            let mut taken = 0;
            while let Some(record) = next.take() {
                match record {
                    Ok((topic, partition, offset, received)) => self.shared.accept(&topic, partition, offset, received),
                    Err(e) => {
                        // librdkafka reconnects by itself; errors here are reports.
                        tracing::warn!(source = %self.shared.policy.source(), error = %e, "kafka consumer error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        break;
                    }
                }
                taken += 1;
                if taken < max.max(1) {
                    next = stream.recv().now_or_never().map(read);
                }
            }
        }
    }

    async fn close(&self) -> Result<()> {
        if !self.open.close() {
            return Ok(());
        }
        self.shared.closing.store(true, Ordering::Release);
        let Some(stream) = self.stream.lock().unwrap().take() else { return Ok(()) };
        // Commit what is settled, then leave the group (dropping the consumer closes it,
        // which blocks until the group has let go of its partitions).
        let positions = self.shared.state.lock().unwrap().revoke(None);
        tokio::task::spawn_blocking(move || {
            commit_positions(&*stream, positions, "committing on close failed; some messages will be delivered again");
            stream.unsubscribe();
            drop(stream);
        })
        .await
        .map_err(|e| Error::fatal(format!("kafka: closing a consumer: {e}")))
    }
}

/// Settles one delivery.
struct KafkaAcker {
    shared: Arc<ConsumerShared>,
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    generation: u64,
    attempt: u32,
    message: Message,
}

impl KafkaAcker {
    fn check_held(&self) -> Result<()> {
        let st = self.shared.state.lock().unwrap();
        if st.generation != self.generation || self.shared.closing.load(Ordering::Acquire) {
            return Err(Error::LeaseLost { id: self.message.id.clone() });
        }
        Ok(())
    }
}

#[async_trait]
impl Acknowledger for KafkaAcker {
    fn policy(&self) -> &SettlePolicy {
        &self.shared.policy
    }

    async fn ack(&self) -> Result<()> {
        self.shared.settle(self, true)
    }

    async fn redeliver(&self, delay: Option<Duration>) -> Result<()> {
        self.check_held()?;
        let attempt = (self.attempt + 1).to_string();
        let delay = delay.unwrap_or_default().min(MAX_RETRY_DELAY);
        let not_before = (SystemTime::now() + delay)
            .duration_since(SystemTime::UNIX_EPOCH)
            // Rounded up to the millisecond: never early.
            .map(|d| (d.as_millis() + u128::from(d.subsec_nanos() % 1_000_000 != 0)).to_string())
            .unwrap_or_default();
        let mut extra = vec![(mapping::ATTEMPT, attempt.as_str())];
        if !delay.is_zero() {
            extra.push((mapping::NOT_BEFORE, not_before.as_str()));
        }
        let partition = self.partition % self.shared.retry_partitions.max(1);
        self.shared.broker.produce(&self.shared.retry_topic, Some(partition), &self.message, &extra).await?;
        if let Some(key) = &self.message.ordering_key {
            // The key stays held for the copy; should the copy land elsewhere, it frees
            // itself after the copy's time and a grace period.
            let mut st = self.shared.state.lock().unwrap();
            if let Some(lock) = st.locks.get_mut(&(self.partition, key.clone())) {
                lock.expires = Some(Instant::now() + delay + LOCK_GRACE);
            }
        }
        self.shared.settle(self, false)
    }

    fn release(&self) {
        self.shared.hand_back(self);
    }

    async fn dead_letter(&self, letter: &DeadLetter) -> Result<()> {
        self.check_held()?;
        let topic = letter.destination().name().as_str();
        self.shared.broker.ensure_topic(topic, None).await?;
        let headers = letter.headers();
        let extra: Vec<(&str, &str)> = headers.iter().map(|(name, value)| (*name, value.as_str())).collect();
        self.shared.broker.produce(topic, None, &self.message, &extra).await?;
        self.shared.settle(self, true)
    }

    async fn extend_lease(&self, _by: Duration) -> Result<()> {
        Err(self.shared.broker.capabilities.unsupported(Feature::LeaseExtension))
    }
}

/// Commits settled positions synchronously (on revoke and on close), warning with
/// `failure` when the commit fails.
fn commit_positions<C: ConsumerContext, K: rdkafka::consumer::Consumer<C>>(
    consumer: &K,
    positions: Vec<(Arc<str>, i32, i64)>,
    failure: &str,
) {
    let mut commit = TopicPartitionList::new();
    for (topic, partition, position) in positions {
        let _ = commit.add_partition_offset(&topic, partition, Offset::Offset(position));
    }
    if commit.count() > 0 {
        if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
            tracing::warn!(error = %e, "{failure}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(payload: usize) -> Pending {
        let received =
            Received { message: Message::new(vec![0u8; payload]), attempt: 1, not_before: None, control: Vec::new() };
        Pending { topic: Arc::from("t"), partition: 0, offset: 0, received, from_retry: false }
    }

    #[test]
    fn read_ahead_is_bounded_in_bytes_not_only_in_records() {
        let mut st = State::default();
        let mut held = 0;
        while st.wants_more() {
            let p = pending(1024 * 1024);
            st.buffered_bytes += p.received.size();
            st.ready.push_back(p);
            held += 1;
        }
        // 1 MB records stop the reading after 64 of them, not 10,000 (10 GB).
        assert_eq!(held, READ_AHEAD_BYTES.div_ceil(1024 * 1024 + 128));
        st.ready.pop_front();
        st.recount_bytes();
        assert!(st.wants_more(), "room again once one is taken");
    }

    #[test]
    fn control_headers_on_the_source_topic_are_data() {
        let mut received = Received {
            message: Message::new("x"),
            attempt: 99,
            not_before: Some(SystemTime::now() + Duration::from_secs(10 * 365 * 24 * 3600)),
            control: vec![
                ("courier-attempt".into(), "99".into()),
                ("courier-not-before".into(), "99999999999999".into()),
            ],
        };
        received.as_data();
        assert_eq!((received.attempt, received.not_before), (1, None));
        assert_eq!(received.message.header("courier-attempt"), Some("99"), "kept, as data");
        assert_eq!(received.message.header("courier-not-before"), Some("99999999999999"));
    }
}
