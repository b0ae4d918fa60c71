//! Message ids.
//!
//! A leaf module: errors name the message they are about, and messages carry an id,
//! so the id lives apart from both.

use std::cell::RefCell;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use compact_str::CompactString;

/// A message's stable identity, the key handlers deduplicate on.
///
/// Ids made by Courier are time-ordered (UUIDv7) and 22 characters long; ids given by
/// a producer are kept as they are.
///
/// ```
/// use courier_core::MessageId;
///
/// let a = MessageId::generate();
/// assert_eq!(a.as_str().len(), 22);
/// assert_eq!(MessageId::from("order-17").as_str(), "order-17");
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(CompactString);

impl MessageId {
    /// A new unique, time-ordered id.
    pub fn generate() -> Self {
        Self::generate_at(SystemTime::now()).0
    }

    /// A new id whose time is `now`, and the time it carries: `now` to the millisecond
    /// (before 1970, the id carries 0 and `now` is kept as it is). So a message reads the
    /// clock once for its id and its timestamp, and they agree.
    pub(crate) fn generate_at(now: SystemTime) -> (Self, SystemTime) {
        let (uuid, time) = V7.with(|state| {
            let mut s = state.borrow_mut();
            if s.rng == 0 {
                // The thread's first id (or, once in 2^64 ids, a state that came round
                // to 0): seeded from the OS.
                s.rng = rand::random::<u64>() | 1;
            }
            let (ms, time) = s.clock.millisecond_of(now);
            (s.next(ms), time)
        });
        (Self::from_uuid(uuid), time)
    }

    /// The id of a UUID: its 22 characters of base64url.
    fn from_uuid(uuid: u128) -> Self {
        // Checking that the text is UTF-8 goes sixteen bytes at a time from a word
        // boundary, then byte by byte: 22 characters padded to 32 check in two steps,
        // where 22 alone took one step and six single bytes (53 instructions, not 76).
        #[repr(align(8))]
        struct Aligned([u8; 32]);
        let mut text = Aligned([b'A'; 32]);
        text.0[..22].copy_from_slice(&base64_url(uuid));
        // base64 output is ASCII, so this cannot fail.
        let text = std::str::from_utf8(&text.0).expect("base64 is ASCII");
        MessageId(CompactString::new(&text[..22]))
    }

    /// The id as text.
    #[inline]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// UUIDv7s (RFC 9562) for [`MessageId::generate`], one generator per thread, so making
/// an id takes no lock and shares no cache line: the unix milliseconds, then a 42-bit
/// counter that starts at a random value each millisecond and counts up within it (the
/// RFC's method 1: one thread's ids stay in order), then 32 random bits, which tell
/// apart the ids of threads and processes made in the same millisecond.
#[derive(Clone, Copy)]
struct V7State {
    ms: u64,
    counter: u64,
    rng: u64,
    clock: LastMillisecond,
}

thread_local! {
    // Made at compile time and seeded on first use: with a run-time initializer every
    // access was checked, and a `Cell` copied the whole state in and out (about 30
    // instructions an id).
    static V7: RefCell<V7State> =
        const { RefCell::new(V7State { ms: 0, counter: 0, rng: 0, clock: LastMillisecond::EMPTY }) };
}

/// The last millisecond a time fell in, as a range of times and its count since the
/// epoch. Most ids are made in the millisecond of the one before: two comparisons then
/// give it, where subtracting the epoch, dividing and adding it back took about 70
/// instructions.
#[derive(Clone, Copy)]
struct LastMillisecond {
    start: SystemTime,
    end: SystemTime,
    ms: u64,
}

impl LastMillisecond {
    /// An empty range: no time falls in it.
    const EMPTY: Self = LastMillisecond { start: UNIX_EPOCH, end: UNIX_EPOCH, ms: 0 };

    /// The milliseconds since the epoch of `now`, and `now` cut to its millisecond
    /// (before 1970: 0, and `now` as it is).
    #[inline]
    fn millisecond_of(&mut self, now: SystemTime) -> (u64, SystemTime) {
        if self.start <= now && now < self.end {
            return (self.ms, self.start);
        }
        match now.duration_since(UNIX_EPOCH) {
            Ok(since) => {
                // Not `as_millis`: its 128-bit division costs more than the rest of the id.
                let ms = since.as_secs() * 1000 + u64::from(since.subsec_millis());
                let start = UNIX_EPOCH + Duration::from_millis(ms);
                // At the far end of the clock there is no next millisecond: not kept.
                let end = start.checked_add(Duration::from_millis(1)).unwrap_or(start);
                *self = LastMillisecond { start, end, ms };
                (ms, start)
            }
            Err(_) => (0, now),
        }
    }
}

const COUNTER_BITS: u32 = 42;

impl V7State {
    /// wyrand: a fast generator with a 64-bit state, seeded from the OS per thread.
    fn random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.rng) * u128::from(self.rng ^ 0xe703_7ed1_a0b4_28db);
        (t >> 64) as u64 ^ t as u64
    }

    /// The next id, as the UUID's 128 bits.
    fn next(&mut self, ms: u64) -> u128 {
        if ms > self.ms {
            self.ms = ms;
            // The top bit left clear, so the count has room before it runs out.
            self.counter = self.random() >> (64 - COUNTER_BITS + 1);
        } else {
            // The same millisecond, or a clock that went back: count on from the last id.
            self.counter += 1;
            if self.counter >> COUNTER_BITS != 0 {
                // 2^41 ids in one millisecond: borrow the next one.
                self.ms += 1;
                self.counter = 0;
            }
        }
        let ms = self.ms & 0xffff_ffff_ffff;
        let high = ms << 16 | 0x7000 | (self.counter >> 30) & 0xfff;
        let low = 0b10 << 62 | (self.counter & 0x3fff_ffff) << 32 | (self.random() & 0xffff_ffff);
        u128::from(high) << 64 | u128::from(low)
    }
}

/// A UUID's 16 bytes (big-endian) as 22 characters of unpadded URL-safe base64 (RFC 4648
/// section 5).
fn base64_url(uuid: u128) -> [u8; 22] {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let (high, low) = ((uuid >> 64) as u64, uuid as u64);
    let mut out = [0u8; 22];
    // Six bits a character straight from the two halves, not three bytes at a time: the
    // 11th character takes four bits from `high` and two from `low`, the last two bits
    // and four zero bits make the 22nd.
    for (i, c) in out[..10].iter_mut().enumerate() {
        *c = ALPHABET[(high >> (58 - 6 * i) & 63) as usize];
    }
    out[10] = ALPHABET[((high & 15) << 2 | low >> 62) as usize];
    for (i, c) in out[11..21].iter_mut().enumerate() {
        *c = ALPHABET[(low >> (56 - 6 * i) & 63) as usize];
    }
    out[21] = ALPHABET[((low & 3) << 4) as usize];
    out
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0.as_str())
    }
}

impl From<&str> for MessageId {
    fn from(s: &str) -> Self {
        MessageId(CompactString::from(s))
    }
}

impl From<String> for MessageId {
    fn from(s: String) -> Self {
        MessageId(CompactString::from(s))
    }
}

impl AsRef<str> for MessageId {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn uuid_of(id: &MessageId) -> uuid::Uuid {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(id.as_str()).expect("base64url");
        uuid::Uuid::from_slice(&bytes).expect("16 bytes")
    }

    #[test]
    fn the_encoding_is_unpadded_url_safe_base64() {
        let mut state = V7State { ms: 0, counter: 0, rng: 7, clock: LastMillisecond::EMPTY };
        for _ in 0..10_000 {
            let uuid = u128::from(state.random()) << 64 | u128::from(state.random());
            let expected = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(uuid.to_be_bytes());
            assert_eq!(std::str::from_utf8(&base64_url(uuid)).unwrap(), expected);
        }
    }

    #[test]
    fn an_id_is_a_uuid_v7_of_its_millisecond() {
        let now = UNIX_EPOCH + std::time::Duration::from_millis(1_764_590_400_123);
        let uuid = uuid_of(&MessageId::generate_at(now).0);
        assert_eq!(uuid.get_version_num(), 7);
        assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122);
        let (secs, nanos) = uuid.get_timestamp().expect("a v7 has a time").to_unix();
        assert_eq!((secs, nanos / 1_000_000), (1_764_590_400, 123));
    }

    /// The remembered millisecond gives every time the millisecond a fresh reading
    /// would, at its edges, before 1970 and whatever came before.
    #[test]
    fn a_time_falls_in_its_own_millisecond_whatever_came_before() {
        let base = UNIX_EPOCH + Duration::from_millis(1_764_590_400_123);
        let times = [
            base,
            base + Duration::from_nanos(1),
            base + Duration::from_nanos(999_999),
            base + Duration::from_millis(1),
            base - Duration::from_nanos(1),
            UNIX_EPOCH,
            UNIX_EPOCH + Duration::from_nanos(999_999),
            UNIX_EPOCH - Duration::from_nanos(1),
            UNIX_EPOCH - Duration::from_millis(5),
        ];
        let fresh = |t: SystemTime| {
            let mut clock = LastMillisecond::EMPTY;
            clock.millisecond_of(t)
        };
        for before in times {
            for t in times {
                let mut clock = LastMillisecond::EMPTY;
                clock.millisecond_of(before);
                assert_eq!(clock.millisecond_of(t), fresh(t), "{t:?} after {before:?}");
            }
        }
        assert_eq!(fresh(base + Duration::from_nanos(999_999)), (1_764_590_400_123, base));
        let before_1970 = UNIX_EPOCH - Duration::from_nanos(1);
        assert_eq!(fresh(before_1970), (0, before_1970));
    }

    /// So a queue that keeps a new message's id can give its time back from it.
    #[test]
    fn a_new_messages_time_is_its_ids_millisecond() {
        for _ in 0..10_000 {
            let m = crate::Message::new("x");
            let (secs, nanos) = uuid_of(&m.id).get_timestamp().expect("a v7 has a time").to_unix();
            assert_eq!(m.timestamp, UNIX_EPOCH + Duration::new(secs, nanos));
        }
    }

    #[test]
    fn one_threads_ids_keep_their_order_even_when_the_clock_goes_back() {
        let start = SystemTime::now();
        let times = (0..50_000u64).map(|i| match i % 3 {
            0 => start + std::time::Duration::from_millis(i / 1000),
            1 => start, // back
            _ => start + std::time::Duration::from_millis(i / 1000),
        });
        let ids: Vec<uuid::Uuid> = times.map(|t| uuid_of(&MessageId::generate_at(t).0)).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids of one thread in order");
    }

    #[test]
    fn ids_made_on_many_threads_at_once_are_distinct() {
        let threads: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..100_000).map(|_| MessageId::generate()).collect::<Vec<_>>()))
            .collect();
        let mut all = std::collections::HashSet::new();
        for t in threads {
            for id in t.join().unwrap() {
                assert!(all.insert(id.clone()), "{id} made twice");
            }
        }
        assert_eq!(all.len(), 400_000);
    }
}
