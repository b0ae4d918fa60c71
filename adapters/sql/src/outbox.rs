//! The transactional outbox and the idempotent consumer: a database write and a message
//! happen together or not at all, and a message delivered again has no second effect.
//!
//! **Sending** from inside your own transaction: [`add`] writes the message to the
//! `courier_outbox` table in your transaction. When it commits, a [`Relay`] (run by the
//! worker runtime, or as `courier outbox relay`) forwards it to any backend and deletes
//! the row only after the backend confirmed it. A rolled-back transaction sends
//! nothing. Delivery is at least once: a relay killed after the backend confirmed and
//! before the row was deleted sends it again, with the same id.
//!
//! ```no_run
//! use courier_core::{Destination, Message};
//!
//! # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id, total) VALUES ($1, $2)").bind(42_i64).bind(990_i64).execute(&mut *tx).await?;
//! courier_sql::outbox::add(&mut *tx, &Destination::queue("orders")?, Message::new("order 42 placed")).await?;
//! tx.commit().await?; // the order row and the message, or neither
//! # Ok(()) }
//! ```
//!
//! **Receiving** once: [`once`] runs your database work in a transaction that also
//! records the message id as processed by a named consumer; a message seen before is
//! skipped, so a redelivery has no second effect.
//!
//! ```no_run
//! # async fn example(pool: sqlx::SqlitePool, delivery: courier_core::Delivery) -> Result<(), courier_core::Error> {
//! let done = courier_sql::outbox::once(&pool, "billing", &delivery.id, async |tx: &mut sqlx::SqliteConnection| {
//!     sqlx::query("UPDATE accounts SET balance = balance - 10 WHERE id = 7")
//!         .execute(&mut *tx)
//!         .await
//!         .map_err(|e| courier_core::Error::retryable(e.to_string()))?;
//!     Ok(())
//! })
//! .await?;
//! println!("{}", if done.is_first() { "charged" } else { "already charged; skipped" });
//! delivery.ack().await?;
//! # Ok(()) }
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use courier_core::{Destination, DynBroker, Error, Message, MessageId, Result};

/// A connection [`add`] and [`once`] can write to: SQLite's or PostgreSQL's (inside a
/// transaction, `&mut *tx`).
#[async_trait]
pub trait OutboxConnection: Send {
    /// Which database, for errors.
    #[doc(hidden)]
    fn backend(&self) -> &'static str;
    /// Adds one row to `courier_outbox`.
    #[doc(hidden)]
    async fn insert_outbox(&mut self, destination: &str, message: &Message) -> std::result::Result<(), sqlx::Error>;
    /// Records `id` as processed by `consumer`; false when it already was.
    #[doc(hidden)]
    async fn record_processed(&mut self, consumer: &str, id: &str) -> std::result::Result<bool, sqlx::Error>;
}

fn micros_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

const INSERT_OUTBOX: &str = "INSERT INTO courier_outbox (destination, id, payload, headers, ordering_key, content_type, dedup_id, created_us, delay_ms) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
const RECORD_PROCESSED: &str =
    "INSERT INTO courier_processed (consumer, id, processed_us) VALUES ($1, $2, $3) ON CONFLICT (consumer, id) DO NOTHING";

macro_rules! outbox_connection {
    ($conn:ty, $backend:literal) => {
        #[async_trait]
        impl OutboxConnection for $conn {
            fn backend(&self) -> &'static str {
                $backend
            }

            async fn insert_outbox(&mut self, destination: &str, m: &Message) -> std::result::Result<(), sqlx::Error> {
                let headers = if m.headers.is_empty() {
                    String::new()
                } else {
                    serde_json::to_string(&m.headers).expect("string map")
                };
                let created = m.timestamp.duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0);
                sqlx::query(INSERT_OUTBOX)
                    .bind(destination)
                    .bind(m.id.as_str())
                    .bind(&m.payload[..])
                    .bind(headers)
                    .bind(m.ordering_key.as_deref())
                    .bind(m.content_type.as_deref())
                    .bind(m.dedup_id.as_deref())
                    .bind(created)
                    .bind(m.delay.map(|d| d.as_millis() as i64).unwrap_or(0))
                    .execute(&mut *self)
                    .await
                    .map(drop)
            }

            async fn record_processed(&mut self, consumer: &str, id: &str) -> std::result::Result<bool, sqlx::Error> {
                let done = sqlx::query(RECORD_PROCESSED)
                    .bind(consumer)
                    .bind(id)
                    .bind(micros_now())
                    .execute(&mut *self)
                    .await?;
                Ok(done.rows_affected() == 1)
            }
        }
    };
}

#[cfg(feature = "sqlite")]
outbox_connection!(sqlx::SqliteConnection, "sqlite");
#[cfg(feature = "postgres")]
outbox_connection!(sqlx::PgConnection, "postgres");

fn tables_missing(backend: &'static str, e: sqlx::Error) -> Error {
    let text = e.to_string();
    if text.contains("no such table") || text.contains("does not exist") {
        Error::permanent(
            backend,
            format!("{text}: Courier's tables are not in this database yet; connect a SqlBroker or a Relay to it once (or run `courier outbox relay`), which creates them"),
            e,
        )
    } else {
        Error::transient(backend, format!("the outbox write failed: {text}"), e)
    }
}

/// Adds `message` for `destination` to the outbox, in the transaction `conn` is in.
/// Checks nothing a backend would refuse (size, names): the relay's send does, and a
/// message it refuses for good is dead-lettered there rather than blocking the others.
pub async fn add<C: OutboxConnection + ?Sized>(
    conn: &mut C,
    destination: &Destination,
    message: Message,
) -> Result<MessageId> {
    let backend = conn.backend();
    conn.insert_outbox(&destination.to_string(), &message).await.map_err(|e| tables_missing(backend, e))?;
    Ok(message.id)
}

/// Whether [`once`] ran the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processed {
    /// First time: the work ran and committed with the record.
    First,
    /// Seen before: the work did not run.
    AlreadyDone,
}

impl Processed {
    /// Whether the work ran now.
    pub fn is_first(self) -> bool {
        self == Processed::First
    }
}

/// Runs `work` once per message id and `consumer`: in one transaction with a record of
/// the id, so a redelivered message (or one processed by another worker meanwhile) is
/// skipped. When `work` fails, nothing of it or of the record is kept, and the message
/// can be retried.
pub async fn once<DB, F>(pool: &sqlx::Pool<DB>, consumer: &str, id: &MessageId, work: F) -> Result<Processed>
where
    DB: sqlx::Database,
    DB::Connection: OutboxConnection,
    F: AsyncFnOnce(&mut DB::Connection) -> Result<()>,
{
    let Some(mut tx) = begin_once(pool, consumer, id).await? else { return Ok(Processed::AlreadyDone) };
    work(&mut tx).await?;
    commit(tx).await?;
    Ok(Processed::First)
}

/// Begins a transaction that records `id` as processed by `consumer`, or answers `None`
/// when that record exists: the message had its effect already. Commit the transaction
/// with the handler's own writes (see [`commit`]); dropped, it rolls back, record
/// included, and the message can be processed again. [`once`] is this around a closure.
///
/// While one transaction holds a record, another trying the same id waits for it to end
/// (PostgreSQL: the unique index; SQLite: the write lock), so two workers given the same
/// message at once cannot both go ahead.
pub async fn begin_once<DB>(
    pool: &sqlx::Pool<DB>,
    consumer: &str,
    id: &MessageId,
) -> Result<Option<sqlx::Transaction<'static, DB>>>
where
    DB: sqlx::Database,
    DB::Connection: OutboxConnection,
{
    let backend = backend_of::<DB>();
    let mut tx =
        pool.begin().await.map_err(|e| Error::transient(backend, format!("cannot begin a transaction: {e}"), e))?;
    if !tx.record_processed(consumer, id.as_str()).await.map_err(|e| tables_missing(backend, e))? {
        return Ok(None);
    }
    Ok(Some(tx))
}

/// Commits a transaction begun by [`begin_once`]. A failure is transient: the message
/// can be processed again. Should the commit have gone through after all (a connection
/// lost in the answer), the next attempt finds the record and skips the work.
pub async fn commit<DB: sqlx::Database>(tx: sqlx::Transaction<'static, DB>) -> Result<()> {
    let backend = backend_of::<DB>();
    tx.commit().await.map_err(|e| Error::transient(backend, format!("cannot commit: {e}"), e))
}

fn backend_of<DB: sqlx::Database>() -> &'static str {
    if DB::NAME == "PostgreSQL" {
        "postgres"
    } else {
        "sqlite"
    }
}

/// Counts of a relay's work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayReport {
    /// Messages the target confirmed and the outbox let go.
    pub relayed: u64,
    /// Messages the target refused for good, moved to the dead-letter destination.
    pub dead_lettered: u64,
}

/// Forwards committed outbox rows to a target backend, oldest first, deleting each row
/// only after the target confirmed it.
///
/// One relay works on a database at a time: each holds a lease in `courier_meta` that it
/// renews while it runs, so a second relay (another process, a restart) waits, and
/// takes over within the lease when the first dies. Order per ordering key is the
/// order of the commits.
pub struct Relay {
    committer: crate::committer::Committer,
    target: DynBroker,
    holder: String,
    backend: &'static str,
    batch: usize,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("holder", &self.holder).field("backend", &self.backend).finish_non_exhaustive()
    }
}

/// How long a relay's lease lasts without renewal.
const RELAY_LEASE: Duration = Duration::from_secs(10);

impl Relay {
    /// A relay from the outbox of the database `url` names (as [`SqlBroker::connect`](crate::SqlBroker::connect)
    /// reads it; Courier's tables are created there if missing) to `target`.
    pub async fn connect(url: &str, target: DynBroker) -> Result<Self> {
        let config = crate::SqlConfig::from_url(url)?;
        let conn = config.open().await?;
        let backend = conn.backend();
        let what = config.describe();
        let reopen = move || {
            let config = config.clone();
            async move { config.open().await }
        };
        let committer =
            crate::committer::Committer::start(conn, what, reopen, Duration::from_secs(300), Default::default());
        let holder = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
        Ok(Relay { committer, target, holder, backend, batch: 500 })
    }

    /// Forwards what the outbox holds now, in batches, and returns when it is empty.
    /// Fails, keeping the rows, when the target cannot be reached; call again.
    ///
    /// While another relay holds the outbox (one that died holds it until its lease runs
    /// out, at most 10 s), this waits for it; it fails if the other keeps renewing.
    pub async fn drain(&self) -> Result<RelayReport> {
        let mut report = RelayReport::default();
        let started = tokio::time::Instant::now();
        loop {
            match self.step().await? {
                Step::Relayed(step) => {
                    report.relayed += step.relayed;
                    report.dead_lettered += step.dead_lettered;
                    if step.relayed + step.dead_lettered == 0 {
                        return Ok(report);
                    }
                }
                Step::HeldBy { holder, until_ms } => {
                    if started.elapsed() > 3 * RELAY_LEASE {
                        return Err(Error::retryable(format!(
                            "another outbox relay ({holder}) holds this outbox and keeps renewing its lease: it is relaying these rows; stop it to relay from here"
                        )));
                    }
                    tracing::info!(%holder, "outbox relay: another relay holds the outbox; waiting for its lease");
                    let left = until_ms.saturating_sub(crate::db::now_ms()).clamp(50, 1000);
                    tokio::time::sleep(Duration::from_millis(left as u64)).await;
                }
            }
        }
    }

    /// Runs until `stop` resolves, forwarding rows as they commit (looking every `poll`
    /// when idle) and backing off while the target fails.
    pub async fn run(&self, poll: Duration, stop: impl std::future::Future<Output = ()>) -> RelayReport {
        tokio::pin!(stop);
        let mut report = RelayReport::default();
        let mut backoff = Duration::from_millis(100);
        loop {
            let pause = match self.step().await {
                Ok(Step::HeldBy { .. }) => poll,
                Ok(Step::Relayed(step)) => {
                    backoff = Duration::from_millis(100);
                    report.relayed += step.relayed;
                    report.dead_lettered += step.dead_lettered;
                    if step.relayed + step.dead_lettered > 0 {
                        Duration::ZERO
                    } else {
                        poll
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "outbox relay: the batch stays in the outbox");
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    backoff
                }
            };
            tokio::select! {
                _ = &mut stop => return report,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// One batch: take the lease, read the oldest rows, send them in order (consecutive
    /// rows to one destination as one batch), delete what was confirmed.
    async fn step(&self) -> Result<Step> {
        let (holder, batch) = (self.holder.clone(), self.batch);
        let rows = match self
            .committer
            .call(|reply| crate::committer::Op::OutboxRead { holder, lease: RELAY_LEASE, max: batch, reply })
            .await?
        {
            OutboxBatch::Rows(rows) => rows,
            OutboxBatch::HeldBy { holder, until_ms } => return Ok(Step::HeldBy { holder, until_ms }),
        };
        let mut report = RelayReport::default();
        let mut confirmed: Vec<i64> = Vec::with_capacity(rows.len());
        let mut i = 0;
        while i < rows.len() {
            let destination = rows[i].1.clone();
            let mut j = i;
            while j < rows.len() && rows[j].1 == destination && j - i < self.target.capabilities().max_batch {
                j += 1;
            }
            let group = &rows[i..j];
            let parsed = Destination::parse(&destination);
            match parsed {
                Ok(to) => {
                    let messages: Vec<Message> = group.iter().map(|r| r.2.clone()).collect();
                    match self.target.send_batch(&to, messages).await {
                        Ok(_) => {
                            confirmed.extend(group.iter().map(|r| r.0));
                            report.relayed += group.len() as u64;
                        }
                        Err(e) if !e.is_retryable() && group.len() == 1 => {
                            // Refused for good (too large, a name the target rejects):
                            // it must not hold up the rows behind it.
                            tracing::error!(error = %e, id = %group[0].2.id, %destination, "outbox relay: the target refuses this message; it is dropped from the outbox");
                            confirmed.push(group[0].0);
                            report.dead_lettered += 1;
                        }
                        Err(e) if !e.is_retryable() => {
                            // Find the one refused: send the group one by one next time.
                            tracing::warn!(error = %e, "outbox relay: the target refused a batch; sending it one by one");
                            for r in group {
                                match self.target.send(&to, r.2.clone()).await {
                                    Ok(_) => report.relayed += 1,
                                    Err(e) if !e.is_retryable() => {
                                        tracing::error!(error = %e, id = %r.2.id, %destination, "outbox relay: the target refuses this message; it is dropped from the outbox");
                                        report.dead_lettered += 1;
                                    }
                                    Err(e) => {
                                        self.delete(confirmed).await?;
                                        return Err(e);
                                    }
                                }
                                confirmed.push(r.0);
                            }
                        }
                        Err(e) => {
                            // Keep what was confirmed so far, stop here to keep the order.
                            self.delete(confirmed).await?;
                            return Err(e);
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, %destination, "outbox relay: a row names no valid destination; it is dropped from the outbox");
                    confirmed.extend(group.iter().map(|r| r.0));
                    report.dead_lettered += group.len() as u64;
                }
            }
            i = j;
        }
        self.delete(confirmed).await?;
        Ok(Step::Relayed(report))
    }

    async fn delete(&self, seqs: Vec<i64>) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        self.committer.call(|reply| crate::committer::Op::OutboxDelete { seqs, reply }).await
    }
}

/// One outbox row: its sequence number, destination and message.
pub(crate) type OutboxRow = (i64, String, Message);

/// What a relay reads: the oldest rows, or who holds the outbox.
pub(crate) enum OutboxBatch {
    Rows(Vec<OutboxRow>),
    HeldBy { holder: String, until_ms: i64 },
}

enum Step {
    Relayed(RelayReport),
    HeldBy { holder: String, until_ms: i64 },
}

/// Reads a relay's batch, taking or renewing the relay lease first.
pub(crate) async fn read(
    conn: &mut crate::db::Conn,
    holder: &str,
    lease: Duration,
    max: usize,
) -> std::result::Result<OutboxBatch, sqlx::Error> {
    if let Some((holder, until_ms)) = conn.relay_lease(holder, lease).await? {
        return Ok(OutboxBatch::HeldBy { holder, until_ms });
    }
    Ok(OutboxBatch::Rows(conn.outbox_rows(max).await?))
}
