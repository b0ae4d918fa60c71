//! The compact form a message takes while it waits in a queue.
//!
//! A plain message (an id made by Courier, its own time, no headers or keys, a payload
//! nothing else holds) costs 48 bytes beside its payload's own memory: its id, its
//! payload's pointer and length, and an empty pointer to the rare fields. Its time is
//! not stored: [`Message::new`] gives a message the millisecond its id carries, so the
//! id's first eight characters give it back. Anything else (a producer's id or time,
//! headers, a key, a message back from a delivery) keeps the fields that do not fit in
//! one box; a payload shared with others is kept as a handle in a box of its own.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use courier_core::{Headers, Message, MessageId};

/// A queued message.
pub(crate) struct Entry {
    pub id: MessageId,
    payload: Payload,
    extra: Option<Box<Extra>>,
}

/// The payload while queued: the bytes alone when nothing else holds them (16 bytes,
/// where `Bytes` takes 32), or a handle on bytes shared with others (a topic's other
/// subscriptions, a delivery still in a handler's hands).
enum Payload {
    Owned(Box<[u8]>),
    Shared(Box<Bytes>),
}

/// The fields most messages leave empty. A message with an `Extra` keeps its time here.
#[derive(Clone)]
struct Extra {
    headers: Headers,
    ordering_key: Option<String>,
    content_type: Option<String>,
    dedup_id: Option<String>,
    time: SystemTime,
    /// Deliveries so far, for a message back in line after one.
    deliveries: u32,
}

impl Extra {
    fn new(time: SystemTime) -> Self {
        Extra { headers: Headers::new(), ordering_key: None, content_type: None, dedup_id: None, time, deliveries: 0 }
    }
}

impl Payload {
    fn from_bytes(bytes: Bytes) -> Self {
        if bytes.is_empty() {
            Payload::Owned(Box::default())
        } else if bytes.is_unique() {
            // Takes the allocation over (a `Vec` given to `Message::new`): no new one.
            Payload::Owned(Vec::from(bytes).into_boxed_slice())
        } else {
            Payload::Shared(Box::new(bytes))
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Payload::Owned(bytes) if bytes.is_empty() => Bytes::new(),
            Payload::Owned(bytes) => Bytes::from(bytes),
            Payload::Shared(bytes) => *bytes,
        }
    }
}

/// The milliseconds since the Unix epoch that an id made by [`MessageId::generate`]
/// begins with: its first eight characters are the UUIDv7's 48-bit time in base64url.
/// Any other id of eight base64url characters or more reads as some number too, which is
/// why [`Entry::from_message`] relies on this only after checking it against the time.
fn id_millis(chars: [u8; 8]) -> Option<u64> {
    let mut ms = 0u64;
    let mut invalid = 0u8;
    for c in chars {
        let sextet = SEXTETS[usize::from(c)];
        invalid |= sextet;
        ms = ms << 6 | u64::from(sextet);
    }
    // One test for all eight: only a character outside the alphabet sets the high bit.
    (invalid & NOT_BASE64 == 0).then_some(ms)
}

const NOT_BASE64: u8 = 0x80;

/// Each byte's value as a base64url digit, or `NOT_BASE64`.
const SEXTETS: [u8; 256] = {
    let mut table = [NOT_BASE64; 256];
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut i = 0;
    while i < 64 {
        table[alphabet[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// The time ids give, remembering the last id's first eight characters (as one word)
/// and their time. Ids made in one millisecond share those characters, so in a batch
/// most messages find their time with one comparison, where decoding it took about 110
/// instructions, once at send and once at delivery.
#[derive(Clone, Copy)]
pub(crate) struct IdTimes {
    prefix: u64,
    time: SystemTime,
}

impl Default for IdTimes {
    /// Eight bytes of 0xff, the prefix it starts with, are not UTF-8: no id has them.
    fn default() -> Self {
        IdTimes { prefix: u64::MAX, time: UNIX_EPOCH }
    }
}

impl IdTimes {
    /// The time an id's first characters give, if they are base64url.
    #[inline(always)]
    fn of(&mut self, id: &MessageId) -> Option<SystemTime> {
        let chars: [u8; 8] = id.as_str().as_bytes().get(..8)?.try_into().ok()?;
        if u64::from_ne_bytes(chars) == self.prefix {
            return Some(self.time);
        }
        self.decode(chars)
    }

    /// A new prefix: decoded, and remembered.
    #[cold]
    #[inline(never)]
    fn decode(&mut self, chars: [u8; 8]) -> Option<SystemTime> {
        self.time = UNIX_EPOCH + Duration::from_millis(id_millis(chars)?);
        self.prefix = u64::from_ne_bytes(chars);
        Some(self.time)
    }
}

impl Entry {
    /// The compact form of `m`; `times` remembers the last id's time for the next.
    pub fn from_message(m: Message, times: &mut IdTimes) -> Self {
        let plain = m.headers.is_empty()
            && m.ordering_key.is_none()
            && m.content_type.is_none()
            && m.dedup_id.is_none()
            && times.of(&m.id) == Some(m.timestamp);
        let Message { id, payload, headers, ordering_key, content_type, timestamp, dedup_id, delay: _ } = m;
        let extra = if plain {
            // An empty map holds no memory, so there is nothing to free; yet its drop
            // walks an empty iterator, about 50 instructions a message.
            std::mem::forget(headers);
            None
        } else {
            let deliveries = 0;
            Some(Box::new(Extra { headers, ordering_key, content_type, dedup_id, time: timestamp, deliveries }))
        };
        Entry { id, payload: Payload::from_bytes(payload), extra }
    }

    /// Takes the payload out for a delivery; [`Entry::put_back`] returns it.
    pub fn take_payload(&mut self) -> Bytes {
        std::mem::replace(&mut self.payload, Payload::Owned(Box::default())).into_bytes()
    }

    /// Puts the payload back, with the deliveries so far, when the message goes back in
    /// a line (or on to a dead-letter destination).
    pub fn put_back(&mut self, payload: Bytes, deliveries: u32) {
        self.payload = Payload::from_bytes(payload);
        if deliveries != 0 || self.extra.is_some() {
            self.extra_mut().deliveries = deliveries;
        }
    }

    /// The message a delivery carries, with `payload` (taken out before).
    // Inlined, the message is built where the delivery holds it, not built and then
    // copied twice (`memcpy` calls: 58 instructions a message).
    #[inline(always)]
    pub fn message(&self, payload: Bytes, times: &mut IdTimes) -> Message {
        let extra = self.extra.as_deref();
        Message {
            id: self.id.clone(),
            payload,
            headers: extra.map(|e| e.headers.clone()).unwrap_or_default(),
            ordering_key: extra.and_then(|e| e.ordering_key.clone()),
            content_type: extra.and_then(|e| e.content_type.clone()),
            timestamp: self.timestamp(times),
            dedup_id: extra.and_then(|e| e.dedup_id.clone()),
            delay: None,
        }
    }

    /// Deliveries so far.
    pub fn deliveries(&self) -> u32 {
        self.extra.as_deref().map_or(0, |e| e.deliveries)
    }

    /// When the message was made.
    #[inline]
    pub fn timestamp(&self, times: &mut IdTimes) -> SystemTime {
        match self.extra.as_deref() {
            Some(extra) => extra.time,
            // `from_message` checked that the id gives the time back.
            None => times.of(&self.id).unwrap_or(UNIX_EPOCH),
        }
    }

    fn extra_mut(&mut self) -> &mut Extra {
        if self.extra.is_none() {
            self.extra = Some(Box::new(Extra::new(self.timestamp(&mut IdTimes::default()))));
        }
        self.extra.as_deref_mut().expect("just made")
    }

    /// The headers, to add to (a dead letter's).
    pub fn headers_mut(&mut self) -> &mut Headers {
        &mut self.extra_mut().headers
    }

    /// Forgets the dedup id and the deliveries: a dead letter is a new arrival.
    pub fn arrive_anew(&mut self) {
        if let Some(extra) = self.extra.as_deref_mut() {
            extra.dedup_id = None;
            extra.deliveries = 0;
        }
    }

    pub fn ordering_key(&self) -> Option<&str> {
        self.extra.as_deref().and_then(|e| e.ordering_key.as_deref())
    }

    /// A copy for another queue (a topic's other subscriptions): the payload becomes
    /// shared first, so neither copies it.
    pub fn share(&mut self) -> Entry {
        let bytes = self.take_payload();
        self.payload = Payload::Shared(Box::new(bytes.clone()));
        Entry { id: self.id.clone(), payload: Payload::Shared(Box::new(bytes)), extra: self.extra.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a delivery of `entry` carries, leaving the entry as it was.
    fn delivered(entry: &mut Entry) -> Message {
        let payload = entry.take_payload();
        let message = entry.message(payload.clone(), &mut IdTimes::default());
        entry.put_back(payload, entry.deliveries());
        message
    }

    fn round_trip(m: Message) -> Message {
        delivered(&mut Entry::from_message(m, &mut IdTimes::default()))
    }

    /// Every field comes back as it went in, whatever the time (before 1970, finer than a
    /// millisecond, far ahead), the id and the rare fields.
    #[test]
    fn a_message_comes_back_whole_from_its_compact_form() {
        let now = SystemTime::now();
        let times = [
            now,
            UNIX_EPOCH,
            UNIX_EPOCH - Duration::from_nanos(1),
            UNIX_EPOCH + Duration::from_millis(1_764_590_400_123),
            UNIX_EPOCH + Duration::from_millis(1_764_590_400_123) + Duration::from_nanos(1),
            UNIX_EPOCH + Duration::from_secs(20_000_000_000),
        ];
        // Producers' ids, some of which read as a time: none may change what comes back.
        let ids = ["", "x", "order-17", "AAAAAAAA", "ZmFrZS10aW1lLWlk", "ab.cdefghijk", "\u{1F600}\u{1F600}"];
        for time in times {
            for id in ids.iter().map(|id| MessageId::from(*id)).chain([MessageId::generate()]) {
                let mut plain = Message::new("p").with_id(id.clone());
                plain.timestamp = time;
                let back = round_trip(plain.clone());
                assert_eq!(back, plain, "{id:?} at {time:?}");

                let mut rich = Message::new("r").with_header("a", "1").with_ordering_key("k").with_dedup_id("d");
                rich.content_type = Some("text/plain".into());
                rich.timestamp = time;
                rich.id = id;
                assert_eq!(round_trip(rich.clone()), rich);
            }
        }
    }

    /// The remembered last prefix never gives one id the time of another, whatever
    /// was read before it.
    #[test]
    fn an_ids_time_does_not_depend_on_the_ids_read_before() {
        let ids: Vec<MessageId> =
            ["AAAAAAAA", "AAAAAAAB", "AAAAAAA", "AAAAAAA.", "AAAAAAAAzz", "\u{1F600}\u{1F600}", ""]
                .into_iter()
                .map(MessageId::from)
                .chain([MessageId::generate(), MessageId::generate()])
                .collect();
        let decoded = |id: &MessageId| {
            let chars: [u8; 8] = id.as_str().as_bytes().get(..8)?.try_into().ok()?;
            Some(UNIX_EPOCH + Duration::from_millis(id_millis(chars)?))
        };
        for before in &ids {
            for id in &ids {
                let mut times = IdTimes::default();
                times.of(before);
                assert_eq!(times.of(id), decoded(id), "{id:?} after {before:?}");
                assert_eq!(times.of(id), decoded(id), "{id:?} twice");
            }
        }
    }

    /// The case the compact form is for: `Message::new` with a payload of its own.
    #[test]
    fn a_plain_message_keeps_no_box_and_no_copy_of_its_payload() {
        let payload = vec![7u8; 100];
        let at = payload.as_ptr();
        let message = Message::new(payload);
        let mut entry = Entry::from_message(message.clone(), &mut IdTimes::default());
        assert!(entry.extra.is_none(), "a plain message has no box");
        // `message` still holds the bytes, so the entry shares them...
        assert!(matches!(entry.payload, Payload::Shared(_)));
        drop(message);
        let mut entry_alone = Entry::from_message(Message::new(vec![1u8; 100]), &mut IdTimes::default());
        assert!(matches!(entry_alone.payload, Payload::Owned(_)), "...and takes them over when nobody else does");
        let payload = entry.take_payload();
        assert_eq!(payload.as_ptr(), at, "never copied");
        entry.put_back(payload, 0);
        assert!(matches!(entry.payload, Payload::Owned(_)));
        assert!(entry.extra.is_none());
        assert_eq!(delivered(&mut entry_alone).payload, vec![1u8; 100]);
    }

    #[test]
    fn a_message_back_from_a_delivery_keeps_its_count_and_payload() {
        let mut entry = Entry::from_message(Message::new("p"), &mut IdTimes::default());
        let payload = entry.take_payload();
        let in_a_handler = entry.message(payload.clone(), &mut IdTimes::default());
        entry.put_back(payload, 2);
        assert_eq!(entry.deliveries(), 2);
        assert!(matches!(entry.payload, Payload::Shared(_)), "the handler still holds the bytes");
        let again = delivered(&mut entry);
        assert_eq!(again, in_a_handler, "the same message, time included");
        assert_eq!(entry.deliveries(), 2);
    }

    #[test]
    fn copies_for_other_queues_share_the_payload() {
        let mut entry = Entry::from_message(Message::new(vec![3u8; 10]), &mut IdTimes::default());
        let mut copy = entry.share();
        let (a, b) = (delivered(&mut entry), delivered(&mut copy));
        assert_eq!(a, b);
        assert_eq!(a.payload.as_ptr(), b.payload.as_ptr());
    }

    #[test]
    fn a_dead_letters_headers_go_into_the_box_of_a_plain_message() {
        let message = Message::new("p");
        let mut entry = Entry::from_message(message.clone(), &mut IdTimes::default());
        assert!(entry.extra.is_none(), "a plain message has no box");
        entry.headers_mut().insert("why".into(), "because".into());
        let back = delivered(&mut entry);
        assert_eq!(back.header("why"), Some("because"));
        assert_eq!(back.timestamp, message.timestamp);
    }

    /// Rare fields out of the way: an entry in the ready line is 48 bytes, so a queued
    /// 100-byte message costs 160 with its payload's allocation.
    #[test]
    fn an_entry_is_small() {
        assert!(std::mem::size_of::<Entry>() <= 48, "{} bytes", std::mem::size_of::<Entry>());
    }
}
