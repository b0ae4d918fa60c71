//! `sqs://` URLs: the region and Courier's options.

use courier_core::backend::BackendUrl;
use courier_core::Result;

/// What an `sqs://` URL says.
#[derive(Debug, Clone)]
pub(crate) struct SqsConfig {
    /// The region, if the URL names one (else the AWS chain's).
    pub region: Option<String>,
    /// Another endpoint than AWS's (a local SQS server).
    pub endpoint: Option<String>,
    /// Create missing queues (true) or report them as not found.
    pub create: bool,
    /// Receives before SQS moves a message to the dead-letter queue, for queues the adapter creates.
    pub redrive_max_receives: Option<u32>,
    /// Parallel ReceiveMessage calls one receive may make.
    pub pollers: usize,
    /// How long one attempt of an SQS call may take before it fails, retryably.
    pub call_timeout: std::time::Duration,
    /// The URL with secrets hidden, for errors and Debug.
    pub redacted: String,
}

impl SqsConfig {
    pub fn from_backend_url(mut url: BackendUrl) -> Result<Self> {
        url.expect_scheme(crate::BACKEND, &["sqs"])?;
        let redacted = url.redacted();
        let region = match url.hosts() {
            [] => None,
            [region] if region.port().is_none() => Some(region.name().to_owned()),
            _ => return Err(url.error(format!("{redacted} names more than a region; write sqs://REGION"))),
        };
        if url.user().is_some() || url.path().is_some_and(|p| !p.is_empty()) {
            return Err(url.error(format!(
                "{redacted} has credentials or a path, which sqs:// URLs do not take (credentials come from the AWS chain)"
            )));
        }
        let options = url.options();
        let config = SqsConfig {
            region,
            endpoint: options.take_str("endpoint"),
            create: options.take_bool("create")?.unwrap_or(true),
            redrive_max_receives: options.take_number("redrive_max_receives", 1..=1000)?,
            pollers: options.take_number("pollers", 1..=16)?.unwrap_or(1),
            call_timeout: std::time::Duration::from_secs(
                options.take_number("call_timeout_secs", 2..=300)?.unwrap_or(30),
            ),
            redacted,
        };
        options.finish()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<SqsConfig> {
        SqsConfig::from_backend_url(BackendUrl::parse(url)?)
    }

    #[test]
    fn region_and_options() {
        let c = parse("sqs://eu-west-1/?endpoint=http%3A%2F%2F127.0.0.1:4566&create=false&pollers=4").unwrap();
        assert_eq!((c.region.as_deref(), c.endpoint.as_deref()), (Some("eu-west-1"), Some("http://127.0.0.1:4566")));
        assert_eq!((c.create, c.pollers, c.redrive_max_receives), (false, 4, None));
        // The endpoint may stay unencoded, as it always could.
        let c = parse("sqs://us-east-1?endpoint=http://127.0.0.1:4566&redrive_max_receives=3").unwrap();
        assert_eq!((c.endpoint.as_deref(), c.redrive_max_receives), (Some("http://127.0.0.1:4566"), Some(3)));
        let c = parse("sqs://").unwrap();
        assert_eq!((c.region, c.create, c.pollers), (None, true, 1));
        assert_eq!(c.call_timeout, std::time::Duration::from_secs(30));
        let c = parse("sqs://eu-west-1?call_timeout_secs=5").unwrap();
        assert_eq!(c.call_timeout, std::time::Duration::from_secs(5));
    }

    #[test]
    fn a_wrong_option_is_named_in_the_shared_style() {
        let err = parse("sqs://eu-west-1?pollers=20").unwrap_err().to_string();
        assert_eq!(
            err,
            "configuration sqs URL option pollers: \"20\" is not valid; expected a whole number from 1 to 16"
        );
        let err = parse("sqs://eu-west-1?create=maybe").unwrap_err().to_string();
        assert_eq!(err, "configuration sqs URL option create: \"maybe\" is not valid; expected true or false");
        let err = parse("sqs://eu-west-1?poller=2").unwrap_err().to_string();
        assert_eq!(
            err,
            "configuration sqs URL option poller: is not an option (did you mean pollers?); the options are \
             endpoint=…, create=true|false, redrive_max_receives=N, pollers=N and call_timeout_secs=N"
        );
        assert!(parse("amqp://eu-west-1").is_err());
        assert!(parse("sqs://eu-west-1/queue").is_err());
        assert!(parse("sqs://a,b").is_err());
    }
}
