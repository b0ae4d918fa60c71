//! Broker fixtures for Courier's contract tests: how each backend under test is reached.
//!
//! Each backend has a test file in `tests/` that expands
//! [`courier_core::conformance_tests!`] with its harness from here. A fixture uses the
//! endpoint in its environment variable when set, else the broker `scripts/brokers up`
//! started on this machine. A broker that cannot be reached fails the tests: nothing is
//! skipped.

use std::sync::Arc;

use async_trait::async_trait;
use courier_core::conformance::{Harness, Timing};
use courier_core::{DynBroker, Result};

/// The in-process backend: a fresh broker per case.
#[derive(Debug, Default, Clone)]
pub struct LocalHarness;

#[async_trait]
impl Harness for LocalHarness {
    async fn broker(&self) -> Result<DynBroker> {
        Ok(Arc::new(courier_local::LocalBroker::new()))
    }
}

/// The endpoint a fixture uses: `$variable` if set, else `default`.
pub fn endpoint(variable: &str, default: &str) -> String {
    std::env::var(variable).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_owned())
}

/// RabbitMQ: `$COURIER_TEST_AMQP`, else the local server at 127.0.0.1:5672 (guest/guest).
pub fn amqp_url() -> String {
    endpoint("COURIER_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2f")
}

/// The RabbitMQ backend; each case opens its own connection.
#[derive(Debug, Default, Clone)]
pub struct AmqpHarness;

#[async_trait]
impl Harness for AmqpHarness {
    async fn broker(&self) -> Result<DynBroker> {
        let url = amqp_url();
        let broker = courier_amqp::AmqpBroker::connect(&url).await.map_err(|e| {
            eprintln!("cannot reach RabbitMQ at {}: {e}; run scripts/brokers up", courier_core::redact_url(&url));
            e
        })?;
        Ok(Arc::new(broker))
    }

    fn timing(&self) -> Timing {
        // Network round trips and delay buckets: allow a little more than in process.
        Timing { quiet: std::time::Duration::from_millis(300), ..Timing::default() }
    }
}
