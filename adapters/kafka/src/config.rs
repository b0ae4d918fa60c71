//! `kafka://` URLs: brokers, Courier's options and librdkafka settings passed through.

use std::time::Duration;

use courier_core::{redact_url, Error, Result};
use rdkafka::ClientConfig;

/// What a `kafka://` URL says.
#[derive(Clone)]
pub(crate) struct KafkaConfig {
    /// `host:port[,host:port…]`.
    pub brokers: String,
    /// Prefix of consumer group ids (`<prefix>.<queue>`), if any.
    pub group_prefix: Option<String>,
    /// Partitions of the topics Courier creates.
    pub partitions: i32,
    /// Replication factor of the topics Courier creates.
    pub replication: i32,
    /// Create missing topics (true) or report them as not found.
    pub create: bool,
    /// How long a rebalance waits for handed-out messages of revoked partitions to settle.
    pub rebalance_drain: Duration,
    /// librdkafka settings, for producer and consumers alike.
    pub client: Vec<(String, String)>,
    /// The URL with its password hidden, for errors and Debug.
    pub redacted: String,
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Settings may hold secrets (sasl.password, ssl keys): show the redacted URL only.
        f.debug_struct("KafkaConfig").field("url", &self.redacted).finish()
    }
}

const OPTIONS: &str = "group=PREFIX, partitions=N, replication_factor=N, create=true|false, \
rebalance_drain_ms=N, security_protocol=…, sasl_mechanism=…, or any librdkafka setting by its dotted name";

impl KafkaConfig {
    pub fn from_url(url: &str) -> Result<Self> {
        let redacted = redact_url(url);
        let rest = url
            .strip_prefix("kafka://")
            .ok_or_else(|| Error::config("url", format!("{redacted} is not a kafka:// URL")))?;
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let authority = authority.trim_end_matches('/');
        let (userinfo, brokers) = match authority.rsplit_once('@') {
            Some((user, hosts)) => (Some(user), hosts),
            None => (None, authority),
        };
        if brokers.is_empty() {
            return Err(Error::config("kafka URL", format!("{redacted} names no broker; write kafka://host:port")));
        }
        let mut config = KafkaConfig {
            brokers: brokers.to_owned(),
            group_prefix: None,
            partitions: 4,
            replication: 1,
            create: true,
            rebalance_drain: Duration::from_secs(10),
            client: Vec::new(),
            redacted: redacted.clone(),
        };
        if let Some(userinfo) = userinfo {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            config.client.push(("sasl.username".into(), percent_decode(user)));
            config.client.push(("sasl.password".into(), percent_decode(password)));
        }
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value);
            let number = |what: &str, range: std::ops::RangeInclusive<i64>| -> Result<i64> {
                value.parse().ok().filter(|n| range.contains(n)).ok_or_else(|| {
                    Error::config(format!("kafka URL option {what}"), format!("{value:?} is not in {range:?}"))
                })
            };
            match key {
                "group" => config.group_prefix = Some(value.clone()).filter(|v| !v.is_empty()),
                "partitions" => config.partitions = number(key, 1..=10_000)? as i32,
                "replication_factor" => config.replication = number(key, 1..=100)? as i32,
                "create" => {
                    config.create = match value.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return Err(Error::config(
                                "kafka URL option create",
                                format!("{value:?} is not true or false"),
                            ))
                        }
                    }
                }
                "rebalance_drain_ms" => {
                    config.rebalance_drain = Duration::from_millis(number(key, 0..=300_000)? as u64)
                }
                "security_protocol" => config.client.push(("security.protocol".into(), value)),
                "sasl_mechanism" => config.client.push(("sasl.mechanism".into(), value)),
                _ if key.contains('.') || key == "debug" => config.client.push((key.to_owned(), value)),
                _ => {
                    return Err(Error::config(
                        format!("kafka URL option {key}"),
                        format!("is not an option; options are {OPTIONS}"),
                    ))
                }
            }
        }
        // Credentials without a protocol: SASL over plain TCP, as most local setups run.
        let has = |c: &KafkaConfig, k: &str| c.client.iter().any(|(key, _)| key == k);
        if userinfo.is_some() && !has(&config, "security.protocol") {
            config.client.push(("security.protocol".into(), "sasl_plaintext".into()));
        }
        if userinfo.is_some() && !has(&config, "sasl.mechanism") {
            config.client.push(("sasl.mechanism".into(), "PLAIN".into()));
        }
        Ok(config)
    }

    /// librdkafka settings every client of this broker shares.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        config.set("client.id", "courier");
        for (key, value) in &self.client {
            config.set(key, value);
        }
        config
    }

    /// The consumer group of a queue or subscription.
    pub fn group_id(&self, source: &courier_core::Source) -> String {
        let name = match source {
            courier_core::Source::Queue(name) => name.to_string(),
            courier_core::Source::Subscription { topic, subscription } => format!("{topic}.{subscription}"),
        };
        match &self.group_prefix {
            Some(prefix) => format!("{prefix}.{name}"),
            None => name,
        }
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting<'a>(c: &'a KafkaConfig, key: &str) -> Option<&'a str> {
        c.client.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    #[test]
    fn parses_brokers_options_and_passthrough() {
        let c = KafkaConfig::from_url(
            "kafka://a:9092,b:9092/?group=app&partitions=6&create=false&security_protocol=ssl&fetch.min.bytes=10",
        )
        .unwrap();
        assert_eq!(c.brokers, "a:9092,b:9092");
        assert_eq!((c.group_prefix.as_deref(), c.partitions, c.create), (Some("app"), 6, false));
        assert_eq!(setting(&c, "security.protocol"), Some("ssl"));
        assert_eq!(setting(&c, "fetch.min.bytes"), Some("10"));
        assert_eq!(c.group_id(&courier_core::Source::queue("orders").unwrap()), "app.orders");
        let sub = courier_core::Source::subscription("events", "billing").unwrap();
        assert_eq!(c.group_id(&sub), "app.events.billing");
    }

    #[test]
    fn credentials_become_sasl_and_are_redacted() {
        let c = KafkaConfig::from_url("kafka://svc:p%40ss@host:9093").unwrap();
        assert_eq!(setting(&c, "sasl.username"), Some("svc"));
        assert_eq!(setting(&c, "sasl.password"), Some("p@ss"));
        assert_eq!(setting(&c, "security.protocol"), Some("sasl_plaintext"));
        assert_eq!(setting(&c, "sasl.mechanism"), Some("PLAIN"));
        assert!(!c.redacted.contains("p%40ss"), "{}", c.redacted);
    }

    #[test]
    fn mistakes_are_named() {
        let err = KafkaConfig::from_url("kafka://h:1?partitons=3").unwrap_err().to_string();
        assert!(err.contains("partitons") && err.contains("partitions=N"), "{err}");
        let err = KafkaConfig::from_url("kafka://h:1?partitions=0").unwrap_err().to_string();
        assert!(err.contains("partitions"), "{err}");
        assert!(KafkaConfig::from_url("amqp://h").is_err());
        assert!(KafkaConfig::from_url("kafka://").is_err());
    }
}
