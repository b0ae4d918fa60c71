//! The worker runtime relays a database's outbox while its routes run: a message added in
//! a committed transaction reaches the handler, one rolled back never does.

#![cfg(feature = "sqlite")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier::sql::outbox::{self, Relay};
use courier::{App, Bytes, Destination, DynBroker, LocalBroker, Message, Source};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_relays_committed_outbox_messages_to_its_routes() {
    let dir = std::env::temp_dir().join(format!("courier-worker-outbox-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("app.db").display());
    let broker: DynBroker = Arc::new(LocalBroker::new());
    let relay = Relay::connect(&url, broker.clone()).await.unwrap();
    let pool = sqlx::SqlitePool::connect(&url.replace("sqlite://", "sqlite:")).await.unwrap();
    let orders = Destination::queue("orders").unwrap();
    let mut tx = pool.begin().await.unwrap();
    outbox::add(&mut *tx, &orders, Message::new("committed")).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    outbox::add(&mut *tx, &orders, Message::new("rolled back")).await.unwrap();
    tx.rollback().await.unwrap();

    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler = {
        let seen = seen.clone();
        move |body: Bytes| {
            let seen = seen.clone();
            async move { seen.lock().unwrap().push(String::from_utf8_lossy(&body).into_owned()) }
        }
    };
    let report = App::new(broker)
        .outbox_relay(relay)
        .route(Source::queue("orders").unwrap(), handler)
        .run_until(async {
            // Until the handler saw the relayed message, or 10 s.
            for _ in 0..200 {
                if !seen.lock().unwrap().is_empty() {
                    tokio::time::sleep(Duration::from_millis(300)).await; // room for a wrong second one
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap();
    assert_eq!(*seen.lock().unwrap(), ["committed"]);
    assert_eq!(report.acked, 1);
    std::fs::remove_dir_all(&dir).ok();
}
