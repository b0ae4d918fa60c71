//! Durability across `kill -9`: a producer and then a consumer process are killed with
//! SIGKILL in the middle of their work, on `sqlite://` and on `postgres://`. After each
//! restart every message whose send returned Ok is delivered, no message whose ack
//! returned Ok comes back, and duplicates are counted and bounded by what was in flight.
//! A worker process killed likewise loses nothing; several processes consuming one
//! queue at once handle no message twice; an outbox relay killed between a send and
//! its delete sends that batch again and nothing else.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use courier_contract_tests::{postgres_url, sqlite_test_path};
use courier_core::conformance::unique_name;
use tokio::process::{Child, Command};

const MESSAGES: usize = 10_000;
/// Most deliveries one consumer process holds: one receive of 100.
const IN_FLIGHT: usize = 100;

fn child(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sql_crash_child")).args(args).kill_on_drop(true).spawn().expect("start the child")
}

fn events(out: &Path, event: &str) -> Vec<String> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    text.lines().filter_map(|l| l.strip_prefix(event)).map(|id| id.trim().to_owned()).collect()
}

/// Waits until `out` reports `n` events of `event`, then kills the child with SIGKILL.
async fn kill_after(mut child: Child, out: &Path, event: &str, n: usize) {
    let started = tokio::time::Instant::now();
    while events(out, event).len() < n {
        assert!(child.try_wait().unwrap().is_none(), "the child ended before it was killed");
        assert!(started.elapsed() < Duration::from_secs(300), "no progress: {} {event}", events(out, event).len());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().await.expect("SIGKILL");
}

async fn finish(mut child: Child) {
    let status =
        tokio::time::timeout(Duration::from_secs(300), child.wait()).await.expect("the child finishes").unwrap();
    assert!(status.success(), "the child failed: {status}");
}

fn out_dir(case: &str) -> PathBuf {
    sqlite_test_path(case).parent().unwrap().to_path_buf()
}

async fn crash_twice_lose_nothing(url: &str, case: &str) {
    let queue = unique_name(case);
    let dir = out_dir(case);
    let out = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let (sent_a, sent_b, run_1, run_2) = (out("sent-a"), out("sent-b"), out("consume-1"), out("consume-2"));
    let n = MESSAGES.to_string();

    // Sends: killed after 3,000 confirmed, then a new process sends what was not confirmed.
    kill_after(child(&["send", url, &queue, &n, "a", &sent_a]), Path::new(&sent_a), "sent ", 3_000).await;
    finish(child(&["send", url, &queue, &n, "b", &sent_b, &sent_a])).await;
    let sent: HashSet<String> =
        events(Path::new(&sent_a), "sent ").into_iter().chain(events(Path::new(&sent_b), "sent ")).collect();
    assert_eq!(
        sent.iter().map(|id| id.split('-').next().unwrap()).collect::<HashSet<_>>().len(),
        MESSAGES,
        "every index was confirmed once by one of the two producers"
    );

    // Consumers: killed after 4,050 acks (in the middle of a batch of 100), then a new one (after the leases ran out) takes the rest.
    kill_after(child(&["consume", url, &queue, "2000", "4000", &run_1]), Path::new(&run_1), "acked ", 4_050).await;
    finish(child(&["consume", url, &queue, "2000", "4000", &run_2])).await;

    let got_1: HashSet<String> = events(Path::new(&run_1), "got ").into_iter().collect();
    let acked_1: HashSet<String> = events(Path::new(&run_1), "acked ").into_iter().collect();
    let got_2: Vec<String> = events(Path::new(&run_2), "got ");
    let came_back: Vec<&String> = got_2.iter().filter(|id| acked_1.contains(*id)).collect();
    assert!(
        came_back.is_empty(),
        "{} messages whose ack returned Ok came back: {:?}",
        came_back.len(),
        &came_back[..came_back.len().min(5)]
    );

    // Delivered at least once: to the killed consumer or to the next one.
    let delivered: HashSet<&String> = got_1.iter().chain(got_2.iter()).collect();
    let lost: Vec<&String> = sent.iter().filter(|id| !delivered.contains(id)).collect();
    assert!(lost.is_empty(), "{} confirmed sends never delivered: {:?}", lost.len(), &lost[..lost.len().min(5)]);
    // Every delivery ended acked. A delivery the killed consumer got, did not record as
    // acked, and that never came back was acked in the instant before the kill: at most
    // the one ack under way.
    let acked_2: HashSet<String> = events(Path::new(&run_2), "acked ").into_iter().collect();
    let got_2_set: HashSet<&String> = got_2.iter().collect();
    let unrecorded: Vec<&String> =
        got_1.iter().filter(|id| !acked_1.contains(*id) && !got_2_set.contains(id)).collect();
    assert!(unrecorded.len() <= 1, "{} deliveries neither acked nor delivered again: {unrecorded:?}", unrecorded.len());
    let unsettled: Vec<&&String> = got_2_set.iter().filter(|id| !acked_2.contains(**id)).collect();
    assert!(unsettled.is_empty(), "the last consumer left deliveries unacked: {unsettled:?}");

    // Duplicates: deliveries of one id more than once (held by the killed consumer), and
    // payloads sent twice (committed before the killed producer heard so).
    let mut deliveries: HashMap<String, usize> = HashMap::new();
    for id in events(Path::new(&run_1), "got ").into_iter().chain(got_2) {
        *deliveries.entry(id).or_default() += 1;
    }
    let redelivered = deliveries.values().filter(|n| **n > 1).count();
    let unconfirmed_sends = deliveries.keys().filter(|id| !sent.contains(*id)).count();
    println!(
        "{case}: {} confirmed sends, {} delivered ids, {redelivered} redelivered after the consumer's kill (bound {IN_FLIGHT}), \
         {unconfirmed_sends} committed sends the killed producer never heard of (bound 16)",
        sent.len(),
        deliveries.len()
    );
    assert!(redelivered <= IN_FLIGHT, "{redelivered} redeliveries: more than one receive's worth was in flight");
    assert!(
        unconfirmed_sends <= 16,
        "{unconfirmed_sends} unconfirmed sends: more than the producer's 16 tasks had in flight"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A worker process (the runtime, concurrency 4, batches of 10) killed with SIGKILL
/// mid-run, then a new one: every confirmed send is handled, and only what the killed
/// worker was handling (one message per slot: at most 4) is handled again. The rest it
/// had fetched comes back after its lease without having been handled.
async fn a_killed_worker_loses_nothing(url: &str, case: &str) {
    const WORKER_IN_FLIGHT: usize = 4;
    let queue = unique_name(case);
    let dir = out_dir(case);
    let out = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let (sent, run_1, run_2) = (out("sent"), out("work-1"), out("work-2"));
    finish(child(&["send", url, &queue, &MESSAGES.to_string(), "a", &sent])).await;
    kill_after(child(&["work", url, &queue, "2000", "4000", &run_1]), Path::new(&run_1), "got ", 4_050).await;
    finish(child(&["work", url, &queue, "2000", "4000", &run_2])).await;

    let sent: HashSet<String> = events(Path::new(&sent), "sent ").into_iter().collect();
    assert_eq!(sent.len(), MESSAGES);
    let (got_1, got_2) = (events(Path::new(&run_1), "got "), events(Path::new(&run_2), "got "));
    let first: HashSet<&String> = got_1.iter().collect();
    let lost: Vec<&String> = sent.iter().filter(|id| !first.contains(id) && !got_2.contains(id)).collect();
    assert!(lost.is_empty(), "{} confirmed sends never handled: {:?}", lost.len(), &lost[..lost.len().min(5)]);
    let again: Vec<&String> = got_2.iter().filter(|id| first.contains(id)).collect();
    let twice_in_one_run = got_1.len() - first.len() + got_2.len() - got_2.iter().collect::<HashSet<_>>().len();
    println!(
        "{case}: {} handled before the kill, {} after; {} handled again after the kill (bound {WORKER_IN_FLIGHT}), {twice_in_one_run} twice within one run",
        got_1.len(),
        got_2.len(),
        again.len()
    );
    assert!(
        again.len() <= WORKER_IN_FLIGHT,
        "{} handled again: more than the killed worker held: {again:?}",
        again.len()
    );
    assert_eq!(twice_in_one_run, 0, "no message handled twice while its lease held");
    std::fs::remove_dir_all(&dir).ok();
}

async fn competing_processes_handle_each_message_once(url: &str, case: &str) {
    let queue = unique_name(case);
    let dir = out_dir(case);
    let sent = dir.join("sent").to_string_lossy().into_owned();
    finish(child(&["send", url, &queue, "3000", "a", &sent])).await;
    let outs: Vec<String> = (0..3).map(|i| dir.join(format!("consume-{i}")).to_string_lossy().into_owned()).collect();
    let children: Vec<Child> = outs.iter().map(|out| child(&["consume", url, &queue, "30000", "2000", out])).collect();
    for c in children {
        finish(c).await;
    }
    let mut handled: HashMap<String, usize> = HashMap::new();
    let mut per_process = Vec::new();
    for out in &outs {
        let acked = events(Path::new(out), "acked ");
        per_process.push(acked.len());
        for id in acked {
            *handled.entry(id).or_default() += 1;
        }
    }
    println!("{case}: acks per process {per_process:?}");
    let twice: Vec<_> = handled.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "handled twice while the lease held: {twice:?}");
    assert_eq!(handled.len(), 3000, "every message handled");
    assert!(per_process.iter().filter(|n| **n > 0).count() >= 2, "the work was shared: {per_process:?}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The outbox relay killed with SIGKILL mid-batch, then run again: every committed
/// outbox row reaches the target at least once; duplicates are what one batch had sent
/// when the kill came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_relay_killed_mid_batch_loses_nothing() {
    use courier_core::{Broker, ConsumerOptions, Destination, Message, Source};
    const ROWS: usize = 5_000;
    const RELAY_BATCH: usize = 500;
    let (app, target) = (sqlite_url("outbox-app"), sqlite_url("outbox-target"));
    let queue = unique_name("relayed");
    let target_broker = courier_sql::SqlBroker::connect(&target).await.unwrap();
    target_broker.declare(&Source::queue(&queue).unwrap()).await.unwrap();
    // The application's database, with Courier's tables (a broker on it creates them).
    courier_sql::SqlBroker::connect(&app).await.unwrap();
    let pool = sqlx::SqlitePool::connect(&app.replace("sqlite://", "sqlite:")).await.unwrap();
    let to = Destination::queue(&queue).unwrap();
    for t in 0..ROWS / 100 {
        let mut tx = pool.begin().await.unwrap();
        for i in 0..100 {
            let n = t * 100 + i;
            courier_sql::outbox::add(&mut *tx, &to, Message::new(n.to_string()).with_id(format!("o{n}")))
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }

    // Killed in the window that matters: after the target confirmed a batch, before its
    // rows left the outbox. The test takes the application database's write lock, so the
    // relay stops at its next write: the delete after a send (the window), or the read of
    // its next batch (before sending: tried again). SQLite's busy timeout is 5 s, well
    // above how long the lock is held.
    let mut relay = child(&["relay", &app, &target]);
    let source = Source::queue(&queue).unwrap();
    let depth = async || target_broker.stats(&source).await.unwrap().depth as usize;
    let started = tokio::time::Instant::now();
    while depth().await < 1_000 {
        assert!(relay.try_wait().unwrap().is_none(), "the relay ended before it was killed");
        assert!(started.elapsed() < Duration::from_secs(120), "the relay made no progress");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut lock = pool.acquire().await.unwrap();
    let (at_kill, in_outbox) = loop {
        assert!(relay.try_wait().unwrap().is_none(), "the relay ended before it was killed");
        assert!(started.elapsed() < Duration::from_secs(120), "the relay was never caught between send and delete");
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *lock).await.unwrap();
        // Until the target stops growing: the relay waits on the lock now.
        let mut seen = depth().await;
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = depth().await;
            if now == seen {
                break;
            }
            seen = now;
        }
        let in_outbox: i64 =
            sqlx::query_scalar("SELECT count(*) FROM courier_outbox").fetch_one(&mut *lock).await.unwrap();
        if seen + in_outbox as usize > ROWS {
            relay.kill().await.unwrap();
            sqlx::query("ROLLBACK").execute(&mut *lock).await.unwrap();
            break (seen, in_outbox);
        }
        sqlx::query("ROLLBACK").execute(&mut *lock).await.unwrap();
        tokio::time::sleep(Duration::from_millis(u64::from(started.elapsed().subsec_nanos() % 40))).await;
    };
    drop(lock);
    let sent_not_deleted = at_kill + in_outbox as usize - ROWS;
    finish(child(&["relay", &app, &target])).await;

    let consumer = target_broker.consumer(&source, ConsumerOptions::default()).await.unwrap();
    let mut copies: HashMap<String, usize> = HashMap::new();
    loop {
        let batch = consumer.receive(1000, Duration::from_millis(300)).await.unwrap();
        if batch.is_empty() {
            break;
        }
        for d in batch {
            *copies.entry(d.id.to_string()).or_default() += 1;
            d.ack().await.unwrap();
        }
    }
    let missing: Vec<usize> = (0..ROWS).filter(|n| !copies.contains_key(&format!("o{n}"))).collect();
    assert!(
        missing.is_empty(),
        "{} committed outbox rows never reached the target: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let duplicates: usize = copies.values().map(|n| n - 1).sum();
    println!(
        "outbox relay killed between send and delete, {at_kill} messages at the target, {sent_not_deleted} of them still in the outbox: \
         {ROWS} rows relayed, {duplicates} sent twice (bound {RELAY_BATCH})"
    );
    assert_eq!(duplicates, sent_not_deleted, "what was sent and not yet deleted is sent again, and nothing else");
    assert!(duplicates <= RELAY_BATCH, "{duplicates} duplicates: more than one relay batch");
}

fn sqlite_url(case: &str) -> String {
    format!("sqlite://{}", sqlite_test_path(case).display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_survives_kill_9_during_sends_and_acks() {
    crash_twice_lose_nothing(&sqlite_url("sqlite-crash"), "sqlite-crash").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_survives_kill_9_during_sends_and_acks() {
    crash_twice_lose_nothing(&postgres_url().await, "postgres-crash").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_sharing_a_sqlite_file_handle_each_message_once() {
    competing_processes_handle_each_message_once(&sqlite_url("sqlite-share"), "sqlite-share").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_sharing_a_postgres_queue_handle_each_message_once() {
    competing_processes_handle_each_message_once(&postgres_url().await, "postgres-share").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_worker_killed_with_kill_9_loses_nothing() {
    a_killed_worker_loses_nothing(&sqlite_url("sqlite-worker-crash"), "sqlite-worker-crash").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_worker_killed_with_kill_9_loses_nothing() {
    a_killed_worker_loses_nothing(&postgres_url().await, "postgres-worker-crash").await;
}

/// A process that starts while others send must not fail their sends: connecting checks
/// the schema, and that check once took table locks in the opposite order to a send's
/// (PostgreSQL then aborted one of them as a deadlock). Sends run from 16 tasks while
/// new brokers connect to the same database, one after another; every send must succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_connecting_while_others_send_fails_no_send() {
    use courier_core::{Broker, Destination, Message};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let url = postgres_url().await;
    let broker = Arc::new(courier_sql::SqlBroker::connect(&url).await.expect("connect"));
    let to = Destination::queue(&unique_name("connect-while-sending")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..16)
        .map(|task| {
            let (broker, to, stop) = (broker.clone(), to.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut sent, mut failed) = (0usize, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    match broker.send(&to, Message::new(format!("{task}-{sent}"))).await {
                        Ok(_) => sent += 1,
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (sent, failed)
            })
        })
        .collect();
    for _ in 0..20 {
        let other = courier_sql::SqlBroker::connect(&url).await.expect("a second process connects");
        drop(other);
    }
    stop.store(true, Ordering::Relaxed);
    let (mut sent, mut failed) = (0, Vec::new());
    for s in senders {
        let (n, f) = s.await.unwrap();
        sent += n;
        failed.extend(f);
    }
    assert!(sent > 0, "nothing was sent");
    assert!(
        failed.is_empty(),
        "{} of {} sends failed while others connected, first: {}",
        failed.len(),
        sent + failed.len(),
        failed[0]
    );
}

/// Another session that locks Courier's tables in the opposite order (a migration, a
/// report run by hand) can deadlock with a send; PostgreSQL then aborts the send's
/// transaction, having written nothing of it. The send runs again and succeeds once the
/// other session is done, instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_aborted_as_a_deadlock_runs_again() {
    use courier_core::{Broker, Destination, Message};
    use courier_sql::sqlx::{self, Connection};

    let url = postgres_url().await;
    let broker = courier_sql::SqlBroker::connect(&url).await.expect("connect");
    let to = Destination::queue(&unique_name("deadlocked-send")).unwrap();
    broker.send(&to, Message::new("first")).await.expect("the queue exists");

    let mut other = sqlx::PgConnection::connect(&url).await.expect("a session of our own");
    // This session must not be the one PostgreSQL picks to break the deadlock: the send's
    // session, with the default 1 s, finds it first.
    sqlx::query("SET deadlock_timeout = '20s'").execute(&mut other).await.unwrap();
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query("LOCK TABLE courier_messages IN SHARE MODE").execute(&mut other).await.unwrap();
    let send = tokio::spawn(async move { broker.send(&to, Message::new("second")).await });
    // The send has registered its queue (a lock on courier_sources) and now waits for
    // courier_messages; taking courier_sources closes the cycle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sqlx::query("LOCK TABLE courier_sources IN SHARE MODE")
        .execute(&mut other)
        .await
        .expect("the send was aborted, not us");
    tokio::time::sleep(Duration::from_millis(200)).await;
    sqlx::query("COMMIT").execute(&mut other).await.unwrap();
    let sent = tokio::time::timeout(Duration::from_secs(30), send).await.expect("the send ended").unwrap();
    sent.expect("the send ran again after the deadlock and succeeded");
}
