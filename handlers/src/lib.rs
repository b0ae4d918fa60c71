//! # Courier
//!
//! Write a message handler once, run it on any queue: the in-process backend,
//! RabbitMQ, Kafka or SQS, as a long-running worker or behind a FaaS trigger. The
//! backend is chosen by configuration, not code.
//!
//! ```
//! use std::time::Duration;
//! use courier::{App, Broker, Destination, Json, Message, Source};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Order { id: u64, total_cents: i64 }
//!
//! /// A handler is a plain async function; `Json` decodes the payload.
//! async fn handle_order(Json(order): Json<Order>) -> Result<(), courier::Error> {
//!     if order.total_cents < 0 {
//!         return Err(courier::Error::fatal("negative total")); // dead-lettered at once
//!     }
//!     Ok(()) // acked
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), courier::Error> {
//! // `memory://` here; `amqp://…`, `kafka://…` or `sqs://…` elsewhere, same code.
//! let broker = courier::connect("memory://").await?;
//! broker.send(&Destination::queue("orders")?, Message::json(&Order { id: 1, total_cents: 999 })?).await?;
//!
//! let report = App::new(broker)
//!     .route(Source::queue("orders")?, handle_order)
//!     .run_until(tokio::time::sleep(Duration::from_millis(200))) // `.run()` waits for Ctrl-C/SIGTERM
//!     .await?;
//! assert_eq!(report.acked, 1);
//! # Ok(()) }
//! ```
//!
//! - [`handler`](Handler): async functions with extractors ([`Json`], [`Context`], …),
//!   returning an [`Outcome`] or a `Result`; tower layers wrap them ([`handler_service`]).
//! - [`App`]: the worker; [`RetryPolicy`]: attempts and backoff, applied by each delivery's
//!   receipt (core owns settlement: retry versus dead letter, and the dead letter's headers).
//! - [`connect`] and [`Config`]: the backend from a URL, a TOML file or `COURIER_*` variables.
//! - `trigger` (feature `trigger`): the same handlers run from FaaS platform events, and
//!   the local FaaS emulator; a module tree of its own that the worker does not use.
//!
//! ## Cargo features
//!
//! | feature | gives |
//! |---|---|
//! | `amqp` (default) | `amqp://` and `amqps://` URLs in [`connect`], through `courier-amqp` |
//! | `sqs` | `sqs://` URLs, through `courier-sqs` (the AWS SDK) |
//! | `kafka` | `kafka://` URLs, through `courier-kafka` (builds librdkafka) |
//! | `trigger` | `courier::trigger`: AWS Lambda SQS, Kafka and RabbitMQ events in, the platform's answer out; `trigger::emulator`, a local event source mapping on any backend |
//! | `lambda` | `trigger` and `courier::trigger::lambda::run`, the AWS Lambda entry point |
//! | `http` | `trigger` and `courier::trigger::http`, HTTP push (CloudEvents, Pub/Sub) on axum |
//!
//! `memory://` (the in-process backend) is always there. The `courier` command and its
//! demo are a separate crate, `courier-cli`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod config;
mod handler;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod idempotent;
#[cfg(feature = "observe")]
mod observe;
#[cfg(feature = "otel")]
pub mod otel;
pub mod queueing;
mod trace;
#[cfg(feature = "trigger")]
pub mod trigger;
mod worker;

pub use config::{connect, redact_url, Config, WorkerConfig, SCHEMES};
pub use courier_core::{
    headers, AfterFailure, Broker, Bytes, Capabilities, Consumer, ConsumerOptions, DeadLetter, Delivery, Destination,
    DynBroker, Error, Feature, Headers, Message, MessageId, Result, RetryPolicy, Source, Stats,
};
pub use courier_local::LocalBroker;
/// The SQL backends (`sqlite://`, `postgres://`), the transactional outbox and the
/// idempotent consumer.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use courier_sql as sql;
pub use handler::{
    handler_service, BatchHandler, Context, FromIncoming, FromIncomingRef, Handler, HandlerFuture, HandlerService,
    Incoming, IntoOutcome, Json, Outcome,
};
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use idempotent::{idempotent, Idempotent};
pub use trace::TraceParent;
pub use worker::{shutdown_signal, App, RouteOptions, RunReport};

// The README's code blocks compile and run as doc tests (they use the optional
// features too: `cargo test --doc --all-features`, as `scripts/test` runs them).
#[cfg(all(doctest, feature = "observe", feature = "sqlite"))]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
