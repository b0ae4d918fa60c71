//! Test support for backend authors (feature `conformance`): a property-test strategy for
//! passwords of any characters, and the check that a text shows none of it.
//!
//! Use it to show that a backend's configuration never reveals a password in its
//! `Debug` output, its redacted URL or its errors:
//!
//! ```
//! use courier_core::redaction::{assert_hidden, encode, password};
//! use proptest::prelude::*;
//!
//! proptest!(|(secret in password())| {
//!     let url = format!("amqp://user:{}@mq:5672/%2f", encode(&secret));
//!     assert_hidden(&courier_core::redact_url(&url), &secret, "redact_url");
//! });
//! ```

use proptest::prelude::*;

/// Cyrillic letters, the URL's own delimiters, and a few ASCII characters (hex digits
/// after a `%`). Every password starts with a Cyrillic letter; nothing else in a URL or
/// in any message has one, so a piece of a password that shows up is caught, not only
/// the whole of it.
pub const ALPHABET: &str = "жшщюяЖ/?#@%+:=&,;[]! f0A";

/// Passwords of 1 to 20 characters from [`ALPHABET`], each starting with a Cyrillic letter.
pub fn password() -> impl Strategy<Value = String> {
    let chars: Vec<char> = ALPHABET.chars().collect();
    proptest::collection::vec(proptest::sample::select(chars), 0..20).prop_map(|rest| {
        let mut p = String::from("ж");
        p.extend(rest);
        p
    })
}

/// Every byte outside the unreserved set as `%XX`, as a careful user writes a password
/// into a URL.
pub fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Panics if `shown` holds `password`, its encoded form, or any piece of it (a Cyrillic
/// letter, raw or percent-encoded); `what` names what was shown, for the message.
pub fn assert_hidden(shown: &str, password: &str, what: &str) {
    let upper = shown.to_ascii_uppercase();
    let leaked = shown.contains(password)
        || shown.contains(&encode(password))
        || shown.chars().any(|c| ('\u{400}'..='\u{4ff}').contains(&c))
        || upper.contains("%D0")
        || upper.contains("%D1");
    assert!(!leaked, "{what} shows (part of) the password {password:?}: {shown}");
}
