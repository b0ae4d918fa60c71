//! The idempotent consumer as a handler: a message delivered three times has one effect;
//! a failed attempt keeps nothing (neither its writes nor the record of its id), so the
//! retry does the work; a rejection dead-letters with nothing kept.

#![cfg(feature = "sqlite")]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use courier::sql::sqlx::{self, Sqlite, SqlitePool, Transaction};
use courier::{idempotent, App, DynBroker, Error, Incoming, LocalBroker, Message, RetryPolicy, RouteOptions, Source};

async fn database(case: &str) -> (std::path::PathBuf, SqlitePool) {
    let dir = std::env::temp_dir().join(format!("courier-idempotent-{case}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("app.db").display());
    // Connecting a relay creates Courier's tables (`courier_processed` among them).
    let broker: DynBroker = Arc::new(LocalBroker::new());
    drop(courier::sql::outbox::Relay::connect(&url, broker).await.unwrap());
    let pool = SqlitePool::connect(&url.replace("sqlite://", "sqlite:")).await.unwrap();
    sqlx::query("CREATE TABLE charges (message TEXT NOT NULL)").execute(&pool).await.unwrap();
    (dir, pool)
}

async fn charges(pool: &SqlitePool) -> Vec<String> {
    sqlx::query_scalar("SELECT message FROM charges ORDER BY rowid").fetch_all(pool).await.unwrap()
}

/// Runs `handler` on `queue` until the queue is drained (nothing waiting, delayed or in
/// flight) or 10 s pass.
async fn run<H: courier::Handler<Incoming>>(broker: DynBroker, queue: &Source, handler: H) -> courier::RunReport {
    let retry = RetryPolicy { max_attempts: 3, initial_backoff: Duration::from_millis(10), ..RetryPolicy::default() };
    let (watch, source) = (broker.clone(), queue.clone());
    App::new(broker)
        .route_with(queue.clone(), handler, RouteOptions::default().retry(retry))
        .run_until(async move {
            for _ in 0..200 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let stats = watch.stats(&source).await.unwrap();
                if stats.depth + stats.in_flight + stats.delayed == 0 {
                    break;
                }
            }
        })
        .await
        .unwrap()
}

async fn charge(
    incoming: Incoming,
    mut tx: Transaction<'static, Sqlite>,
) -> Result<Transaction<'static, Sqlite>, Error> {
    sqlx::query("INSERT INTO charges (message) VALUES ($1)")
        .bind(incoming.message.id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(|e| Error::transient("sqlite", format!("charge: {e}"), e))?;
    Ok(tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_delivered_three_times_has_one_effect() {
    let (dir, pool) = database("thrice").await;
    let broker: DynBroker = Arc::new(LocalBroker::new());
    let queue = Source::queue("orders").unwrap();
    for _ in 0..3 {
        broker.send(&queue.destination(), Message::new("order 7").with_id("order-7")).await.unwrap();
    }
    broker.send(&queue.destination(), Message::new("order 8").with_id("order-8")).await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let handler = idempotent(pool.clone(), "billing", move |incoming, tx| {
        counted.fetch_add(1, Ordering::SeqCst);
        charge(incoming, tx)
    });
    let report = run(broker, &queue, handler).await;
    assert_eq!(report.acked, 4, "every delivery is acked: {report:?}");
    assert_eq!(charges(&pool).await, ["order-7", "order-8"], "one effect per message");
    assert_eq!(calls.load(Ordering::SeqCst), 2, "the work ran once per message id");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_keeps_nothing_and_the_retry_does_the_work() {
    let (dir, pool) = database("retry").await;
    let broker: DynBroker = Arc::new(LocalBroker::new());
    let queue = Source::queue("orders").unwrap();
    broker.send(&queue.destination(), Message::new("order 9").with_id("order-9")).await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let handler = idempotent(pool.clone(), "billing", move |incoming, tx| {
        let call = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            // Writes, then fails: the write and the record of the id roll back together.
            let tx = charge(incoming, tx).await?;
            if call == 0 {
                drop(tx);
                return Err(Error::transient(
                    "test",
                    "the payment service timed out",
                    std::io::Error::other("timeout"),
                ));
            }
            Ok(tx)
        }
    });
    let report = run(broker, &queue, handler).await;
    assert_eq!((report.retried, report.acked), (1, 1), "{report:?}");
    assert_eq!(charges(&pool).await, ["order-9"], "the failed attempt's write is gone, the retry's kept");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_dead_letters_and_keeps_nothing() {
    let (dir, pool) = database("reject").await;
    let broker: DynBroker = Arc::new(LocalBroker::new());
    let queue = Source::queue("orders").unwrap();
    broker.send(&queue.destination(), Message::new("not json").with_id("bad")).await.unwrap();
    let handler = idempotent(pool.clone(), "billing", |incoming: Incoming, tx| async move {
        let tx = charge(incoming.clone(), tx).await?;
        let _: serde_json::Value = incoming.message.decode_json()?; // a decode error: dead-letter
        Ok(tx)
    });
    let report = run(broker, &queue, handler).await;
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    assert!(charges(&pool).await.is_empty(), "nothing of the rejected message is kept");
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM courier_processed").fetch_one(&pool).await.unwrap();
    assert_eq!(recorded, 0, "a rejected message is not recorded as processed");
    std::fs::remove_dir_all(&dir).ok();
}
