//! Helpers the adapters' throughput benchmarks share, included by path
//! (`#[path = "../../bench_support.rs"] mod bench_support;`) so every bench reads its
//! settings and summarises its rounds the same way.
#![allow(dead_code)] // each bench uses what it needs

use std::time::Duration;

/// A numeric setting from the environment (`BENCH_MESSAGES`, `BENCH_ROUNDS`), else `default`.
pub fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Messages per second.
pub fn rate(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

/// The median of the rounds' figures (the upper one of an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

/// A 22-character id like Courier's generated ones, so both sides carry the same bytes.
pub fn uuid_like(i: usize) -> String {
    format!("{i:0>22}")
}
