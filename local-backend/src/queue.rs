//! One queue (or one subscription of a topic): ready messages, per-key FIFO, leases,
//! delays, capacity, and the timer task that drives leases and delays.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use courier_core::{DeadLetter as Letter, Error, MessageId, Result, SettlePolicy, Source, Stats};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::entry::{Entry, IdTimes};
use crate::tag_table::TagTable;
use crate::{BrokerInner, WhenFull};

/// How far ahead an unbounded delay, lease or wait is put: later than any real deadline.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `by` after `now`, saturating: a delay or lease too long for the clock (such as
/// `Duration::MAX`) means "not in this process's lifetime", never a panic, which would
/// lose a message already taken out of its place.
fn later(now: Instant, by: Duration) -> Instant {
    now.checked_add(by.min(FAR_FUTURE)).unwrap_or(now)
}

/// Settings a consumer's deliveries carry, so leases that expire in the timer task
/// know how to treat them.
pub(crate) struct ConsumerPolicy {
    pub id: u64,
    pub lease: Duration,
    /// Core's policy: the attempt limit and the dead-letter destination.
    pub settle: Arc<SettlePolicy>,
}

struct InFlight {
    /// The message, its payload taken out into `payload`.
    entry: Entry,
    /// The payload, shared with the delivery.
    payload: Bytes,
    /// Deliveries so far, this one included.
    deliveries: u32,
    deadline: Instant,
    policy: Arc<ConsumerPolicy>,
}

impl InFlight {
    /// The entry whole again, to go back in a line or on to a dead-letter destination.
    fn into_entry(self) -> Entry {
        let mut entry = self.entry;
        entry.put_back(self.payload, self.deliveries);
        entry
    }
}

struct Delayed {
    due: Instant,
    seq: u64,
    entry: Entry,
    /// A retry keeps its key's turn; a delayed send joins its key's line when due.
    retry: bool,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// A queued message on its way to a dead-letter destination, with core's dead letter.
pub(crate) struct DeadEntry {
    pub entry: Entry,
    pub letter: Letter,
}

type InFlightMap = TagTable<InFlight>;

/// Lease deadlines in expiry order, cheap on the per-message path.
///
/// Deliveries of one consumer get deadlines in time order, so most go on a deque; the
/// rest (extensions, consumers with different leases) go in an ordered set. A settled
/// delivery at the front of the deque leaves it at once (the common case: settled in the
/// order taken); one settled out of order stays as a stale entry, which the timer skips,
/// until the deque is compacted, when stale entries outnumber live ones. So a settlement
/// costs no lookup, and the deque's size stays proportional to what is in flight.
///
/// It is kept apart from the in-flight table, though both follow tag order mostly: tag
/// order is deadline order only while every consumer has one lease and none extends it,
/// and the table moves long-held deliveries (the earliest deadlines) to an unordered
/// map, which the timer would then have to search.
#[derive(Default)]
struct Leases {
    in_order: VecDeque<(Instant, u64)>,
    out_of_order: BTreeSet<(Instant, u64)>,
}

impl Leases {
    fn add(&mut self, deadline: Instant, tag: u64) {
        if self.in_order.back().is_none_or(|&(last, _)| last <= deadline) {
            self.in_order.push_back((deadline, tag));
        } else {
            self.out_of_order.insert((deadline, tag));
        }
    }

    /// Forgets the lease `(deadline, tag)`, whose delivery was settled, extended or
    /// handed back (and is no longer in `in_flight` with that deadline).
    fn settled(&mut self, deadline: Instant, tag: u64, in_flight: &InFlightMap) {
        if !self.out_of_order.is_empty() && self.out_of_order.remove(&(deadline, tag)) {
            return;
        }
        if self.in_order.front() == Some(&(deadline, tag)) {
            self.in_order.pop_front();
        } else if self.in_order.len() > 1024 && self.in_order.len() > 2 * in_flight.len() {
            self.in_order.retain(|&(d, t)| in_flight.get(t).is_some_and(|f| f.deadline == d));
        }
    }

    fn first(&self) -> Option<(Instant, u64)> {
        match (self.in_order.front(), self.out_of_order.first()) {
            (Some(a), Some(b)) => Some(*a.min(b)),
            (a, b) => a.or(b).copied(),
        }
    }

    fn pop_first(&mut self) {
        let from_set = match (self.in_order.front(), self.out_of_order.first()) {
            (Some(a), Some(b)) => b < a,
            (None, Some(_)) => true,
            _ => false,
        };
        if from_set {
            self.out_of_order.pop_first();
        } else {
            self.in_order.pop_front();
        }
    }
}

#[derive(Default)]
struct State {
    /// Messages any consumer may take now.
    ready: VecDeque<Entry>,
    /// Keys with a message ready, in flight or awaiting retry, and the messages of that
    /// key waiting behind it. A key absent here is free.
    keys: HashMap<String, VecDeque<Entry>>,
    waiting_behind_keys: usize,
    in_flight: InFlightMap,
    leases: Leases,
    delayed: BinaryHeap<Reverse<Delayed>>,
    /// Every message held: ready, waiting, in flight and delayed.
    held: usize,
    next_tag: u64,
    next_seq: u64,
    dead_lettered: u64,
    /// The deadline the timer task sleeps until.
    armed: Option<Instant>,
    /// The time of the last id delivered, for the next (see [`IdTimes`]).
    id_times: IdTimes,
    closed: bool,
}

pub(crate) struct Queue {
    pub source: Source,
    state: Mutex<State>,
    readable: Notify,
    writable: Notify,
    timer: Arc<Notify>,
    capacity: Option<usize>,
    when_full: WhenFull,
    broker: Weak<BrokerInner>,
}

impl Queue {
    /// Creates the queue and starts its timer task on the current tokio runtime.
    pub fn start(source: Source, capacity: Option<usize>, when_full: WhenFull, broker: Weak<BrokerInner>) -> Arc<Self> {
        let timer = Arc::new(Notify::new());
        let queue = Arc::new(Queue {
            source,
            state: Mutex::new(State::default()),
            readable: Notify::new(),
            writable: Notify::new(),
            timer: timer.clone(),
            capacity,
            when_full,
            broker,
        });
        tokio::spawn(run_timer(Arc::downgrade(&queue), timer));
        queue
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way
        // that loses messages, so keep going rather than poisoning every later call.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn full_error(&self) -> Error {
        Error::Full { destination: self.source.to_string(), capacity: self.capacity.unwrap_or(0) }
    }

    /// Reserves room for `n` messages, waiting or failing when full as configured.
    pub async fn reserve(&self, n: usize) -> Result<()> {
        let Some(capacity) = self.capacity else {
            self.lock().held += n;
            return Ok(());
        };
        if n > capacity {
            return Err(self.full_error());
        }
        loop {
            let notified = self.writable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                if st.closed {
                    return Err(Error::Closed { what: "broker" });
                }
                if st.held + n <= capacity {
                    st.held += n;
                    // Others may fit too.
                    if st.held < capacity {
                        self.writable.notify_one();
                    }
                    return Ok(());
                }
                if self.when_full == WhenFull::Error {
                    return Err(self.full_error());
                }
            }
            notified.await;
        }
    }

    /// Gives back room reserved but not used.
    pub fn unreserve(&self, n: usize) {
        self.lock().held -= n;
        self.writable.notify_one();
    }

    /// Adds messages for which room was reserved, each with an optional delay.
    pub fn push(&self, entries: impl IntoIterator<Item = (Entry, Option<Duration>)>) {
        let mut st = self.lock();
        let mut now = None;
        let mut ready = false;
        let mut soonest: Option<Instant> = None;
        for (entry, delay) in entries {
            match delay.filter(|d| !d.is_zero()) {
                Some(delay) => {
                    let due = later(*now.get_or_insert_with(Instant::now), delay);
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    st.delayed.push(Reverse(Delayed { due, seq, entry, retry: false }));
                    soonest = Some(soonest.map_or(due, |s| s.min(due)));
                }
                None => {
                    st.enqueue(entry);
                    ready = true;
                }
            }
        }
        if let Some(due) = soonest {
            self.arm(&mut st, due);
        }
        drop(st);
        if ready {
            self.readable.notify_one();
        }
    }

    /// Adds a dead letter: it never waits for room, so nothing is lost on its way.
    pub fn push_dead_letter(&self, entry: Entry) {
        let mut st = self.lock();
        st.held += 1;
        st.enqueue(entry);
        drop(st);
        self.readable.notify_one();
    }

    /// Wakes the timer task if `deadline` is sooner than what it sleeps until.
    fn arm(&self, st: &mut State, deadline: Instant) {
        if st.armed.is_none_or(|armed| deadline < armed) {
            st.armed = Some(deadline);
            self.timer.notify_one();
        }
    }

    /// Takes up to `max` ready messages for a consumer, waiting up to `wait`, onto the
    /// end of `taken`; returns how many. `deliver` makes each one's delivery from its
    /// tag, attempt and message, in place (a message is large, and moving it from one
    /// vector into another cost a copy each).
    pub async fn take<T>(
        self: &Arc<Self>,
        max: usize,
        wait: Duration,
        policy: &Arc<ConsumerPolicy>,
        consumer: &courier_core::backend::OpenGuard,
        taken: &mut Vec<T>,
        mut deliver: impl FnMut(u64, u32, courier_core::Message) -> T,
    ) -> Result<usize> {
        let started = Instant::now();
        let deadline = later(started, wait);
        let max = max.max(1);
        let mut first_try = true;
        loop {
            let notified = self.readable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                consumer.check()?;
                let mut st = self.lock();
                if st.closed {
                    return Err(Error::Closed { what: "broker" });
                }
                if !st.ready.is_empty() {
                    let now = if first_try { started } else { Instant::now() };
                    let lease_deadline = later(now, policy.lease);
                    let n = max.min(st.ready.len());
                    taken.reserve_exact(n);
                    for _ in 0..n {
                        let mut entry = st.ready.pop_front().expect("checked length");
                        let deliveries = entry.deliveries() + 1;
                        let payload = entry.take_payload();
                        let tag = st.next_tag;
                        st.next_tag += 1;
                        taken.push(deliver(tag, deliveries, entry.message(payload.clone(), &mut st.id_times)));
                        st.leases.add(lease_deadline, tag);
                        let policy = policy.clone();
                        st.in_flight
                            .insert(tag, InFlight { entry, payload, deliveries, deadline: lease_deadline, policy });
                    }
                    self.arm(&mut st, lease_deadline);
                    let more = !st.ready.is_empty();
                    drop(st);
                    if more {
                        // Pass the baton: another waiting consumer can take the rest.
                        self.readable.notify_one();
                    }
                    return Ok(n);
                }
            }
            first_try = false;
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(0),
            }
        }
    }

    fn settle_lost(id: &MessageId) -> Error {
        Error::LeaseLost { id: id.clone() }
    }

    /// Removes an in-flight delivery for good.
    pub fn ack(&self, tag: u64, id: &MessageId) -> Result<()> {
        let mut st = self.lock();
        let (flight, woke) = st.acked(tag).ok_or_else(|| Self::settle_lost(id))?;
        drop(st);
        drop(flight); // outside the lock
        self.after_finish(woke);
        Ok(())
    }

    /// Removes in-flight deliveries for good under one lock; each one's result, in order.
    pub fn ack_all(&self, deliveries: &[(u64, &MessageId)]) -> Vec<Result<()>> {
        let mut results = Vec::with_capacity(deliveries.len());
        let mut done = Vec::with_capacity(deliveries.len());
        let mut st = self.lock();
        let mut woke = false;
        for &(tag, id) in deliveries {
            match st.acked(tag) {
                Some((flight, released_key)) => {
                    woke |= released_key;
                    done.push(flight);
                    results.push(Ok(()));
                }
                None => results.push(Err(Self::settle_lost(id))),
            }
        }
        drop(st);
        drop(done); // outside the lock
        self.after_finish(woke);
        results
    }

    /// Hands an in-flight delivery back for another attempt, after `delay` when given.
    pub fn redeliver(&self, tag: u64, id: &MessageId, delay: Option<Duration>) -> Result<()> {
        let mut st = self.lock();
        let flight = st.take_in_flight(tag).ok_or_else(|| Self::settle_lost(id))?;
        let flight_entry = flight.into_entry();
        match delay.filter(|d| !d.is_zero()) {
            Some(delay) => {
                let due = later(Instant::now(), delay);
                let seq = st.next_seq;
                st.next_seq += 1;
                st.delayed.push(Reverse(Delayed { due, seq, entry: flight_entry, retry: true }));
                self.arm(&mut st, due);
            }
            None => {
                st.ready.push_back(flight_entry);
                drop(st);
                self.readable.notify_one();
            }
        }
        Ok(())
    }

    /// Dead-letters an in-flight delivery now.
    pub fn dead_letter_now(&self, tag: u64, id: &MessageId, letter: &Letter) -> Result<()> {
        let mut st = self.lock();
        let flight = st.take_in_flight(tag).ok_or_else(|| Self::settle_lost(id))?;
        let dead = st.remove_for_dead_letter(flight.into_entry(), letter.clone());
        drop(st);
        self.dead_letter(dead)
    }

    /// Moves an in-flight delivery's lease deadline to `by` from now.
    pub fn extend(&self, tag: u64, id: &MessageId, by: Duration) -> Result<()> {
        let mut st = self.lock();
        let deadline = later(Instant::now(), by);
        let flight = st.in_flight.get_mut(tag).ok_or_else(|| Self::settle_lost(id))?;
        let old = std::mem::replace(&mut flight.deadline, deadline);
        st.forget_lease(old, tag);
        st.leases.add(deadline, tag);
        self.arm(&mut st, deadline);
        Ok(())
    }

    /// Hands a closing consumer's unsettled deliveries to the others.
    pub fn release_consumer(&self, consumer: u64) {
        let mut st = self.lock();
        let mut tags: Vec<u64> =
            st.in_flight.iter().filter(|(_, f)| f.policy.id == consumer).map(|(tag, _)| tag).collect();
        // Oldest first back at the front of the line.
        tags.sort_unstable();
        for tag in tags.iter().rev() {
            let flight = st.take_in_flight(*tag).expect("listed above");
            st.ready.push_front(flight.into_entry());
        }
        drop(st);
        if !tags.is_empty() {
            self.readable.notify_one();
        }
    }

    /// Moves due delays to ready and expired leases back to ready (or dead letter);
    /// returns the next deadline.
    fn process_due(&self, now: Instant) -> Option<Instant> {
        let mut dead = Vec::new();
        let mut woke = false;
        let next = {
            let mut st = self.lock();
            while st.delayed.peek().is_some_and(|Reverse(d)| d.due <= now) {
                let Reverse(d) = st.delayed.pop().expect("peeked");
                if d.retry {
                    st.ready.push_back(d.entry);
                } else {
                    st.enqueue(d.entry);
                }
                woke = true;
            }
            while let Some((deadline, tag)) = st.leases.first() {
                if deadline > now {
                    break;
                }
                st.leases.pop_first();
                // Skip leases that were settled or extended since.
                if st.in_flight.get(tag).is_none_or(|f| f.deadline != deadline) {
                    continue;
                }
                let flight = st.in_flight.remove(tag).expect("checked above");
                // Only the backend sees a lease expire, so it counts that attempt; core's
                // policy says whether it was the last, and builds the dead letter.
                let settle = &flight.policy.settle;
                if settle.is_last(flight.deliveries) {
                    let letter = settle.gave_up(flight.deliveries, "max attempts reached on lease expiry");
                    dead.push(st.remove_for_dead_letter(flight.into_entry(), letter));
                } else {
                    // An expired lease is the oldest work around: first in line.
                    st.ready.push_front(flight.into_entry());
                }
                woke = true;
            }
            let next = match (st.delayed.peek().map(|Reverse(d)| d.due), st.leases.first().map(|l| l.0)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            st.armed = next;
            next
        };
        if woke {
            self.readable.notify_one();
        }
        for d in dead {
            // The broker may be closing; a dead letter with nowhere to go stays lost only
            // because the whole in-process broker is gone.
            let _ = self.dead_letter(d);
        }
        next
    }

    pub(crate) fn dead_letter(&self, dead: DeadEntry) -> Result<()> {
        self.writable.notify_one();
        let broker = self.broker.upgrade().ok_or(Error::Closed { what: "broker" })?;
        broker.deliver_dead_letter(dead)
    }

    fn after_finish(&self, released_key: bool) {
        if self.capacity.is_some() {
            self.writable.notify_one();
        }
        if released_key {
            self.readable.notify_one();
        }
    }

    pub fn stats(&self) -> Stats {
        let st = self.lock();
        let now = SystemTime::now();
        let mut times = IdTimes::default();
        let oldest = st
            .ready
            .iter()
            .chain(st.keys.values().flatten())
            .map(|entry| entry.timestamp(&mut times))
            .min()
            .map(|t| now.duration_since(t).unwrap_or_default());
        Stats {
            depth: (st.ready.len() + st.waiting_behind_keys) as u64,
            in_flight: st.in_flight.len() as u64,
            delayed: st.delayed.len() as u64,
            dead_lettered: st.dead_lettered,
            oldest_age: oldest,
        }
    }

    /// Drops every waiting and delayed message; in-flight ones stay until settled.
    pub fn purge(&self) -> u64 {
        let mut st = self.lock();
        let removed = st.ready.len() + st.waiting_behind_keys + st.delayed.len();
        st.ready.clear();
        st.delayed.clear();
        st.waiting_behind_keys = 0;
        // Keys stay busy only for messages still in flight.
        let busy: std::collections::HashSet<String> =
            st.in_flight.values().filter_map(|f| f.entry.ordering_key().map(str::to_owned)).collect();
        st.keys.retain(|k, waiting| {
            waiting.clear();
            busy.contains(k)
        });
        st.held -= removed;
        drop(st);
        self.writable.notify_waiters();
        removed as u64
    }

    pub fn close(&self) {
        self.lock().closed = true;
        self.readable.notify_waiters();
        self.writable.notify_waiters();
        self.timer.notify_one();
    }
}

impl State {
    fn forget_lease(&mut self, deadline: Instant, tag: u64) {
        self.leases.settled(deadline, tag, &self.in_flight);
    }

    /// Takes a delivery out of flight, with its lease; `None` if it is not in flight.
    // Inlined, like `acked` and the tag table's `insert` and `remove`: an in-flight
    // record is over 100 bytes, and each call it returns through moves it once more.
    #[inline(always)]
    fn take_in_flight(&mut self, tag: u64) -> Option<InFlight> {
        let flight = self.in_flight.remove(tag)?;
        self.forget_lease(flight.deadline, tag);
        Some(flight)
    }

    /// Removes an acked delivery for good: its entry (to drop outside the lock), and
    /// whether that let a message of its key become ready. `None` if it is not in flight.
    #[inline(always)]
    fn acked(&mut self, tag: u64) -> Option<(InFlight, bool)> {
        let flight = self.take_in_flight(tag)?;
        let released_key = self.finish(&flight.entry);
        Some((flight, released_key))
    }

    /// Adds a fresh message, behind its key's current message if the key is busy.
    // Inlined for a message without a key, which only joins the line.
    #[inline(always)]
    fn enqueue(&mut self, entry: Entry) {
        if entry.ordering_key().is_none() {
            self.ready.push_back(entry);
        } else {
            self.enqueue_keyed(entry);
        }
    }

    fn enqueue_keyed(&mut self, entry: Entry) {
        match entry.ordering_key() {
            None => self.ready.push_back(entry),
            Some(key) => match self.keys.get_mut(key) {
                Some(waiting) => {
                    waiting.push_back(entry);
                    self.waiting_behind_keys += 1;
                }
                None => {
                    self.keys.insert(key.to_owned(), VecDeque::new());
                    self.ready.push_back(entry);
                }
            },
        }
    }

    /// A message leaves for good: frees its room and lets its key's next message go.
    /// Returns whether a message became ready.
    // Inlined for the ack of a message without a key, which only counts it out.
    #[inline(always)]
    fn finish(&mut self, entry: &Entry) -> bool {
        self.held -= 1;
        match entry.ordering_key() {
            None => false,
            Some(key) => self.next_of_key(key),
        }
    }

    /// Lets the message waiting behind `key` go, or frees the key; whether one went.
    fn next_of_key(&mut self, key: &str) -> bool {
        let Some(waiting) = self.keys.get_mut(key) else { return false };
        match waiting.pop_front() {
            Some(next) => {
                self.waiting_behind_keys -= 1;
                self.ready.push_back(next);
                true
            }
            None => {
                self.keys.remove(key);
                false
            }
        }
    }

    fn remove_for_dead_letter(&mut self, entry: Entry, letter: Letter) -> DeadEntry {
        self.finish(&entry);
        self.dead_lettered += 1;
        DeadEntry { entry, letter }
    }
}

/// Builds the entry a dead letter becomes: same id, payload and headers, plus core's
/// dead-letter headers (why, after how many attempts, from where).
pub(crate) fn dead_letter_entry(dead: DeadEntry) -> Entry {
    let DeadEntry { mut entry, letter } = dead;
    letter.write_headers(entry.headers_mut());
    // A dead letter is a new arrival in its queue: never dropped as a duplicate, and
    // with no deliveries yet.
    entry.arrive_anew();
    entry
}

async fn run_timer(queue: Weak<Queue>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(queue) = queue.upgrade() else { return };
            if queue.lock().closed {
                return;
            }
            queue.process_due(Instant::now())
        };
        match next {
            Some(deadline) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}
