//! Rows a consumer claimed ahead (after a full batch) but never handed out are no
//! delivery: a consumer dropped without `close` gives them back at once, as first
//! attempts, instead of leaving them leased until their lease runs out.

use std::time::Duration;

use courier_core::{Broker, ConsumerOptions, Message, Source};
use courier_sql::SqlBroker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_consumer_gives_back_what_it_read_ahead_as_first_attempts() {
    let dir = std::env::temp_dir().join(format!("courier-sql-read-ahead-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let broker = SqlBroker::connect(&format!("sqlite://{}", dir.join("q.db").display())).await.unwrap();
    let source = Source::queue("ahead").unwrap();
    broker.declare(&source).await.unwrap();
    let messages = (0..30).map(|i| Message::new(format!("m{i}"))).collect();
    broker.send_batch(&source.destination(), messages).await.unwrap();

    // A 30 s lease: anything left leased would not come back within this test.
    let options = ConsumerOptions::default().lease(Duration::from_secs(30)).prefetch(10);
    let consumer = broker.consumer(&source, options.clone()).await.unwrap();
    let first = consumer.receive(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.len(), 10, "a full batch, so the next one is claimed ahead");
    for d in first {
        d.ack().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // the claim ahead has gone through
    drop(consumer); // not closed: a task that panicked, a receive loop cancelled

    let next = broker.consumer(&source, options).await.unwrap();
    let mut rest = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while rest.len() < 20 && tokio::time::Instant::now() < deadline {
        rest.extend(next.receive(20, Duration::from_millis(500)).await.unwrap());
    }
    assert_eq!(rest.len(), 20, "the rows read ahead came back at once, not after their lease");
    for d in &rest {
        assert_eq!(d.attempt(), 1, "{} was never handed out: no attempt", d.id);
        d.ack().await.unwrap();
    }
    next.close().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
