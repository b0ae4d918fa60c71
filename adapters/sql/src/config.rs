//! Settings from a `sqlite://` or `postgres://` URL, and opening the connection.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use courier_core::backend::{redact_url, UrlOptions};
use courier_core::{Error, Result};
use tokio::sync::Notify;

use crate::db::{open_error, Conn};

/// How long opening a database may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Which database, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file, created if missing.
    Sqlite(PathBuf),
    /// A PostgreSQL URL without Courier's own options (it may hold a password).
    Postgres(String),
}

/// SQLite's `synchronous` setting: what a commit waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// The log reaches the disk at every commit: survives power loss.
    #[default]
    Full,
    /// The log reaches the disk at checkpoints: survives a crash of the process, may
    /// lose the last commits on power loss.
    Normal,
}

/// Settings of a [`SqlBroker`](crate::SqlBroker).
///
/// ```
/// use std::time::Duration;
/// use courier_sql::{Location, SqlConfig, Synchronous};
///
/// let config = SqlConfig::from_url("sqlite://data/queues.db?synchronous=normal&poll_ms=50")?;
/// assert_eq!(config.location, Location::Sqlite("data/queues.db".into()));
/// assert_eq!(config.synchronous, Synchronous::Normal);
/// assert_eq!(config.poll, Duration::from_millis(50));
///
/// let config = SqlConfig::from_url("postgres://app@db:5432/orders?sslmode=require&dedup_window_secs=60")?;
/// assert_eq!(config.location, Location::Postgres("postgres://app@db:5432/orders?sslmode=require".into()));
/// assert_eq!(config.dedup_window, Duration::from_secs(60));
///
/// let err = SqlConfig::from_url("sqlite://q.db?synchronus=full").unwrap_err();
/// assert!(err.to_string().contains("did you mean synchronous"), "{err}");
/// # Ok::<(), courier_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct SqlConfig {
    /// The database.
    pub location: Location,
    /// SQLite only: what a commit waits for. Default [`Synchronous::Full`].
    pub synchronous: Synchronous,
    /// SQLite only: how long to wait for another process's write lock. Default 5 s.
    pub busy_timeout: Duration,
    /// How often a waiting consumer looks again when nothing woke it: for messages
    /// sent by other processes to a SQLite file (PostgreSQL wakes consumers with
    /// `NOTIFY`). Default 100 ms for SQLite, 1 s for PostgreSQL.
    pub poll: Duration,
    /// How long a dedup id is remembered. Default 5 minutes.
    pub dedup_window: Duration,
    /// The largest payload accepted, in bytes. Default 16 MiB.
    pub max_payload: usize,
}

/// PostgreSQL URL options passed through to the driver.
const POSTGRES_OPTIONS: &[&str] = &[
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "application_name",
    "options",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
];

impl SqlConfig {
    /// Reads a URL: `sqlite://PATH` (relative to the working directory) or
    /// `sqlite:///ABSOLUTE/PATH` with options `synchronous` (`full` or `normal`),
    /// `busy_timeout_ms`; or `postgres://` / `postgresql://` with PostgreSQL's own
    /// options (`sslmode`, `application_name`, …). Both take `poll_ms`,
    /// `dedup_window_secs` and `max_payload` (bytes).
    pub fn from_url(url: &str) -> Result<Self> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            Error::config(
                "backend URL",
                format!("{:?} is not a URL; write sqlite://PATH or postgres://HOST/DB", redact_url(url)),
            )
        })?;
        let (body, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut options = UrlOptions::parse(scheme, query)?;
        let sqlite = match scheme {
            "sqlite" => true,
            "postgres" | "postgresql" => false,
            other => {
                return Err(Error::config(
                    "backend URL",
                    format!("scheme {other:?} is not one of the SQL backends; write sqlite:// or postgres://"),
                ))
            }
        };
        let poll = options.take_millis("poll_ms", 1..=60_000)?;
        let dedup_window = options.take_secs("dedup_window_secs", ..)?.unwrap_or(Duration::from_secs(300));
        let max_payload = options.take_number("max_payload", 1..=(512 * 1024 * 1024usize))?.unwrap_or(16 * 1024 * 1024);
        let mut config = SqlConfig {
            location: Location::Sqlite(PathBuf::new()),
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(5),
            poll: poll.unwrap_or(Duration::from_millis(100)),
            dedup_window,
            max_payload,
        };
        if sqlite {
            if body.is_empty() {
                return Err(Error::config(
                    "sqlite URL",
                    "names no file; write sqlite://relative/path.db or sqlite:///absolute/path.db",
                ));
            }
            config.location = Location::Sqlite(PathBuf::from(body));
            config.synchronous = options
                .take_enum("synchronous", &[("full", Synchronous::Full), ("normal", Synchronous::Normal)])?
                .unwrap_or_default();
            config.busy_timeout = options.take_millis("busy_timeout_ms", ..)?.unwrap_or(config.busy_timeout);
        } else {
            config.poll = poll.unwrap_or(Duration::from_secs(1));
            let passed =
                options.take_matching("PostgreSQL's own connection options", |k| POSTGRES_OPTIONS.contains(&k));
            let mut pg = format!("{scheme}://{body}");
            for (i, (k, v)) in passed.iter().enumerate() {
                pg.push(if i == 0 { '?' } else { '&' });
                pg.push_str(k);
                pg.push('=');
                pg.push_str(&percent_encode(v));
            }
            config.location = Location::Postgres(pg);
        }
        options.finish()?;
        Ok(config)
    }

    /// The database, for messages: a file's path, or the URL without its password.
    pub fn describe(&self) -> String {
        match &self.location {
            Location::Sqlite(path) => format!("SQLite file {}", path.display()),
            Location::Postgres(url) => format!("PostgreSQL at {}", redact_url(url)),
        }
    }

    /// Opens a connection with Courier's settings and prepares the tables.
    pub(crate) async fn open(&self) -> Result<Conn> {
        let what = self.describe();
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, self.connect()).await.map_err(|_| {
            Error::transient(
                self.backend(),
                format!("cannot use {what}: no answer within {CONNECT_TIMEOUT:?}; check that it is reachable"),
                "timeout",
            )
        })?;
        let mut conn = conn.map_err(|e| open_error(self.backend(), &what, e))?;
        conn.migrate(&what).await?;
        Ok(conn)
    }

    fn backend(&self) -> &'static str {
        match self.location {
            Location::Sqlite(_) => "sqlite",
            Location::Postgres(_) => "postgres",
        }
    }

    async fn connect(&self) -> std::result::Result<Conn, sqlx::Error> {
        use sqlx::ConnectOptions;
        match &self.location {
            #[cfg(feature = "sqlite")]
            Location::Sqlite(path) => {
                use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
                let options = SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(match self.synchronous {
                        Synchronous::Full => SqliteSynchronous::Full,
                        Synchronous::Normal => SqliteSynchronous::Normal,
                    })
                    .busy_timeout(self.busy_timeout)
                    .statement_cache_capacity(512);
                Ok(Conn::Sqlite(options.connect().await?))
            }
            #[cfg(feature = "postgres")]
            Location::Postgres(url) => {
                let options: sqlx::postgres::PgConnectOptions = url.parse()?;
                let mut conn = options.statement_cache_capacity(512).connect().await?;
                // A receive takes the oldest rows of one source: an index scan in `seq` order
                // stops after them. With row counts it has not sampled yet (a queue that grew
                // since the last ANALYZE) the planner prefers a bitmap scan that reads and
                // sorts the whole queue: 7.8 ms against 0.09 ms at 20,000 queued. This
                // connection runs Courier's statements only.
                sqlx::query("SET enable_bitmapscan = off").execute(&mut conn).await?;
                Ok(Conn::Postgres(conn))
            }
            #[allow(unreachable_patterns)]
            _ => Err(sqlx::Error::Configuration(
                format!("this build of courier-sql lacks the `{}` feature", self.backend()).into(),
            )),
        }
    }

    /// PostgreSQL: a task that wakes this process's consumers when any session commits
    /// messages (`LISTEN courier`). SQLite has nothing alike; its consumers poll.
    pub(crate) async fn listen(&self, wake: Arc<Notify>) -> Result<Option<tokio::task::JoinHandle<()>>> {
        match &self.location {
            #[cfg(feature = "postgres")]
            Location::Postgres(url) => {
                let what = self.describe();
                let mut listener = tokio::time::timeout(CONNECT_TIMEOUT, sqlx::postgres::PgListener::connect(url))
                    .await
                    .map_err(|_| {
                        Error::transient("postgres", format!("cannot listen on {what}: no answer"), "timeout")
                    })?
                    .map_err(|e| open_error("postgres", &what, e))?;
                listener.listen("courier").await.map_err(|e| open_error("postgres", &what, e))?;
                Ok(Some(tokio::spawn(async move {
                    loop {
                        match listener.recv().await {
                            Ok(_) => wake.notify_waiters(),
                            Err(e) => {
                                // The listener reconnects on the next call; consumers poll meanwhile.
                                tracing::warn!(error = %e, "PostgreSQL LISTEN connection lost; reconnecting");
                                wake.notify_waiters();
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    }
                })))
            }
            _ => {
                let _ = wake;
                Ok(None)
            }
        }
    }
}

fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever a configuration file or an environment variable holds, reading it is an
    /// error that says what is wrong, never a panic and never a guess.
    #[test]
    fn garbage_urls_are_clear_errors() {
        for url in [
            "sqlite://",
            "sqlite://?synchronous=full",
            "sqlite",
            "sqlite:/q.db",
            "mysql://db/app",
            "sqlite://q.db?synchronous=sometimes",
            "sqlite://q.db?poll_ms=0",
            "sqlite://q.db?max_payload=-1",
            "sqlite://q.db?poll_ms=5&poll_ms=6",
            "postgres://db/app?sslmode=require&colour=red",
            "postgres://db/app?%ff=1",
        ] {
            let err = SqlConfig::from_url(url).unwrap_err();
            assert!(matches!(err, Error::Config { .. }), "{url}: {err:?}");
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn postgres_options_pass_through_encoded_and_passwords_stay_out_of_descriptions() {
        let config =
            SqlConfig::from_url("postgres://app:s3cret@db/shop?options=-c%20search_path%3Dx&poll_ms=50").unwrap();
        assert_eq!(
            config.location,
            Location::Postgres("postgres://app:s3cret@db/shop?options=-c%20search_path%3Dx".into())
        );
        assert_eq!(config.poll, Duration::from_millis(50));
        assert!(!config.describe().contains("s3cret"), "{}", config.describe());
    }
}
