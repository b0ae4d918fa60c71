use std::time::Duration;

use super::*;
use crate::Error;

fn parse(url: &str) -> BackendUrl {
    BackendUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
}

fn config_error(result: crate::Result<impl std::fmt::Debug>) -> (String, String) {
    match result {
        Err(Error::Config { key, message }) => (key, message),
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

#[test]
fn the_parts_of_a_url() {
    let url = parse("AMQP://app:s3cret@mq:5672/%2f?heartbeat=10");
    assert_eq!(url.scheme(), "amqp");
    assert_eq!((url.user(), url.password()), (Some("app"), Some("s3cret")));
    assert_eq!(url.hosts().len(), 1);
    assert_eq!((url.hosts()[0].name(), url.hosts()[0].port()), ("mq", Some(5672)));
    assert_eq!(url.path(), Some("/"));
    assert_eq!(url.without_query(), "AMQP://app:s3cret@mq:5672/%2f");
    assert_eq!(url.as_str(), "AMQP://app:s3cret@mq:5672/%2f?heartbeat=10");

    let url = parse("memory://");
    assert_eq!((url.user(), url.hosts(), url.path()), (None, &[][..], None));
    let url = parse("sqs://eu-west-1/?endpoint=http://127.0.0.1:4566/x");
    assert_eq!(url.hosts()[0].to_string(), "eu-west-1");
    assert_eq!(url.path(), Some(""));
    let url = parse("kafka://user@h");
    assert_eq!((url.user(), url.password()), (Some("user"), None));
}

#[test]
fn passwords_keep_every_character() {
    // Percent-encoded, every character comes back.
    let url = parse("amqp://us%3Aer:%2F%3F%23%40%25%2B%3A@h");
    assert_eq!((url.user(), url.password()), (Some("us:er"), Some("/?#@%+:")));
    // Written as they are, `@`, `:`, `#`, `+` and a `%` that starts no escape survive too.
    let url = parse("kafka://svc:p@ss:w#rd+100%@h:9093");
    assert_eq!((url.user(), url.password()), (Some("svc"), Some("p@ss:w#rd+100%")));
    assert_eq!(url.hosts()[0].to_string(), "h:9093");
    // Never in Debug output or the redacted form.
    let debug = format!("{url:?}");
    assert!(!debug.contains("p@ss"), "{debug}");
    assert!(!url.redacted().contains("p@ss"), "{}", url.redacted());
    // An unencoded `/` in a password cannot be told from a path; the error shows none of it.
    let (_, message) = config_error(BackendUrl::parse("amqp://u:se/cret@h/vhost"));
    assert!(!message.contains("se") && !message.contains("cret"), "{message}");
    assert!(message.contains("%2F"), "{message}");
    assert_eq!(redact_url("amqp://u:12/cret@h/v?x=1"), "amqp://***@h/v?x=1");
    let (key, message) = config_error(BackendUrl::parse("kafka://u:%FF@h"));
    assert_eq!((key.as_str(), message.as_str()), ("kafka URL", "the password is not UTF-8 once percent-decoded"));
}

#[test]
fn host_lists_ports_and_ipv6() {
    let url = parse("kafka://a:9092,b,[::1]:9094,[fe80::1]");
    let hosts: Vec<String> = url.hosts().iter().map(ToString::to_string).collect();
    assert_eq!(hosts, ["a:9092", "b", "[::1]:9094", "[fe80::1]"]);
    assert_eq!((url.hosts()[2].name(), url.hosts()[2].port()), ("::1", Some(9094)));
    assert_eq!(url.hosts()[1].port(), None);

    let (key, message) = config_error(BackendUrl::parse("kafka://a:99999"));
    assert_eq!(key, "kafka URL");
    assert!(message.contains("port \"99999\"") && message.contains("0 to 65535"), "{message}");
    let (_, message) = config_error(BackendUrl::parse("kafka://a:1,,b:2"));
    assert!(message.contains("no name"), "{message}");
    let (_, message) = config_error(BackendUrl::parse("amqp://::1:5672"));
    assert!(message.contains("[::1]:5672"), "{message}");
    let (_, message) = config_error(BackendUrl::parse("amqp://[::1"));
    assert!(message.contains("does not close"), "{message}");
}

#[test]
fn what_is_not_a_url() {
    let (key, message) = config_error(BackendUrl::parse("localhost:5672"));
    assert_eq!(key, "backend URL");
    assert!(message.contains("is not a URL"), "{message}");
    let (_, message) = config_error(BackendUrl::parse("u:hunter2@h://x"));
    assert!(!message.contains("hunter2"), "{message}");
    assert!(BackendUrl::parse("1x://h").is_err());
    assert!("myq://h".parse::<BackendUrl>().is_ok());
}

#[test]
fn a_backend_names_the_schemes_it_takes() {
    let url = parse("http://u:hunter2@h");
    let (key, message) = config_error(url.expect_scheme("rabbitmq", &["amqp", "amqps"]));
    assert_eq!(key, "backend URL");
    assert_eq!(message, "the rabbitmq backend takes amqp:// or amqps:// URLs, not http://u:***@h");
    assert!(parse("AMQPS://h").expect_scheme("rabbitmq", &["amqp", "amqps"]).is_ok());
}

#[test]
fn values_are_percent_decoded_and_plus_stays() {
    let mut url = parse("myq://h?path=%2Ftmp%2Fca%20file.pem&sig=a+b%2Bc&empty&%6Bey=v");
    let options = url.options();
    assert_eq!(options.take_str("path").as_deref(), Some("/tmp/ca file.pem"));
    assert_eq!(options.take_str("sig").as_deref(), Some("a+b+c"));
    assert_eq!(options.take_str("empty").as_deref(), Some(""));
    assert_eq!(options.take_str("key").as_deref(), Some("v"));
    assert_eq!(options.take_str("path"), None, "taken already");
    options.finish().unwrap();
}

#[test]
fn a_key_given_twice_is_an_error() {
    let (key, message) = config_error(BackendUrl::parse("myq://h?batch=1&x=2&batch=3"));
    assert_eq!((key.as_str(), message.as_str()), ("myq URL option batch", "is given twice; give it once"));
    let (key, _) = config_error(BackendUrl::parse("myq://h?=5"));
    assert_eq!(key, "myq URL");
}

#[test]
fn typed_getters_name_the_option_the_value_and_what_is_allowed() {
    let mut url = parse("myq://h?prefetch=abc&limit=0&wait_secs=21&create=yes&mode=maybe&drain_ms=x&n=-1");
    let o = url.options();
    let check = |result: crate::Result<Option<_>>, key: &str, message: &str| {
        let (k, m) = config_error(result.map(|v: Option<u64>| v));
        assert_eq!((k.as_str(), m.as_str()), (key, message));
    };
    check(
        o.take_number::<u64>("prefetch", 1..=65535),
        "myq URL option prefetch",
        "\"abc\" is not valid; expected a whole number from 1 to 65535",
    );
    check(
        o.take_number::<u64>("limit", 1..),
        "myq URL option limit",
        "\"0\" is not valid; expected a whole number from 1",
    );
    check(o.take_number::<u64>("n", ..), "myq URL option n", "\"-1\" is not valid; expected a whole number");
    let (key, message) = config_error(o.take_secs("wait_secs", ..=20));
    assert_eq!(key, "myq URL option wait_secs");
    assert_eq!(message, "\"21\" is not valid; expected a whole number of seconds up to 20");
    let (_, message) = config_error(o.take_millis("drain_ms", ..));
    assert_eq!(message, "\"x\" is not valid; expected a whole number of milliseconds");
    let (key, message) = config_error(o.take_bool("create"));
    assert_eq!(
        (key.as_str(), message.as_str()),
        ("myq URL option create", "\"yes\" is not valid; expected true or false")
    );
    let (_, message) = config_error(o.take_enum("mode", &[("a", 1), ("b", 2), ("c", 3)]));
    assert_eq!(message, "\"maybe\" is not valid; expected a, b or c");
    // All were taken, if not read.
    o.finish().unwrap();
}

#[test]
fn typed_getters_read_good_values() {
    let mut url = parse("myq://h?n=7&wait=2&drain=250&on=true&off=false&mode=verify&addr=127.0.0.1");
    let o = url.options();
    assert_eq!(o.take_number("n", 1..=10u16).unwrap(), Some(7u16));
    assert_eq!(o.take_secs("wait", ..).unwrap(), Some(Duration::from_secs(2)));
    assert_eq!(o.take_millis("drain", ..=1000).unwrap(), Some(Duration::from_millis(250)));
    assert_eq!((o.take_bool("on").unwrap(), o.take_bool("off").unwrap()), (Some(true), Some(false)));
    assert_eq!(o.take_enum("mode", &[("create", 'c'), ("verify", 'v')]).unwrap(), Some('v'));
    let addr: Option<std::net::Ipv4Addr> = o.take_parse("addr", "an IPv4 address").unwrap();
    assert_eq!(addr, Some(std::net::Ipv4Addr::LOCALHOST));
    assert_eq!(o.take_number("missing", 1..=10u16).unwrap(), None);
    o.finish().unwrap();
}

#[test]
fn secret_values_are_not_repeated_in_errors() {
    let mut url = parse("myq://h?api_token=hunter2");
    let (_, message) = config_error(url.options().take_number::<u32>("api_token", ..));
    assert!(!message.contains("hunter2"), "{message}");
    assert!(!format!("{:?}", url.options()).contains("hunter2"));
}

#[test]
fn unknown_options_are_errors_that_list_the_known_ones() {
    let mut url = parse("myq://h?partitons=3");
    url.options().take_number::<u32>("partitions", 1..=100).unwrap();
    url.options().take_bool("create").unwrap();
    let (key, message) = config_error(url.options().finish());
    assert_eq!(key, "myq URL option partitons");
    assert_eq!(
        message,
        "is not an option (did you mean partitions?); the options are partitions=N and create=true|false"
    );

    let mut url = parse("myq://h?zzz=1");
    url.options().take_str("group");
    let (_, message) = config_error(url.options().finish());
    assert_eq!(message, "is not an option; the options are group=…");

    let (key, message) = config_error(parse("memory://?a=1&b=2").options().finish());
    assert_eq!(
        (key.as_str(), message.as_str()),
        ("memory URL options a, b", "are not options; memory URLs take no options")
    );
}

#[test]
fn a_backend_may_pass_settings_through() {
    let mut url = parse("kafka://h?group=app&fetch.min.bytes=10&sasl.password=p%26w&debug=all&colour=red");
    let o = url.options();
    assert_eq!(o.take_str("group").as_deref(), Some("app"));
    let client = o.take_matching("any librdkafka setting by its dotted name", |k| k.contains('.') || k == "debug");
    let client: Vec<(&str, &str)> = client.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(client, [("fetch.min.bytes", "10"), ("sasl.password", "p&w"), ("debug", "all")]);
    let (key, message) = config_error(o.finish());
    assert_eq!(key, "kafka URL option colour");
    assert_eq!(message, "is not an option; the options are group=… and any librdkafka setting by its dotted name");
}

#[test]
fn the_guard_closes_once() {
    let guard = OpenGuard::new("broker");
    assert!(!guard.is_closed() && guard.check().is_ok());
    assert!(guard.close());
    assert!(!guard.close());
    assert!(matches!(guard.check(), Err(Error::Closed { what: "broker" })));
}

/// Passwords (and tokens) made of any characters never show in what Courier writes about
/// a URL: [`redact_url`], [`BackendUrl`]'s `Debug` and `redacted()`, or the errors of
/// parsing it and reading its options.
mod secrets_stay_secret {
    use proptest::prelude::*;

    use super::*;

    pub(super) use crate::redaction::{assert_hidden, encode, password};

    /// Everything Courier's core writes about `url`.
    fn check(url: &str, password: &str) {
        assert_hidden(&redact_url(url), password, "redact_url");
        match BackendUrl::parse(url) {
            Ok(mut parsed) => {
                assert_hidden(&format!("{parsed:?}"), password, "Debug");
                assert_hidden(&parsed.redacted(), password, "redacted()");
                if let Err(e) = parsed.expect_scheme("none", &["none"]) {
                    assert_hidden(&e.to_string(), password, "expect_scheme's error");
                }
                let options = parsed.options();
                assert_hidden(&format!("{options:?}"), password, "the options' Debug");
                if let Err(e) = options.take_number("heartbeat", 1..=10u32) {
                    assert_hidden(&e.to_string(), password, "an option's error");
                }
                if let Err(e) = options.finish() {
                    assert_hidden(&e.to_string(), password, "finish's error");
                }
            }
            Err(e) => {
                assert_hidden(&e.to_string(), password, "the parse error");
                assert_hidden(&format!("{e:?}"), password, "the parse error's Debug");
            }
        }
    }

    /// URLs with `secret` where a password (or token) goes; some parse, some do not.
    pub(super) fn urls(secret: &str) -> Vec<String> {
        vec![
            format!("amqp://user:{secret}@127.0.0.1:5672/%2f?heartbeat=10"),
            format!("amqps://user:{secret}@mq.example.com/vhost"),
            format!("kafka://svc:{secret}@h1:9092,h2:9093?client.id=x&heartbeat=99"),
            format!("kafka://svc:{secret}@h1:99999"),
            format!("sqs://user:{secret}@eu-west-1?bogus=1"),
            format!("amqp://user:{secret}@[::1"),
            format!("amqp:/user:{secret}@h"),
        ]
    }

    proptest! {
        #[test]
        fn percent_encoded_passwords(password in password()) {
            let encoded = encode(&password);
            for url in urls(&encoded) {
                check(&url, &password);
            }
            // In secret-looking options too (a raw `&` would end the value: not here).
            check(&format!("myq://h?token={encoded}&sasl.password={encoded}&x=1"), &password);
            // A token alone, without a colon.
            check(&format!("amqp://{encoded}@h:5672"), &password);
        }

        #[test]
        fn raw_passwords_the_parser_takes(password in password()) {
            // Raw `/` and `?` end the authority (write them as %2F and %3F); a raw `:`
            // in a token would make its start a user name.
            let password: String = password.chars().filter(|c| !matches!(c, '/' | '?')).collect();
            for url in urls(&password) {
                check(&url, &password);
            }
            let token: String = password.chars().filter(|c| *c != ':').collect();
            check(&format!("amqp://{token}@h:5672/%2f"), &token);
        }

        #[test]
        fn raw_passwords_with_question_marks(password in password()) {
            // A raw `?` is hidden too, unless an `=` or `&` comes between it and the
            // userinfo's last `@` (then the text is a query like any other).
            let password: String = password.chars().filter(|c| !matches!(c, '/' | '=' | '&')).collect();
            for url in urls(&password) {
                check(&url, &password);
            }
        }
    }

    #[test]
    fn a_password_with_an_unencoded_question_mark_is_hidden() {
        let url = "amqp://user:ab?cd@h:5672/%2f?heartbeat=10&token=t";
        assert_eq!(redact_url(url), "amqp://***@h:5672/%2f?heartbeat=10&token=***");
        let (_, message) = config_error(BackendUrl::parse(url));
        assert!(!message.contains("ab") && !message.contains("cd") && message.contains("%3F"), "{message}");
        // A port-like start parses as a host; the URL is refused all the same.
        let (_, message) = config_error(BackendUrl::parse("kafka://svc:12?cd@h:9092"));
        assert!(!message.contains("12") && !message.contains("cd"), "{message}");
        // An `@` in an option's value is no password.
        assert_eq!(parse("kafka://h:9092?sasl.username=me@corp").hosts()[0].name(), "h");
        assert_eq!(redact_url("kafka://h:9092?client.id=me@corp"), "kafka://h:9092?client.id=me@corp");
        assert_eq!(redact_url("amqp:/u:a?b@h?token=x"), "***@h?token=***");
    }

    #[test]
    fn a_token_alone_is_hidden() {
        // `scheme://token@host`: some backends take the userinfo without a colon as a
        // token, and redact_url cannot know which; it hides it.
        assert_eq!(redact_url("amqp://tok3n@host:5672/%2f?heartbeat=5"), "amqp://***@host:5672/%2f?heartbeat=5");
        assert!(!format!("{:?}", parse("kafka://tok3n@h")).contains("tok3n"));
    }
}
