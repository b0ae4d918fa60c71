//! `amqp://` and `amqps://` URLs: what lapin understands, plus Courier's own options.

use std::time::Duration;

use courier_core::{redact_url, Error, Result};

/// How the adapter treats queues, exchanges and bindings it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeclareMode {
    /// Create what is missing (idempotent; the default).
    Create,
    /// Only check that it exists; a missing one is [`Error::NotFound`]. For brokers whose
    /// topology is owned by operators or infrastructure code.
    Verify,
}

/// The queue type used when the adapter creates a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// RabbitMQ's classic queue (the default).
    Classic,
    /// A replicated quorum queue; the attempt number then also counts the broker's
    /// `x-delivery-count`.
    Quorum,
}

/// Settings of an [`AmqpBroker`](crate::AmqpBroker), usually read from its URL.
///
/// Courier's options ride in the URL's query next to lapin's own (`heartbeat`,
/// `connection_timeout`, `channel_max`, `frame_max`, `auth_mechanism`, and for
/// `amqps://` the TLS settings), and are removed before the URL reaches lapin:
///
/// | option | values | default |
/// |---|---|---|
/// | `declare` | `create` or `verify` | `create` |
/// | `queue_type` | `classic` or `quorum` | `classic` |
/// | `prefetch` | default basic.qos per consumer, 1..=65535 | consumer option (100) |
/// | `reconnect_timeout_secs` | how long a lost connection is retried before errors surface | `30` |
/// | `queue_expires_secs` | RabbitMQ deletes a queue the adapter created once it has had no consumer for this long (`x-expires`); for temporary queues | never |
/// | `tls_ca_file` | PEM file of the CA that signed the broker's certificate, for `amqps://` with a private CA | the system's roots |
///
/// ```
/// use courier_amqp::{AmqpConfig, DeclareMode};
///
/// let config = AmqpConfig::from_url("amqp://app:s3cret@mq:5672/%2f?declare=verify&heartbeat=10")?;
/// assert_eq!(config.declare, DeclareMode::Verify);
/// // lapin keeps its own options; the password never shows in Debug output or errors.
/// assert_eq!(config.redacted(), "amqp://app:***@mq:5672/%2f?heartbeat=10");
/// assert!(!format!("{config:?}").contains("s3cret"));
/// # Ok::<(), courier_core::Error>(())
/// ```
#[derive(Clone)]
pub struct AmqpConfig {
    uri: String,
    /// Create missing topology, or only verify it.
    pub declare: DeclareMode,
    /// The type of queues the adapter creates.
    pub queue_type: QueueType,
    /// A basic.qos prefetch that overrides each consumer's own.
    pub prefetch: Option<u16>,
    /// How long a lost connection is retried before calls fail with a retryable error.
    pub reconnect_timeout: Duration,
    /// Extra trusted CA certificates (PEM) for `amqps://`, read from `tls_ca_file`.
    pub tls_ca_pem: Option<String>,
    /// `x-expires` for queues the adapter creates: unused queues disappear after this.
    pub queue_expires: Option<Duration>,
}

impl AmqpConfig {
    /// Reads an `amqp://` or `amqps://` URL.
    pub fn from_url(url: &str) -> Result<Self> {
        let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or_default();
        if scheme != "amqp" && scheme != "amqps" {
            return Err(Error::config("url", format!("{} is not an amqp:// or amqps:// URL", redact_url(url))));
        }
        let (head, query) = url.split_once('?').unwrap_or((url, ""));
        let mut config = AmqpConfig {
            uri: String::new(),
            declare: DeclareMode::Create,
            queue_type: QueueType::Classic,
            prefetch: None,
            reconnect_timeout: Duration::from_secs(30),
            tls_ca_pem: None,
            queue_expires: None,
        };
        let mut passthrough = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "declare" => {
                    config.declare = match value {
                        "create" => DeclareMode::Create,
                        "verify" => DeclareMode::Verify,
                        _ => return Err(bad(key, value, "create or verify")),
                    }
                }
                "queue_type" => {
                    config.queue_type = match value {
                        "classic" => QueueType::Classic,
                        "quorum" => QueueType::Quorum,
                        _ => return Err(bad(key, value, "classic or quorum")),
                    }
                }
                "prefetch" => {
                    config.prefetch =
                        Some(value.parse().ok().filter(|p| *p > 0).ok_or_else(|| bad(key, value, "1..=65535"))?)
                }
                "reconnect_timeout_secs" => {
                    let secs: u64 = value.parse().map_err(|_| bad(key, value, "a number of seconds"))?;
                    config.reconnect_timeout = Duration::from_secs(secs);
                }
                "queue_expires_secs" => {
                    let secs: u64 = value
                        .parse()
                        .ok()
                        .filter(|s| *s > 0)
                        .ok_or_else(|| bad(key, value, "a number of seconds above 0"))?;
                    config.queue_expires = Some(Duration::from_secs(secs));
                }
                "tls_ca_file" => {
                    let path = percent_decode(value);
                    config.tls_ca_pem = Some(std::fs::read_to_string(&path).map_err(|e| {
                        Error::config("amqp URL option tls_ca_file", format!("cannot read {path:?}: {e}"))
                    })?);
                }
                _ => passthrough.push(pair),
            }
        }
        config.uri = if passthrough.is_empty() { head.to_owned() } else { format!("{head}?{}", passthrough.join("&")) };
        Ok(config)
    }

    /// The URL handed to lapin, with the password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.uri)
    }

    /// The URL handed to lapin, credentials included.
    pub(crate) fn uri(&self) -> &str {
        &self.uri
    }
}

/// `%2F` and friends in a URL query value, for file paths.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn bad(key: &str, value: &str, allowed: &str) -> Error {
    Error::config(format!("amqp URL option {key}"), format!("{value:?} is not valid; use {allowed}"))
}

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("uri", &self.redacted())
            .field("declare", &self.declare)
            .field("queue_type", &self.queue_type)
            .field("prefetch", &self.prefetch)
            .field("reconnect_timeout", &self.reconnect_timeout)
            .field("queue_expires", &self.queue_expires)
            .field("tls_ca_pem", &self.tls_ca_pem.as_ref().map(|_| "…"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_read_and_stripped() {
        let c = AmqpConfig::from_url("amqps://u:p@h/vh?queue_type=quorum&prefetch=5&reconnect_timeout_secs=3").unwrap();
        assert_eq!(
            (c.queue_type, c.prefetch, c.reconnect_timeout),
            (QueueType::Quorum, Some(5), Duration::from_secs(3))
        );
        assert_eq!(c.uri(), "amqps://u:p@h/vh");
    }

    #[test]
    fn bad_values_name_the_option() {
        let err = AmqpConfig::from_url("amqp://h?declare=maybe").unwrap_err().to_string();
        assert!(err.contains("declare") && err.contains("create or verify"), "{err}");
        let err = AmqpConfig::from_url("amqp://h?prefetch=0").unwrap_err().to_string();
        assert!(err.contains("prefetch"), "{err}");
        assert!(AmqpConfig::from_url("http://h").is_err());
    }
}
