//! Message ids.
//!
//! A leaf module: errors name the message they are about, and messages carry an id,
//! so the id lives apart from both.

use std::fmt;

use base64::Engine as _;
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
        let uuid = uuid::Uuid::now_v7();
        let mut buf = [0u8; 22];
        let written = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode_slice(uuid.as_bytes(), &mut buf)
            .expect("16 bytes encode to 22 base64 characters");
        // base64 output is ASCII, so this cannot fail.
        MessageId(CompactString::from_utf8(&buf[..written]).expect("base64 is ASCII"))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
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
