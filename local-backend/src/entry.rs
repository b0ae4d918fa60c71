//! The compact form a message takes while it waits in a queue.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use courier_core::{Headers, Message, MessageId};

/// A queued message. Rare fields (headers among them: most messages have none, and even
/// an empty map costs 24 bytes and a drop) live behind one optional box, so that a
/// million plain messages cost little more than their payloads.
#[derive(Clone)]
pub(crate) struct Entry {
    pub id: MessageId,
    pub payload: Bytes,
    timestamp: Timestamp,
    pub extra: Option<Box<Extra>>,
    /// Deliveries so far.
    pub deliveries: u32,
}

#[derive(Clone, Default)]
pub(crate) struct Extra {
    pub headers: Headers,
    pub ordering_key: Option<String>,
    pub content_type: Option<String>,
    pub dedup_id: Option<String>,
    /// The message's time when `Timestamp` cannot hold it.
    time: Option<SystemTime>,
}

/// A message's time in 8 bytes instead of `SystemTime`'s 16: nanoseconds since the Unix
/// epoch, which reach the year 2554; a time outside that range (before 1970, or that
/// far ahead) is kept whole in `Extra`.
#[derive(Clone, Copy)]
struct Timestamp(u64);

/// The marker for "kept whole in `Extra`".
const TIME_IN_EXTRA: u64 = u64::MAX;

impl Entry {
    pub fn from_message(m: Message) -> Self {
        let nanos = m.timestamp.duration_since(UNIX_EPOCH).ok().and_then(|d| u64::try_from(d.as_nanos()).ok());
        let timestamp = Timestamp(nanos.filter(|n| *n != TIME_IN_EXTRA).unwrap_or(TIME_IN_EXTRA));
        let rare = !m.headers.is_empty()
            || m.ordering_key.is_some()
            || m.content_type.is_some()
            || m.dedup_id.is_some()
            || timestamp.0 == TIME_IN_EXTRA;
        let extra = rare.then(|| {
            let time = (timestamp.0 == TIME_IN_EXTRA).then_some(m.timestamp);
            let (headers, ordering_key, content_type, dedup_id) =
                (m.headers, m.ordering_key, m.content_type, m.dedup_id);
            Box::new(Extra { headers, ordering_key, content_type, dedup_id, time })
        });
        Entry { id: m.id, payload: m.payload, timestamp, extra, deliveries: 0 }
    }

    pub fn to_message(&self) -> Message {
        let extra = self.extra.as_deref();
        Message {
            id: self.id.clone(),
            payload: self.payload.clone(),
            headers: extra.map(|e| e.headers.clone()).unwrap_or_default(),
            ordering_key: extra.and_then(|e| e.ordering_key.clone()),
            content_type: extra.and_then(|e| e.content_type.clone()),
            timestamp: self.timestamp(),
            dedup_id: extra.and_then(|e| e.dedup_id.clone()),
            delay: None,
        }
    }

    /// When the message was made.
    pub fn timestamp(&self) -> SystemTime {
        match self.timestamp.0 {
            TIME_IN_EXTRA => self.extra.as_deref().and_then(|e| e.time).unwrap_or(UNIX_EPOCH),
            nanos => UNIX_EPOCH + Duration::from_nanos(nanos),
        }
    }

    /// The headers, to add to (a dead letter's); moves them into the box if need be.
    pub fn headers_mut(&mut self) -> &mut Headers {
        &mut self.extra.get_or_insert_with(Box::default).headers
    }

    pub fn ordering_key(&self) -> Option<&str> {
        self.extra.as_deref().and_then(|e| e.ordering_key.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: Message) -> Message {
        Entry::from_message(m).to_message()
    }

    /// Every field comes back as it went in, whatever the time (before 1970, the
    /// nanosecond the compact form reserves, far ahead) and with or without rare fields.
    #[test]
    fn a_message_comes_back_whole_from_its_compact_form() {
        let far = UNIX_EPOCH + Duration::from_secs(20_000_000_000);
        let times = [
            SystemTime::now(),
            UNIX_EPOCH,
            UNIX_EPOCH - Duration::from_nanos(1),
            UNIX_EPOCH + Duration::from_nanos(TIME_IN_EXTRA),
            UNIX_EPOCH + Duration::from_nanos(TIME_IN_EXTRA - 1),
            far,
        ];
        for time in times {
            let mut plain = Message::new("p");
            plain.timestamp = time;
            let back = round_trip(plain.clone());
            assert_eq!((back.id, back.payload, back.timestamp), (plain.id, plain.payload, time));
            assert!(back.headers.is_empty());

            let mut rich = Message::new("r").with_header("a", "1").with_ordering_key("k").with_dedup_id("d");
            rich.content_type = Some("text/plain".into());
            rich.timestamp = time;
            let back = round_trip(rich.clone());
            assert_eq!(back.headers, rich.headers);
            assert_eq!(
                (back.ordering_key, back.content_type, back.dedup_id),
                (rich.ordering_key, rich.content_type, rich.dedup_id)
            );
            assert_eq!(back.timestamp, time);
        }
    }

    #[test]
    fn a_dead_letters_headers_go_into_the_box_of_a_plain_message() {
        let mut entry = Entry::from_message(Message::new("p"));
        assert!(entry.extra.is_none(), "a plain message has no box");
        entry.headers_mut().insert("why".into(), "because".into());
        assert_eq!(entry.to_message().headers.get("why").map(String::as_str), Some("because"));
    }

    /// Rare fields out of the way: an entry in the ready line is 80 bytes, not 112.
    #[test]
    fn an_entry_is_small() {
        assert!(std::mem::size_of::<Entry>() <= 80, "{} bytes", std::mem::size_of::<Entry>());
    }
}
