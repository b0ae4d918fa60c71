//! A worker process for the Kafka crash test (`tests/tests/kafka_groups.rs`): it handles
//! a queue through Courier's worker and, before each ack, appends `<id> <payload>` to a
//! file, so the test can tell what was handled even after a SIGKILL.
//!
//! Usage: `kafka_worker URL QUEUE OUT_FILE`
#![forbid(unsafe_code)]

use std::io::Write;
use std::sync::{Arc, Mutex};

use courier::{App, Bytes, Context, RouteOptions, Source};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, queue, out] = &args[..] else {
        eprintln!("usage: kafka_worker URL QUEUE OUT_FILE");
        std::process::exit(2);
    };
    // RUST_LOG=courier_kafka=trace shows each record read and each rebalance on stderr.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    }
    let broker = courier::connect(url).await.unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    let file = std::fs::OpenOptions::new().create(true).append(true).open(out).expect("open the output file");
    let file = Arc::new(Mutex::new(file));
    let handler = move |ctx: Context, body: Bytes| {
        let file = file.clone();
        async move {
            // Some I/O, so several messages are in flight when the process dies.
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            let line = format!("{} {}\n", ctx.id, String::from_utf8_lossy(&body));
            // The kernel keeps the write when the process is killed.
            file.lock().unwrap().write_all(line.as_bytes()).expect("write the output file");
        }
    };
    let source = Source::queue(queue).expect("a valid queue name");
    App::new(broker)
        .route_with(source, handler, RouteOptions::default().concurrency(8).batch(32))
        .run()
        .await
        .expect("the worker runs");
}
