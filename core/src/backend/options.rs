//! The options in a backend URL's query, read with typed getters.

use std::fmt;
use std::ops::{Bound, RangeBounds};
use std::str::FromStr;
use std::time::Duration;

use super::url::{is_secret_key, join_list, percent_decode};
use crate::error::{Error, Result};

/// The options of a backend URL's query (`?batch=10&create=false`), read with typed
/// getters.
///
/// The rules, the same for every backend:
///
/// - Keys and values are percent-decoded (`%2F` is `/`); `+` stays a plus sign (write a
///   space as `%20`). A key without `=` has the empty value. Empty pairs (`&&`) are
///   skipped. Keys and the words of [`take_bool`](Self::take_bool) and
///   [`take_enum`](Self::take_enum) are case-sensitive.
/// - A key given twice is an error: the URL is parsed to nothing, rather than one of
///   the two winning silently.
/// - Each getter consumes its option and returns `Ok(None)` when the URL does not give
///   it. A value the getter cannot read is an [`Error::Config`] whose key is the option
///   as written (`myq URL option batch`) and whose message names the value and what is
///   allowed: `"ten" is not valid; expected a whole number from 1 to 100`. Values of
///   secret-looking options (`password`, `token`, `secret`…) are not repeated.
/// - **Unknown options are errors.** After taking the options it knows, a backend calls
///   [`finish`](Self::finish), which fails on any option left, naming it (with the
///   likely one meant, for a typo) and listing the options the backend asked for. A
///   backend that passes settings through to a client library takes them with
///   [`take_matching`](Self::take_matching) (Kafka: any key with a `.`, a librdkafka
///   setting), which `finish` lists too.
///
/// ```
/// use std::time::Duration;
/// use courier_core::backend::BackendUrl;
///
/// #[derive(Debug, Clone, Copy, PartialEq)]
/// enum Mode { Create, Verify }
///
/// let mut url = BackendUrl::parse("myq://host:1234/path?batch=10&mode=verify&wait_secs=5&client.id=a%2Fb")?;
/// let options = url.options();
/// assert_eq!(options.take_number("batch", 1..=100u32)?, Some(10));
/// let modes = [("create", Mode::Create), ("verify", Mode::Verify)];
/// assert_eq!(options.take_enum("mode", &modes)?, Some(Mode::Verify));
/// assert_eq!(options.take_secs("wait_secs", ..=20)?, Some(Duration::from_secs(5)));
/// assert_eq!(options.take_bool("create")?, None); // not in the URL
/// let client: Vec<(String, String)> = options.take_matching("any client setting by its dotted name", |k| k.contains('.'));
/// assert_eq!(client, [("client.id".to_owned(), "a/b".to_owned())]);
/// options.finish()?;
///
/// // A wrong value names the option, the value and what is allowed.
/// let mut url = BackendUrl::parse("myq://host?batch=ten")?;
/// let err = url.options().take_number("batch", 1..=100u32).unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "configuration myq URL option batch: \"ten\" is not valid; expected a whole number from 1 to 100"
/// );
/// # Ok::<(), courier_core::Error>(())
/// ```
#[derive(Clone)]
pub struct UrlOptions {
    scheme: String,
    pairs: Vec<Pair>,
    /// The options the backend asked for, as `key=hint`, for the unknown-option error.
    asked: Vec<String>,
    /// Descriptions of what `take_matching` passes through.
    passthrough: Vec<String>,
}

#[derive(Clone)]
struct Pair {
    key: String,
    value: String,
    taken: bool,
}

impl UrlOptions {
    /// Parses a query (the part of a URL after `?`, without it) of a `scheme` URL; the
    /// scheme names the options in errors. [`BackendUrl::parse`](super::BackendUrl::parse)
    /// calls this; call it directly for a query that arrives on its own.
    pub fn parse(scheme: &str, query: &str) -> Result<Self> {
        let mut options =
            UrlOptions { scheme: scheme.to_owned(), pairs: Vec::new(), asked: Vec::new(), passthrough: Vec::new() };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode(key).ok_or_else(|| {
                Error::config(format!("{scheme} URL"), format!("option {key:?} is not UTF-8 once percent-decoded"))
            })?;
            if key.is_empty() {
                return Err(Error::config(
                    format!("{scheme} URL"),
                    "an option in the query has no name (it starts with =)",
                ));
            }
            let value = percent_decode(value)
                .ok_or_else(|| options.error(&key, "the value is not UTF-8 once percent-decoded"))?;
            if options.pairs.iter().any(|p| p.key == key) {
                return Err(options.error(&key, "is given twice; give it once"));
            }
            options.pairs.push(Pair { key, value, taken: false });
        }
        Ok(options)
    }

    /// An [`Error::Config`] about option `key`, whose key reads `<scheme> URL option <key>`:
    /// for checks a backend makes itself (a file the option names cannot be read).
    pub fn error(&self, key: &str, message: impl Into<String>) -> Error {
        Error::config(format!("{} URL option {key}", self.scheme), message)
    }

    /// Takes `key`'s value as text (possibly empty).
    pub fn take_str(&mut self, key: &str) -> Option<String> {
        self.take_raw(key, "…")
    }

    /// Takes `key`'s value parsed with [`FromStr`]; `expected` says what is allowed, for
    /// the error (`"a URL"`, `"plain, external or anonymous"`).
    pub fn take_parse<T: FromStr>(&mut self, key: &str, expected: &str) -> Result<Option<T>> {
        let Some(value) = self.take_raw(key, "…") else { return Ok(None) };
        value.parse().map(Some).map_err(|_| self.invalid(key, &value, expected))
    }

    /// Takes `key`'s value as a whole number within `range` (`1..=65535`, `..=300`, `..`),
    /// of any integer type.
    pub fn take_number<T>(&mut self, key: &str, range: impl RangeBounds<T>) -> Result<Option<T>>
    where
        T: FromStr + PartialOrd + fmt::Display,
    {
        self.take_in_range(key, range, "")
    }

    /// Takes `key`'s value as a whole number of seconds within `range`.
    pub fn take_secs(&mut self, key: &str, range: impl RangeBounds<u64>) -> Result<Option<Duration>> {
        Ok(self.take_in_range(key, range, " of seconds")?.map(Duration::from_secs))
    }

    /// Takes `key`'s value as a whole number of milliseconds within `range`.
    pub fn take_millis(&mut self, key: &str, range: impl RangeBounds<u64>) -> Result<Option<Duration>> {
        Ok(self.take_in_range(key, range, " of milliseconds")?.map(Duration::from_millis))
    }

    /// Takes `key`'s value as `true` or `false`.
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>> {
        self.take_enum_hinted(key, &[("true", true), ("false", false)])
    }

    /// Takes `key`'s value as one of the words in `choices`, returning the value paired
    /// with it.
    ///
    /// ```
    /// let mut url = courier_core::backend::BackendUrl::parse("myq://h?declare=maybe")?;
    /// let err = url.options().take_enum("declare", &[("create", 1), ("verify", 2)]).unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "configuration myq URL option declare: \"maybe\" is not valid; expected create or verify"
    /// );
    /// # Ok::<(), courier_core::Error>(())
    /// ```
    pub fn take_enum<T: Copy>(&mut self, key: &str, choices: &[(&str, T)]) -> Result<Option<T>> {
        self.take_enum_hinted(key, choices)
    }

    /// Takes every option left whose key `accept`s, in URL order: for settings a backend
    /// passes through to a client library by name. `described` says what passes, for
    /// the list of options in [`finish`](Self::finish)'s error ("any librdkafka setting
    /// by its dotted name"). Take the backend's own options first.
    pub fn take_matching(&mut self, described: &str, accept: impl Fn(&str) -> bool) -> Vec<(String, String)> {
        if !self.passthrough.iter().any(|d| d == described) {
            self.passthrough.push(described.to_owned());
        }
        self.pairs
            .iter_mut()
            .filter(|p| !p.taken && accept(&p.key))
            .map(|p| {
                p.taken = true;
                (p.key.clone(), p.value.clone())
            })
            .collect()
    }

    /// `Ok` if every option was taken; else an error naming the options left and listing
    /// the ones the backend asked for. Call it after taking every option the backend
    /// knows.
    ///
    /// ```
    /// let mut url = courier_core::backend::BackendUrl::parse("myq://h?bacth=10&color=red")?;
    /// url.options().take_number("batch", 1..=100u32)?;
    /// url.options().take_bool("create")?;
    /// let err = url.options().finish().unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "configuration myq URL options bacth, color: are not options (did you mean batch for bacth?); \
    ///      the options are batch=N and create=true|false"
    /// );
    /// # Ok::<(), courier_core::Error>(())
    /// ```
    pub fn finish(&self) -> Result<()> {
        let left: Vec<&str> = self.pairs.iter().filter(|p| !p.taken).map(|p| p.key.as_str()).collect();
        if left.is_empty() {
            return Ok(());
        }
        let mut allowed = self.asked.clone();
        allowed.extend(self.passthrough.iter().cloned());
        let options = if allowed.is_empty() {
            format!("{} URLs take no options", self.scheme)
        } else {
            format!("the options are {}", join_list(&allowed, "and"))
        };
        let guesses: Vec<(&str, &str)> =
            left.iter().filter_map(|key| self.likely_meant(key).map(|meant| (*key, meant))).collect();
        Err(match (left.as_slice(), guesses.as_slice()) {
            ([key], []) => self.error(key, format!("is not an option; {options}")),
            ([key], [(_, meant)]) => self.error(key, format!("is not an option (did you mean {meant}?); {options}")),
            (keys, guesses) => {
                let guesses: Vec<String> = guesses.iter().map(|(key, meant)| format!("{meant} for {key}")).collect();
                let guesses =
                    if guesses.is_empty() { String::new() } else { format!(" (did you mean {}?)", guesses.join(", ")) };
                Error::config(
                    format!("{} URL options {}", self.scheme, keys.join(", ")),
                    format!("are not options{guesses}; {options}"),
                )
            }
        })
    }

    fn take_raw(&mut self, key: &str, hint: &str) -> Option<String> {
        let entry = format!("{key}={hint}");
        if !self.asked.contains(&entry) {
            self.asked.push(entry);
        }
        let pair = self.pairs.iter_mut().find(|p| !p.taken && p.key == key)?;
        pair.taken = true;
        Some(pair.value.clone())
    }

    fn take_in_range<T>(&mut self, key: &str, range: impl RangeBounds<T>, unit: &str) -> Result<Option<T>>
    where
        T: FromStr + PartialOrd + fmt::Display,
    {
        let Some(value) = self.take_raw(key, "N") else { return Ok(None) };
        match value.parse::<T>() {
            Ok(n) if range.contains(&n) => Ok(Some(n)),
            _ => Err(self.invalid(key, &value, &describe_range(&range, unit))),
        }
    }

    fn take_enum_hinted<T: Copy>(&mut self, key: &str, choices: &[(&str, T)]) -> Result<Option<T>> {
        let words: Vec<&str> = choices.iter().map(|(word, _)| *word).collect();
        let Some(value) = self.take_raw(key, &words.join("|")) else { return Ok(None) };
        match choices.iter().find(|(word, _)| *word == value) {
            Some((_, choice)) => Ok(Some(*choice)),
            None => Err(self.invalid(key, &value, &join_list(&words, "or"))),
        }
    }

    fn invalid(&self, key: &str, value: &str, expected: &str) -> Error {
        let shown = if is_secret_key(key) { "the value".to_owned() } else { format!("{value:?}") };
        self.error(key, format!("{shown} is not valid; expected {expected}"))
    }

    /// The option asked for that `key` is most likely a typo of.
    fn likely_meant(&self, key: &str) -> Option<&str> {
        self.asked
            .iter()
            .map(|entry| entry.split_once('=').map_or(entry.as_str(), |(k, _)| k))
            .map(|known| (edit_distance(key, known), known))
            .filter(|(distance, known)| match known.len().max(key.len()) {
                0..=2 => false,
                3..=4 => *distance <= 1,
                _ => *distance <= 2,
            })
            .min_by_key(|(distance, _)| *distance)
            .map(|(_, known)| known)
    }
}

impl fmt::Debug for UrlOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.pairs.iter().map(|p| (&p.key, if is_secret_key(&p.key) { "***" } else { &p.value })))
            .finish()
    }
}

/// "a whole number from 1 to 100", "a whole number of seconds up to 20".
fn describe_range<T: fmt::Display>(range: &impl RangeBounds<T>, unit: &str) -> String {
    let what = format!("a whole number{unit}");
    match (range.start_bound(), range.end_bound()) {
        (Bound::Unbounded, Bound::Unbounded) => what,
        (Bound::Included(a), Bound::Unbounded) => format!("{what} from {a}"),
        (Bound::Excluded(a), Bound::Unbounded) => format!("{what} above {a}"),
        (Bound::Unbounded, Bound::Included(b)) => format!("{what} up to {b}"),
        (Bound::Unbounded, Bound::Excluded(b)) => format!("{what} below {b}"),
        (Bound::Included(a), Bound::Included(b)) => format!("{what} from {a} to {b}"),
        (Bound::Included(a), Bound::Excluded(b)) => format!("{what} from {a} and below {b}"),
        (Bound::Excluded(a), Bound::Included(b)) => format!("{what} above {a} and up to {b}"),
        (Bound::Excluded(a), Bound::Excluded(b)) => format!("{what} above {a} and below {b}"),
    }
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}
