//! `courier outbox relay --once` forwards what a database's outbox holds to the configured
//! backend and says how many it relayed.

#![cfg(feature = "sqlite")]

use std::process::Command;

use courier::sql::outbox;
use courier::{Broker, Destination, Message, Source};

#[test]
fn outbox_relay_once_forwards_every_committed_message() {
    let dir = std::env::temp_dir().join(format!("courier-cli-outbox-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (app, target) = (dir.join("app.db"), dir.join("target.db"));
    let (app_url, target_url) = (format!("sqlite://{}", app.display()), format!("sqlite://{}", target.display()));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        // Courier's tables in the application's database, then 50 messages committed.
        courier::sql::SqlBroker::connect(&app_url).await.unwrap();
        let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", app.display())).await.unwrap();
        let mut tx = pool.begin().await.unwrap();
        for i in 0..50 {
            outbox::add(&mut *tx, &Destination::queue("relayed").unwrap(), Message::new(format!("m{i}")))
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    });
    let out = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["outbox", "relay", "--from", &app_url, "--once", "--backend", &target_url])
        .env_remove("COURIER_CONFIG")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("relayed 50 messages"), "{stdout}");
    runtime.block_on(async {
        let target = courier::sql::SqlBroker::connect(&target_url).await.unwrap();
        assert_eq!(target.stats(&Source::queue("relayed").unwrap()).await.unwrap().depth, 50);
    });
    std::fs::remove_dir_all(&dir).ok();
}
