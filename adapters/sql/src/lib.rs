//! # courier-sql
//!
//! Courier's durable backends on a database: an embedded SQLite file (`sqlite://`) for
//! one machine with no broker to run, and PostgreSQL (`postgres://`) for many workers on
//! many machines sharing one database. Both keep every clause of the contract with every
//! capability the in-process backend has: leases that expire and can be extended,
//! delays, retries, dead letters, topics with subscriptions, ordered keys, a dedup
//! window, purge and stats. The contract is `docs/contract.md` in the repository.
//!
//! ```
//! use std::time::Duration;
//! use courier_core::{Broker, ConsumerOptions, Destination, Message, Source};
//! use courier_sql::SqlBroker;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), courier_core::Error> {
//! # let dir = std::env::temp_dir().join(format!("courier-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! # let file = dir.join("queues.db");
//! let broker = SqlBroker::connect(&format!("sqlite://{}", file.display())).await?;
//! let orders = Source::queue("orders")?;
//! let consumer = broker.consumer(&orders, ConsumerOptions::default()).await?;
//!
//! broker.send(&Destination::queue("orders")?, Message::new("order #1")).await?;
//! let delivery = consumer.receive_one(Duration::from_secs(1)).await?.expect("a message");
//! assert_eq!(&delivery.payload[..], b"order #1");
//! delivery.ack().await?; // once this returns, the message is gone for good
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(()) }
//! ```
//!
//! ## Durability
//!
//! A send that returned `Ok` is committed: it survives the process being killed
//! (`kill -9`), and with `sqlite://` the default settings survive a power loss too.
//! An ack that returned `Ok` is committed: the message never comes back. Deliveries
//! held when a process dies come back when their lease runs out.
//!
//! | SQLite setting | Courier's choice | what it means |
//! |---|---|---|
//! | `journal_mode` | `WAL` | writers append to a log beside the file; readers never block them; several processes share the file |
//! | `synchronous` | `FULL` (URL `synchronous=full`, the default) | every commit waits for the log to reach the disk: survives power loss |
//! | | `NORMAL` (URL `synchronous=normal`) | the log reaches the disk at checkpoints: survives a process crash, may lose the last commits on power loss; faster |
//! | `busy_timeout` | 5 s (URL `busy_timeout_ms`) | how long a process waits for another's write lock before the call fails, retryably |
//!
//! Throughput does not pay one fsync per message: one task per broker owns the
//! connection and commits every operation that arrived meanwhile (sends, receives,
//! acks of any number of callers) in one transaction.
//!
//! ## How the contract maps onto the tables
//!
//! | contract clause | here |
//! |---|---|
//! | queue, subscription | rows of `courier_messages` with the source's name; a subscription is registered in `courier_sources` and a send to its topic writes one row per subscription |
//! | competing consumers | a receive leases rows in a transaction (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so sessions on other machines take other rows) |
//! | lease, expiry, extension | `lease` holds the receiver's token and `visible_ms` its deadline; a row whose deadline passed is visible again |
//! | attempts, dead letter | `attempts` counts deliveries; the last one failing moves the row to the dead-letter destination, in the same transaction, with reason, attempts and origin headers |
//! | settle once, late settlement | every settlement names the row and its lease token; a row no longer held answers `LeaseLost` |
//! | delay, delayed retry | `visible_ms` in the future |
//! | per-key order | a row is visible only when no older row of its key is left in the source |
//! | dedup window | `courier_dedup`, keyed by destination and dedup id, rows expire with the window |
//! | waking consumers | in-process: at commit; across processes: PostgreSQL `LISTEN/NOTIFY`, SQLite polls (`poll_ms`, default 100) |
//!
//! Clocks: leases and delays use each process's clock; processes sharing a database
//! must keep their clocks in step to well within a lease (NTP does).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod committer;
mod config;
mod db;
pub mod outbox;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use courier_core::backend::OpenGuard;
use courier_core::{
    Acknowledger, Broker, Capabilities, Consumer, ConsumerOptions, DeadLetter, Delivery, Destination, Error, Message,
    MessageId, Result, SettlePolicy, Source, Stats,
};
use tokio::sync::Notify;

use committer::{Committer, Op, Target};
pub use config::{Location, SqlConfig, Synchronous};
use db::Stored;
/// The sqlx this crate is built with, whose pools and transactions its outbox API takes.
pub use sqlx;

/// The most deliveries one receive takes.
const MAX_RECEIVE: usize = 1000;

/// A queue backend on SQLite or PostgreSQL. Cheap to clone: clones share one connection
/// and its committer task.
#[derive(Clone, Debug)]
pub struct SqlBroker {
    inner: Arc<Inner>,
}

struct Inner {
    caps: Capabilities,
    committer: Committer,
    wake: Arc<Notify>,
    poll: Duration,
    open: OpenGuard,
    listener: Option<tokio::task::JoinHandle<()>>,
    what: String,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlBroker").field("database", &self.what).finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(listener) = &self.listener {
            listener.abort();
        }
    }
}

impl SqlBroker {
    /// Opens the database a URL names, creating Courier's tables if missing:
    /// `sqlite://PATH` (relative) or `sqlite:///ABSOLUTE/PATH`, or
    /// `postgres://user:password@host:port/database`. See [`SqlConfig::from_url`] for
    /// the options. Must be called inside a tokio runtime.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::with_config(SqlConfig::from_url(url)?).await
    }

    /// Opens the database `config` names.
    pub async fn with_config(config: SqlConfig) -> Result<Self> {
        let conn = config.open().await?;
        let backend = conn.backend();
        let wake = Arc::new(Notify::new());
        let listener = config.listen(wake.clone()).await?;
        let reopen = {
            let config = config.clone();
            move || {
                let config = config.clone();
                async move { config.open().await }
            }
        };
        let committer = Committer::start(conn, config.describe(), reopen, config.dedup_window, wake.clone());
        let caps =
            Capabilities { max_payload: config.max_payload, max_batch: MAX_RECEIVE, ..Capabilities::all(backend) };
        Ok(SqlBroker {
            inner: Arc::new(Inner {
                caps,
                committer,
                wake,
                poll: config.poll,
                open: OpenGuard::new("broker"),
                listener,
                what: config.describe(),
            }),
        })
    }

    async fn send_to(&self, to: Target, messages: Vec<Message>) -> Result<Vec<MessageId>> {
        self.inner.open.check()?;
        self.inner.caps.check_batch(&messages)?;
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        self.inner.committer.call(|reply| Op::Send { to, messages, reply }).await
    }
}

#[async_trait]
impl Broker for SqlBroker {
    fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    async fn send(&self, destination: &Destination, message: Message) -> Result<MessageId> {
        let mut ids = self.send_to(Target::Destination(destination.clone()), vec![message]).await?;
        Ok(ids.pop().expect("one id per message"))
    }

    async fn send_batch(&self, destination: &Destination, messages: Vec<Message>) -> Result<Vec<MessageId>> {
        self.send_to(Target::Destination(destination.clone()), messages).await
    }

    async fn consumer(&self, source: &Source, options: ConsumerOptions) -> Result<Box<dyn Consumer>> {
        self.inner.open.check()?;
        self.declare(source).await?;
        let settle = options.settle_policy(source);
        // The dead-letter queue exists before the first dead letter needs it.
        if let Destination::Queue(name) = settle.dead_letter() {
            self.declare(&Source::Queue(name.clone())).await?;
        }
        // A random high half per consumer: its leases are one range, handed back at close.
        let base = i64::from(rand::random::<u32>() & 0x7fff_ffff).max(1) << 32;
        Ok(Box::new(SqlConsumer {
            broker: self.inner.clone(),
            source: source.clone(),
            key: db::source_key(source),
            settle,
            lease: options.lease,
            base,
            next: AtomicU32::new(0),
            open: OpenGuard::new("consumer"),
            prefetch: options.prefetch,
            ahead: Default::default(),
        }))
    }

    async fn declare(&self, source: &Source) -> Result<()> {
        self.inner.open.check()?;
        let source = source.clone();
        self.inner.committer.call(|reply| Op::Declare { source, reply }).await
    }

    async fn send_to_source(&self, source: &Source, message: Message) -> Result<MessageId> {
        let mut ids = self.send_to(Target::Source(source.clone()), vec![message]).await?;
        Ok(ids.pop().expect("one id per message"))
    }

    async fn stats(&self, source: &Source) -> Result<Stats> {
        self.inner.open.check()?;
        let source = source.clone();
        self.inner.committer.call(|reply| Op::Stats { source, reply }).await
    }

    async fn purge(&self, source: &Source) -> Result<u64> {
        self.inner.open.check()?;
        let source = source.clone();
        self.inner.committer.call(|reply| Op::Purge { source, reply }).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.open.close();
        if let Some(listener) = &self.inner.listener {
            listener.abort();
        }
        self.inner.wake.notify_waiters();
        Ok(())
    }
}

struct SqlConsumer {
    broker: Arc<Inner>,
    source: Source,
    key: String,
    settle: Arc<SettlePolicy>,
    lease: Duration,
    base: i64,
    next: AtomicU32,
    open: OpenGuard,
    prefetch: usize,
    ahead: tokio::sync::Mutex<ReadAhead>,
}

/// Rows claimed for the next receive while the caller works on the last one, so the
/// next claim shares a transaction with the acks of the last batch instead of waiting
/// for one of its own.
#[derive(Default)]
struct ReadAhead {
    ready: std::collections::VecDeque<(Stored, i64)>,
    claimed_at: Option<tokio::time::Instant>,
    pending: Option<(i64, tokio::sync::oneshot::Receiver<Result<committer::Claimed>>)>,
}

impl SqlConsumer {
    fn token(&self) -> i64 {
        self.base | i64::from(self.next.fetch_add(1, Ordering::Relaxed))
    }

    fn delivery(&self, stored: Stored, token: i64) -> Delivery {
        let acker = SqlAcker {
            committer: self.broker.committer.clone(),
            settle: self.settle.clone(),
            seq: stored.seq,
            lease: token,
            id: stored.message.id.clone(),
        };
        let attempt = u32::try_from(stored.attempts).unwrap_or(u32::MAX);
        Delivery::new(stored.message, attempt, Box::new(acker))
    }

    /// Whether a full batch of `max` makes this consumer claim the next one ahead: for
    /// callers taking batches (one at a time means one at a time) and with a prefetch.
    fn reads_ahead(&self, max: usize) -> bool {
        max > 1 && self.prefetch > 0
    }

    fn read_ahead(&self, ahead: &mut ReadAhead) {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let token = self.token();
        let (source, policy, lease) = (self.key.clone(), self.settle.clone(), self.lease);
        let max = self.prefetch.min(MAX_RECEIVE);
        self.broker.committer.post(Op::Claim { source, max, lease, token, policy, reply });
        ahead.pending = Some((token, answer));
    }

    /// Gives rows read ahead but never handed out back, uncounted: they were no attempt.
    fn give_back(&self, rows: impl IntoIterator<Item = (Stored, i64)>) {
        give_back(&self.broker.committer, rows);
    }
}

/// Unleases rows that were claimed but never handed out, taking back their attempt.
fn give_back(committer: &Committer, rows: impl IntoIterator<Item = (Stored, i64)>) {
    for (stored, lease) in rows {
        let op = Op::Unlease { seq: stored.seq, lease, delay: Duration::ZERO, uncount: true, reply: None };
        committer.post(op);
    }
}

impl Drop for SqlConsumer {
    /// Not closed (a task that panicked, a loop cancelled): what was read ahead goes back
    /// now, as no attempt, rather than after its lease with one counted. A claim still
    /// under way is waited for on the runtime, then given back too. What was handed out
    /// stays with its holders, who settle it or let its lease run out.
    fn drop(&mut self) {
        let Ok(mut ahead) = self.ahead.try_lock() else { return };
        let rows: Vec<_> = ahead.ready.drain(..).collect();
        self.give_back(rows);
        if let (Some((token, answer)), Ok(runtime)) = (ahead.pending.take(), tokio::runtime::Handle::try_current()) {
            let committer = self.broker.committer.clone();
            runtime.spawn(async move {
                if let Ok(Ok(claimed)) = answer.await {
                    give_back(&committer, claimed.taken.into_iter().map(|s| (s, token)));
                }
            });
        }
    }
}

#[async_trait]
impl Consumer for SqlConsumer {
    fn source(&self) -> &Source {
        &self.source
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let deadline = tokio::time::Instant::now() + wait;
        let max = max.clamp(1, MAX_RECEIVE);
        let mut ahead = self.ahead.lock().await;
        loop {
            self.open.check()?;
            self.broker.open.check()?;
            if ahead.ready.is_empty() {
                if let Some((token, answer)) = ahead.pending.take() {
                    if let Ok(Ok(claimed)) = answer.await {
                        ahead.ready.extend(claimed.taken.into_iter().map(|s| (s, token)));
                        ahead.claimed_at = Some(tokio::time::Instant::now());
                    }
                }
            }
            // Read ahead long ago: the lease is half gone, so let it go rather than hand
            // out a delivery about to expire.
            if ahead.claimed_at.is_some_and(|at| at.elapsed() > self.lease / 2) {
                let stale: Vec<_> = ahead.ready.drain(..).collect();
                self.give_back(stale);
            }
            if !ahead.ready.is_empty() {
                let n = max.min(ahead.ready.len());
                let batch: Vec<(Stored, i64)> = ahead.ready.drain(..n).collect();
                if ahead.ready.is_empty() && n == max && self.reads_ahead(max) {
                    self.read_ahead(&mut ahead);
                }
                return Ok(batch.into_iter().map(|(stored, token)| self.delivery(stored, token)).collect());
            }
            // Armed before looking, so a commit between the look and the wait still wakes us.
            let notified = self.broker.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let token = self.token();
            let (source, policy, lease) = (self.key.clone(), self.settle.clone(), self.lease);
            let claimed =
                self.broker.committer.call(|reply| Op::Claim { source, max, lease, token, policy, reply }).await?;
            if !claimed.taken.is_empty() {
                // A full batch: the source is busy, so claim the next one meanwhile.
                if claimed.taken.len() == max && self.reads_ahead(max) {
                    self.read_ahead(&mut ahead);
                }
                return Ok(claimed.taken.into_iter().map(|stored| self.delivery(stored, token)).collect());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let mut nap = (deadline - now).min(self.broker.poll);
            if let Some(next) = claimed.next_visible {
                let until = Duration::from_millis(next.saturating_sub(db::now_ms()).max(1) as u64);
                nap = nap.min(until);
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(nap) => {}
            }
        }
    }

    async fn close(&self) -> Result<()> {
        if self.open.close() {
            let mut ahead = self.ahead.lock().await;
            if let Some((token, answer)) = ahead.pending.take() {
                if let Ok(Ok(claimed)) = answer.await {
                    ahead.ready.extend(claimed.taken.into_iter().map(|s| (s, token)));
                }
            }
            let rows: Vec<_> = ahead.ready.drain(..).collect();
            self.give_back(rows);
            let (source, lo, hi) = (self.key.clone(), self.base, self.base | 0xffff_ffff);
            self.broker.committer.call(|reply| Op::HandBack { source, lo, hi, reply }).await?;
        }
        Ok(())
    }
}

struct SqlAcker {
    committer: Committer,
    settle: Arc<SettlePolicy>,
    seq: i64,
    lease: i64,
    id: MessageId,
}

impl SqlAcker {
    fn held(&self, done: bool) -> Result<()> {
        if done {
            Ok(())
        } else {
            Err(Error::LeaseLost { id: self.id.clone() })
        }
    }
}

#[async_trait]
impl Acknowledger for SqlAcker {
    fn policy(&self) -> &SettlePolicy {
        &self.settle
    }

    async fn ack(&self) -> Result<()> {
        let (seq, lease) = (self.seq, self.lease);
        self.held(self.committer.call(|reply| Op::Ack { seq, lease, reply }).await?)
    }

    async fn redeliver(&self, delay: Option<Duration>) -> Result<()> {
        let (seq, lease, delay) = (self.seq, self.lease, delay.unwrap_or_default());
        self.held(
            self.committer.call(|reply| Op::Unlease { seq, lease, delay, uncount: false, reply: Some(reply) }).await?,
        )
    }

    async fn dead_letter(&self, letter: &DeadLetter) -> Result<()> {
        let (seq, lease, letter) = (self.seq, self.lease, letter.clone());
        self.held(self.committer.call(|reply| Op::DeadLetter { seq, lease, letter, reply }).await?)
    }

    async fn extend_lease(&self, by: Duration) -> Result<()> {
        let (seq, lease) = (self.seq, self.lease);
        self.held(self.committer.call(|reply| Op::Extend { seq, lease, by, reply }).await?)
    }

    fn release(&self) {
        // Visible again now rather than after its lease; a delivery settled or expired
        // meanwhile matches no row, and nothing happens.
        self.committer.post(Op::Unlease {
            seq: self.seq,
            lease: self.lease,
            delay: Duration::ZERO,
            uncount: false,
            reply: None,
        });
    }
}
