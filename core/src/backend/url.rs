//! Backend URLs: parsed once, credentials kept out of logs.

use std::fmt;
use std::str::FromStr;

use super::options::UrlOptions;
use crate::error::{Error, Result};

/// A backend URL, parsed once: `scheme://[user[:password]@]host[:port][,host[:port]…][/path][?options]`.
///
/// - The scheme is lowercased; it chooses the backend.
/// - The user name, password and path are percent-decoded (`%2f` is `/`, `%40` is `@`);
///   a `%` not followed by two hex digits stays as it is, and `+` stays a plus sign. Write
///   `/` and `?` in a password as `%2F` and `%3F`; `@` and `:` may stay as they are (the
///   host starts after the last `@`, the password after the first `:`). `#` has no
///   special meaning: backend URLs have no fragment. A URL whose first option's name has
///   an `@`, as a raw `?` in a password gives, is refused, showing none of the password.
/// - Hosts are a comma-separated list, each with an optional port; IPv6 addresses go in
///   brackets (`[::1]:5672`). Host names are kept as written.
/// - The query becomes [`UrlOptions`], read with typed getters that consume each option;
///   see [`UrlOptions`] for the rules.
///
/// The original text is kept, for backends that hand it to a client library
/// ([`as_str`](Self::as_str), [`without_query`](Self::without_query)) and for
/// [`redacted`](Self::redacted). `Debug` shows the redacted URL only: never the password.
///
/// ```
/// use courier_core::backend::BackendUrl;
///
/// let mut url = BackendUrl::parse("MyQ://app:p%40ss@host:1234/path?batch=10")?;
/// assert_eq!(url.scheme(), "myq");
/// assert_eq!((url.user(), url.password()), (Some("app"), Some("p@ss")));
/// assert_eq!(url.hosts()[0].name(), "host");
/// assert_eq!(url.hosts()[0].port(), Some(1234));
/// assert_eq!(url.path(), Some("path"));
/// assert_eq!(url.options().take_number("batch", 1..=100u32)?, Some(10));
/// url.options().finish()?;
/// assert_eq!(url.redacted(), "MyQ://app:***@host:1234/path?batch=10");
/// assert!(!format!("{url:?}").contains("p%40ss"));
/// # Ok::<(), courier_core::Error>(())
/// ```
#[derive(Clone)]
pub struct BackendUrl {
    original: String,
    scheme: String,
    user: Option<String>,
    password: Option<String>,
    hosts: Vec<Host>,
    path: Option<String>,
    options: UrlOptions,
}

/// One host of a [`BackendUrl`]: a name (or IP address) and an optional port.
///
/// `Display` writes it back as `name:port`, with an IPv6 address in brackets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    name: String,
    port: Option<u16>,
}

impl Host {
    /// The host name or IP address, as written (an IPv6 address without its brackets).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The port, if the URL gives one.
    pub fn port(&self) -> Option<u16> {
        self.port
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.contains(':') {
            write!(f, "[{}]", self.name)?;
        } else {
            f.write_str(&self.name)?;
        }
        match self.port {
            Some(port) => write!(f, ":{port}"),
            None => Ok(()),
        }
    }
}

impl BackendUrl {
    /// Parses a backend URL. Errors are [`Error::Config`] naming what is wrong, with the
    /// URL redacted.
    pub fn parse(url: &str) -> Result<Self> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(Error::config(
                "backend URL",
                format!("{:?} is not a URL; write it like scheme://host:port", hide_userinfo(url)),
            ));
        };
        let valid_scheme = scheme.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && scheme.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !valid_scheme {
            return Err(Error::config(
                "backend URL",
                format!(
                    "{:?} does not start with a scheme (a letter, then letters, digits, +, - or .) and ://",
                    hide_userinfo(url)
                ),
            ));
        }
        let scheme = scheme.to_ascii_lowercase();
        let invalid = |message: String| Error::config(format!("{scheme} URL"), message);
        let (before_query, query) = match rest.split_once('?') {
            Some((before, query)) => (before, Some(query)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.split_once('/') {
            Some((authority, path)) => (authority, Some(path)),
            None => (before_query, None),
        };
        let (userinfo, host_list) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };
        if userinfo_in_query(query).is_some() {
            // Whatever the "hosts" are, they are the start of a password: show none of it.
            return Err(invalid(format!(
                "{} has an @ in the name of its first option, as a password with an unencoded ? gives; write / and ? in a password as %2F and %3F",
                redact_url(url)
            )));
        }
        let decode = |what: &str, text: &str| {
            percent_decode(text).ok_or_else(|| invalid(format!("the {what} is not UTF-8 once percent-decoded")))
        };
        let (user, password) = match userinfo {
            None => (None, None),
            Some(userinfo) => match userinfo.split_once(':') {
                Some((user, password)) => (Some(decode("user name", user)?), Some(decode("password", password)?)),
                None => (Some(decode("user name", userinfo)?), None),
            },
        };
        let hosts = if host_list.is_empty() {
            Vec::new()
        } else {
            host_list
                .split(',')
                .map(parse_host)
                .collect::<std::result::Result<Vec<_>, String>>()
                .map_err(|why| match path {
                    // The "host" may be the start of a password with an unencoded `/`: say
                    // so, and show none of it.
                    Some(path) if path.contains('@') => invalid(format!(
                        "{} has no valid host before its first /; if the password has a / or ?, write them as %2F and %3F",
                        redact_url(url)
                    )),
                    _ => invalid(format!("{why} in {}", redact_url(url))),
                })?
        };
        let path = path.map(|p| decode("path", p)).transpose()?;
        let options = UrlOptions::parse(&scheme, query.unwrap_or(""))?;
        Ok(BackendUrl { original: url.to_owned(), scheme, user, password, hosts, path, options })
    }

    /// The scheme, lowercased: `amqp`, `kafka`, `myq`.
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// The user name, percent-decoded, if the URL has credentials.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The password, percent-decoded, if the URL has one.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// The hosts, in order; empty when the URL names none (`memory://`).
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The path after the hosts, percent-decoded and without its leading `/` (an AMQP
    /// vhost: `%2f` is `/`). `None` when the URL has no `/` after the hosts; `Some("")`
    /// when it ends in one.
    pub fn path(&self) -> Option<&str> {
        self.path.as_deref()
    }

    /// The query's options, to be read with typed getters and then
    /// [`finish`](UrlOptions::finish)ed.
    pub fn options(&mut self) -> &mut UrlOptions {
        &mut self.options
    }

    /// The URL as given, credentials included: for a client library that takes the URL
    /// itself. Never log it; log [`redacted`](Self::redacted).
    pub fn as_str(&self) -> &str {
        &self.original
    }

    /// The URL as given up to its query (credentials included), for a client library
    /// that takes the URL but not the options the backend reads itself.
    pub fn without_query(&self) -> &str {
        self.original.split_once('?').map_or(&self.original, |(head, _)| head)
    }

    /// The URL with its password and secret-looking option values replaced by `***`,
    /// for errors and logs (see [`redact_url`]).
    pub fn redacted(&self) -> String {
        redact_url(&self.original)
    }

    /// `Ok` if the scheme is one of `schemes`; else an error saying which schemes the
    /// backend (called `backend` in the message) takes.
    ///
    /// A runtime dispatching on [`scheme`](Self::scheme) has already chosen the backend;
    /// the check keeps a backend's own URL constructor from accepting another's URL.
    pub fn expect_scheme(&self, backend: &str, schemes: &[&str]) -> Result<()> {
        if schemes.contains(&self.scheme.as_str()) {
            return Ok(());
        }
        let list: Vec<String> = schemes.iter().map(|s| format!("{s}://")).collect();
        Err(Error::config(
            "backend URL",
            format!("the {backend} backend takes {} URLs, not {}", join_list(&list, "or"), self.redacted()),
        ))
    }

    /// A configuration error about this URL (not about one option; for those see
    /// [`UrlOptions::error`]): its key is `<scheme> URL`.
    ///
    /// ```
    /// let url = courier_core::backend::BackendUrl::parse("myq://")?;
    /// assert_eq!(url.error("names no host").to_string(), "configuration myq URL: names no host");
    /// # Ok::<(), courier_core::Error>(())
    /// ```
    pub fn error(&self, message: impl Into<String>) -> Error {
        Error::config(format!("{} URL", self.scheme), message)
    }
}

impl FromStr for BackendUrl {
    type Err = Error;

    fn from_str(url: &str) -> Result<Self> {
        BackendUrl::parse(url)
    }
}

impl fmt::Debug for BackendUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendUrl").field("url", &self.redacted()).finish_non_exhaustive()
    }
}

/// Text that failed to parse as a URL, with anything up to an `@` hidden: it may be a
/// password.
fn hide_userinfo(text: &str) -> String {
    match text.rsplit_once('@') {
        Some((_, after)) => format!("***@{after}"),
        None => text.to_owned(),
    }
}

/// One entry of the host list: `name`, `name:port`, `[v6]`, `[v6]:port`.
fn parse_host(text: &str) -> std::result::Result<Host, String> {
    let (name, port) = if let Some(bracketed) = text.strip_prefix('[') {
        let (name, after) =
            bracketed.split_once(']').ok_or_else(|| format!("host {text:?} opens a [ that does not close"))?;
        match after {
            "" => (name, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (name, Some(port)),
                None => return Err(format!("host {text:?} has {after:?} after its ]; write [address]:port")),
            },
        }
    } else if text.matches(':').count() > 1 {
        return Err(format!("host {text:?} looks like an IPv6 address; write it in brackets, as in [::1]:5672"));
    } else {
        match text.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (text, None),
        }
    };
    if name.is_empty() {
        return Err(format!("host {text:?} has no name (an empty entry in the host list?)"));
    }
    let port = match port {
        None => None,
        Some(port) => Some(port.parse::<u16>().map_err(|_| {
            format!("port {port:?} of host {name:?} is not valid; expected a whole number from 0 to 65535")
        })?),
    };
    Ok(Host { name: name.to_owned(), port })
}

/// Decodes `%XX` escapes. A `%` without two hex digits after it stays as it is, and `+`
/// stays a plus sign. `None` if the bytes decoded are not UTF-8.
pub(crate) fn percent_decode(text: &str) -> Option<String> {
    if !text.contains('%') {
        return Some(text.to_owned());
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((high * 16 + low) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// `a`, `a or b`, `a, b or c` (with `word` "or"; or "and").
pub(crate) fn join_list<S: AsRef<str>>(items: &[S], word: &str) -> String {
    match items {
        [] => String::new(),
        [one] => one.as_ref().to_owned(),
        [init @ .., last] => {
            let init: Vec<&str> = init.iter().map(AsRef::as_ref).collect();
            format!("{} {word} {}", init.join(", "), last.as_ref())
        }
    }
}

/// A URL with its password and secret-looking query values replaced by `***`, for
/// errors, logs and `Debug` output. Userinfo without a colon may be a token rather than a
/// user name, so it is hidden whole.
///
/// ```
/// assert_eq!(
///     courier_core::redact_url("amqp://app:s3cret@mq:5672/prod?token=abc&heartbeat=10"),
///     "amqp://app:***@mq:5672/prod?token=***&heartbeat=10"
/// );
/// assert_eq!(courier_core::redact_url("myq://tok3n@host"), "myq://***@host");
/// ```
pub fn redact_url(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let out = match head.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_once('/').map(|(a, p)| (a, Some(p))).unwrap_or((rest, None));
            // A password with an unencoded `/` puts part of it in what looks like the path:
            // hide everything up to the last `@` rather than show it.
            // One with an unencoded `?` puts part of it in what looks like the query.
            if let Some(after) = userinfo_in_query(query) {
                return redact_url(&format!("{scheme}://***@{after}"));
            }
            if let Some((_, after)) = path.and_then(|p| p.rsplit_once('@')) {
                return redact_query(format!("{scheme}://***@{after}"), query);
            }
            let authority = match authority.rsplit_once('@') {
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _)) => format!("{user}:***@{host}"),
                    // Userinfo without a colon is a user name to some backends and a
                    // token (a secret) to others (`scheme://tok3n@host`); this cannot
                    // know which, so it hides it.
                    None => format!("***@{host}"),
                },
                None => authority.to_owned(),
            };
            match path {
                Some(p) => format!("{scheme}://{authority}/{p}"),
                None => format!("{scheme}://{authority}"),
            }
        }
        // Not a URL (`amqp:/user:pw@h`, a typo): anything up to an `@` may be a password,
        // an unencoded `?` in it included.
        None => {
            let hidden = hide_userinfo(url);
            return match hidden.split_once('?') {
                Some((head, query)) => redact_query(head.to_owned(), Some(query)),
                None => hidden,
            };
        }
    };
    redact_query(out, query)
}

/// Where a password with an unencoded `?` put the rest of the userinfo: the query's
/// first key has an `@` (no option's name has one). The query after that key's last `@`
/// (hosts, path and options), if so.
fn userinfo_in_query(query: Option<&str>) -> Option<&str> {
    let query = query?;
    let key_end = query.find(['=', '&']).unwrap_or(query.len());
    let at = query[..key_end].rfind('@')?;
    Some(&query[at + 1..])
}

/// `head` with `?query` appended, secret-looking values replaced by `***`.
fn redact_query(mut out: String, query: Option<&str>) -> String {
    if let Some(query) = query {
        let redacted: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if is_secret_key(k) => format!("{k}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&redacted.join("&"));
    }
    out
}

/// Whether an option's (or a client setting's) value may be a secret, so that errors and
/// logs hide it: its name holds `password`, `passwd`, `secret`, `token`, `key`,
/// `credential` or `sasl`, in any case.
///
/// ```
/// use courier_core::backend::is_secret_key;
///
/// assert!(is_secret_key("sasl.password") && is_secret_key("ssl.key.location") && is_secret_key("Token"));
/// assert!(!is_secret_key("heartbeat"));
/// ```
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "passwd", "secret", "token", "key", "credential", "sasl"].iter().any(|s| k.contains(s))
}
