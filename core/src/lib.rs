//! # courier-core
//!
//! The portable contract of Courier: write a message handler once, run it on any queue.
//!
//! - [`Message`]: payload bytes, headers, id, ordering key, content type, timestamp.
//! - [`Broker`] and [`Consumer`]: the traits each backend implements; [`Delivery`]: a
//!   received message, settled exactly once by ack, retry or reject; its [`Receipt`]
//!   decides retry versus dead letter from the consumer's [`SettlePolicy`] and
//!   [`RetryPolicy`], and [`DeadLetter`] builds every dead letter's headers.
//! - [`Capabilities`]: what a backend can do; asking for more is an [`Error::Unsupported`].
//! - [`Error`]: one error type that says whether retrying can help.
//! - [`backend`]: the kit for backend authors: URL parsing with typed options, the
//!   closed guard.
//! - `conformance` (feature): the contract's test cases, run by every backend.
//!
//! The contract itself, clause by clause, is `docs/contract.md` in the repository, and
//! `docs/architecture.md` follows one message from `send` to settlement.
//!
//! Backends: `courier-local` (in-process, every feature), and adapters for RabbitMQ,
//! Kafka and SQS.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

// Modules import one way only (no cycles), leaves first:
//   feature, id, retry      import nothing of the crate
//   error                   imports feature, id
//   backend, codec, destination  import error
//   message                 imports codec, error, id
//   capabilities            imports error, feature, message
//   delivery                imports destination, error, message, retry
//   broker                  imports capabilities, delivery, destination, error, message, retry
//   conformance (feature)   imports the public API
mod broker;
mod capabilities;
mod codec;
mod delivery;
mod destination;
mod error;
mod feature;
mod id;
mod message;
mod retry;

pub mod backend;

#[cfg(feature = "conformance")]
pub mod conformance;
#[cfg(any(test, feature = "conformance"))]
pub mod redaction;

pub use backend::redact_url;
pub use broker::{Broker, Consumer, ConsumerOptions, DynBroker, Stats};
pub use bytes::Bytes;
pub use capabilities::{Capabilities, Feature};
pub use codec::{Codec, JsonCodec};
pub use delivery::{Acknowledger, AfterFailure, DeadLetter, Delivery, Receipt, SettlePolicy, TaggedAcknowledger};
pub use destination::{Destination, Name, Source, MAX_NAME_LEN};
pub use error::{BoxError, Error, Result};
pub use message::{headers, Headers, Message, MessageId};
pub use retry::RetryPolicy;
