//! Where messages go (destinations) and where consumers read from (sources).

use std::fmt;

use crate::error::{Error, Result};

/// The longest portable name. Backends may allow less (SQS: 80) and say so in their errors.
pub const MAX_NAME_LEN: usize = 200;

/// A validated queue, topic or subscription name: 1 to 200 ASCII letters, digits, `.`, `_` or `-`.
///
/// These characters are valid on every supported broker, so a name that passes here
/// works wherever the handler is deployed.
///
/// ```
/// use courier_core::Name;
///
/// assert!(Name::new("queue", "orders.v2").is_ok());
/// let err = Name::new("queue", "orders/v2").unwrap_err();
/// assert!(err.to_string().contains("'/'"), "{err}");
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
// Inline up to 23 bytes (shared beyond): every delivery carries its source's name, and
// cloning an inline name is a copy, not an atomic reference count.
pub struct Name(smol_str::SmolStr);

impl Name {
    /// Validates `name`; `kind` ("queue", "topic", "subscription") goes into the error.
    pub fn new(kind: &'static str, name: &str) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidName { kind, name: name.to_owned(), reason };
        if name.is_empty() {
            return Err(invalid("it is empty; use 1 to 200 letters, digits, '.', '_' or '-'".into()));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(invalid(format!("it is {} characters long; the limit is {MAX_NAME_LEN}", name.len())));
        }
        if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
            return Err(invalid(format!("{c:?} is not allowed; use letters, digits, '.', '_' or '-'")));
        }
        Ok(Name(smol_str::SmolStr::new(name)))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// Where a message is sent: a queue (consumers compete) or a topic (every subscription
/// gets every message).
///
/// ```
/// use courier_core::Destination;
///
/// let orders = Destination::queue("orders")?;
/// assert_eq!(orders.to_string(), "queue:orders");
/// # Ok::<(), courier_core::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Destination {
    /// Point to point.
    Queue(Name),
    /// Publish/subscribe.
    Topic(Name),
}

impl Destination {
    /// A queue destination; the name is validated.
    pub fn queue(name: &str) -> Result<Self> {
        Ok(Destination::Queue(Name::new("queue", name)?))
    }

    /// A topic destination; the name is validated.
    pub fn topic(name: &str) -> Result<Self> {
        Ok(Destination::Topic(Name::new("topic", name)?))
    }

    /// The queue or topic name.
    pub fn name(&self) -> &Name {
        match self {
            Destination::Queue(n) | Destination::Topic(n) => n,
        }
    }

    /// Parses the `Display` form back: `queue:NAME` or `topic:NAME`.
    pub fn parse(text: &str) -> Result<Self> {
        match text.split_once(':') {
            Some(("queue", name)) => Destination::queue(name),
            Some(("topic", name)) => Destination::topic(name),
            _ => Err(Error::InvalidName {
                kind: "destination",
                name: text.to_owned(),
                reason: "write it as queue:NAME or topic:NAME".into(),
            }),
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Queue(n) => write!(f, "queue:{n}"),
            Destination::Topic(n) => write!(f, "topic:{n}"),
        }
    }
}

/// Where a consumer reads: a queue, or one named subscription of a topic.
///
/// ```
/// use courier_core::Source;
///
/// let billing = Source::subscription("order-events", "billing")?;
/// assert_eq!(billing.to_string(), "topic:order-events/billing");
/// assert_eq!(billing.default_dead_letter().to_string(), "queue:order-events.billing.dlq");
/// # Ok::<(), courier_core::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Source {
    /// Compete for a queue's messages.
    Queue(Name),
    /// Compete for one subscription's copy of a topic's messages.
    Subscription {
        /// The topic.
        topic: Name,
        /// The subscription's name.
        subscription: Name,
    },
}

impl Source {
    /// A queue source; the name is validated.
    pub fn queue(name: &str) -> Result<Self> {
        Ok(Source::Queue(Name::new("queue", name)?))
    }

    /// A subscription of a topic; both names are validated.
    pub fn subscription(topic: &str, subscription: &str) -> Result<Self> {
        Ok(Source::Subscription {
            topic: Name::new("topic", topic)?,
            subscription: Name::new("subscription", subscription)?,
        })
    }

    /// The destination producers send to for this source to receive.
    pub fn destination(&self) -> Destination {
        match self {
            Source::Queue(n) => Destination::Queue(n.clone()),
            Source::Subscription { topic, .. } => Destination::Topic(topic.clone()),
        }
    }

    /// Where this source's dead letters go unless configured otherwise:
    /// the queue `NAME.dlq` (`TOPIC.SUBSCRIPTION.dlq` for subscriptions).
    pub fn default_dead_letter(&self) -> Destination {
        let name = match self {
            Source::Queue(n) => format!("{n}.dlq"),
            Source::Subscription { topic, subscription } => format!("{topic}.{subscription}.dlq"),
        };
        // A valid name plus ".dlq" can only fail on length; clip rather than fail.
        let name = if name.len() > MAX_NAME_LEN { name[name.len() - MAX_NAME_LEN..].to_owned() } else { name };
        Destination::Queue(Name::new("queue", name.trim_start_matches('.')).expect("derived from a valid name"))
    }

    /// Parses the `Display` form back: `queue:NAME` or `topic:NAME/SUBSCRIPTION`.
    pub fn parse(text: &str) -> Result<Self> {
        match text.split_once(':') {
            Some(("queue", name)) => Source::queue(name),
            Some(("topic", rest)) => match rest.split_once('/') {
                Some((topic, sub)) => Source::subscription(topic, sub),
                None => Err(Error::InvalidName {
                    kind: "source",
                    name: text.to_owned(),
                    reason: "a topic source needs a subscription: topic:NAME/SUBSCRIPTION".into(),
                }),
            },
            _ => Err(Error::InvalidName {
                kind: "source",
                name: text.to_owned(),
                reason: "write it as queue:NAME or topic:NAME/SUBSCRIPTION".into(),
            }),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Queue(n) => write!(f, "queue:{n}"),
            Source::Subscription { topic, subscription } => write!(f, "topic:{topic}/{subscription}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_with_reasons() {
        for bad in ["", "a b", "ünï", "x/y"] {
            let err = Name::new("queue", bad).unwrap_err();
            assert!(matches!(err, Error::InvalidName { .. }), "{bad:?}: {err}");
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        assert!(Name::new("topic", &long).unwrap_err().to_string().contains("limit is 200"));
        assert!(Name::new("topic", &"a".repeat(MAX_NAME_LEN)).is_ok());
    }

    #[test]
    fn display_forms_parse_back() {
        for s in ["queue:orders", "topic:events/billing"] {
            assert_eq!(Source::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(Destination::parse("topic:events").unwrap().to_string(), "topic:events");
        assert!(Source::parse("topic:events").is_err());
        assert!(Destination::parse("orders").is_err());
    }

    #[test]
    fn long_names_still_get_a_valid_dead_letter_queue() {
        let src = Source::queue(&"q".repeat(MAX_NAME_LEN)).unwrap();
        assert!(src.default_dead_letter().name().as_str().ends_with(".dlq"));
    }
}
