//! Choosing the backend by configuration: a URL, a TOML file, environment variables.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use courier_core::backend::BackendUrl;
pub use courier_core::redact_url;
use courier_core::{DynBroker, Error, Result, RetryPolicy};

use crate::worker::RouteOptions;

/// The URL schemes Courier knows, whether or not this build includes them.
pub const SCHEMES: &[&str] = &["memory", "sqlite", "postgres", "postgresql", "amqp", "amqps", "kafka", "sqs"];

/// Opens the backend a URL names: `memory://` (built in), `sqlite://PATH` (on by
/// default), `postgres://`, `amqp://`/`amqps://`, `kafka://` and `sqs://` (each behind
/// the cargo feature of the same name).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), courier::Error> {
/// let broker = courier::connect("memory://?capacity=10000").await?;
/// assert_eq!(broker.capabilities().backend, "local");
///
/// let err = courier::connect("redis://localhost").await.unwrap_err();
/// assert!(err.to_string().contains("memory, sqlite, postgres, postgresql, amqp, amqps, kafka, sqs"));
/// # Ok(()) }
/// ```
pub async fn connect(url: &str) -> Result<DynBroker> {
    // A file path is not a host: the SQL backends read their own URLs.
    match url.split_once("://").map(|(scheme, _)| scheme) {
        #[cfg(feature = "sqlite")]
        Some("sqlite") => return Ok(Arc::new(courier_sql::SqlBroker::connect(url).await?)),
        #[cfg(not(feature = "sqlite"))]
        Some("sqlite") => {
            return Err(Error::config(
                "backend",
                "sqlite:// needs the `sqlite` feature of the courier crate (on by default), which this build does not have",
            ))
        }
        #[cfg(feature = "postgres")]
        Some("postgres" | "postgresql") => return Ok(Arc::new(courier_sql::SqlBroker::connect(url).await?)),
        #[cfg(not(feature = "postgres"))]
        Some("postgres" | "postgresql") => {
            return Err(Error::config(
                "backend",
                "postgres:// needs the `postgres` feature of the courier crate, which this build does not have; rebuild with `--features postgres`",
            ))
        }
        _ => {}
    }
    // Parsed once here; the backend chosen by the scheme reads the rest.
    let url = BackendUrl::parse(url)?;
    match url.scheme() {
        "memory" => Ok(Arc::new(courier_local::LocalBroker::from_backend_url(url)?)),
        #[cfg(feature = "amqp")]
        "amqp" | "amqps" => Ok(Arc::new(courier_amqp::AmqpBroker::connect_url(url).await?)),
        #[cfg(not(feature = "amqp"))]
        scheme @ ("amqp" | "amqps") => Err(Error::config(
            "backend",
            format!("{scheme}:// needs the `amqp` feature of the courier crate (on by default), which this build does not have"),
        )),
        #[cfg(feature = "sqs")]
        "sqs" => Ok(Arc::new(courier_sqs::SqsBroker::connect_url(url).await?)),
        #[cfg(not(feature = "sqs"))]
        "sqs" => Err(Error::config(
            "backend",
            "sqs:// needs the `sqs` feature of the courier crate, which this build does not have; rebuild with `--features sqs`",
        )),
        #[cfg(feature = "kafka")]
        "kafka" => Ok(Arc::new(courier_kafka::KafkaBroker::connect_url(url).await?)),
        #[cfg(not(feature = "kafka"))]
        "kafka" => Err(Error::config(
            "backend",
            "kafka:// needs the `kafka` feature of the courier crate, which this build does not have; rebuild with `--features kafka` (it builds librdkafka, which needs a C compiler and make)",
        )),
        other => Err(Error::config(
            "backend",
            format!("unknown scheme {other:?} in {}; expected one of {}", url.redacted(), SCHEMES.join(", ")),
        )),
    }
}

/// Courier's settings, from defaults, then a TOML file, then `COURIER_*` variables.
///
/// ```toml
/// backend = "amqp://app:secret@mq:5672/%2f"
///
/// [worker]
/// concurrency = 8
/// batch = 10
/// lease_secs = 30
/// max_attempts = 5
/// initial_backoff_ms = 500
/// max_backoff_ms = 300000
/// shutdown_grace_secs = 30
/// ```
///
/// | variable | key |
/// |---|---|
/// | `COURIER_CONFIG` | path of the TOML file |
/// | `COURIER_BACKEND` | `backend` |
/// | `COURIER_CONCURRENCY`, `COURIER_BATCH`, `COURIER_LEASE_SECS`, `COURIER_MAX_ATTEMPTS`, `COURIER_INITIAL_BACKOFF_MS`, `COURIER_MAX_BACKOFF_MS`, `COURIER_SHUTDOWN_GRACE_SECS` | `worker.*` |
///
/// ```
/// let config = courier::Config::from_toml("backend = \"memory://\"\n[worker]\nconcurrency = 2\n")?
///     .with_env([("COURIER_MAX_ATTEMPTS", "3")])?;
/// assert_eq!(config.worker.concurrency, 2);
/// assert_eq!(config.route_options().retry.max_attempts, 3);
///
/// let err = courier::Config::from_toml("[worker]\nconcurency = 2\n").unwrap_err();
/// assert!(err.to_string().contains("unknown field `concurency`"));
/// # Ok::<(), courier::Error>(())
/// ```
#[derive(Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The backend URL. Default `memory://`.
    pub backend: String,
    /// Worker settings.
    pub worker: WorkerConfig,
}

/// The `[worker]` table.
#[derive(Clone, Debug, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Handlers running at once per route.
    pub concurrency: usize,
    /// Messages per fetch.
    pub batch: usize,
    /// Lease in seconds.
    pub lease_secs: u64,
    /// Deliveries before dead-lettering.
    pub max_attempts: u32,
    /// First retry delay in milliseconds.
    pub initial_backoff_ms: u64,
    /// Longest retry delay in milliseconds.
    pub max_backoff_ms: u64,
    /// Shutdown grace in seconds.
    pub shutdown_grace_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config { backend: "memory://".to_owned(), worker: WorkerConfig::default() }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        let route = RouteOptions::default();
        WorkerConfig {
            concurrency: route.concurrency,
            batch: route.batch,
            lease_secs: route.lease.as_secs(),
            max_attempts: route.retry.max_attempts,
            initial_backoff_ms: route.retry.initial_backoff.as_millis() as u64,
            max_backoff_ms: route.retry.max_backoff.as_millis() as u64,
            shutdown_grace_secs: 30,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config").field("backend", &redact_url(&self.backend)).field("worker", &self.worker).finish()
    }
}

impl Config {
    /// Defaults, then the file `COURIER_CONFIG` names (if set), then `COURIER_*` variables.
    pub fn load() -> Result<Self> {
        let config = match std::env::var("COURIER_CONFIG") {
            Ok(path) => Self::from_file(Path::new(&path))?,
            Err(_) => Config::default(),
        };
        config.with_env(std::env::vars().filter(|(k, _)| k.starts_with("COURIER_")))
    }

    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::config("COURIER_CONFIG", format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| match e {
            Error::Config { key, message } => Error::config(key, format!("{message} (in {})", path.display())),
            other => other,
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::config("config file", e.message().to_owned()))
    }

    /// Applies `COURIER_*` variables over these settings.
    pub fn with_env<K: AsRef<str>, V: AsRef<str>>(mut self, vars: impl IntoIterator<Item = (K, V)>) -> Result<Self> {
        for (key, value) in vars {
            let (key, value) = (key.as_ref(), value.as_ref());
            fn number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T> {
                value.trim().parse().map_err(|_| Error::config(key, format!("expected a whole number, got {value:?}")))
            }
            let w = &mut self.worker;
            match key {
                "COURIER_BACKEND" => self.backend = value.to_owned(),
                "COURIER_CONCURRENCY" => w.concurrency = number(key, value)?,
                "COURIER_BATCH" => w.batch = number(key, value)?,
                "COURIER_LEASE_SECS" => w.lease_secs = number(key, value)?,
                "COURIER_MAX_ATTEMPTS" => w.max_attempts = number(key, value)?,
                "COURIER_INITIAL_BACKOFF_MS" => w.initial_backoff_ms = number(key, value)?,
                "COURIER_MAX_BACKOFF_MS" => w.max_backoff_ms = number(key, value)?,
                "COURIER_SHUTDOWN_GRACE_SECS" => w.shutdown_grace_secs = number(key, value)?,
                "COURIER_CONFIG" => {}
                other if other.starts_with("COURIER_") => {
                    return Err(Error::config(
                        other,
                        "unknown setting; known: COURIER_CONFIG, COURIER_BACKEND, COURIER_CONCURRENCY, COURIER_BATCH, COURIER_LEASE_SECS, COURIER_MAX_ATTEMPTS, COURIER_INITIAL_BACKOFF_MS, COURIER_MAX_BACKOFF_MS, COURIER_SHUTDOWN_GRACE_SECS",
                    ))
                }
                _ => {}
            }
        }
        self.validate()?;
        Ok(self)
    }

    fn validate(&self) -> Result<()> {
        let w = &self.worker;
        for (key, value) in [("worker.concurrency", w.concurrency), ("worker.batch", w.batch)] {
            if value == 0 {
                return Err(Error::config(key, "must be at least 1"));
            }
        }
        if w.max_attempts == 0 {
            return Err(Error::config("worker.max_attempts", "must be at least 1 (1 means no retries)"));
        }
        if w.lease_secs == 0 {
            return Err(Error::config("worker.lease_secs", "must be at least 1 second"));
        }
        Ok(())
    }

    /// Route options from the `[worker]` settings.
    pub fn route_options(&self) -> RouteOptions {
        let w = &self.worker;
        RouteOptions::default()
            .concurrency(w.concurrency)
            .batch(w.batch)
            .lease(Duration::from_secs(w.lease_secs))
            .retry(
                RetryPolicy::default()
                    .max_attempts(w.max_attempts)
                    .backoff(Duration::from_millis(w.initial_backoff_ms), Duration::from_millis(w.max_backoff_ms)),
            )
    }

    /// The shutdown grace period.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.worker.shutdown_grace_secs)
    }

    /// Opens the configured backend.
    pub async fn connect(&self) -> Result<DynBroker> {
        connect(&self.backend).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_the_file_and_names_bad_keys() {
        let c = Config::from_toml("backend = \"memory://\"").unwrap().with_env([("COURIER_BATCH", "4")]).unwrap();
        assert_eq!(c.worker.batch, 4);
        let err = Config::default().with_env([("COURIER_BATCH", "four")]).unwrap_err();
        assert_eq!(err.to_string(), "configuration COURIER_BATCH: expected a whole number, got \"four\"");
        let err = Config::default().with_env([("COURIER_BACKENDS", "x")]).unwrap_err();
        assert!(err.to_string().starts_with("configuration COURIER_BACKENDS: unknown setting"), "{err}");
        let err = Config::default().with_env([("COURIER_MAX_ATTEMPTS", "0")]).unwrap_err();
        assert!(err.to_string().contains("worker.max_attempts"), "{err}");
    }

    #[tokio::test]
    async fn secrets_never_show_in_debug_or_errors() {
        let c = Config::default().with_env([("COURIER_BACKEND", "amqp://u:hunter2@h/v?password=x")]).unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("hunter2") && !debug.contains("password=x"), "{debug}");
        let err = connect("nats://u:hunter2@h").await.unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(err.to_string().contains("u:***@h"), "{err}");
    }

    #[cfg(not(feature = "kafka"))]
    #[tokio::test]
    async fn a_known_scheme_without_its_feature_says_how_to_get_it() {
        let err = connect("kafka://localhost:9092").await.unwrap_err();
        assert!(err.to_string().contains("--features kafka"), "{err}");
    }
}
