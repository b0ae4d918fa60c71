//! `amqp://` and `amqps://` URLs: what lapin understands, plus Courier's own options.

use std::time::Duration;

use courier_core::backend::BackendUrl;
use courier_core::{redact_url, Result};

/// How the adapter treats queues, exchanges and bindings it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeclareMode {
    /// Use what exists as it is, whatever its settings (durable or not, classic or
    /// quorum, with its own dead-letter exchange or none), and create what is missing
    /// with Courier's settings; the default. A queue another application declared with
    /// its client's defaults is consumed as it is, and a log line names the settings
    /// that differ from Courier's.
    Adopt,
    /// Create what is missing and insist on Courier's settings: a queue or exchange that
    /// exists with other settings is an error naming the one that differs.
    Create,
    /// Only check that it exists; a missing one is
    /// [`Error::NotFound`](courier_core::Error::NotFound). For brokers whose topology is
    /// owned by operators or infrastructure code.
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
/// `connection_timeout` in milliseconds, `channel_max`, `frame_max`, `auth_mechanism`),
/// which are checked and handed on to lapin; Courier's are removed before the URL reaches
/// lapin. Any other option is an error that names it (the rules are those of
/// [`UrlOptions`](courier_core::backend::UrlOptions)).
///
/// Heartbeats are how both ends notice a connection that died without a reset (a
/// dropped network, a paused VM): RabbitMQ proposes 60 s, and a smaller `heartbeat`
/// notices sooner (the fault tests use 5 s). `heartbeat=0` does not turn them off while
/// the server proposes a value (lapin then takes the server's); only a server configured
/// with 0 does. With heartbeats off, such a connection goes unnoticed: Courier's calls time
/// out after 15 s, but the messages RabbitMQ prefetched to a consumer on it stay unacked on
/// the broker until its kernel gives up on the socket, minutes later. The adapter logs a
/// warning when the negotiated heartbeat is 0.
///
/// | option | values | default |
/// |---|---|---|
/// | `declare` | `adopt` (use what exists as it is, create what is missing), `create` (as `adopt`, but what exists must have Courier's settings) or `verify` (create nothing) | `adopt` |
/// | `durable` | `true` or `false`: whether queues and exchanges the adapter creates survive a broker restart (`false` for applications that want transient queues) | `true` |
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
    /// Adopt existing topology and create what is missing, insist on Courier's
    /// settings, or only verify that it exists.
    pub declare: DeclareMode,
    /// Whether queues and exchanges the adapter creates are durable.
    pub durable: bool,
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
        Self::from_backend_url(BackendUrl::parse(url)?)
    }

    /// Reads a parsed `amqp://` or `amqps://` URL.
    pub fn from_backend_url(mut url: BackendUrl) -> Result<Self> {
        url.expect_scheme(crate::BACKEND, &["amqp", "amqps"])?;
        let options = url.options();
        let declare = options.take_enum(
            "declare",
            &[("adopt", DeclareMode::Adopt), ("create", DeclareMode::Create), ("verify", DeclareMode::Verify)],
        )?;
        let durable = options.take_bool("durable")?;
        let queue_type =
            options.take_enum("queue_type", &[("classic", QueueType::Classic), ("quorum", QueueType::Quorum)])?;
        let prefetch = options.take_number("prefetch", 1..=u16::MAX)?;
        let reconnect_timeout = options.take_secs("reconnect_timeout_secs", ..)?;
        let queue_expires = options.take_secs("queue_expires_secs", 1..)?;
        let tls_ca_pem = match options.take_str("tls_ca_file") {
            None => None,
            Some(path) => Some(
                std::fs::read_to_string(&path)
                    .map_err(|e| options.error("tls_ca_file", format!("cannot read {path:?}: {e}")))?,
            ),
        };
        // lapin's own options: checked here, so that a wrong one is named like Courier's,
        // and handed on to lapin (which would ignore an unknown one silently).
        let mut lapin = Vec::new();
        if let Some(n) = options.take_number::<u32>("frame_max", ..)? {
            lapin.push(format!("frame_max={n}"));
        }
        if let Some(n) = options.take_number::<u16>("channel_max", ..)? {
            lapin.push(format!("channel_max={n}"));
        }
        if let Some(n) = options.take_number::<u16>("heartbeat", ..)? {
            lapin.push(format!("heartbeat={n}"));
        }
        if let Some(n) = options.take_number::<u64>("connection_timeout", ..)? {
            lapin.push(format!("connection_timeout={n}"));
        }
        let mechanisms = "plain, amqplain, external, anonymous or rabbit-cr-demo";
        if let Some(m) = options.take_parse::<lapin::uri::SASLMechanism>("auth_mechanism", mechanisms)? {
            lapin.push(format!("auth_mechanism={m}"));
        }
        options.finish()?;
        let head = url.without_query();
        Ok(AmqpConfig {
            uri: if lapin.is_empty() { head.to_owned() } else { format!("{head}?{}", lapin.join("&")) },
            declare: declare.unwrap_or(DeclareMode::Adopt),
            durable: durable.unwrap_or(true),
            queue_type: queue_type.unwrap_or(QueueType::Classic),
            prefetch,
            reconnect_timeout: reconnect_timeout.unwrap_or(Duration::from_secs(30)),
            tls_ca_pem,
            queue_expires,
        })
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

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("uri", &self.redacted())
            .field("declare", &self.declare)
            .field("durable", &self.durable)
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
        // By default what exists is used as it is, and what is created is durable.
        let c = AmqpConfig::from_url("amqp://h").unwrap();
        assert_eq!((c.declare, c.durable), (DeclareMode::Adopt, true));
        let c = AmqpConfig::from_url("amqp://h?declare=create&durable=false").unwrap();
        assert_eq!((c.declare, c.durable), (DeclareMode::Create, false));
    }

    #[test]
    fn bad_values_name_the_option() {
        let err = AmqpConfig::from_url("amqp://h?declare=maybe").unwrap_err().to_string();
        assert!(err.contains("declare") && err.contains("adopt, create or verify"), "{err}");
        let err = AmqpConfig::from_url("amqp://h?durable=maybe").unwrap_err().to_string();
        assert!(err.contains("durable"), "{err}");
        let err = AmqpConfig::from_url("amqp://h?prefetch=0").unwrap_err().to_string();
        assert!(err.contains("prefetch"), "{err}");
        assert!(AmqpConfig::from_url("http://h").is_err());
    }

    #[test]
    fn a_wrong_option_is_named_in_the_shared_style() {
        let err = AmqpConfig::from_url("amqp://h?prefetch=lots").unwrap_err().to_string();
        assert_eq!(
            err,
            "configuration amqp URL option prefetch: \"lots\" is not valid; expected a whole number from 1 to 65535"
        );
        // lapin's own options are checked the same way, and a typo is no longer ignored.
        let err = AmqpConfig::from_url("amqps://h?heartbeat=ten").unwrap_err().to_string();
        assert!(err.starts_with("configuration amqps URL option heartbeat: \"ten\" is not valid"), "{err}");
        let err = AmqpConfig::from_url("amqp://h?prefech=5").unwrap_err().to_string();
        assert!(
            err.starts_with("configuration amqp URL option prefech: is not an option (did you mean prefetch?)"),
            "{err}"
        );
        assert!(err.contains("declare=adopt|create|verify") && err.contains("heartbeat=N"), "{err}");
    }

    #[test]
    fn lapin_options_reach_lapin() {
        let c = AmqpConfig::from_url(
            "amqp://u:p%2Fw@h:5672/%2f?heartbeat=10&prefetch=5&auth_mechanism=external&connection_timeout=500",
        )
        .unwrap();
        assert_eq!(c.uri(), "amqp://u:p%2Fw@h:5672/%2f?heartbeat=10&connection_timeout=500&auth_mechanism=EXTERNAL");
        assert_eq!(c.prefetch, Some(5));
    }

    /// Passwords made of any characters never show in the configuration's `Debug` output,
    /// its redacted URL, or its errors (the passwords and the check are
    /// `courier_core::redaction`'s).
    mod secrets_stay_secret {
        use courier_core::redaction::{assert_hidden, encode, password};
        use proptest::prelude::*;

        use super::*;

        fn check(url: &str, password: &str) {
            match AmqpConfig::from_url(url) {
                Ok(config) => {
                    assert_hidden(&format!("{config:?}"), password, "Debug");
                    assert_hidden(&config.redacted(), password, "redacted()");
                }
                Err(e) => assert_hidden(&format!("{e} {e:?}"), password, "the error"),
            }
        }

        fn urls(secret: &str) -> Vec<String> {
            vec![
                format!("amqp://user:{secret}@127.0.0.1:5672/%2f?heartbeat=10"),
                format!("amqps://user:{secret}@mq/vhost?prefetch=0"),
                format!("amqp://user:{secret}@mq/vhost?prefech=5"),
                format!("amqp://user:{secret}@mq:99999"),
                format!("kafka://user:{secret}@mq"),
                format!("amqp://{secret}@mq:5672/%2f"),
            ]
        }

        proptest! {
            #[test]
            fn percent_encoded_passwords(password in password()) {
                for url in urls(&encode(&password)) {
                    check(&url, &password);
                }
            }

            #[test]
            fn raw_passwords_the_parser_takes(password in password()) {
                // Raw `/` and `?` end the authority; a raw `:` in a token starts a password.
                let password: String = password.chars().filter(|c| !matches!(c, '/' | '?' | ':')).collect();
                for url in urls(&password) {
                    check(&url, &password);
                }
            }
        }
    }
}
