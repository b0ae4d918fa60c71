//! Files and disks a SQLite backend meets in the field: a file that is not a database,
//! a read-only place, a full disk, a database from a newer Courier. Each is a clear
//! error naming the file and what to do, and nothing already stored is harmed.
//!
//! The read-only and full-disk cases mount small tmpfs file systems, which needs root
//! (CI runs as root on its machine).

use std::path::{Path, PathBuf};
use std::time::Duration;

use courier_core::{Broker, ConsumerOptions, Destination, Message, Source};
use courier_sql::SqlBroker;

fn scratch(case: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("courier-sql-bad-{case}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

/// A tmpfs mounted at `dir` for the life of the value.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, options: &str) -> Mount {
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "mounting a tmpfs at {} failed: these cases need root", dir.display());
        Mount(dir.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_refused_and_left_alone() {
    let dir = scratch("notdb");
    let file = dir.join("notes.txt");
    let bytes = b"these are my notes, not a database\n".repeat(200);
    std::fs::write(&file, &bytes).unwrap();
    let err = SqlBroker::connect(&url(&file)).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&file.display().to_string()), "names the file: {text}");
    assert!(text.contains("not a SQLite database"), "says what is wrong: {text}");
    assert!(!err.is_retryable());
    assert_eq!(std::fs::read(&file).unwrap(), bytes, "the file is unchanged");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_read_only_place_is_a_clear_error() {
    let dir = scratch("readonly");
    let _mount = Mount::tmpfs(&dir, "ro,size=1m");
    let file = dir.join("queues.db");
    let err = SqlBroker::connect(&url(&file)).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&file.display().to_string()), "names the file: {text}");
    assert!(text.contains("may write there"), "says what to do: {text}");
}

#[tokio::test]
async fn a_missing_directory_is_a_clear_error() {
    let file = std::env::temp_dir().join(format!("courier-no-such-dir-{}", std::process::id())).join("q.db");
    let text = SqlBroker::connect(&url(&file)).await.unwrap_err().to_string();
    assert!(text.contains(&file.display().to_string()) && text.contains("directory exists"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_send_and_keeps_what_was_stored() {
    let dir = scratch("full");
    let mount = Mount::tmpfs(&dir, "size=2m");
    // Ballast, removed later to make room as an operator would.
    let ballast = dir.join("ballast");
    std::fs::write(&ballast, vec![0u8; 512 * 1024]).unwrap();
    let file = dir.join("queues.db");
    let broker = SqlBroker::connect(&url(&file)).await.unwrap();
    let orders = Destination::queue("orders").unwrap();
    let mut stored = 0;
    let err = loop {
        match broker.send(&orders, Message::new(vec![b'x'; 64 * 1024])).await {
            Ok(_) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < 1000, "a 2 MiB disk took {stored} messages of 64 KiB");
    };
    let text = err.to_string();
    assert!(text.contains("full") && text.contains("free some space"), "says what is wrong and what to do: {text}");
    assert!(err.is_retryable(), "a full disk passes: {err:?}");
    assert!(stored > 0, "some messages fitted");
    // With room again, everything stored before the disk filled is intact and can be
    // taken and acked.
    std::fs::remove_file(&ballast).unwrap();
    let consumer = broker.consumer(&Source::queue("orders").unwrap(), ConsumerOptions::default()).await.unwrap();
    let mut taken = 0;
    while taken < stored {
        let batch = consumer.receive(100, Duration::from_secs(2)).await.unwrap();
        assert!(!batch.is_empty(), "{taken} of {stored} stored messages came back");
        for d in batch {
            assert_eq!(d.payload.len(), 64 * 1024);
            d.ack().await.unwrap();
            taken += 1;
        }
    }
    println!("a 2 MiB tmpfs held {stored} messages of 64 KiB; the next send failed: {text}");
    broker.close().await.unwrap();
    drop(consumer);
    drop(broker);
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(mount);
    std::fs::remove_dir_all(&dir).ok();
}

/// A database whose schema version reads `version`: connecting to it is refused with
/// this error's text.
async fn refused_with_schema_version(case: &str, version: &str) -> (PathBuf, String) {
    let dir = scratch(case);
    let file = dir.join("queues.db");
    let broker = SqlBroker::connect(&url(&file)).await.unwrap();
    broker.send(&Destination::queue("orders").unwrap(), Message::new("kept")).await.unwrap();
    broker.close().await.unwrap();
    drop(broker);
    {
        use sqlx::{ConnectOptions, Connection};
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new().filename(&file).connect().await.unwrap();
        sqlx::query("UPDATE courier_meta SET value = $1 WHERE key = 'schema_version'")
            .bind(version)
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
    }
    let err = SqlBroker::connect(&url(&file)).await.unwrap_err();
    (dir, err.to_string())
}

#[tokio::test]
async fn a_database_from_a_newer_courier_is_refused() {
    let (dir, text) = refused_with_schema_version("newer", "99").await;
    assert!(text.contains(&dir.join("queues.db").display().to_string()), "names the file: {text}");
    assert!(text.contains("schema 99") && text.contains("upgrade Courier"), "says what to do: {text}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Connecting skips its checks when the schema version is the current one; anything
/// else it does not know (garbage written by hand) is still refused, never taken as current.
#[tokio::test]
async fn a_database_whose_schema_version_is_garbage_is_refused() {
    for (case, garbage) in [("garbage-text", "abc"), ("garbage-empty", ""), ("garbage-spaced", " 1")] {
        let (dir, text) = refused_with_schema_version(case, garbage).await;
        assert!(text.contains("(unreadable)") && text.contains("upgrade Courier"), "{garbage:?}: {text}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
