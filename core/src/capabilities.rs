//! What a backend can do, published as a value so callers and the conformance kit can ask.

use std::time::Duration;

use crate::error::{Error, Result};
// `Feature` is defined in a leaf module so `error` can name it without importing this one.
pub use crate::feature::Feature;
use crate::message::Message;

/// What a backend supports. Each backend publishes one; asking for a feature it lacks
/// returns [`Error::Unsupported`] rather than being silently ignored.
///
/// ```
/// use courier_core::{Capabilities, Feature};
///
/// let caps = Capabilities { fan_out: false, ..Capabilities::all("example") };
/// assert!(caps.supports(Feature::OrderedKeys));
/// let err = caps.require(Feature::FanOut).unwrap_err();
/// assert!(err.to_string().starts_with("example does not support topics"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// The backend's short name, used in errors ("local", "amqp", "kafka", "sqs").
    pub backend: &'static str,
    /// Topics with subscriptions.
    pub fan_out: bool,
    /// Per-key FIFO.
    pub ordered_keys: bool,
    /// The longest delay a send may ask for; `None` when delayed send is unsupported.
    pub max_delay: Option<Duration>,
    /// Retry with a delay before redelivery.
    pub delayed_retry: bool,
    /// Dedup ids honoured within a window.
    pub dedup: bool,
    /// Unsettled deliveries come back after their lease.
    pub lease_expiry: bool,
    /// Leases can be extended.
    pub lease_extension: bool,
    /// The broker itself moves poison messages to a dead-letter destination.
    pub native_dead_letter: bool,
    /// Statistics per destination.
    pub stats: bool,
    /// Purging a destination.
    pub purge: bool,
    /// Sending to one subscription of a topic alone ([`Broker::send_to_source`](crate::Broker::send_to_source)).
    pub subscription_send: bool,
    /// The largest payload in bytes.
    pub max_payload: usize,
    /// The most messages in one batch send or receive.
    pub max_batch: usize,
}

impl Capabilities {
    /// Every feature on, with generous limits; a starting point for `..` updates.
    pub fn all(backend: &'static str) -> Self {
        Capabilities {
            backend,
            fan_out: true,
            ordered_keys: true,
            max_delay: Some(Duration::from_secs(365 * 24 * 3600)),
            delayed_retry: true,
            dedup: true,
            lease_expiry: true,
            lease_extension: true,
            native_dead_letter: true,
            stats: true,
            purge: true,
            subscription_send: true,
            max_payload: 64 * 1024 * 1024,
            max_batch: 10_000,
        }
    }

    /// Whether the backend has `feature`.
    pub fn supports(&self, feature: Feature) -> bool {
        match feature {
            Feature::FanOut => self.fan_out,
            Feature::OrderedKeys => self.ordered_keys,
            Feature::DelayedSend => self.max_delay.is_some(),
            Feature::DelayedRetry => self.delayed_retry,
            Feature::Dedup => self.dedup,
            Feature::LeaseExpiry => self.lease_expiry,
            Feature::LeaseExtension => self.lease_extension,
            Feature::Stats => self.stats,
            Feature::Purge => self.purge,
            Feature::SubscriptionSend => self.subscription_send,
        }
    }

    /// `Ok` when the backend has `feature`, else [`Error::Unsupported`].
    pub fn require(&self, feature: Feature) -> Result<()> {
        if self.supports(feature) {
            Ok(())
        } else {
            Err(self.unsupported(feature))
        }
    }

    /// The [`Error::Unsupported`] for `feature` on this backend.
    pub fn unsupported(&self, feature: Feature) -> Error {
        Error::Unsupported { backend: self.backend, feature }
    }

    /// Checks a message against the backend before any I/O: payload size, delay,
    /// ordering key and dedup id. Backends call this first in `send`.
    pub fn check_message(&self, message: &Message) -> Result<()> {
        if message.payload.len() > self.max_payload {
            return Err(Error::PayloadTooLarge {
                backend: self.backend,
                size: message.payload.len(),
                limit: self.max_payload,
            });
        }
        if let Some(delay) = message.delay.filter(|d| !d.is_zero()) {
            match self.max_delay {
                None => return Err(self.unsupported(Feature::DelayedSend)),
                Some(limit) if delay > limit => {
                    return Err(Error::DelayTooLong { backend: self.backend, requested: delay, limit })
                }
                Some(_) => {}
            }
        }
        if message.ordering_key.is_some() {
            self.require(Feature::OrderedKeys)?;
        }
        if message.dedup_id.is_some() {
            self.require(Feature::Dedup)?;
        }
        Ok(())
    }

    /// Checks a whole batch: its size and each message.
    pub fn check_batch(&self, messages: &[Message]) -> Result<()> {
        if messages.len() > self.max_batch {
            return Err(Error::BatchTooLarge { backend: self.backend, size: messages.len(), limit: self.max_batch });
        }
        messages.iter().try_for_each(|m| self.check_message(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_payload_names_size_and_limit() {
        let caps = Capabilities { max_payload: 10, ..Capabilities::all("tiny") };
        let err = caps.check_message(&Message::new(vec![0u8; 11])).unwrap_err();
        assert!(matches!(err, Error::PayloadTooLarge { size: 11, limit: 10, .. }), "{err}");
        assert!(err.to_string().contains("11 bytes exceeds tiny's limit of 10 bytes"));
        caps.check_message(&Message::new(vec![0u8; 10])).unwrap();
    }

    #[test]
    fn features_a_backend_lacks_are_refused_by_name() {
        let caps = Capabilities { ordered_keys: false, dedup: false, max_delay: None, ..Capabilities::all("plain") };
        let keyed = Message::new("x").with_ordering_key("k");
        assert!(matches!(caps.check_message(&keyed), Err(Error::Unsupported { feature: Feature::OrderedKeys, .. })));
        let deduped = Message::new("x").with_dedup_id("d");
        assert!(matches!(caps.check_message(&deduped), Err(Error::Unsupported { feature: Feature::Dedup, .. })));
        let delayed = Message::new("x").with_delay(Duration::from_secs(1));
        assert!(matches!(caps.check_message(&delayed), Err(Error::Unsupported { feature: Feature::DelayedSend, .. })));
    }

    #[test]
    fn a_delay_past_the_maximum_is_refused() {
        let caps = Capabilities { max_delay: Some(Duration::from_secs(900)), ..Capabilities::all("sqs") };
        let err = caps.check_message(&Message::new("x").with_delay(Duration::from_secs(901))).unwrap_err();
        assert!(matches!(err, Error::DelayTooLong { .. }), "{err}");
    }
}
