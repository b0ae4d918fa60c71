//! The one error type every Courier backend and runtime returns.

use std::fmt;

use crate::feature::Feature;
use crate::id::MessageId;

/// A boxed error from a lower layer (a broker client, a codec).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with Courier's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in Courier.
///
/// Each variant says what happened and what to do about it. Ask
/// [`Error::is_retryable`] whether trying the same call again later can succeed.
///
/// ```
/// use courier_core::{Error, Feature};
///
/// let err = Error::Unsupported { backend: "sqs", feature: Feature::FanOut };
/// assert!(!err.is_retryable());
/// assert!(err.to_string().contains("sqs does not support topics with subscriptions"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The backend lacks a feature the call needs. Check
    /// [`Capabilities`](crate::Capabilities) before relying on it.
    #[error("{backend} does not support {feature}; check the backend's Capabilities before relying on it, or choose a backend that has it")]
    Unsupported {
        /// The backend's name, as in its capabilities.
        backend: &'static str,
        /// The missing feature.
        feature: Feature,
    },

    /// A payload is larger than the backend accepts. Raised before any network I/O.
    #[error("payload of {size} bytes exceeds {backend}'s limit of {limit} bytes; store large payloads elsewhere and send a reference")]
    PayloadTooLarge {
        /// The backend's name.
        backend: &'static str,
        /// The payload's size in bytes.
        size: usize,
        /// The backend's maximum payload in bytes.
        limit: usize,
    },

    /// A requested delay is longer than the backend can hold a message back.
    #[error("delay of {requested:?} exceeds {backend}'s maximum of {limit:?}; schedule the message closer to its time or use a backend with longer delays")]
    DelayTooLong {
        /// The backend's name.
        backend: &'static str,
        /// The delay asked for.
        requested: std::time::Duration,
        /// The longest delay the backend supports.
        limit: std::time::Duration,
    },

    /// A batch holds more messages than the backend takes in one call.
    #[error("batch of {size} messages exceeds {backend}'s limit of {limit} per call; split it")]
    BatchTooLarge {
        /// The backend's name.
        backend: &'static str,
        /// Messages in the batch.
        size: usize,
        /// The backend's maximum.
        limit: usize,
    },

    /// A queue, topic or subscription name is not valid.
    #[error("invalid {kind} name {name:?}: {reason}")]
    InvalidName {
        /// What the name was for: "queue", "topic" or "subscription".
        kind: &'static str,
        /// The rejected name.
        name: String,
        /// Why it was rejected, and what is allowed.
        reason: String,
    },

    /// A destination or subscription does not exist and the call does not create it.
    #[error("{kind} {name:?} does not exist; declare it first or enable creation")]
    NotFound {
        /// "queue", "topic" or "subscription".
        kind: &'static str,
        /// The missing name.
        name: String,
    },

    /// A delivery was settled a second time.
    #[error("message {id} was already settled; a delivery is acked, retried or rejected exactly once")]
    AlreadySettled {
        /// The message's id.
        id: MessageId,
    },

    /// The delivery's lease ran out (or its consumer closed) before settlement; the
    /// message has gone back to the queue and will be delivered again.
    #[error("lease on message {id} was lost (it expired or its consumer closed); the message will be delivered again, so keep handlers idempotent or extend the lease for long work")]
    LeaseLost {
        /// The message's id.
        id: MessageId,
    },

    /// The handle (broker, consumer) was closed.
    #[error("this {what} is closed; open a new one")]
    Closed {
        /// What was closed: "broker", "consumer".
        what: &'static str,
    },

    /// A destination with bounded capacity is full.
    #[error(
        "{destination} is full ({capacity} messages); slow down the producer, add consumers, or raise the capacity"
    )]
    Full {
        /// The destination that is full.
        destination: String,
        /// Its capacity in messages.
        capacity: usize,
    },

    /// A payload could not be decoded into the type a handler asked for. Permanent:
    /// the same bytes will never decode, so the message belongs in the dead-letter destination.
    #[error("could not decode payload as {type_name}: {source}")]
    Decode {
        /// The Rust type asked for.
        type_name: &'static str,
        /// The codec's error.
        #[source]
        source: BoxError,
    },

    /// A value could not be encoded into a payload.
    #[error("could not encode {type_name} as a payload: {source}")]
    Encode {
        /// The Rust type given.
        type_name: &'static str,
        /// The codec's error.
        #[source]
        source: BoxError,
    },

    /// Configuration is missing or wrong. Never contains a secret.
    #[error("configuration {key}: {message}")]
    Config {
        /// The key that is wrong, as the user wrote it (e.g. `COURIER_BACKEND`, `amqp.prefetch`).
        key: String,
        /// What is wrong and what is allowed.
        message: String,
    },

    /// The broker or its client failed.
    #[error("{backend}: {message}{}", if *.retryable { " (retryable)" } else { "" })]
    Broker {
        /// The backend's name.
        backend: &'static str,
        /// What failed.
        message: String,
        /// Whether trying again later can succeed.
        retryable: bool,
        /// The client's error, if any.
        #[source]
        source: Option<BoxError>,
    },

    /// A handler or operation failed for a reason of its own.
    #[error("{message}")]
    Other {
        /// What failed.
        message: String,
        /// Whether trying again later can succeed.
        retryable: bool,
    },
}

impl Error {
    /// Whether the same call may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Full { .. } => true,
            Error::Broker { retryable, .. } | Error::Other { retryable, .. } => *retryable,
            _ => false,
        }
    }

    /// A retryable broker error, for adapters.
    pub fn transient(backend: &'static str, message: impl fmt::Display, source: impl Into<BoxError>) -> Self {
        Error::Broker { backend, message: message.to_string(), retryable: true, source: Some(source.into()) }
    }

    /// A permanent broker error, for adapters.
    pub fn permanent(backend: &'static str, message: impl fmt::Display, source: impl Into<BoxError>) -> Self {
        Error::Broker { backend, message: message.to_string(), retryable: false, source: Some(source.into()) }
    }

    /// A configuration error naming the key.
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config { key: key.into(), message: message.into() }
    }

    /// A handler's own failure that should be retried.
    pub fn retryable(message: impl Into<String>) -> Self {
        Error::Other { message: message.into(), retryable: true }
    }

    /// A handler's own failure that will never succeed (dead-letter it).
    pub fn fatal(message: impl Into<String>) -> Self {
        Error::Other { message: message.into(), retryable: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_errors_say_whether_they_are_retryable() {
        let e = Error::transient("amqp", "connection reset", std::io::Error::other("eof"));
        assert!(e.is_retryable());
        assert_eq!(e.to_string(), "amqp: connection reset (retryable)");
        let e = Error::permanent("amqp", "access refused", std::io::Error::other("403"));
        assert!(!e.is_retryable());
        assert_eq!(e.to_string(), "amqp: access refused");
    }
}
