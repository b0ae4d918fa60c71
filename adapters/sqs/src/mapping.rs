//! Courier messages to SQS bodies and message attributes, and back.

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName};
use base64::Engine;
use courier_core::{Error, Message, MessageId, Result};

use crate::{BACKEND, MAX_PAYLOAD};

/// Message attribute carrying Courier's message id (SQS assigns its own).
pub(crate) const ID_ATTRIBUTE: &str = "courier-id";
/// Message attribute marking a base64 body (the Lambda SQS trigger reads it too).
pub(crate) const ENCODING_ATTRIBUTE: &str = "courier-encoding";
/// Message attribute carrying the content type.
pub(crate) const CONTENT_TYPE_ATTRIBUTE: &str = "content-type";
/// Message attribute carrying all headers as one JSON object, when a message Courier
/// republishes (a dead letter, with its reason, attempts and origin) would need more
/// attributes than SQS allows. Sends by applications never pack: they are refused first.
pub(crate) const PACKED_HEADERS_ATTRIBUTE: &str = "courier-headers";
/// SQS's limit on message attributes.
const MAX_ATTRIBUTES: usize = 10;

pub(crate) struct Body {
    pub text: String,
    pub encoded: bool,
}

/// Whether SQS accepts the text as a body: #x9 | #xA | #xD | #x20 to #xD7FF | #xE000 to #xFFFD | #x10000 to #x10FFFF.
fn is_sqs_text(text: &str) -> bool {
    text.chars().all(
        |c| matches!(c, '\u{9}' | '\u{a}' | '\u{d}' | '\u{20}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..),
    )
}

pub(crate) fn body(message: &Message) -> Body {
    match std::str::from_utf8(&message.payload) {
        Ok(text) if is_sqs_text(text) => Body { text: text.to_owned(), encoded: false },
        _ => Body { text: base64::engine::general_purpose::STANDARD.encode(&message.payload), encoded: true },
    }
}

/// The bytes SQS counts for a message: body plus attribute names and values.
pub(crate) fn encoded_size(message: &Message) -> usize {
    let body = match std::str::from_utf8(&message.payload) {
        Ok(text) if is_sqs_text(text) => message.payload.len(),
        _ => message.payload.len().div_ceil(3) * 4,
    };
    let attributes: usize = message.headers.iter().map(|(k, v)| attribute_name(k).len() + v.len() + 24).sum();
    body + attributes + ID_ATTRIBUTE.len() + message.id.as_str().len() + 6 + 64
}

/// Checks, before any I/O, what only SQS limits: the encoded size and the attribute count.
pub(crate) fn check_encoded(message: &Message) -> Result<()> {
    let size = encoded_size(message);
    if size > MAX_PAYLOAD {
        return Err(Error::PayloadTooLarge { backend: BACKEND, size, limit: MAX_PAYLOAD });
    }
    let needed = message.headers.len() + 2 + usize::from(message.content_type.is_some());
    if needed > MAX_ATTRIBUTES {
        return Err(Error::Broker {
            backend: BACKEND,
            message: format!(
                "SQS allows {MAX_ATTRIBUTES} message attributes and this message needs {needed} ({} headers, plus {} of Courier's); send fewer headers or put them in the payload",
                message.headers.len(),
                needed - message.headers.len()
            ),
            retryable: false,
            source: None,
        });
    }
    Ok(())
}

fn string(value: &str) -> Result<MessageAttributeValue> {
    // SQS refuses empty values; a custom String type marks an empty one.
    let (data_type, value) = if value.is_empty() { (EMPTY_TYPE, "-") } else { ("String", value) };
    MessageAttributeValue::builder()
        .data_type(data_type)
        .string_value(value)
        .build()
        .map_err(|e| Error::permanent(BACKEND, "build a message attribute", e))
}

const EMPTY_TYPE: &str = "String.courier-empty";
/// Prefix of attribute names that carry a header name SQS would refuse, base64url-encoded.
const ENCODED_NAME_PREFIX: &str = "courier-h.";

/// Whether SQS accepts an attribute name: letters, digits, `_`, `-`, `.`; no leading,
/// trailing or doubled `.`; not `AWS.`/`Amazon.`; at most 256 characters.
fn is_sqs_attribute_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.is_empty()
        && name.len() <= 256
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && !lower.starts_with("aws.")
        && !lower.starts_with("amazon.")
        && !name.starts_with(ENCODED_NAME_PREFIX)
}

fn attribute_name(header: &str) -> String {
    if is_sqs_attribute_name(header) {
        header.to_owned()
    } else {
        format!("{ENCODED_NAME_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(header))
    }
}

fn header_name(attribute: &str) -> String {
    attribute
        .strip_prefix(ENCODED_NAME_PREFIX)
        .and_then(|b64| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(b64).ok())
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .unwrap_or_else(|| attribute.to_owned())
}

pub(crate) fn attributes(message: &Message, encoded: bool) -> Result<HashMap<String, MessageAttributeValue>> {
    let mut attributes = HashMap::with_capacity(message.headers.len() + 3);
    let own = 1 + usize::from(encoded) + usize::from(message.content_type.is_some());
    if message.headers.len() + own > MAX_ATTRIBUTES {
        // A dead letter of a message that used every attribute: its headers, dead-letter
        // headers included, ride in one, rather than the dead letter failing for ever.
        let packed: std::collections::BTreeMap<&str, &str> =
            message.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let json = serde_json::to_string(&packed).map_err(|e| Error::permanent(BACKEND, "pack headers", e))?;
        attributes.insert(PACKED_HEADERS_ATTRIBUTE.to_owned(), string(&json)?);
    } else {
        for (k, v) in &message.headers {
            attributes.insert(attribute_name(k), string(v)?);
        }
    }
    attributes.insert(ID_ATTRIBUTE.to_owned(), string(message.id.as_str())?);
    if encoded {
        attributes.insert(ENCODING_ATTRIBUTE.to_owned(), string("base64")?);
    }
    if let Some(ct) = &message.content_type {
        attributes.insert(CONTENT_TYPE_ATTRIBUTE.to_owned(), string(ct)?);
    }
    Ok(attributes)
}

/// A received SQS message: the Courier message, its attempt, its receipt handle, and
/// why it cannot be handled, if it cannot (it is then dead-lettered on its own, as it
/// arrived, while the messages received with it go on).
pub(crate) struct Received {
    pub message: Message,
    pub attempt: u32,
    pub handle: String,
    pub poison: Option<String>,
}

/// The body's bytes. Courier base64-encodes only payloads SQS cannot carry as text, so
/// a `courier-encoding: base64` whose body decodes to text SQS could carry was not set by
/// Courier: that body is data, kept as it is (with the attribute as a plain header),
/// never decoded into other bytes.
fn payload(body: &str, encoding: Option<&str>) -> (Vec<u8>, bool, Option<String>) {
    if encoding != Some("base64") {
        return (body.as_bytes().to_vec(), false, None);
    }
    match base64::engine::general_purpose::STANDARD.decode(body) {
        Ok(bytes) if std::str::from_utf8(&bytes).is_ok_and(is_sqs_text) => (body.as_bytes().to_vec(), false, None),
        Ok(bytes) => (bytes, true, None),
        Err(e) => (
            body.as_bytes().to_vec(),
            false,
            Some(format!("undecodable: its courier-encoding attribute says base64, but the body is not base64 ({e})")),
        ),
    }
}

pub(crate) fn message(m: &aws_sdk_sqs::types::Message) -> Received {
    let attrs = m.message_attributes();
    let text = |name: &str| attrs.and_then(|a| a.get(name)).and_then(|v| v.string_value()).map(str::to_owned);
    let (payload, decoded, poison) = payload(m.body().unwrap_or_default(), text(ENCODING_ATTRIBUTE).as_deref());
    let id = text(ID_ATTRIBUTE).or_else(|| m.message_id().map(str::to_owned)).unwrap_or_default();
    let mut message = Message::new(payload).with_id(MessageId::from(id.as_str()));
    for (k, v) in attrs.into_iter().flatten() {
        // The encoding is Courier's when it decoded, and named in the reason when it could
        // not; a dead letter that kept it would be undecodable again where it lands.
        let encoding_used = decoded || poison.is_some();
        if matches!(k.as_str(), ID_ATTRIBUTE | CONTENT_TYPE_ATTRIBUTE) || (encoding_used && k == ENCODING_ATTRIBUTE) {
            continue;
        }
        if k == PACKED_HEADERS_ATTRIBUTE {
            let packed = v.string_value().and_then(|j| serde_json::from_str::<HashMap<String, String>>(j).ok());
            if let Some(packed) = packed {
                message.headers.extend(packed);
                continue;
            }
        }
        let value = match (v.data_type(), v.string_value(), v.binary_value()) {
            (EMPTY_TYPE, _, _) => String::new(),
            (_, Some(s), _) => s.to_owned(),
            (_, None, Some(b)) => String::from_utf8_lossy(b.as_ref()).into_owned(),
            _ => String::new(),
        };
        message.headers.insert(header_name(k), value);
    }
    message.content_type = text(CONTENT_TYPE_ATTRIBUTE);
    let system = m.attributes();
    let sys = |a: MessageSystemAttributeName| system.and_then(|s| s.get(&a)).cloned();
    message.ordering_key = sys(MessageSystemAttributeName::MessageGroupId);
    message.dedup_id = sys(MessageSystemAttributeName::MessageDeduplicationId);
    if let Some(ms) = sys(MessageSystemAttributeName::SentTimestamp).and_then(|t| t.parse::<u64>().ok()) {
        message.timestamp = UNIX_EPOCH + Duration::from_millis(ms);
    }
    let attempt = sys(MessageSystemAttributeName::ApproximateReceiveCount).and_then(|n| n.parse().ok()).unwrap_or(1);
    let handle = m.receipt_handle().unwrap_or_default().to_owned();
    Received { message, attempt, handle, poison }
}

/// The SQS name of a queue: `.` is not allowed in SQS names (but for the `.fifo` suffix),
/// so it becomes `_`: Courier's `orders.dlq` is SQS's `orders_dlq`.
pub(crate) fn queue_name(name: &str) -> String {
    match name.strip_suffix(".fifo") {
        Some(stem) => format!("{}.fifo", stem.replace('.', "_")),
        None => name.replace('.', "_"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message SQS would hand back for what `attributes` and `body` produced.
    fn round_trip(message: &Message) -> Received {
        let body = body(message);
        let attributes = attributes(message, body.encoded).unwrap();
        assert!(attributes.len() <= MAX_ATTRIBUTES, "{} attributes", attributes.len());
        let sqs = aws_sdk_sqs::types::Message::builder()
            .body(body.text)
            .set_message_attributes(Some(attributes))
            .message_id("sqs-id")
            .receipt_handle("handle")
            .build();
        super::message(&sqs)
    }

    #[test]
    fn a_dead_letter_of_a_message_using_every_attribute_still_fits() {
        let mut message = Message::new("x");
        for i in 0..8 {
            message = message.with_header(format!("h{i}"), format!("v{i}"));
        }
        check_encoded(&message).expect("8 headers and Courier's 2 attributes fit the 10");
        let letter = courier_core::DeadLetter::new(
            "bad",
            3,
            courier_core::Source::queue("q").unwrap(),
            courier_core::Destination::queue("q.dlq").unwrap(),
        );
        let dead = letter.apply(message.clone());
        let back = round_trip(&dead);
        assert_eq!(back.message.headers, dead.headers, "every header, the dead-letter ones too, comes back");
        assert_eq!(back.message.id, message.id);
    }

    #[test]
    fn a_packed_headers_attribute_that_is_not_json_stays_a_plain_header() {
        let value = MessageAttributeValue::builder().data_type("String").string_value("{not json").build().unwrap();
        let sqs = aws_sdk_sqs::types::Message::builder()
            .body("fine")
            .message_attributes(PACKED_HEADERS_ATTRIBUTE, value)
            .message_id("id")
            .receipt_handle("h")
            .build();
        let received = super::message(&sqs);
        assert!(received.poison.is_none());
        assert_eq!(received.message.header(PACKED_HEADERS_ATTRIBUTE), Some("{not json"));
        assert_eq!(&received.message.payload[..], b"fine");
    }

    #[test]
    fn a_body_is_decoded_only_when_courier_encoded_it() {
        use base64::engine::general_purpose::STANDARD;
        // Courier's own encoding of bytes SQS cannot carry: decoded.
        let binary = vec![0u8, 1, 2, 255];
        let (bytes, decoded, poison) = payload(&STANDARD.encode(&binary), Some("base64"));
        assert_eq!((bytes, decoded, poison), (binary, true, None));
        // A producer's text that merely claims base64: Courier would have sent it as text,
        // so it is data, kept as it came.
        let forged = STANDARD.encode("plain words");
        assert_eq!(payload(&forged, Some("base64")), (forged.clone().into_bytes(), false, None));
        // Not base64 at all: that message alone is poison, with a reason.
        let (bytes, _, poison) = payload("not base64!!", Some("base64"));
        assert_eq!(bytes, b"not base64!!");
        assert!(poison.unwrap().contains("not base64"));
    }

    #[test]
    fn names_sqs_refuses_are_encoded_and_come_back() {
        for header in ["with space", "ünïcödé", "AWS.trace", ".dot", "ok-name_1.x"] {
            let attribute = attribute_name(header);
            assert!(is_sqs_attribute_name(&attribute) || attribute.starts_with(ENCODED_NAME_PREFIX), "{attribute}");
            assert_eq!(header_name(&attribute), header);
        }
        assert_eq!(attribute_name("ok-name_1.x"), "ok-name_1.x", "valid names stay readable");
        assert_eq!(queue_name("orders.dlq"), "orders_dlq");
        assert_eq!(queue_name("orders.v2.fifo"), "orders_v2.fifo");
    }
}
