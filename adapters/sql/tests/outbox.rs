//! The transactional outbox and the idempotent consumer, on SQLite and on PostgreSQL,
//! relaying to the in-process backend. (A relay killed mid-batch: `tests/tests/sql_crash.rs`.)

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use courier_core::{ConsumerOptions, Destination, DynBroker, Message, Source};
use courier_local::LocalBroker;
use courier_sql::outbox::{self, Processed, Relay};

fn sqlite_url(case: &str) -> String {
    let dir = std::env::temp_dir().join(format!("courier-outbox-{case}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    format!("sqlite://{}", dir.join("app.db").display())
}

/// A schema of this test process's own: one outbox has one relay, and tests running at
/// once in other processes must not relay each other's rows.
async fn postgres_url(case: &str) -> String {
    let base = std::env::var("COURIER_TEST_POSTGRES")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!("courier_outbox_{case}_{}", std::process::id());
    let pool = sqlx::PgPool::connect(&base).await.expect("PostgreSQL (scripts/brokers up starts it)");
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}")).execute(&pool).await.unwrap();
    let separator = if base.contains('?') { '&' } else { '?' };
    format!("{base}{separator}options=-c%20search_path%3D{schema}")
}

async fn sqlite_url_async(case: &str) -> String {
    sqlite_url(case)
}

fn unique(case: &str) -> String {
    courier_core::conformance::unique_name(case)
}

async fn drain_target(target: &DynBroker, queue: &str, within: Duration) -> Vec<Message> {
    let consumer = target.consumer(&Source::queue(queue).unwrap(), ConsumerOptions::default()).await.unwrap();
    let mut got = Vec::new();
    loop {
        let batch = consumer.receive(500, within).await.unwrap();
        if batch.is_empty() {
            return got;
        }
        for d in batch {
            d.ack().await.unwrap();
            got.push(d.into_message());
        }
    }
}

/// Removes what a case made: its SQLite directory, or its PostgreSQL schema.
async fn clean_up(url: &str) {
    if let Some(path) = url.strip_prefix("sqlite://") {
        if let Some(dir) = std::path::Path::new(path).parent() {
            std::fs::remove_dir_all(dir).ok();
        }
    } else if let Some((base, schema)) = url.split_once("?options=-c%20search_path%3D") {
        if let Ok(pool) = sqlx::PgPool::connect(base).await {
            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).execute(&pool).await;
        }
    }
}

macro_rules! outbox_cases {
    ($module:ident, $pool:ty, $conn:ty, $url:expr) => {
        mod $module {
            use super::*;

            async fn setup(case: &str) -> (String, $pool, DynBroker, Relay, String) {
                let url = $url(case).await;
                let target: DynBroker = Arc::new(LocalBroker::new());
                // The relay creates Courier's tables in the application's database.
                let relay = Relay::connect(&url, target.clone()).await.unwrap();
                let pool = <$pool>::connect(&url.replace("sqlite://", "sqlite:")).await.unwrap();
                sqlx::query("CREATE TABLE IF NOT EXISTS app_orders (id TEXT PRIMARY KEY, total BIGINT NOT NULL)")
                    .execute(&pool)
                    .await
                    .unwrap();
                sqlx::query(
                    "CREATE TABLE IF NOT EXISTS app_balance (account TEXT PRIMARY KEY, charged BIGINT NOT NULL)",
                )
                .execute(&pool)
                .await
                .unwrap();
                (url, pool, target, relay, unique(case))
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_rolled_back_transaction_sends_nothing_and_a_committed_one_is_relayed_once_in_order() {
                let (url, pool, target, relay, queue) = setup("order").await;
                relay.drain().await.unwrap(); // whatever earlier runs left
                let to = Destination::queue(&queue).unwrap();

                let mut tx = pool.begin().await.unwrap();
                sqlx::query("INSERT INTO app_orders (id, total) VALUES ($1, 5)")
                    .bind(format!("{queue}-rolled"))
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                outbox::add(&mut *tx, &to, Message::new("rolled back").with_id("rolled")).await.unwrap();
                tx.rollback().await.unwrap();

                for t in 0..10 {
                    let mut tx = pool.begin().await.unwrap();
                    for i in 0..100 {
                        let n = t * 100 + i;
                        let key = format!("customer-{}", n % 7);
                        outbox::add(
                            &mut *tx,
                            &to,
                            Message::new(n.to_string()).with_id(format!("m{n}")).with_ordering_key(key),
                        )
                        .await
                        .unwrap();
                    }
                    tx.commit().await.unwrap();
                }
                let report = relay.drain().await.unwrap();
                assert_eq!(report.relayed, 1000, "{report:?}");
                assert_eq!(relay.drain().await.unwrap().relayed, 0, "nothing left to relay");

                let got = drain_target(&target, &queue, Duration::from_millis(200)).await;
                drop((pool, relay));
                clean_up(&url).await;
                assert_eq!(got.len(), 1000, "each committed message exactly once, the rolled back one never");
                assert!(got.iter().all(|m| m.id.as_str() != "rolled"));
                let mut last: HashMap<String, i64> = HashMap::new();
                for m in &got {
                    let n: i64 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
                    let key = m.ordering_key.clone().expect("the key is kept");
                    if let Some(prev) = last.insert(key.clone(), n) {
                        assert!(prev < n, "key {key}: {n} after {prev}");
                    }
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_message_delivered_three_times_has_one_effect() {
                let (url, pool, target, relay, queue) = setup("once").await;
                let account = queue.clone();
                sqlx::query("INSERT INTO app_balance (account, charged) VALUES ($1, 0)")
                    .bind(&account)
                    .execute(&pool)
                    .await
                    .unwrap();
                let to = Destination::queue(&queue).unwrap();
                target.send(&to, Message::new("charge 10").with_id(format!("{queue}-charge"))).await.unwrap();

                let consumer = target
                    .consumer(&Source::queue(&queue).unwrap(), ConsumerOptions::default().max_attempts(5))
                    .await
                    .unwrap();
                let mut outcomes = Vec::new();
                for delivery in 1..=3 {
                    let d = consumer.receive_one(Duration::from_secs(2)).await.unwrap().expect("the message");
                    assert_eq!(d.attempt(), delivery);
                    let account = account.clone();
                    let done = outbox::once(&pool, "billing", &d.id, async move |tx: &mut $conn| {
                        sqlx::query("UPDATE app_balance SET charged = charged + 10 WHERE account = $1")
                            .bind(&account)
                            .execute(&mut *tx)
                            .await
                            .map_err(|e| courier_core::Error::retryable(e.to_string()))?;
                        Ok(())
                    })
                    .await
                    .unwrap();
                    outcomes.push(done);
                    // As if the ack were lost: the message comes again.
                    if delivery < 3 {
                        d.retry().await.unwrap()
                    } else {
                        d.ack().await.unwrap()
                    }
                }
                assert_eq!(outcomes, [Processed::First, Processed::AlreadyDone, Processed::AlreadyDone]);
                let charged: i64 = sqlx::query_scalar("SELECT charged FROM app_balance WHERE account = $1")
                    .bind(&account)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                assert_eq!(charged, 10, "one effect for three deliveries");

                // Work that fails keeps nothing, not even the record: the retry runs it.
                let id = courier_core::MessageId::from(format!("{queue}-failing"));
                let failed = outbox::once(&pool, "billing", &id, async |_tx: &mut $conn| {
                    Err(courier_core::Error::retryable("card issuer down"))
                })
                .await;
                assert!(failed.is_err());
                let again = outbox::once(&pool, "billing", &id, async |_tx: &mut $conn| Ok(())).await.unwrap();
                assert_eq!(again, Processed::First);
                drop((pool, relay));
                clean_up(&url).await;
            }
        }
    };
}

outbox_cases!(sqlite, sqlx::SqlitePool, sqlx::SqliteConnection, sqlite_url_async);
outbox_cases!(postgres, sqlx::PgPool, sqlx::PgConnection, postgres_url);

/// Rows an application (or a hand-written migration) wrote badly cost only themselves: a
/// destination that is no destination is dropped and counted, headers that are not JSON
/// arrive empty, and the rows around them are relayed in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_outbox_row_costs_only_itself() {
    let url = sqlite_url("garbage");
    let target: DynBroker = Arc::new(LocalBroker::new());
    let relay = Relay::connect(&url, target.clone()).await.unwrap();
    let pool = sqlx::SqlitePool::connect(&url.replace("sqlite://", "sqlite:")).await.unwrap();
    let queue = unique("garbage");
    let to = Destination::queue(&queue).unwrap();
    let mut tx = pool.begin().await.unwrap();
    outbox::add(&mut *tx, &to, Message::new("before").with_id("before")).await.unwrap();
    let insert = "INSERT INTO courier_outbox (destination, id, payload, headers, created_us, delay_ms) VALUES ($1, $2, $3, $4, 0, 0)";
    for (destination, id, headers) in [
        ("nonsense", "no-destination", ""),
        ("queue:has space", "bad-name", ""),
        (to.to_string().as_str(), "bad-headers", "{not json"),
    ] {
        sqlx::query(insert)
            .bind(destination)
            .bind(id)
            .bind(&b"\xff\x00"[..])
            .bind(headers)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    outbox::add(&mut *tx, &to, Message::new("after").with_id("after")).await.unwrap();
    tx.commit().await.unwrap();

    let report = relay.drain().await.unwrap();
    assert_eq!((report.relayed, report.dead_lettered), (3, 2), "{report:?}");
    let got = drain_target(&target, &queue, Duration::from_millis(200)).await;
    let ids: Vec<&str> = got.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["before", "bad-headers", "after"]);
    assert!(got[1].headers.is_empty(), "unreadable headers arrive empty: {:?}", got[1].headers);
    drop((pool, relay));
    clean_up(&url).await;
}
