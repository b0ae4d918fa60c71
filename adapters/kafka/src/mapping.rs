//! Courier messages as Kafka records and back.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use courier_core::{Message, MessageId};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::Message as _;

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

/// The record's timestamp for `message`, in ms since the epoch.
pub(crate) fn timestamp_ms(message: &Message) -> i64 {
    message.timestamp.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// What a received record carries besides the message.
pub(crate) struct Received {
    pub message: Message,
    pub attempt: u32,
    pub not_before: Option<SystemTime>,
}

/// A received record as a Courier message. Records from other producers have no
/// `courier-id`: the CloudEvents `ce_id` is used, else `topic-partition-offset`, so
/// redeliveries of one record keep one id.
pub(crate) fn received(record: &rdkafka::message::BorrowedMessage<'_>) -> Received {
    let mut message = Message::new(Bytes::copy_from_slice(record.payload().unwrap_or_default()));
    let mut id = None;
    let mut ce_id = None;
    let (mut attempt, mut not_before) = (1, None);
    if let Some(headers) = record.headers() {
        for header in headers.iter() {
            let value = header.value.map(String::from_utf8_lossy).unwrap_or_default().into_owned();
            match header.key {
                ID => id = Some(value),
                CONTENT_TYPE => message.content_type = Some(value),
                ATTEMPT => attempt = value.parse::<u32>().unwrap_or(1).max(1),
                NOT_BEFORE => not_before = value.parse::<u64>().ok().map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
                key => {
                    if key == CE_ID {
                        ce_id = Some(value.clone());
                    }
                    message.headers.insert(key.to_owned(), value);
                }
            }
        }
    }
    message.id = match id.or(ce_id) {
        Some(id) => MessageId::from(id),
        None => MessageId::from(format!("{}-{}-{}", record.topic(), record.partition(), record.offset())),
    };
    message.ordering_key = record.key().map(|k| String::from_utf8_lossy(k).into_owned());
    if let Some(ms) = record.timestamp().to_millis().filter(|ms| *ms >= 0) {
        message.timestamp = UNIX_EPOCH + Duration::from_millis(ms as u64);
    }
    Received { message, attempt, not_before }
}
