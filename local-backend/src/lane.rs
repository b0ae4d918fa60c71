//! A consumer's own part of a queue: the deliveries it holds, their leases and its tags.
//!
//! Competing consumers share a queue's line, but not what each one has taken. Each keeps
//! its in-flight records and leases here, under a lock of its own, so that an ack of a
//! message without a key (the common case) touches nothing another consumer uses: only
//! a take holds the queue's shared lock, once a batch. With one lock for all of it,
//! consumers on two cores waited for each other at every take and every ack, and four
//! drained a queue more slowly than one alone.
//!
//! Locks are always taken in one order: a queue's list of lanes, then a lane (several
//! lanes in the list's order), then the queue's shared state. Whatever moves a message
//! between a lane and the shared state holds both, so no message is ever in neither.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use courier_core::SettlePolicy;
use tokio::time::Instant;

use crate::entry::{Entry, IdTimes};
use crate::tag_table::{Removed, TagTable};

/// One consumer's part of a queue.
pub(crate) struct Lane {
    /// How long a delivery is leased for when taken.
    pub lease: Duration,
    /// Core's policy: the attempt limit and the dead-letter destination.
    pub settle: Arc<SettlePolicy>,
    state: Mutex<LaneState>,
}

#[derive(Default)]
pub(crate) struct LaneState {
    pub in_flight: TagTable<InFlight>,
    pub leases: Leases,
    pub next_tag: u64,
    /// The time of the last id delivered, for the next (see [`IdTimes`]).
    pub id_times: IdTimes,
    /// Set when the consumer closed and its deliveries went back: it takes no more.
    pub closed: bool,
}

impl Lane {
    pub fn new(lease: Duration, settle: Arc<SettlePolicy>) -> Self {
        Lane { lease, settle, state: Mutex::default() }
    }

    pub fn lock(&self) -> MutexGuard<'_, LaneState> {
        // As for the queue's lock: a panic while holding it cannot lose a message.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LaneState {
    /// Takes a delivery out of flight, with its lease; `None` if it is not in flight.
    // Inlined, like the tag table's `insert`: an in-flight record is about 100 bytes,
    // and each call it returns through moves it once more.
    #[inline(always)]
    pub fn take_in_flight(&mut self, tag: u64) -> Option<InFlight> {
        match self.finish_in_flight(tag, |_| true) {
            Removed::Taken(flight) => Some(flight),
            Removed::Absent | Removed::Dropped => None,
        }
    }

    /// Ends the delivery `tag` for good. Its record is dropped where it lies, under the
    /// lane's lock alone, unless `shared(&entry)` says the queue's shared state must
    /// see it leave: then it is handed out.
    #[inline(always)]
    pub fn finish_in_flight(&mut self, tag: u64, shared: impl FnOnce(&Entry) -> bool) -> Removed<InFlight> {
        let mut deadline = None;
        let removed = self.in_flight.remove_or_drop(tag, |flight| {
            deadline = Some(flight.deadline);
            shared(&flight.entry)
        });
        // Not `if let Some(deadline)` for both: reading a taken record's own deadline
        // measured about 9 instructions a message fewer.
        match &removed {
            Removed::Taken(flight) => self.leases.settled(flight.deadline, tag, &self.in_flight),
            Removed::Dropped => self.leases.settled(deadline.expect("read before the drop"), tag, &self.in_flight),
            Removed::Absent => {}
        }
        removed
    }
}

pub(crate) struct InFlight {
    /// The message, its payload taken out into `payload`.
    pub entry: Entry,
    /// The payload, shared with the delivery.
    pub payload: Bytes,
    /// Deliveries so far, this one included.
    pub deliveries: u32,
    pub deadline: Instant,
}

impl InFlight {
    /// The entry whole again, to go back in a line or on to a dead-letter destination.
    pub fn into_entry(self) -> Entry {
        let mut entry = self.entry;
        entry.put_back(self.payload, self.deliveries);
        entry
    }
}

/// Lease deadlines in expiry order, cheap on the per-message path.
///
/// A consumer's deliveries get deadlines in time order, so most go on a deque; the rest
/// (extensions) go in an ordered set. A settled delivery at the front of the deque
/// leaves it at once (the common case: settled in the order taken); one settled out of
/// order stays as a stale entry, which the timer skips, until the deque is compacted,
/// when stale entries outnumber live ones. So a settlement costs no lookup, and the
/// deque's size stays proportional to what is in flight.
///
/// It is kept apart from the in-flight table, though both follow tag order mostly: tag
/// order is deadline order only while no lease is extended, and the table moves
/// long-held deliveries (the earliest deadlines) to an unordered map, which the timer
/// would then have to search.
#[derive(Default)]
pub(crate) struct Leases {
    in_order: VecDeque<(Instant, u64)>,
    out_of_order: BTreeSet<(Instant, u64)>,
}

impl Leases {
    pub fn add(&mut self, deadline: Instant, tag: u64) {
        if self.in_order.back().is_none_or(|&(last, _)| last <= deadline) {
            self.in_order.push_back((deadline, tag));
        } else {
            self.out_of_order.insert((deadline, tag));
        }
    }

    /// Forgets the lease `(deadline, tag)`, whose delivery was settled, extended or
    /// handed back (and is no longer in `in_flight` with that deadline).
    pub fn settled(&mut self, deadline: Instant, tag: u64, in_flight: &TagTable<InFlight>) {
        if !self.out_of_order.is_empty() && self.out_of_order.remove(&(deadline, tag)) {
            return;
        }
        if self.in_order.front() == Some(&(deadline, tag)) {
            self.in_order.pop_front();
        } else if self.in_order.len() > 1024 && self.in_order.len() > 2 * in_flight.len() {
            self.in_order.retain(|&(d, t)| in_flight.get(t).is_some_and(|f| f.deadline == d));
        }
    }

    pub fn first(&self) -> Option<(Instant, u64)> {
        match (self.in_order.front(), self.out_of_order.first()) {
            (Some(a), Some(b)) => Some(*a.min(b)),
            (a, b) => a.or(b).copied(),
        }
    }

    pub fn pop_first(&mut self) {
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

    pub fn clear(&mut self) {
        self.in_order.clear();
        self.out_of_order.clear();
    }
}
