//! One queue (or one subscription of a topic): ready messages, per-key FIFO, delays,
//! capacity, its consumers' lanes (see [`crate::lane`]), and the timer task that drives
//! leases and delays.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use courier_core::backend::OpenGuard;
use courier_core::{DeadLetter as Letter, Error, Message, MessageId, Result, SettlePolicy, Source, Stats};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::entry::{Entry, IdTimes};
use crate::lane::{InFlight, Lane, LaneState};
use crate::tag_table::Removed;
use crate::{BrokerInner, WhenFull};

/// How far ahead an unbounded delay, lease or wait is put: later than any real deadline.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `by` after `now`, saturating: a delay or lease too long for the clock (such as
/// `Duration::MAX`) means "not in this process's lifetime", never a panic, which would
/// lose a message already taken out of its place.
fn later(now: Instant, by: Duration) -> Instant {
    now.checked_add(by.min(FAR_FUTURE)).unwrap_or(now)
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

#[derive(Default)]
struct State {
    /// Messages any consumer may take now.
    ready: VecDeque<Entry>,
    /// Keys with a message ready, in flight or awaiting retry, and the messages of that
    /// key waiting behind it. A key absent here is free.
    keys: HashMap<String, VecDeque<Entry>>,
    waiting_behind_keys: usize,
    delayed: BinaryHeap<Reverse<Delayed>>,
    /// Whether the queue has a capacity, and so counts what it holds in `held`. An
    /// unbounded queue does not, so that an ack of a message without a key need not
    /// take this lock at all.
    bounded: bool,
    /// Every message held (ready, waiting, in flight and delayed), when `bounded`.
    held: usize,
    next_seq: u64,
    dead_lettered: u64,
    /// The deadline the timer task sleeps until.
    armed: Option<Instant>,
    closed: bool,
}

pub(crate) struct Queue {
    pub source: Source,
    state: Mutex<State>,
    /// Every open consumer's lane, and those of consumers dropped unclosed while they
    /// still hold deliveries, for the timer to expire their leases.
    lanes: Mutex<Vec<Arc<Lane>>>,
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
            state: Mutex::new(State { bounded: capacity.is_some(), ..State::default() }),
            lanes: Mutex::default(),
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

    fn lanes(&self) -> MutexGuard<'_, Vec<Arc<Lane>>> {
        self.lanes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A lane for a new consumer. Lanes of consumers dropped without closing, that
    /// hold no delivery any more, leave the list here.
    pub fn open_lane(&self, lease: Duration, settle: Arc<SettlePolicy>) -> Arc<Lane> {
        let lane = Arc::new(Lane::new(lease, settle));
        let mut lanes = self.lanes();
        lanes.retain(|l| Arc::strong_count(l) > 1 || !l.lock().in_flight.is_empty());
        lanes.push(lane.clone());
        lane
    }

    #[cfg(test)]
    pub fn lane_count(&self) -> usize {
        self.lanes().len()
    }

    /// Runs `f` with every lane and the shared state locked (in the one order), for a
    /// view or a change of the whole queue. The list stays locked throughout, so no consumer opened meanwhile can take a
    /// message unseen (purge must see every key in flight).
    fn with_all<R>(&self, f: impl FnOnce(&mut [MutexGuard<'_, LaneState>], &mut State) -> R) -> R {
        let lanes = self.lanes();
        let mut guards: Vec<_> = lanes.iter().map(|l| l.lock()).collect();
        let mut st = self.lock();
        f(&mut guards, &mut st)
    }

    fn full_error(&self) -> Error {
        Error::Full { destination: self.source.to_string(), capacity: self.capacity.unwrap_or(0) }
    }

    /// Reserves room for `n` messages, waiting or failing when full as configured.
    pub async fn reserve(&self, n: usize) -> Result<()> {
        let Some(capacity) = self.capacity else {
            // Nothing to count: an unbounded queue always has room.
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
        if self.capacity.is_some() {
            self.lock().held -= n;
            self.writable.notify_one();
        }
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
        if st.bounded {
            st.held += 1;
        }
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

    /// Takes up to `max` ready messages into `lane`, waiting up to `wait`, onto the end
    /// of `taken`; returns how many. `deliver` makes each one's delivery from its tag,
    /// attempt and message, in place (a message is large, and moving it from one
    /// vector into another cost a copy each).
    pub async fn take<T>(
        &self,
        lane: &Lane,
        max: usize,
        wait: Duration,
        consumer: &OpenGuard,
        taken: &mut Vec<T>,
        mut deliver: impl FnMut(u64, u32, Message) -> T,
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
                let mut ls = lane.lock();
                if ls.closed {
                    return Err(Error::Closed { what: "consumer" });
                }
                let mut st = self.lock();
                if st.closed {
                    return Err(Error::Closed { what: "broker" });
                }
                if !st.ready.is_empty() {
                    let now = if first_try { started } else { Instant::now() };
                    let lease_deadline = later(now, lane.lease);
                    let n = max.min(st.ready.len());
                    // Deliveries are made here, under both locks. Moving the entries out
                    // first and making them after the shared lock cost one consumer 2-4%
                    // of its drain, and gained four no more than noise (measured).
                    let LaneState { in_flight, leases, next_tag, id_times, .. } = &mut *ls;
                    taken.reserve_exact(n);
                    for _ in 0..n {
                        let mut entry = st.ready.pop_front().expect("checked length");
                        let tag = *next_tag;
                        *next_tag += 1;
                        let deliveries = entry.deliveries() + 1;
                        let payload = entry.take_payload();
                        taken.push(deliver(tag, deliveries, entry.message(payload.clone(), id_times)));
                        leases.add(lease_deadline, tag);
                        in_flight.insert(tag, InFlight { entry, payload, deliveries, deadline: lease_deadline });
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

    /// Whether a message leaving for good changes the shared state: it frees room in a
    /// bounded queue, or lets its key's next message go.
    #[inline(always)]
    fn finish_is_shared(&self, entry: &Entry) -> bool {
        self.capacity.is_some() || entry.ordering_key().is_some()
    }

    /// Removes an in-flight delivery for good.
    pub fn ack(&self, lane: &Lane, tag: u64, id: &MessageId) -> Result<()> {
        let mut ls = lane.lock();
        // Taken out only when the shared state must see it leave.
        let flight = match ls.finish_in_flight(tag, |entry| self.finish_is_shared(entry)) {
            Removed::Dropped => return Ok(()),
            Removed::Absent => return Err(Self::settle_lost(id)),
            Removed::Taken(flight) => flight,
        };
        let woke = self.lock().finish(&flight.entry);
        drop(ls);
        drop(flight); // outside the locks
        self.after_finish(woke);
        Ok(())
    }

    /// Removes in-flight deliveries for good under the lane's lock; each one's result, in
    /// order.
    pub fn ack_all(&self, lane: &Lane, deliveries: &[(u64, &MessageId)]) -> Vec<Result<()>> {
        let mut results = Vec::with_capacity(deliveries.len());
        // Only records the shared state must see leave are moved out, to drop after.
        let mut done = Vec::new();
        let mut ls = lane.lock();
        // The shared lock, taken only if one of them needs it.
        let mut shared = None;
        let mut woke = false;
        for &(tag, id) in deliveries {
            match ls.finish_in_flight(tag, |entry| self.finish_is_shared(entry)) {
                Removed::Dropped => results.push(Ok(())),
                Removed::Taken(flight) => {
                    woke |= shared.get_or_insert_with(|| self.lock()).finish(&flight.entry);
                    done.push(flight);
                    results.push(Ok(()));
                }
                Removed::Absent => results.push(Err(Self::settle_lost(id))),
            }
        }
        drop(shared);
        drop(ls);
        drop(done); // outside the locks
        self.after_finish(woke);
        results
    }

    /// Hands an in-flight delivery back for another attempt, after `delay` when given.
    pub fn redeliver(&self, lane: &Lane, tag: u64, id: &MessageId, delay: Option<Duration>) -> Result<()> {
        let mut ls = lane.lock();
        let flight = ls.take_in_flight(tag).ok_or_else(|| Self::settle_lost(id))?;
        let flight_entry = flight.into_entry();
        let mut st = self.lock();
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
    pub fn dead_letter_now(&self, lane: &Lane, tag: u64, id: &MessageId, letter: &Letter) -> Result<()> {
        let mut ls = lane.lock();
        let flight = ls.take_in_flight(tag).ok_or_else(|| Self::settle_lost(id))?;
        let dead = self.lock().remove_for_dead_letter(flight.into_entry(), letter.clone());
        drop(ls);
        self.dead_letter(dead)
    }

    /// Moves an in-flight delivery's lease deadline to `by` from now.
    pub fn extend(&self, lane: &Lane, tag: u64, id: &MessageId, by: Duration) -> Result<()> {
        let mut ls = lane.lock();
        let deadline = later(Instant::now(), by);
        let flight = ls.in_flight.get_mut(tag).ok_or_else(|| Self::settle_lost(id))?;
        let old = std::mem::replace(&mut flight.deadline, deadline);
        let LaneState { leases, in_flight, .. } = &mut *ls;
        leases.settled(old, tag, in_flight);
        leases.add(deadline, tag);
        self.arm(&mut self.lock(), deadline);
        Ok(())
    }

    /// Hands a closing consumer's unsettled deliveries to the others, and forgets its lane.
    pub fn release_lane(&self, lane: &Arc<Lane>) {
        let mut ls = lane.lock();
        ls.closed = true;
        let mut flights: Vec<(u64, InFlight)> = std::mem::take(&mut ls.in_flight).into_entries().collect();
        ls.leases.clear();
        // Oldest first back at the front of the line.
        flights.sort_unstable_by_key(|(tag, _)| *tag);
        let released = !flights.is_empty();
        let mut st = self.lock();
        for (_, flight) in flights.into_iter().rev() {
            st.ready.push_front(flight.into_entry());
        }
        drop(st);
        drop(ls);
        self.lanes().retain(|l| !Arc::ptr_eq(l, lane));
        if released {
            self.readable.notify_one();
        }
    }

    /// Moves due delays to ready and expired leases back to ready (or dead letter);
    /// returns the next deadline.
    fn process_due(&self, now: Instant) -> Option<Instant> {
        let mut dead = Vec::new();
        let mut woke = false;
        let lanes = self.lanes().clone();
        let mut next = {
            let mut st = self.lock();
            // Disarmed while the lanes are read: a take meanwhile arms its lease anew,
            // which wakes this task again, rather than being lost behind an older
            // deadline that the end of this pass overwrites.
            st.armed = None;
            while st.delayed.peek().is_some_and(|Reverse(d)| d.due <= now) {
                let Reverse(d) = st.delayed.pop().expect("peeked");
                if d.retry {
                    st.ready.push_back(d.entry);
                } else {
                    st.enqueue(d.entry);
                }
                woke = true;
            }
            st.delayed.peek().map(|Reverse(d)| d.due)
        };
        for lane in &lanes {
            let mut ls = lane.lock();
            if ls.leases.first().is_some_and(|(deadline, _)| deadline <= now) {
                let mut st = self.lock();
                while let Some((deadline, tag)) = ls.leases.first() {
                    if deadline > now {
                        break;
                    }
                    ls.leases.pop_first();
                    // Skip leases that were settled or extended since.
                    if ls.in_flight.get(tag).is_none_or(|f| f.deadline != deadline) {
                        continue;
                    }
                    let flight = ls.in_flight.remove(tag).expect("checked above");
                    // Only the backend sees a lease expire, so it counts that attempt;
                    // core's policy says whether it was the last, and builds the dead
                    // letter.
                    if lane.settle.is_last(flight.deliveries) {
                        let letter = lane.settle.gave_up(flight.deliveries, "max attempts reached on lease expiry");
                        dead.push(st.remove_for_dead_letter(flight.into_entry(), letter));
                    } else {
                        // An expired lease is the oldest work around: first in line.
                        st.ready.push_front(flight.into_entry());
                    }
                    woke = true;
                }
            }
            if let Some((deadline, _)) = ls.leases.first() {
                next = Some(next.map_or(deadline, |n| n.min(deadline)));
            }
        }
        {
            let mut st = self.lock();
            next = match (st.armed, next) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            st.armed = next;
        }
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
        self.with_all(|lanes, st| {
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
                in_flight: lanes.iter().map(|l| l.in_flight.len() as u64).sum(),
                delayed: st.delayed.len() as u64,
                dead_lettered: st.dead_lettered,
                oldest_age: oldest,
            }
        })
    }

    /// Drops every waiting and delayed message; in-flight ones stay until settled.
    pub fn purge(&self) -> u64 {
        let removed = self.with_all(|lanes, st| {
            let removed = st.ready.len() + st.waiting_behind_keys + st.delayed.len();
            st.ready.clear();
            st.delayed.clear();
            st.waiting_behind_keys = 0;
            // Keys stay busy only for messages still in flight.
            let busy: HashSet<&str> =
                lanes.iter().flat_map(|l| l.in_flight.values()).filter_map(|f| f.entry.ordering_key()).collect();
            st.keys.retain(|k, waiting| {
                waiting.clear();
                busy.contains(k.as_str())
            });
            if st.bounded {
                st.held -= removed;
            }
            removed
        });
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
    fn finish(&mut self, entry: &Entry) -> bool {
        if self.bounded {
            self.held -= 1;
        }
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
