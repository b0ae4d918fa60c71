//! The features of the contract that some backends lack, named in capabilities and in
//! [`Error::Unsupported`](crate::Error::Unsupported).
//!
//! A leaf module: errors name a feature, capabilities answer for one, and neither needs
//! the other to say which.

use std::fmt;

/// A feature of the contract that some backends lack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Feature {
    /// Topics with named subscriptions, each getting every message.
    FanOut,
    /// Per-key FIFO delivery of messages with an ordering key.
    OrderedKeys,
    /// Holding a sent message back for a delay.
    DelayedSend,
    /// Redelivering a retried message only after a delay.
    DelayedRetry,
    /// Dropping a message whose dedup id was seen within the window.
    Dedup,
    /// Unsettled deliveries come back after a lease (visibility timeout).
    LeaseExpiry,
    /// Extending a delivery's lease while work goes on.
    LeaseExtension,
    /// Counting messages per destination.
    Stats,
    /// Removing every waiting message of a destination.
    Purge,
    /// Sending to one subscription of a topic alone (redriving its dead letters).
    SubscriptionSend,
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Feature::FanOut => "topics with subscriptions (fan-out)",
            Feature::OrderedKeys => "ordering keys (per-key FIFO)",
            Feature::DelayedSend => "delayed send",
            Feature::DelayedRetry => "retry with a delay",
            Feature::Dedup => "deduplication ids",
            Feature::LeaseExpiry => "lease expiry (redelivery of unsettled messages after a timeout)",
            Feature::LeaseExtension => "lease extension",
            Feature::Stats => "destination statistics",
            Feature::Purge => "purge",
            Feature::SubscriptionSend => "sending to one subscription alone",
        })
    }
}
