//! Group commit: one task owns the connection and runs every operation that arrives
//! while the previous transaction commits in the next one.
//!
//! Many sends, receives and acks then share one transaction and one fsync, which is
//! where a durable queue's throughput goes. A transaction that fails is rolled back and
//! its operations are run again one by one, so an operation that cannot succeed fails
//! alone and the others still commit.

use std::sync::Arc;
use std::time::Duration;

use courier_core::{DeadLetter, Destination, Error, Message, MessageId, Result, SettlePolicy, Source, Stats};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::db::{after, db_error, now_ms, source_key, Conn, DbResult, Stored};
use crate::outbox::OutboxBatch;

/// The longest a transaction may take before its connection is dropped and reopened.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Most operations in one transaction.
const MAX_OPS: usize = 512;
/// How often expired dedup ids are deleted.
const DEDUP_SWEEP: Duration = Duration::from_secs(60);

/// Where a send goes: a destination (a topic reaches each subscription), or one source
/// that must already exist.
pub(crate) enum Target {
    Destination(Destination),
    Source(Source),
}

/// What a receive took: deliveries, or when none, when the next message shows.
pub(crate) struct Claimed {
    pub taken: Vec<Stored>,
    pub next_visible: Option<i64>,
}

pub(crate) enum Op {
    Send {
        to: Target,
        messages: Vec<Message>,
        reply: oneshot::Sender<Result<Vec<MessageId>>>,
    },
    Claim {
        source: String,
        max: usize,
        lease: Duration,
        token: i64,
        policy: Arc<SettlePolicy>,
        reply: oneshot::Sender<Result<Claimed>>,
    },
    Ack {
        seq: i64,
        lease: i64,
        reply: oneshot::Sender<Result<bool>>,
    },
    /// Lease ended: visible again after `delay`. No reply: a delivery dropped unsettled.
    /// `uncount`: the delivery was never handed out (read ahead), so it was no attempt.
    Unlease {
        seq: i64,
        lease: i64,
        delay: Duration,
        uncount: bool,
        reply: Option<oneshot::Sender<Result<bool>>>,
    },
    Extend {
        seq: i64,
        lease: i64,
        by: Duration,
        reply: oneshot::Sender<Result<bool>>,
    },
    DeadLetter {
        seq: i64,
        lease: i64,
        letter: DeadLetter,
        reply: oneshot::Sender<Result<bool>>,
    },
    HandBack {
        source: String,
        lo: i64,
        hi: i64,
        reply: oneshot::Sender<Result<u64>>,
    },
    Declare {
        source: Source,
        reply: oneshot::Sender<Result<()>>,
    },
    Stats {
        source: Source,
        reply: oneshot::Sender<Result<Stats>>,
    },
    Purge {
        source: Source,
        reply: oneshot::Sender<Result<u64>>,
    },
    OutboxRead {
        holder: String,
        lease: Duration,
        max: usize,
        reply: oneshot::Sender<Result<OutboxBatch>>,
    },
    OutboxDelete {
        seqs: Vec<i64>,
        reply: oneshot::Sender<Result<()>>,
    },
}

impl Op {
    /// Whether committing this may make a message visible to a waiting consumer.
    fn wakes(&self) -> bool {
        !matches!(
            self,
            Op::Claim { .. }
                | Op::Stats { .. }
                | Op::Extend { .. }
                | Op::Declare { .. }
                | Op::OutboxRead { .. }
                | Op::OutboxDelete { .. }
        )
    }

    fn fail(self, e: Error) {
        let e2 = || clone_error(&e);
        match self {
            Op::Send { reply, .. } => drop(reply.send(Err(e2()))),
            Op::Claim { reply, .. } => drop(reply.send(Err(e2()))),
            Op::Ack { reply, .. } | Op::Extend { reply, .. } | Op::DeadLetter { reply, .. } => {
                drop(reply.send(Err(e2())))
            }
            Op::Unlease { reply, .. } => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(e2()));
                }
            }
            Op::HandBack { reply, .. } | Op::Purge { reply, .. } => drop(reply.send(Err(e2()))),
            Op::Declare { reply, .. } | Op::OutboxDelete { reply, .. } => drop(reply.send(Err(e2()))),
            Op::OutboxRead { reply, .. } => drop(reply.send(Err(e2()))),
            Op::Stats { reply, .. } => drop(reply.send(Err(e2()))),
        }
    }
}

/// Errors are not `Clone`; a failed transaction tells each of its operations the same.
fn clone_error(e: &Error) -> Error {
    match e {
        Error::Broker { backend, message, retryable, .. } => {
            Error::Broker { backend, message: message.clone(), retryable: *retryable, source: None }
        }
        other => Error::Other { message: other.to_string(), retryable: other.is_retryable() },
    }
}

/// The outcome of one operation inside a transaction, sent once it committed.
enum Answer {
    Ids(Result<Vec<MessageId>>),
    Claimed(Claimed),
    Done(bool),
    Count(u64),
    Unit,
    Stats(Result<Stats>),
    Outbox(OutboxBatch),
}

/// A handle to the committer task.
#[derive(Clone)]
pub(crate) struct Committer {
    tx: mpsc::Sender<Op>,
}

impl Committer {
    /// Starts the task on `conn`; `reopen` makes a new connection after one broke.
    pub fn start<F, Fut>(conn: Conn, what: String, reopen: F, dedup_window: Duration, wake: Arc<Notify>) -> Self
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<Conn>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(run(conn, what, reopen, rx, dedup_window, wake));
        Committer { tx }
    }

    pub async fn call<T>(&self, op: impl FnOnce(oneshot::Sender<Result<T>>) -> Op) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        let closed = || Error::Closed { what: "broker" };
        self.tx.send(op(reply)).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// Queues an operation nobody waits for (a drop handing a delivery back).
    pub fn post(&self, op: Op) {
        if let Err(mpsc::error::TrySendError::Full(op)) = self.tx.try_send(op) {
            let tx = self.tx.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = tx.send(op).await;
                });
            }
        }
    }
}

async fn run<F, Fut>(
    conn: Conn,
    what: String,
    reopen: F,
    mut rx: mpsc::Receiver<Op>,
    dedup_window: Duration,
    wake: Arc<Notify>,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Conn>>,
{
    let backend = conn.backend();
    let mut conn = Some(conn);
    let mut batch = Vec::with_capacity(MAX_OPS);
    let mut last_sweep = tokio::time::Instant::now();
    while rx.recv_many(&mut batch, MAX_OPS).await > 0 {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match reopen().await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    tracing::warn!(backend, error = %e, "cannot reopen the database; failing this batch");
                    for op in batch.drain(..) {
                        op.fail(clone_error(&e));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let wakes = batch.iter().any(Op::wakes);
        let sweep = last_sweep.elapsed() >= DEDUP_SWEEP;
        let started = std::time::Instant::now();
        let r = transaction_retrying(c, &batch, dedup_window, wakes, sweep).await;
        tracing::trace!(
            backend,
            operations = batch.len(),
            took_us = started.elapsed().as_micros() as u64,
            "transaction"
        );
        match r {
            Ok(answers) => {
                if sweep {
                    last_sweep = tokio::time::Instant::now();
                }
                reply_all(batch.drain(..), answers);
                if wakes {
                    wake.notify_waiters();
                }
            }
            Err(e) => {
                let broken = e.is_none_or(|e| is_connection_error(&e));
                if broken {
                    conn = None;
                }
                // One by one: an operation that cannot succeed fails alone.
                for op in batch.drain(..) {
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => match reopen().await {
                            Ok(c) => conn.insert(c),
                            Err(e) => {
                                op.fail(e);
                                continue;
                            }
                        },
                    };
                    let ops = [op];
                    match transaction_retrying(c, &ops, dedup_window, ops[0].wakes(), false).await {
                        Ok(answers) => {
                            let woke = ops[0].wakes();
                            reply_all(ops.into_iter(), answers);
                            if woke {
                                wake.notify_waiters();
                            }
                        }
                        Err(e) => {
                            let error = match &e {
                                Some(e) => db_error(backend, &what, e),
                                None => Error::transient(
                                    backend,
                                    format!("the database did not answer within {TRANSACTION_TIMEOUT:?}; the connection is reopened"),
                                    "timeout",
                                ),
                            };
                            if e.is_none_or(|e| is_connection_error(&e)) {
                                conn = None;
                            }
                            let [op] = ops;
                            op.fail(error);
                        }
                    }
                }
            }
        }
    }
}

fn is_connection_error(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed | sqlx::Error::Tls(_))
}

fn reply_all(ops: impl Iterator<Item = Op>, answers: Vec<Answer>) {
    for (op, answer) in ops.zip(answers) {
        match (op, answer) {
            (Op::Send { reply, .. }, Answer::Ids(ids)) => drop(reply.send(ids)),
            (Op::Claim { reply, .. }, Answer::Claimed(c)) => drop(reply.send(Ok(c))),
            (Op::Ack { reply, .. } | Op::Extend { reply, .. } | Op::DeadLetter { reply, .. }, Answer::Done(d)) => {
                drop(reply.send(Ok(d)))
            }
            (Op::Unlease { reply, .. }, Answer::Done(d)) => {
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(d));
                }
            }
            (Op::HandBack { reply, .. } | Op::Purge { reply, .. }, Answer::Count(n)) => drop(reply.send(Ok(n))),
            (Op::Declare { reply, .. } | Op::OutboxDelete { reply, .. }, Answer::Unit) => drop(reply.send(Ok(()))),
            (Op::OutboxRead { reply, .. }, Answer::Outbox(rows)) => drop(reply.send(Ok(rows))),
            (Op::Stats { reply, .. }, Answer::Stats(s)) => drop(reply.send(s)),
            (op, _) => op.fail(Error::fatal("internal: answer of another kind")),
        }
    }
}

/// How many times a transaction PostgreSQL aborted as a deadlock or a serialization
/// conflict runs again before its operations fail.
const CONFLICT_RETRIES: u32 = 3;

/// A deadlock (40P01) or serialization failure (40001): the database rolled the whole
/// transaction back, so running it again is safe and is what PostgreSQL asks for.
fn is_conflict(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("40P01" | "40001")))
}

/// [`transaction`], run again after a short pause when the database aborted it as a
/// conflict with another session, so a deadlock costs time, not a failed operation.
async fn transaction_retrying(
    conn: &mut Conn,
    ops: &[Op],
    dedup_window: Duration,
    wakes: bool,
    sweep: bool,
) -> std::result::Result<Vec<Answer>, Option<sqlx::Error>> {
    let mut pause = Duration::from_millis(5);
    for _ in 0..CONFLICT_RETRIES {
        match transaction(conn, ops, dedup_window, wakes, sweep).await {
            Err(Some(e)) if is_conflict(&e) => {
                tracing::debug!(error = %e, "the database aborted a transaction as a conflict; running it again");
                tokio::time::sleep(pause).await;
                pause *= 4;
            }
            done => return done,
        }
    }
    transaction(conn, ops, dedup_window, wakes, sweep).await
}

/// Runs `ops` in one transaction and commits. `Err(None)` is a timeout.
async fn transaction(
    conn: &mut Conn,
    ops: &[Op],
    dedup_window: Duration,
    wakes: bool,
    sweep: bool,
) -> std::result::Result<Vec<Answer>, Option<sqlx::Error>> {
    let work = async {
        conn.begin().await?;
        let result = async {
            let answers = apply(conn, ops, dedup_window).await?;
            if sweep {
                conn.sweep_dedup(now_ms()).await?;
            }
            if wakes {
                conn.notify().await?;
            }
            conn.commit().await?;
            Ok(answers)
        }
        .await;
        if result.is_err() {
            let _ = conn.rollback().await;
        }
        result
    };
    match tokio::time::timeout(TRANSACTION_TIMEOUT, work).await {
        Ok(result) => result.map_err(Some),
        Err(_) => Err(None),
    }
}

/// The operations of one transaction, in an order that lets each see the others' work:
/// sends first (a receive in the same transaction sees them), settlements, then receives
/// (which see keys the settlements freed). Acks share one statement.
async fn apply(conn: &mut Conn, ops: &[Op], dedup_window: Duration) -> DbResult<Vec<Answer>> {
    let now = now_ms();
    let mut answers: Vec<Option<Answer>> = ops.iter().map(|_| None).collect();

    // Sends: every message of every send in one multi-row insert.
    let mut rows: Vec<(String, &Message, i64)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let Op::Send { to, messages, .. } = op else { continue };
        let (key, targets) = match to {
            Target::Destination(d) => (destination_key(d), conn.targets(d).await?),
            Target::Source(s) => {
                if !conn.source_exists(s).await? {
                    answers[i] = Some(Answer::Ids(Err(not_found(s))));
                    continue;
                }
                (source_key(s), vec![source_key(s)])
            }
        };
        let mut ids = Vec::with_capacity(messages.len());
        for m in messages {
            if let Some(dedup_id) = &m.dedup_id {
                if let Some(first) = conn.dedup(&key, dedup_id, &m.id, now, dedup_window).await? {
                    ids.push(first);
                    continue;
                }
            }
            ids.push(m.id.clone());
            let visible = after(now, m.delay.unwrap_or_default());
            for t in &targets {
                rows.push((t.clone(), m, visible));
            }
        }
        answers[i] = Some(Answer::Ids(Ok(ids)));
    }
    if !rows.is_empty() {
        let rows: Vec<(&str, &Message, i64)> = rows.iter().map(|(s, m, v)| (s.as_str(), *m, *v)).collect();
        conn.insert(&rows).await?;
    }

    // Acks: one statement for all.
    let acks: Vec<(usize, i64, i64)> = ops
        .iter()
        .enumerate()
        .filter_map(|(i, op)| match op {
            Op::Ack { seq, lease, .. } => Some((i, *seq, *lease)),
            _ => None,
        })
        .collect();
    if !acks.is_empty() {
        let held: Vec<(i64, i64)> = acks.iter().map(|(_, s, l)| (*s, *l)).collect();
        let done: std::collections::HashSet<i64> = conn.delete_leased(&held).await?.into_iter().collect();
        for (i, seq, _) in acks {
            answers[i] = Some(Answer::Done(done.contains(&seq)));
        }
    }

    // Other settlements and administration, in arrival order.
    for (i, op) in ops.iter().enumerate() {
        let answer = match op {
            Op::Unlease { seq, lease, delay, uncount, .. } => {
                Answer::Done(conn.unlease(*seq, *lease, after(now, *delay), *uncount).await?)
            }
            Op::Extend { seq, lease, by, .. } => Answer::Done(conn.extend(*seq, *lease, after(now, *by)).await?),
            Op::DeadLetter { seq, lease, letter, .. } => {
                Answer::Done(conn.dead_letter(*seq, Some(*lease), letter, now).await?)
            }
            Op::HandBack { source, lo, hi, .. } => Answer::Count(conn.hand_back(source, *lo, *hi, now).await?),
            Op::Declare { source, .. } => {
                conn.declare(source).await?;
                Answer::Unit
            }
            Op::Stats { source, .. } => Answer::Stats(match conn.stats(source, now).await? {
                Some(stats) => Ok(stats),
                None => Err(not_found(source)),
            }),
            Op::Purge { source, .. } => Answer::Count(conn.purge(source, now).await?),
            Op::OutboxRead { holder, lease, max, .. } => {
                Answer::Outbox(crate::outbox::read(conn, holder, *lease, *max).await?)
            }
            Op::OutboxDelete { seqs, .. } => {
                conn.outbox_delete(seqs).await?;
                Answer::Unit
            }
            _ => continue,
        };
        answers[i] = Some(answer);
    }

    // Receives last, the receives of one source together: one look-up, one update and
    // one read for all of them, whatever the number of consumers.
    let mut by_source: Vec<(&str, Vec<usize>)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        if let Op::Claim { source, .. } = op {
            match by_source.iter_mut().find(|(s, _)| *s == source.as_str()) {
                Some((_, claims)) => claims.push(i),
                None => by_source.push((source.as_str(), vec![i])),
            }
        }
    }
    for (source, claims) in by_source {
        // Rounds of at most MAX_CLAIM rows, to keep each statement's values in bounds.
        let mut rest = &claims[..];
        while !rest.is_empty() {
            let mut take = 0;
            let mut rows = 0;
            while take < rest.len() && (take == 0 || rows + claim_max(&ops[rest[take]]) <= MAX_CLAIM) {
                rows += claim_max(&ops[rest[take]]);
                take += 1;
            }
            let (round, later) = rest.split_at(take);
            rest = later;
            let mut candidates = conn.candidates(source, now, rows).await?.into_iter();
            let mut grants: Vec<(Vec<i64>, i64, i64)> = Vec::with_capacity(round.len());
            for &i in round {
                let Op::Claim { max, lease, token, policy, .. } = &ops[i] else { unreachable!("grouped claims") };
                let mut live = Vec::with_capacity(*max);
                while live.len() < *max {
                    let Some((seq, held, attempts)) = candidates.next() else { break };
                    // Only the backend sees a lease run out, so it counts that attempt; core's
                    // policy says whether it was the last and builds the dead letter.
                    let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
                    if held.is_some() && policy.is_last(attempts) {
                        let letter = policy.gave_up(attempts, "max attempts reached on lease expiry");
                        conn.dead_letter(seq, None, &letter, now).await?;
                    } else {
                        live.push(seq);
                    }
                }
                grants.push((live, *token, after(now, *lease)));
            }
            let mut owner = std::collections::HashMap::new();
            for (g, (seqs, _, _)) in grants.iter().enumerate() {
                for seq in seqs {
                    owner.insert(*seq, g);
                }
            }
            let mut taken: Vec<Vec<Stored>> = grants.iter().map(|_| Vec::new()).collect();
            for stored in conn.lease_many(&grants).await? {
                if let Some(g) = owner.get(&stored.seq) {
                    taken[*g].push(stored);
                }
            }
            let mut next_visible = None;
            for (&i, taken) in round.iter().zip(taken) {
                if taken.is_empty() && next_visible.is_none() {
                    next_visible = Some(conn.next_visible(source, now).await?);
                }
                let next_visible = if taken.is_empty() { next_visible.flatten() } else { None };
                answers[i] = Some(Answer::Claimed(Claimed { taken, next_visible }));
            }
        }
    }

    Ok(answers.into_iter().map(|a| a.expect("every operation answered")).collect())
}

/// Most rows one round of receives of a source takes.
const MAX_CLAIM: usize = 1000;

fn claim_max(op: &Op) -> usize {
    match op {
        Op::Claim { max, .. } => *max,
        _ => 0,
    }
}

fn destination_key(d: &Destination) -> String {
    d.to_string()
}

fn not_found(source: &Source) -> Error {
    match source {
        Source::Queue(n) => Error::NotFound { kind: "queue", name: n.to_string() },
        Source::Subscription { subscription, .. } => {
            Error::NotFound { kind: "subscription", name: subscription.to_string() }
        }
    }
}
