//! A producer or consumer process for the SQL crash tests (`tests/tests/sql_crash.rs`).
//! It appends one line per event to a file (`sent ID`, `got ID`, `acked ID`), written
//! after the call returned, so the test knows what each side was told even after the
//! process is killed with SIGKILL (the kernel keeps what was written).
//!
//! Usage:
//! - `sql_crash_child send URL QUEUE COUNT TAG OUT [SKIP_FILE]`: sends messages `m<i>-<TAG>`
//!   with payload `<i>` for i in 0..COUNT from 16 tasks at once, skipping the indices
//!   SKIP_FILE already reports as sent.
//! - `sql_crash_child consume URL QUEUE LEASE_MS IDLE_MS OUT`: receives in batches of
//!   100 and acks each delivery in turn, until nothing came for IDLE_MS.
//! - `sql_crash_child work URL QUEUE LEASE_MS IDLE_MS OUT`: a worker (`App`, one route,
//!   concurrency 4) whose handler records each delivery, until nothing came for IDLE_MS.
//! - `sql_crash_child relay FROM_URL TO_URL`: relays the outbox of FROM_URL's database to
//!   the SQL backend TO_URL until the outbox is empty.
#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier_core::{Broker, ConsumerOptions, Destination, Message, Source};
use courier_sql::SqlBroker;

type Out = Arc<Mutex<std::fs::File>>;

fn record(out: &Out, event: &str, id: &str) {
    let line = format!("{event} {id}\n");
    out.lock().unwrap().write_all(line.as_bytes()).expect("write the output file");
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage =
        "usage: sql_crash_child send URL QUEUE COUNT TAG OUT [SKIP_FILE] | consume URL QUEUE LEASE_MS IDLE_MS OUT | work URL QUEUE LEASE_MS IDLE_MS OUT | relay FROM_URL TO_URL";
    let open = |path: &str| -> Out {
        Arc::new(Mutex::new(
            std::fs::OpenOptions::new().create(true).append(true).open(path).expect("open the output file"),
        ))
    };
    match &args[1..] {
        [mode, url, queue, count, tag, out, skip @ ..] if mode == "send" => {
            let broker = SqlBroker::connect(url).await.unwrap_or_else(|e| panic!("connect: {e}"));
            let count: usize = count.parse().expect(usage);
            let skipped: HashSet<usize> = match skip.first() {
                Some(file) => std::fs::read_to_string(file)
                    .expect("read the skip file")
                    .lines()
                    .filter_map(|l| l.strip_prefix("sent m"))
                    .filter_map(|id| id.split('-').next()?.parse().ok())
                    .collect(),
                None => HashSet::new(),
            };
            let out = open(out);
            let to = Destination::queue(queue).expect("queue name");
            let tasks: Vec<_> = (0..16)
                .map(|task| {
                    let (broker, to, out, tag, skipped) =
                        (broker.clone(), to.clone(), out.clone(), tag.clone(), skipped.clone());
                    tokio::spawn(async move {
                        for i in (task..count).step_by(16).filter(|i| !skipped.contains(i)) {
                            let id = format!("m{i}-{tag}");
                            broker.send(&to, Message::new(i.to_string()).with_id(id.as_str())).await.expect("send");
                            record(&out, "sent", &id);
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.expect("sender task");
            }
        }
        [mode, url, queue, lease_ms, idle_ms, out] if mode == "consume" => {
            let broker = SqlBroker::connect(url).await.unwrap_or_else(|e| panic!("connect: {e}"));
            let out = open(out);
            let lease = Duration::from_millis(lease_ms.parse().expect(usage));
            let idle = Duration::from_millis(idle_ms.parse().expect(usage));
            let source = Source::queue(queue).expect("queue name");
            let consumer = broker
                .consumer(&source, ConsumerOptions::default().lease(lease).unlimited_attempts())
                .await
                .expect("consumer");
            let mut quiet_since = tokio::time::Instant::now();
            while quiet_since.elapsed() < idle {
                let batch = consumer.receive(100, Duration::from_millis(500)).await.expect("receive");
                if batch.is_empty() {
                    continue;
                }
                for d in &batch {
                    record(&out, "got", d.id.as_str());
                }
                // One at a time, each its own commit, so a kill lands between acks.
                for d in batch {
                    d.ack().await.expect("ack");
                    record(&out, "acked", d.id.as_str());
                }
                // Quiet counts from the last ack: acks slowed by other processes' locks
                // must not end the loop while a batch read ahead still waits here.
                quiet_since = tokio::time::Instant::now();
            }
            // Gives back what was read ahead now; dropped at exit, it would wait out its lease.
            consumer.close().await.expect("close");
        }
        [mode, url, queue, lease_ms, idle_ms, out] if mode == "work" => {
            let broker: courier_core::DynBroker =
                Arc::new(SqlBroker::connect(url).await.unwrap_or_else(|e| panic!("connect: {e}")));
            let out = open(out);
            let lease = Duration::from_millis(lease_ms.parse().expect(usage));
            let idle = Duration::from_millis(idle_ms.parse().expect(usage));
            let last = Arc::new(Mutex::new(tokio::time::Instant::now()));
            let handler = {
                let (out, last) = (out.clone(), last.clone());
                move |message: Message| {
                    let (out, last) = (out.clone(), last.clone());
                    async move {
                        record(&out, "got", message.id.as_str());
                        *last.lock().unwrap() = tokio::time::Instant::now();
                    }
                }
            };
            let options = courier::RouteOptions::default().concurrency(4).lease(lease);
            courier::App::new(broker)
                .route_with(Source::queue(queue).expect("queue name"), handler, options)
                .run_until(async move {
                    while last.lock().unwrap().elapsed() < idle {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                })
                .await
                .expect("the worker ran to the end");
        }
        [mode, from, to] if mode == "relay" => {
            let target = SqlBroker::connect(to).await.unwrap_or_else(|e| panic!("connect: {e}"));
            let relay = courier_sql::outbox::Relay::connect(from, Arc::new(target)).await.expect("relay");
            relay.drain().await.expect("relay the outbox");
        }
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}
