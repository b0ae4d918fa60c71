//! The kit for backend authors: what every backend needs besides the [`Broker`] and
//! [`Consumer`] traits, written once so that all backends behave alike.
//!
//! - [`BackendUrl`]: a backend URL parsed once — scheme, credentials, hosts, path —
//!   with its query as [`UrlOptions`].
//! - [`UrlOptions`]: typed getters for the query's options, and one rule for the
//!   options nobody asked for ([`UrlOptions::finish`]). Every error is an
//!   [`Error::Config`](crate::Error::Config) that names the option as the user wrote it
//!   (`myq URL option batch`), the value, and what is allowed.
//! - [`OpenGuard`]: the closed flag of a broker or consumer handle, answering calls
//!   after `close` with [`Error::Closed`](crate::Error::Closed).
//! - [`redact_url`]: a URL with its secrets hidden, for logs and errors, and
//!   [`is_secret_key`]: whether a setting's value is to be hidden.
//!
//! A third-party backend needs this kit and the conformance kit (feature
//! `conformance`), nothing else from Courier. A sketch of a backend's constructor:
//!
//! ```
//! use std::time::Duration;
//! use courier_core::backend::{BackendUrl, OpenGuard};
//! use courier_core::Result;
//!
//! struct MyBroker {
//!     address: String,
//!     batch: u32,
//!     linger: Duration,
//!     open: OpenGuard,
//! }
//!
//! impl MyBroker {
//!     /// For direct users: `MyBroker::connect("myq://host:1234/path?batch=10")`.
//!     fn connect(url: &str) -> Result<Self> {
//!         Self::connect_url(BackendUrl::parse(url)?)
//!     }
//!
//!     /// For a runtime that has already parsed the URL to choose the backend.
//!     fn connect_url(mut url: BackendUrl) -> Result<Self> {
//!         url.expect_scheme("myq", &["myq"])?;
//!         let address = match url.hosts() {
//!             [one] => one.to_string(),
//!             _ => return Err(url.error("name one host, as in myq://host:1234")),
//!         };
//!         let options = url.options();
//!         let batch = options.take_number("batch", 1..=100u32)?.unwrap_or(10);
//!         let linger = options.take_millis("linger_ms", ..=1000)?.unwrap_or_default();
//!         options.finish()?; // anything left is a mistake, named in the error
//!         Ok(MyBroker { address, batch, linger, open: OpenGuard::new("broker") })
//!     }
//!
//!     fn send(&self) -> Result<()> {
//!         self.open.check()?; // Error::Closed once closed
//!         Ok(())
//!     }
//! }
//!
//! let broker = MyBroker::connect("myq://host:1234/path?batch=10")?;
//! assert_eq!((broker.address.as_str(), broker.batch), ("host:1234", 10));
//! broker.send()?;
//! broker.open.close();
//! assert!(broker.send().is_err());
//!
//! let Err(err) = MyBroker::connect("myq://host:1234?bacth=10") else { panic!("a typo") };
//! assert_eq!(
//!     err.to_string(),
//!     "configuration myq URL option bacth: is not an option (did you mean batch?); \
//!      the options are batch=N and linger_ms=N"
//! );
//! # Ok::<(), courier_core::Error>(())
//! ```
//!
//! [`Broker`]: crate::Broker
//! [`Consumer`]: crate::Consumer

mod guard;
mod options;
mod url;

#[cfg(test)]
mod tests;

pub use guard::OpenGuard;
pub use options::UrlOptions;
pub use url::{is_secret_key, redact_url, BackendUrl, Host};
