//! In-flight deliveries by delivery tag, cheap on the per-message path.
//!
//! A queue gives tags in sequence and most deliveries are settled about in the order
//! they were taken, so the table is a deque indexed by `tag - first`: an insert is a
//! push at the back, a removal takes a slot and drops the empty slots at the front. No
//! hashing, no probing: a hash map cost about 150 instructions a message here.
//!
//! One delivery held long (a slow handler, an extended lease) while later ones settle
//! would keep every slot after it. So when empty slots outnumber the live ones, the
//! oldest live entries move to a hash map of stragglers until they no longer do: the
//! deque stays proportional to what is in flight, and each entry moves at most once.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

/// Below this many slots the deque is never compacted: holes that few cost nothing.
const COMPACT_ABOVE: usize = 1024;

/// What [`TagTable::remove_or_drop`] did.
#[derive(Debug, PartialEq)]
pub(crate) enum Removed<T> {
    /// No value had the tag.
    Absent,
    /// The value was dropped in the table.
    Dropped,
    /// The value, taken out as asked.
    Taken(T),
}

/// Values by tag; tags given to [`TagTable::insert`] in increasing order stay in the deque.
pub(crate) struct TagTable<T> {
    /// The tag of `in_order[0]`.
    first: u64,
    in_order: VecDeque<Option<T>>,
    /// Live entries of `in_order`.
    live: usize,
    /// Entries moved out of the deque (held long), or inserted out of sequence.
    stragglers: HashMap<u64, T, BuildHasherDefault<TagHasher>>,
}

impl<T> Default for TagTable<T> {
    fn default() -> Self {
        TagTable { first: 0, in_order: VecDeque::new(), live: 0, stragglers: HashMap::default() }
    }
}

impl<T> TagTable<T> {
    /// The next tag the deque takes at its back.
    fn next(&self) -> u64 {
        self.first + self.in_order.len() as u64
    }

    /// The deque's index of `tag`, if it is in the deque's range.
    fn index(&self, tag: u64) -> Option<usize> {
        let index = tag.checked_sub(self.first)?;
        (index < self.in_order.len() as u64).then_some(index as usize)
    }

    /// Adds `value` under `tag`, which must not be in the table.
    #[inline(always)]
    pub fn insert(&mut self, tag: u64, value: T) {
        if self.in_order.is_empty() {
            self.first = tag;
        }
        if tag == self.next() {
            self.in_order.push_back(Some(value));
            self.live += 1;
        } else {
            // Not the next in sequence (the queue never does this): still found by tag.
            debug_assert!(self.index(tag).is_none_or(|i| self.in_order[i].is_none()), "tag {tag} inserted twice");
            self.stragglers.insert(tag, value);
        }
    }

    pub fn get(&self, tag: u64) -> Option<&T> {
        match self.index(tag) {
            Some(i) => self.in_order[i].as_ref(),
            None => self.stragglers.get(&tag),
        }
    }

    pub fn get_mut(&mut self, tag: u64) -> Option<&mut T> {
        match self.index(tag) {
            Some(i) => self.in_order[i].as_mut(),
            None => self.stragglers.get_mut(&tag),
        }
    }

    pub fn remove(&mut self, tag: u64) -> Option<T> {
        match self.remove_or_drop(tag, |_| true) {
            Removed::Taken(value) => Some(value),
            Removed::Absent | Removed::Dropped => None,
        }
    }

    /// Removes `tag`'s value, dropping it where it lies unless `take(&value)` asks for
    /// it. An in-flight record is about 100 bytes: moved out, through `Option`s and
    /// returns, only to be dropped, it cost about 30 instructions a message.
    #[inline(always)]
    pub fn remove_or_drop(&mut self, tag: u64, take: impl FnOnce(&T) -> bool) -> Removed<T> {
        let Some(i) = self.index(tag) else {
            let straggler = if self.stragglers.is_empty() { None } else { self.stragglers.remove(&tag) };
            return match straggler {
                None => Removed::Absent,
                Some(value) if take(&value) => Removed::Taken(value),
                Some(_) => Removed::Dropped,
            };
        };
        let slot = &mut self.in_order[i];
        let Some(value) = slot.as_ref() else { return Removed::Absent };
        let removed = match take(value) {
            true => Removed::Taken(slot.take().expect("checked above")),
            false => {
                *slot = None;
                Removed::Dropped
            }
        };
        self.live -= 1;
        if i == 0 {
            self.drop_empty_front();
        } else if self.in_order.len() > COMPACT_ABOVE && self.in_order.len() > 2 * self.live {
            self.compact();
        }
        removed
    }

    // Inlined: one test in the common case, where a call cost about 30 instructions.
    #[inline(always)]
    fn drop_empty_front(&mut self) {
        while let Some(None) = self.in_order.front() {
            self.in_order.pop_front();
            self.first += 1;
        }
    }

    /// Moves the oldest live entries to the stragglers until at most half the deque is
    /// empty slots.
    fn compact(&mut self) {
        while self.in_order.len() > 2 * self.live {
            match self.in_order.pop_front() {
                Some(Some(value)) => {
                    self.stragglers.insert(self.first, value);
                    self.live -= 1;
                }
                Some(None) => {}
                None => break,
            }
            self.first += 1;
        }
        self.drop_empty_front();
    }

    pub fn len(&self) -> usize {
        self.live + self.stragglers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every entry with its tag, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        let in_order = self.in_order.iter().enumerate().filter_map(|(i, v)| Some((self.first + i as u64, v.as_ref()?)));
        in_order.chain(self.stragglers.iter().map(|(tag, v)| (*tag, v)))
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.iter().map(|(_, v)| v)
    }

    /// Every entry with its tag, taken out, in no particular order.
    pub fn into_entries(self) -> impl Iterator<Item = (u64, T)> {
        let first = self.first;
        let in_order = self.in_order.into_iter().enumerate().filter_map(move |(i, v)| Some((first + i as u64, v?)));
        in_order.chain(self.stragglers)
    }

    /// Slots the deque holds, live or empty (for tests of its bound).
    #[cfg(test)]
    fn slots(&self) -> usize {
        self.in_order.len()
    }
}

/// Delivery tags are sequential numbers: one multiply spreads them well enough, far
/// cheaper than SipHash.
#[derive(Default)]
struct TagHasher(u64);

impl Hasher for TagHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | *b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The table against a `BTreeMap` model, over a long run of inserts in sequence
    /// and removals in every order, including tags never inserted and removed twice.
    #[test]
    fn agrees_with_a_map_whatever_the_order_of_removal() {
        let mut table = TagTable::default();
        let mut model = BTreeMap::new();
        let mut next = 5u64;
        // A small deterministic generator, so a failure replays.
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for step in 0..200_000u64 {
            match random() % 10 {
                0..=4 => {
                    table.insert(next, step);
                    model.insert(next, step);
                    next += 1;
                }
                5..=7 => {
                    // Mostly the oldest, as a queue settles.
                    let tag = model.keys().next().copied().unwrap_or(0);
                    assert_eq!(table.remove(tag), model.remove(&tag));
                }
                8 => {
                    let tag = random() % (next + 10);
                    assert_eq!(table.remove(tag), model.remove(&tag));
                }
                9 if step % 2 == 0 => {
                    // Dropped in place, or taken out when asked (odd values here).
                    let tag = match random() % 2 {
                        0 => model.keys().next().copied().unwrap_or(0),
                        _ => random() % (next + 10),
                    };
                    let expected = match model.remove(&tag) {
                        None => Removed::Absent,
                        Some(v) if v % 2 == 1 => Removed::Taken(v),
                        Some(_) => Removed::Dropped,
                    };
                    assert_eq!(table.remove_or_drop(tag, |v| v % 2 == 1), expected);
                }
                _ => {
                    let tag = random() % (next + 10);
                    assert_eq!(table.get(tag), model.get(&tag));
                    if let Some(v) = table.get_mut(tag) {
                        *v += 1;
                        *model.get_mut(&tag).unwrap() += 1;
                    }
                }
            }
            assert_eq!(table.len(), model.len());
        }
        let mut all: Vec<_> = table.iter().map(|(t, v)| (t, *v)).collect();
        all.sort_unstable();
        assert_eq!(all, model.into_iter().collect::<Vec<_>>());
    }

    /// One delivery held for ever while a million after it are settled: the deque does
    /// not grow with them, and the held one is still found.
    #[test]
    fn one_delivery_held_long_does_not_keep_the_slots_after_it() {
        let mut table = TagTable::default();
        table.insert(0, "held");
        for tag in 1..1_000_000 {
            table.insert(tag, "quick");
            assert_eq!(table.remove(tag), Some("quick"));
            assert!(table.slots() <= 2 * COMPACT_ABOVE, "{} slots for 1 in flight", table.slots());
        }
        assert_eq!(table.len(), 1);
        assert_eq!(table.get(0), Some(&"held"));
        assert_eq!(table.remove(0), Some("held"));
        assert_eq!(table.len(), 0);
    }

    /// Tags out of sequence (lower than the deque's, or past its end) are still kept.
    #[test]
    fn tags_out_of_sequence_are_kept_beside_the_deque() {
        let mut table = TagTable::default();
        table.insert(10, 'a');
        table.insert(11, 'b');
        table.insert(3, 'c');
        table.insert(20, 'd');
        table.insert(12, 'e');
        for (tag, v) in [(10, 'a'), (11, 'b'), (3, 'c'), (20, 'd'), (12, 'e')] {
            assert_eq!(table.get(tag), Some(&v));
        }
        assert_eq!(table.len(), 5);
        for (tag, v) in [(3, 'c'), (12, 'e'), (10, 'a'), (20, 'd'), (11, 'b')] {
            assert_eq!(table.remove(tag), Some(v));
            assert_eq!(table.remove(tag), None);
        }
        assert_eq!(table.len(), 0);
        assert_eq!(table.slots(), 0);
    }
}
