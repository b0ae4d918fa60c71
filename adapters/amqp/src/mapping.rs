//! Courier messages to AMQP 0-9-1 properties and back.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use courier_core::{Error, Headers, Message, MessageId, Result};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

/// Header the adapter keeps: which delivery the next one will be. Not shown to handlers.
pub(crate) const ATTEMPT_HEADER: &str = "x-courier-attempt";

/// Persistent delivery mode: messages survive a broker restart in durable queues.
const PERSISTENT: u8 = 2;

/// The properties of `message`, sent as delivery `attempt`.
///
/// The message id, the content type, header names and the `amqp-*` headers that become
/// properties are AMQP short strings, at most 255 bytes on the wire; a longer one is a
/// non-retryable error naming it, found here, before any I/O (lapin would panic).
pub(crate) fn properties(message: &Message, attempt: u32) -> Result<BasicProperties> {
    let secs = message.timestamp.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let mut props = BasicProperties::default()
        .with_message_id(short("message id", message.id.as_str())?)
        .with_timestamp(secs)
        .with_delivery_mode(PERSISTENT);
    if let Some(ct) = &message.content_type {
        props = props.with_content_type(short("content type", ct)?);
    }
    if message.headers.is_empty() && attempt <= 1 {
        return Ok(props);
    }
    let mut table = FieldTable::default();
    for (k, v) in &message.headers {
        // Headers that came from AMQP properties go back to being properties.
        match PROPERTY_HEADERS.iter().find(|(name, _)| name == k) {
            Some((name, set)) => props = set(props, short(&format!("value of header {name}"), v)?),
            None => {
                table.insert(
                    short(&format!("header name {:?}", abbreviated(k)), k)?,
                    AMQPValue::LongString(LongString::from(v.as_bytes().to_vec())),
                );
            }
        }
    }
    if attempt > 1 {
        table.insert(ShortString::from(ATTEMPT_HEADER), AMQPValue::LongLongInt(attempt as i64));
    }
    Ok(props.with_headers(table))
}

/// `text` as an AMQP short string, or an error naming `field` when it is over 255 bytes.
fn short(field: &str, text: &str) -> Result<ShortString> {
    ShortString::try_new(text).map_err(|_| Error::Broker {
        backend: crate::BACKEND,
        message: format!(
            "the {field} is {} bytes, and AMQP carries it as a short string of at most 255 bytes; shorten it",
            text.len()
        ),
        retryable: false,
        source: None,
    })
}

/// The first 32 characters of `text`, for naming a long header in an error.
fn abbreviated(text: &str) -> String {
    match text.char_indices().nth(32) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

type SetProperty = fn(BasicProperties, ShortString) -> BasicProperties;

/// AMQP properties that Courier shows as headers, and how to set them again.
const PROPERTY_HEADERS: [(&str, SetProperty); 4] = [
    ("amqp-correlation-id", BasicProperties::with_correlation_id),
    ("amqp-reply-to", BasicProperties::with_reply_to),
    ("amqp-type", BasicProperties::with_type),
    ("amqp-app-id", BasicProperties::with_app_id),
];

/// Headers the broker adds for its own bookkeeping; handlers never see them, and a
/// republished copy does not carry them.
fn is_broker_bookkeeping(name: &str) -> bool {
    name == "x-death"
        || name == "x-delivery-count"
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
}

/// The properties of a received message, republished as a retry or a dead letter: every
/// property the publisher set survives, with Courier's attempt header and any extra headers.
pub(crate) fn republished(
    original: &BasicProperties,
    id: &MessageId,
    next_attempt: u32,
    extra: &[(&str, String)],
) -> Result<BasicProperties> {
    let mut table = FieldTable::default();
    if let Some(headers) = original.headers() {
        for (k, v) in headers.inner() {
            if !is_broker_bookkeeping(k.as_str()) {
                table.insert(k.clone(), v.clone());
            }
        }
    }
    table.insert(ShortString::from(ATTEMPT_HEADER), AMQPValue::LongLongInt(next_attempt as i64));
    for (k, v) in extra {
        table.insert(
            short(&format!("header name {:?}", abbreviated(k)), k)?,
            AMQPValue::LongString(LongString::from(v.as_bytes().to_vec())),
        );
    }
    // The rest came off the wire as short strings already.
    let mut props = original.clone().with_message_id(short("message id", id.as_str())?).with_headers(table);
    if props.delivery_mode().is_none() {
        props = props.with_delivery_mode(PERSISTENT);
    }
    Ok(props)
}

/// A received AMQP message as a Courier message, and the attempt number it carries.
///
/// Messages from plain AMQP clients are welcome: a missing message id becomes a fresh
/// one, header values of any AMQP type are rendered as text (numbers in decimal,
/// booleans as `true`/`false`, byte arrays as UTF-8 where they are, nested values in
/// a debug form), and `correlation_id`, `reply_to`, `type` and `app_id` properties
/// appear as headers `amqp-correlation-id`, `amqp-reply-to`, `amqp-type`, `amqp-app-id`.
pub(crate) fn message(data: Bytes, props: &BasicProperties, redelivered: bool) -> (Message, u32) {
    let mut headers = Headers::new();
    let mut attempt = 1u32;
    let mut delivery_count = None;
    if let Some(table) = props.headers() {
        for (k, v) in table.inner() {
            match k.as_str() {
                ATTEMPT_HEADER => attempt = as_number(v).unwrap_or(1).clamp(1, u32::MAX as i64) as u32,
                // Quorum queues count redeliveries themselves.
                "x-delivery-count" => delivery_count = as_number(v).map(|n| n.clamp(0, u32::MAX as i64) as u32),
                name if is_broker_bookkeeping(name) => {}
                _ => {
                    headers.insert(k.as_str().to_owned(), render(v));
                }
            }
        }
    }
    // Redelivered by the broker (a consumer went away unsettled): one more attempt. A
    // quorum queue says exactly how many times; a classic queue only that it happened.
    match delivery_count {
        Some(n) => attempt = attempt.saturating_add(n),
        None if redelivered => attempt = attempt.saturating_add(1),
        None => {}
    }
    for (name, value) in [
        ("amqp-correlation-id", props.correlation_id()),
        ("amqp-reply-to", props.reply_to()),
        ("amqp-type", props.kind()),
        ("amqp-app-id", props.app_id()),
    ] {
        if let Some(v) = value {
            headers.insert(name.to_owned(), v.as_str().to_owned());
        }
    }
    let id = props.message_id().as_ref().map(|s| MessageId::from(s.as_str())).unwrap_or_else(MessageId::generate);
    // A timestamp past what `SystemTime` holds (2^63 seconds and more on Unix) names no
    // time at all: the message gets its receive time, as one without a timestamp does,
    // rather than UNIX_EPOCH, which would make it look 56 years old.
    let timestamp = props
        .timestamp()
        .and_then(|secs| UNIX_EPOCH.checked_add(Duration::from_secs(secs)))
        .unwrap_or_else(SystemTime::now);
    let message = Message {
        id,
        payload: data,
        headers,
        ordering_key: None,
        content_type: props.content_type().as_ref().map(|s| s.as_str().to_owned()),
        timestamp,
        dedup_id: None,
        delay: None,
    };
    (message, attempt)
}

fn as_number(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(n) => *n as i64,
        AMQPValue::ShortShortUInt(n) => *n as i64,
        AMQPValue::ShortInt(n) => *n as i64,
        AMQPValue::ShortUInt(n) => *n as i64,
        AMQPValue::LongInt(n) => *n as i64,
        AMQPValue::LongUInt(n) => *n as i64,
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok()?,
        _ => return None,
    })
}

fn render(v: &AMQPValue) -> String {
    match v {
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
        AMQPValue::Float(f) => f.to_string(),
        AMQPValue::Double(f) => f.to_string(),
        AMQPValue::Timestamp(t) => t.to_string(),
        other => match as_number(other) {
            Some(n) => n.to_string(),
            None => format!("{other:?}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    mod round_trip {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any message Courier can send comes back as it went: id, content type,
            /// headers (the `amqp-*` ones as properties and back), payload. One it cannot
            /// send is refused with an error, never a panic.
            #[test]
            fn a_message_survives_amqp(
                id in ".{1,40}",
                content_type in proptest::option::of("[ -~]{0,40}"),
                headers in proptest::collection::btree_map("[a-zA-Z0-9_.-]{1,40}|.{0,300}", ".{0,60}", 0..6),
                payload in proptest::collection::vec(any::<u8>(), 0..64),
            ) {
                let mut message = Message::new(payload.clone()).with_id(id.as_str());
                message.content_type = content_type.clone();
                for (k, v) in &headers {
                    message.headers.insert(k.clone(), v.clone());
                }
                let Ok(props) = properties(&message, 1) else { return Ok(()) };
                let (back, attempt) = super::message(Bytes::from(payload.clone()), &props, false);
                prop_assert_eq!(attempt, 1);
                prop_assert_eq!(back.id.as_str(), id.as_str());
                prop_assert_eq!(&back.content_type, &content_type);
                prop_assert_eq!(&back.payload[..], &payload[..]);
                for (k, v) in &headers {
                    if k != ATTEMPT_HEADER && !is_broker_bookkeeping(k) {
                        prop_assert_eq!(back.headers.get(k), Some(v), "header {:?}", k);
                    }
                }
            }
        }
    }

    #[test]
    fn headers_and_properties_survive_the_round_trip() {
        let msg = Message::new(vec![0u8, 255, 7])
            .with_id("m-1")
            .with_content_type("application/octet-stream")
            .with_header("ünï cödé", "✓ 🚀")
            .with_header("empty", "");
        let props = properties(&msg, 3).unwrap();
        let (back, attempt) = message(msg.payload.clone(), &props, false);
        assert_eq!((back.id.as_str(), attempt), ("m-1", 3));
        assert_eq!(back.headers, msg.headers, "the attempt header is not shown");
        assert_eq!(back.content_type, msg.content_type);
        let (_, attempt) = message(msg.payload.clone(), &props, true);
        assert_eq!(attempt, 4, "a broker redelivery counts");
    }

    #[test]
    fn plain_client_values_render_predictably() {
        let mut table = FieldTable::default();
        table.insert("n".into(), AMQPValue::LongInt(-42));
        table.insert("flag".into(), AMQPValue::Boolean(true));
        table.insert("bytes".into(), AMQPValue::ByteArray(b"raw".to_vec().into()));
        let props = BasicProperties::default().with_headers(table).with_correlation_id("c-9".into());
        let (m, attempt) = message(Bytes::from_static(b"x"), &props, false);
        assert_eq!(attempt, 1);
        assert_eq!(m.header("n"), Some("-42"));
        assert_eq!(m.header("flag"), Some("true"));
        assert_eq!(m.header("bytes"), Some("raw"));
        assert_eq!(m.header("amqp-correlation-id"), Some("c-9"));
        assert_eq!(m.id.as_str().len(), 22, "a fresh id when the publisher gave none");
    }

    #[test]
    fn a_timestamp_past_what_system_time_holds_is_the_receive_time() {
        // 2^64 - 1 seconds since the epoch: more than SystemTime holds (2^63 seconds on Unix).
        let before = SystemTime::now();
        let props = BasicProperties::default().with_timestamp(u64::MAX).with_message_id("far-future".into());
        let (m, attempt) = message(Bytes::from_static(b"x"), &props, false);
        assert_eq!((m.id.as_str(), attempt), ("far-future", 1), "the message itself is intact");
        assert!(m.timestamp >= before && m.timestamp <= SystemTime::now(), "{:?}", m.timestamp);
        // A time far off but one SystemTime holds is kept as it is.
        let props = BasicProperties::default().with_timestamp(i64::MAX as u64 / 2);
        let (m, _) = message(Bytes::from_static(b"x"), &props, false);
        assert_eq!(m.timestamp.duration_since(UNIX_EPOCH).unwrap().as_secs(), i64::MAX as u64 / 2);
    }

    #[test]
    fn over_long_short_strings_are_refused_by_name_before_any_io() {
        let long = "n".repeat(256);
        let fits = "f".repeat(255);
        let cases = [
            (Message::new("x").with_id(long.as_str()), "message id"),
            (Message::new("x").with_content_type(long.as_str()), "content type"),
            (Message::new("x").with_header(long.as_str(), "v"), "header name"),
            (Message::new("x").with_header("amqp-correlation-id", long.as_str()), "amqp-correlation-id"),
        ];
        for (msg, field) in cases {
            let err = properties(&msg, 1).unwrap_err();
            assert!(!err.is_retryable(), "{err}");
            let text = err.to_string();
            assert!(text.contains(field) && text.contains("256 bytes") && text.contains("255"), "{text}");
        }
        let fine = Message::new("x")
            .with_id(fits.as_str())
            .with_content_type(fits.as_str())
            .with_header(fits.as_str(), long.as_str())
            .with_header("amqp-app-id", fits.as_str());
        properties(&fine, 2).unwrap();
        // A republished copy is checked the same way.
        let err = republished(&properties(&fine, 1).unwrap(), &MessageId::from(long.as_str()), 2, &[]).unwrap_err();
        assert!(err.to_string().contains("message id"), "{err}");
    }
}
