//! `kafka://` URLs: brokers, Courier's options and librdkafka settings passed through.

use std::time::Duration;

use courier_core::backend::BackendUrl;
use courier_core::Result;
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

impl KafkaConfig {
    #[cfg(test)]
    pub fn from_url(url: &str) -> Result<Self> {
        Self::from_backend_url(BackendUrl::parse(url)?)
    }

    pub fn from_backend_url(mut url: BackendUrl) -> Result<Self> {
        url.expect_scheme(crate::BACKEND, &["kafka"])?;
        let redacted = url.redacted();
        if url.hosts().is_empty() {
            return Err(url.error(format!("{redacted} names no broker; write kafka://host:port")));
        }
        if url.path().is_some_and(|p| !p.is_empty()) {
            return Err(url.error(format!("{redacted} has a path, which kafka:// URLs do not take")));
        }
        let brokers = url.hosts().iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        let mut client = Vec::new();
        if let Some(user) = url.user() {
            client.push(("sasl.username".to_owned(), user.to_owned()));
            client.push(("sasl.password".to_owned(), url.password().unwrap_or_default().to_owned()));
        }
        let has_credentials = url.user().is_some();
        let options = url.options();
        let group_prefix = options.take_str("group").filter(|g| !g.is_empty());
        let partitions = options.take_number("partitions", 1..=10_000)?.unwrap_or(4);
        let replication = options.take_number("replication_factor", 1..=100)?.unwrap_or(1);
        let create = options.take_bool("create")?.unwrap_or(true);
        let rebalance_drain = options.take_millis("rebalance_drain_ms", ..=300_000)?.unwrap_or(Duration::from_secs(10));
        if let Some(protocol) = options.take_str("security_protocol") {
            client.push(("security.protocol".to_owned(), protocol));
        }
        if let Some(mechanism) = options.take_str("sasl_mechanism") {
            client.push(("sasl.mechanism".to_owned(), mechanism));
        }
        client.extend(options.take_matching("any librdkafka setting by its dotted name (or debug)", |key| {
            key.contains('.') || key == "debug"
        }));
        options.finish()?;
        // Credentials without a protocol: SASL over plain TCP, as most local setups run.
        let has = |c: &[(String, String)], k: &str| c.iter().any(|(key, _)| key == k);
        if has_credentials && !has(&client, "security.protocol") {
            client.push(("security.protocol".into(), "sasl_plaintext".into()));
        }
        if has_credentials && !has(&client, "sasl.mechanism") {
            client.push(("sasl.mechanism".into(), "PLAIN".into()));
        }
        Ok(KafkaConfig { brokers, group_prefix, partitions, replication, create, rebalance_drain, client, redacted })
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

    #[test]
    fn a_wrong_option_is_named_in_the_shared_style() {
        let err = KafkaConfig::from_url("kafka://h:1?create=yes").unwrap_err().to_string();
        assert_eq!(err, "configuration kafka URL option create: \"yes\" is not valid; expected true or false");
        let err = KafkaConfig::from_url("kafka://h:1?partitions=0").unwrap_err().to_string();
        assert_eq!(
            err,
            "configuration kafka URL option partitions: \"0\" is not valid; expected a whole number from 1 to 10000"
        );
        let err = KafkaConfig::from_url("kafka://h:1?partitons=3").unwrap_err().to_string();
        assert!(
            err.starts_with("configuration kafka URL option partitons: is not an option (did you mean partitions?)"),
            "{err}"
        );
        assert!(err.ends_with("and any librdkafka setting by its dotted name (or debug)"), "{err}");
        let err = KafkaConfig::from_url("kafka://h:1?fetch.min.bytes=1&fetch.min.bytes=2").unwrap_err().to_string();
        assert!(err.contains("kafka URL option fetch.min.bytes: is given twice"), "{err}");
    }

    #[test]
    fn brokers_keep_their_form() {
        let c = KafkaConfig::from_url("kafka://a:9092,[::1]:9093/?debug=all").unwrap();
        assert_eq!(c.brokers, "a:9092,[::1]:9093");
        assert_eq!(setting(&c, "debug"), Some("all"));
        assert!(KafkaConfig::from_url("kafka://a:9092/topic").is_err());
    }

    /// Passwords made of any characters never show in the configuration's `Debug` output,
    /// its redacted URL, or its errors (the passwords and the check are
    /// `courier_core::redaction`'s).
    mod secrets_stay_secret {
        use courier_core::redaction::{assert_hidden, encode, password};
        use proptest::prelude::*;

        use super::*;

        fn check(url: &str, password: &str) {
            match KafkaConfig::from_url(url) {
                Ok(config) => {
                    assert_hidden(&format!("{config:?}"), password, "Debug");
                    assert_hidden(&config.redacted, password, "the redacted URL");
                }
                Err(e) => assert_hidden(&format!("{e} {e:?}"), password, "the error"),
            }
        }

        fn urls(secret: &str) -> Vec<String> {
            vec![
                format!("kafka://svc:{secret}@h1:9092,h2:9093?client.id=x"),
                format!("kafka://svc:{secret}@h1:9092/topic"),
                format!("kafka://svc:{secret}@h1:9092?partitions=0"),
                format!("kafka://svc:{secret}@h1:9092?partitons=3"),
                format!("kafka://svc:{secret}@"),
                format!("kafka://svc:{secret}@h1:99999"),
                format!("amqp://svc:{secret}@h1"),
                format!("kafka://{secret}@h1:9092"),
            ]
        }

        proptest! {
            #[test]
            fn percent_encoded_passwords(password in password()) {
                let encoded = encode(&password);
                for url in urls(&encoded) {
                    check(&url, &password);
                }
                check(&format!("kafka://h:9092?sasl.password={encoded}&partitions=x"), &password);
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
