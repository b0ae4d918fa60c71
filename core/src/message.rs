//! The message model: what a producer sends and a consumer receives.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::codec::{Codec, JsonCodec};
use crate::error::Result;
// `MessageId` is defined in a leaf module so `error` can name it without importing this one.
pub use crate::id::MessageId;

const JSON_CONTENT_TYPE: &str = "application/json";

/// Message headers: string names to string values, ordered by name.
pub type Headers = BTreeMap<String, String>;

/// A message: payload bytes plus the metadata every backend carries.
///
/// The same type is sent and received. `delay` and `dedup_id` are instructions to the
/// backend at send time; on received messages `delay` is always `None`.
///
/// ```
/// use std::time::Duration;
/// use courier_core::Message;
///
/// #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
/// struct Order { id: u32 }
///
/// let msg = Message::json(&Order { id: 7 })?
///     .with_header("tenant", "acme")
///     .with_ordering_key("customer-42")
///     .with_delay(Duration::from_secs(5));
/// assert_eq!(msg.content_type.as_deref(), Some("application/json"));
/// assert_eq!(msg.decode_json::<Order>()?, Order { id: 7 });
/// # Ok::<(), courier_core::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Stable id; made by Courier when the producer gives none.
    pub id: MessageId,
    /// The payload: any bytes, not only UTF-8.
    pub payload: Bytes,
    /// Headers, string to string.
    pub headers: Headers,
    /// Messages with the same key are delivered in order, one at a time, where the
    /// backend has the `ordered_keys` capability.
    pub ordering_key: Option<String>,
    /// MIME type of the payload, e.g. `application/json`.
    pub content_type: Option<String>,
    /// When the message was created. [`Message::new`] gives the millisecond (the
    /// precision brokers keep) that its id carries too.
    pub timestamp: SystemTime,
    /// Id for deduplication within the backend's window; a repeat is accepted and dropped.
    pub dedup_id: Option<String>,
    /// Send-time instruction: do not deliver before this much time has passed.
    pub delay: Option<Duration>,
}

impl Message {
    /// A message with `payload`, a fresh id and the current time, to the millisecond.
    ///
    /// ```
    /// use std::time::UNIX_EPOCH;
    /// use courier_core::Message;
    ///
    /// let msg = Message::new("hello");
    /// assert_eq!(msg.timestamp.duration_since(UNIX_EPOCH).unwrap().subsec_nanos() % 1_000_000, 0);
    /// ```
    pub fn new(payload: impl Into<Bytes>) -> Self {
        // Whole milliseconds, as the id has: a queue that keeps the id need not keep the
        // time (the in-process backend's queued messages are 16 bytes smaller for it).
        let (id, timestamp) = MessageId::generate_at(SystemTime::now());
        Message {
            id,
            payload: payload.into(),
            headers: Headers::new(),
            ordering_key: None,
            content_type: None,
            timestamp,
            dedup_id: None,
            delay: None,
        }
    }

    /// A message whose payload is `value` as JSON, with content type `application/json`.
    pub fn json<T: serde::Serialize + ?Sized>(value: &T) -> Result<Self> {
        let mut msg = Message::new(JsonCodec::to_bytes(value)?);
        msg.content_type = Some(JSON_CONTENT_TYPE.to_owned());
        Ok(msg)
    }

    /// A message whose payload is `value` encoded by codec `C`.
    pub fn encode<C: Codec<T>, T: ?Sized>(value: &T) -> Result<Self> {
        let mut msg = Message::new(C::encode(value)?);
        msg.content_type = Some(C::CONTENT_TYPE.to_owned());
        Ok(msg)
    }

    /// Decodes the payload as JSON into `T`; a failure is a permanent [`Error::Decode`](crate::Error::Decode).
    pub fn decode_json<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        JsonCodec::from_bytes(&self.payload)
    }

    /// Decodes the payload with codec `C`.
    pub fn decode<C: Codec<T>, T>(&self) -> Result<T> {
        C::decode(&self.payload)
    }

    /// Sets the id.
    pub fn with_id(mut self, id: impl Into<MessageId>) -> Self {
        self.id = id.into();
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the ordering key.
    pub fn with_ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// Sets the content type.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Sets the dedup id.
    pub fn with_dedup_id(mut self, dedup_id: impl Into<String>) -> Self {
        self.dedup_id = Some(dedup_id.into());
        self
    }

    /// Holds the message back for `delay` after it is sent.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Header names Courier itself writes.
pub mod headers {
    /// Why a message was dead-lettered.
    pub const DEAD_LETTER_REASON: &str = "courier-dead-letter-reason";
    /// How many deliveries the message had when it was dead-lettered.
    pub const DEAD_LETTER_ATTEMPTS: &str = "courier-dead-letter-attempts";
    /// The destination (as `queue:name` or `topic:name/subscription`) it came from.
    pub const DEAD_LETTER_ORIGIN: &str = "courier-dead-letter-origin";
    /// W3C trace context, carried from producer to handler.
    pub const TRACEPARENT: &str = "traceparent";
}
