//! Broker fixtures for Courier's contract tests: how each backend under test is reached.
//!
//! Each backend has a test file in `tests/` that expands
//! [`courier_core::conformance_tests!`] with its harness from here.

use std::sync::Arc;

use async_trait::async_trait;
use courier_core::conformance::Harness;
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
