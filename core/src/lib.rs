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
#![warn(missing_docs)]

mod broker;
mod capabilities;
mod codec;
mod delivery;
mod destination;
mod error;
mod message;
mod retry;

pub mod backend;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use backend::redact_url;
pub use broker::{Broker, Consumer, ConsumerOptions, DynBroker, Stats};
pub use bytes::Bytes;
pub use capabilities::{Capabilities, Feature};
pub use codec::{Codec, Json};
pub use delivery::{Acknowledger, AfterFailure, DeadLetter, Delivery, Receipt, SettlePolicy};
pub use destination::{Destination, Name, Source, MAX_NAME_LEN};
pub use error::{BoxError, Error, Result};
pub use message::{headers, Headers, Message, MessageId};
pub use retry::RetryPolicy;
