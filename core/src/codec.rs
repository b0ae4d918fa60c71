//! Typed payloads: a codec turns values into payload bytes and back.

use bytes::Bytes;

use crate::error::{Error, Result};

/// Encodes values of `T` to payload bytes and decodes them back.
///
/// Decoding failures are permanent ([`Error::Decode`]): the same bytes never decode,
/// so the runtime dead-letters such messages instead of retrying them.
///
/// ```
/// use bytes::Bytes;
/// use courier_core::{Codec, Error, Message};
///
/// /// Plain UTF-8 text.
/// struct Text;
/// impl Codec<String> for Text {
///     const CONTENT_TYPE: &'static str = "text/plain; charset=utf-8";
///     fn encode(value: &String) -> Result<Bytes, Error> {
///         Ok(Bytes::copy_from_slice(value.as_bytes()))
///     }
///     fn decode(bytes: &[u8]) -> Result<String, Error> {
///         String::from_utf8(bytes.to_vec())
///             .map_err(|e| Error::Decode { type_name: "String", source: e.into() })
///     }
/// }
///
/// let msg = Message::encode::<Text, _>(&"hello".to_string())?;
/// assert_eq!(msg.decode::<Text, String>()?, "hello");
/// # Ok::<(), Error>(())
/// ```
pub trait Codec<T: ?Sized> {
    /// The content type written on encoded messages.
    const CONTENT_TYPE: &'static str;
    /// Value to bytes.
    fn encode(value: &T) -> Result<Bytes>;
    /// Bytes to value.
    fn decode(bytes: &[u8]) -> Result<T>
    where
        T: Sized;
}

/// JSON through serde; Courier's default codec (the `courier` crate's `Json` extractor
/// decodes with it).
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonCodec;

impl JsonCodec {
    /// `value` as JSON bytes (needs only `Serialize`).
    pub fn to_bytes<T: serde::Serialize + ?Sized>(value: &T) -> Result<Bytes> {
        serde_json::to_vec(value)
            .map(Bytes::from)
            .map_err(|e| Error::Encode { type_name: std::any::type_name::<T>(), source: e.into() })
    }

    /// JSON bytes as a `T` (needs only `Deserialize`).
    pub fn from_bytes<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::Decode { type_name: std::any::type_name::<T>(), source: e.into() })
    }
}

impl<T: serde::Serialize + serde::de::DeserializeOwned> Codec<T> for JsonCodec {
    const CONTENT_TYPE: &'static str = "application/json";

    fn encode(value: &T) -> Result<Bytes> {
        JsonCodec::to_bytes(value)
    }

    fn decode(bytes: &[u8]) -> Result<T> {
        JsonCodec::from_bytes(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::JsonCodec;

    #[derive(serde::Deserialize, serde::Serialize, Debug)]
    #[allow(dead_code)]
    struct Order {
        id: u32,
    }

    #[test]
    fn decode_failure_is_permanent_and_names_the_type() {
        let err = JsonCodec::from_bytes::<Order>(b"not json").unwrap_err();
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("could not decode payload as"), "{err}");
        assert!(err.to_string().contains("Order"), "{err}");
    }
}
