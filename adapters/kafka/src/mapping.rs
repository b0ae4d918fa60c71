//! Courier messages as Kafka records and back.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use courier_core::{Message, MessageId};
use rdkafka::message::{Header, Headers, OwnedHeaders};

/// The message id (Kafka records have none).
pub(crate) const ID: &str = "courier-id";
/// The content type, as the CloudEvents Kafka binding names it.
pub(crate) const CONTENT_TYPE: &str = "content-type";
/// Which delivery a record carried through the retry topic is (absent: 1).
pub(crate) const ATTEMPT: &str = "courier-attempt";
/// On the retry topic: not to be delivered before this time (ms since the epoch).
pub(crate) const NOT_BEFORE: &str = "courier-not-before";
/// CloudEvents binary mode (Kafka binding): attributes as `ce_` headers.
const CE_ID: &str = "ce_id";

/// Record headers for `message`, plus Courier's own `extra` ones.
pub(crate) fn headers(message: &Message, extra: &[(&str, &str)]) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(message.headers.len() + 2 + extra.len());
    headers = headers.insert(Header { key: ID, value: Some(message.id.as_str()) });
    if let Some(ct) = &message.content_type {
        headers = headers.insert(Header { key: CONTENT_TYPE, value: Some(ct.as_str()) });
    }
    for (key, value) in &message.headers {
        headers = headers.insert(Header { key: key.as_str(), value: Some(value.as_str()) });
    }
    for (key, value) in extra {
        headers = headers.insert(Header { key, value: Some(*value) });
    }
    headers
}

/// Refuses, before any I/O, a header name librdkafka would cut short: it takes names as
/// C strings, so `a\0b` would arrive as `a` (found by the round-trip property below).
pub(crate) fn check_header_names(message: &Message) -> courier_core::Result<()> {
    match message.headers.keys().find(|k| k.contains('\0')) {
        None => Ok(()),
        Some(name) => Err(courier_core::Error::Broker {
            backend: crate::BACKEND,
            message: format!(
                "header name {name:?} holds a NUL character, which Kafka header names cannot carry; rename the header"
            ),
            retryable: false,
            source: None,
        }),
    }
}

/// The record's timestamp for `message`, in ms since the epoch.
pub(crate) fn timestamp_ms(message: &Message) -> i64 {
    message.timestamp.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// What a received record carries besides the message.
pub(crate) struct Received {
    pub message: Message,
    pub attempt: u32,
    pub not_before: Option<SystemTime>,
    /// The `courier-attempt` and `courier-not-before` headers as they came: control on
    /// the retry topic, which only Courier writes; data anywhere else.
    pub control: Vec<(String, String)>,
}

impl Received {
    /// For a record of the source topic itself: what any producer wrote there is data,
    /// so the attempt and not-before headers go back among the headers, and count for
    /// nothing (a forged attempt would dead-letter early; a far-future not-before would
    /// hold the record and freeze its partition's commits).
    pub(crate) fn as_data(&mut self) {
        self.attempt = 1;
        self.not_before = None;
        self.message.headers.extend(self.control.drain(..));
    }

    /// Bytes the record holds in memory while buffered, roughly.
    pub(crate) fn size(&self) -> usize {
        let headers: usize = self.message.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.message.payload.len() + headers + self.message.ordering_key.as_ref().map_or(0, String::len) + 128
    }
}

/// A received record as a Courier message. Records from other producers have no
/// `courier-id`: the CloudEvents `ce_id` is used, else `topic-partition-offset`, so
/// redeliveries of one record keep one id. Generic over rdkafka's record types so that
/// the mapping is property-tested on records built in memory, as well as run on the
/// ones librdkafka lends.
pub(crate) fn received<M: rdkafka::Message>(record: &M) -> Received {
    let mut message = Message::new(Bytes::copy_from_slice(record.payload().unwrap_or_default()));
    let mut id = None;
    let mut ce_id = None;
    let (mut attempt, mut not_before, mut control) = (1, None, Vec::new());
    if let Some(headers) = record.headers() {
        for (key, value) in read_headers(headers) {
            match key.as_str() {
                ID => id = Some(value),
                CONTENT_TYPE => message.content_type = Some(value),
                ATTEMPT => {
                    attempt = value.parse::<u32>().unwrap_or(1).max(1);
                    control.push((key, value));
                }
                NOT_BEFORE => {
                    not_before =
                        value.parse::<u64>().ok().and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms)));
                    control.push((key, value));
                }
                _ => {
                    if key == CE_ID {
                        ce_id = Some(value.clone());
                    }
                    message.headers.insert(key, value);
                }
            }
        }
    }
    // An empty id names nothing (and would be shared by every record that sends one).
    message.id = match id.or(ce_id).filter(|id| !id.is_empty()) {
        Some(id) => MessageId::from(id),
        None => MessageId::from(format!("{}-{}-{}", record.topic(), record.partition(), record.offset())),
    };
    message.ordering_key = record.key().map(|k| String::from_utf8_lossy(k).into_owned());
    if let Some(ms) = record.timestamp().to_millis().filter(|ms| *ms >= 0) {
        message.timestamp = UNIX_EPOCH + Duration::from_millis(ms as u64);
    }
    Received { message, attempt, not_before, control }
}

/// A record's headers as text: values as UTF-8, invalid sequences replaced.
///
/// A header whose key is not UTF-8 is skipped, with a warning; the record and its other
/// headers are kept. rdkafka 0.39 reads each key with `to_str().unwrap()`, a panic for
/// such a key, and gives no safe way to its bytes (this crate forbids unsafe code), so the
/// panic is caught around that one header; it cannot have corrupted anything, as it happens
/// after librdkafka has answered, on rdkafka's own borrowed view. The default panic hook
/// still prints it; under `panic = "abort"` it would end the process.
pub(crate) fn read_headers<H: Headers>(headers: &H) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(headers.count());
    for index in 0..headers.count() {
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            headers.try_get(index).map(|header| {
                let value = header.value.map(String::from_utf8_lossy).unwrap_or_default().into_owned();
                (header.key.to_owned(), value)
            })
        }));
        match read {
            Ok(Some(pair)) => out.push(pair),
            Ok(None) => break,
            Err(_) => tracing::warn!(index, "skipped a record header whose key is not UTF-8"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy as _;

    proptest::proptest! {
        /// What Courier writes as record headers reads back as it went: the id, the
        /// content type and every header, Courier's own extras after them.
        #[test]
        fn headers_round_trip_through_a_record(
            id in ".{1,40}",
            content_type in proptest::option::of(".{0,40}"),
            headers in proptest::collection::btree_map(".{0,20}", ".{0,60}", 0..6),
            attempt in 1u32..1000,
        ) {
            let mut message = Message::new("x").with_id(id.as_str());
            message.content_type = content_type.clone();
            for (k, v) in &headers {
                message.headers.insert(k.clone(), v.clone());
            }
            if headers.keys().any(|k| k.contains('\0')) {
                proptest::prop_assert!(check_header_names(&message).is_err(), "refused before any I/O");
                return Ok(());
            }
            proptest::prop_assert!(check_header_names(&message).is_ok());
            let attempt = attempt.to_string();
            let written = super::headers(&message, &[(ATTEMPT, attempt.as_str())]);
            let read = read_headers(&written);
            let mut expected = vec![(ID.to_owned(), id.clone())];
            if let Some(ct) = &content_type {
                expected.push((CONTENT_TYPE.to_owned(), ct.clone()));
            }
            expected.extend(message.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
            expected.push((ATTEMPT.to_owned(), attempt));
            proptest::prop_assert_eq!(read, expected);
        }
    }

    /// A record as the send path writes it for `message` (the same headers, key and
    /// timestamp), held in memory as librdkafka would hand it back.
    fn as_record(message: &Message, partition: i32, offset: i64) -> rdkafka::message::OwnedMessage {
        rdkafka::message::OwnedMessage::new(
            Some(message.payload.to_vec()),
            message.ordering_key.as_ref().map(|k| k.clone().into_bytes()),
            "orders".to_owned(),
            rdkafka::Timestamp::CreateTime(timestamp_ms(message)),
            partition,
            offset,
            Some(super::headers(message, &[])),
        )
    }

    /// Names Courier writes itself; a header of the same name is not the message's own.
    fn reserved(name: &str) -> bool {
        [ID, CONTENT_TYPE, ATTEMPT, NOT_BEFORE].contains(&name) || name.contains('\0')
    }

    proptest::proptest! {
        /// A whole message round-trips through a record: payload (any bytes), id,
        /// content type, headers, ordering key and the timestamp to the millisecond.
        #[test]
        fn a_message_round_trips_through_a_record(
            payload in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            id in ".{1,40}",
            content_type in proptest::option::of(".{0,40}"),
            headers in proptest::collection::btree_map(".{0,20}", ".{0,60}", 0..6),
            key in proptest::option::of(".{0,30}"),
            ms in 0u64..=4_102_444_800_000, // up to the year 2100
            partition in 0i32..1000,
            offset in 0i64..i64::MAX,
        ) {
            let mut message = Message::new(payload.clone()).with_id(id.as_str());
            message.content_type = content_type.clone();
            message.ordering_key = key.clone();
            message.timestamp = UNIX_EPOCH + Duration::from_millis(ms) + Duration::from_micros(999);
            message.headers = headers.into_iter().filter(|(k, _)| !reserved(k)).collect();
            let mut read = received(&as_record(&message, partition, offset));
            read.as_data(); // as on the source topic
            proptest::prop_assert_eq!(&read.message.payload[..], &payload[..]);
            proptest::prop_assert_eq!(read.message.id.as_str(), id.as_str());
            proptest::prop_assert_eq!(&read.message.content_type, &content_type);
            proptest::prop_assert_eq!(&read.message.headers, &message.headers);
            proptest::prop_assert_eq!(&read.message.ordering_key, &key);
            proptest::prop_assert_eq!(read.message.timestamp, UNIX_EPOCH + Duration::from_millis(ms));
            proptest::prop_assert_eq!((read.attempt, read.not_before), (1, None));
        }

        /// Whatever a foreign producer writes (any payload, key, header values, any
        /// timestamp, Courier's own header names with any value) maps without a panic
        /// to a message with an id, its payload as it came; on the source topic nothing
        /// of it is control.
        #[test]
        fn any_record_maps_to_a_message(
            payload in proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..200)),
            key in proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..40)),
            headers in proptest::collection::vec(
                (
                    proptest::prop_oneof![
                        proptest::strategy::Just(ID.to_owned()),
                        proptest::strategy::Just(CONTENT_TYPE.to_owned()),
                        proptest::strategy::Just(ATTEMPT.to_owned()),
                        proptest::strategy::Just(NOT_BEFORE.to_owned()),
                        proptest::strategy::Just(CE_ID.to_owned()),
                        "[^\\x00]{0,20}",
                    ],
                    proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..40)),
                ),
                0..8,
            ),
            timestamp in proptest::prop_oneof![
                proptest::strategy::Just(rdkafka::Timestamp::NotAvailable),
                proptest::num::i64::ANY.prop_map(rdkafka::Timestamp::CreateTime),
                proptest::num::i64::ANY.prop_map(rdkafka::Timestamp::LogAppendTime),
            ],
            partition in proptest::num::i32::ANY,
            offset in proptest::num::i64::ANY,
        ) {
            let mut owned = OwnedHeaders::new();
            for (name, value) in &headers {
                owned = owned.insert(Header { key: name.as_str(), value: value.as_deref() });
            }
            let record = rdkafka::message::OwnedMessage::new(
                payload.clone(), key, "orders".to_owned(), timestamp, partition, offset, Some(owned),
            );
            let mut read = received(&record);
            proptest::prop_assert!(!read.message.id.as_str().is_empty());
            proptest::prop_assert!(read.attempt >= 1);
            proptest::prop_assert_eq!(&read.message.payload[..], payload.as_deref().unwrap_or_default());
            read.as_data();
            proptest::prop_assert_eq!((read.attempt, read.not_before), (1, None));
        }
    }

    #[test]
    fn headers_are_read_in_order_with_values_as_text() {
        let headers = OwnedHeaders::new()
            .insert(Header { key: "a", value: Some("1") })
            .insert(Header { key: "bin", value: Some(&b"\xffok"[..]) })
            .insert(Header::<&str> { key: "none", value: None });
        let read = read_headers(&headers);
        assert_eq!(
            read,
            [("a".to_owned(), "1".to_owned()), ("bin".into(), "\u{fffd}ok".into()), ("none".into(), String::new())]
        );
    }
}
