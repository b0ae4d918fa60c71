//! `courier top` in a real terminal: started in a tmux session beside a worker on a
//! SQLite file, its pane captured twice. The figures appear, the measured model among
//! them, and they change as messages arrive.
//!
//! Needs tmux (`scripts/test` installs it where missing); without it the test fails
//! rather than passing unrun.

use std::process::Command;
use std::time::Duration;

use courier::{DynBroker, Message, Source};

mod common;
use common::ObservedWorker;

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux").args(args).output().expect("tmux is installed (scripts/test installs it)");
    assert!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The pane's row for `source`, split into its columns.
fn row(pane: &str, source: &str) -> Vec<String> {
    let line =
        pane.lines().find(|l| l.starts_with(source)).unwrap_or_else(|| panic!("no row for {source} in:\n{pane}"));
    line.split_whitespace().map(str::to_owned).collect()
}

#[test]
fn top_shows_live_figures_in_a_terminal() {
    let dir = std::env::temp_dir().join(format!("courier-top-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("q.db").display());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let source = Source::queue("watched").unwrap();
    let broker: DynBroker = runtime.block_on(courier::connect(&url)).unwrap();
    // A worker (one slot, ~5 ms a message) fed ~50 messages a second, metrics on.
    let worker = ObservedWorker::start(
        &runtime,
        broker.clone(),
        source.clone(),
        Duration::from_millis(20),
        Duration::from_millis(5),
    );
    let addr = worker.addr;
    std::thread::sleep(Duration::from_millis(200)); // the queue is declared

    let session = format!("courier-top-{}", std::process::id());
    let command = format!(
        "{} --backend {url} top queue:watched --metrics http://{addr}/metrics --interval 0.5",
        env!("CARGO_BIN_EXE_courier")
    );
    tmux(&["new-session", "-d", "-s", &session, "-x", "160", "-y", "20", &command]);
    std::thread::sleep(Duration::from_millis(2_500));
    let first = tmux(&["capture-pane", "-p", "-t", &session]);
    // A burst the one slot cannot keep up with: the depth must show it.
    runtime.block_on(async {
        let burst = (0..300).map(|_| Message::new("burst")).collect();
        broker.send_batch(&source.destination(), burst).await.unwrap();
    });
    std::thread::sleep(Duration::from_millis(1_200));
    let second = tmux(&["capture-pane", "-p", "-t", &session]);
    let _ = Command::new("tmux").args(["kill-session", "-t", &session]).status();
    drop(worker);
    std::fs::remove_dir_all(&dir).ok();

    assert!(
        first.contains("courier top:") && first.contains("M/M/c Wq") && first.contains("Lq"),
        "the header:\n{first}"
    );
    let (a, b) = (row(&first, "queue:watched"), row(&second, "queue:watched"));
    // source, depth, in flight, dead, λ/s, t ms, c, ρ, Wq ms, Lq, M/M/c Wq, M/M/1 Wq
    assert_eq!(a.len(), 12, "{first}");
    let lambda: f64 = a[4].parse().unwrap_or_else(|_| panic!("λ measured: {first}"));
    assert!(lambda > 5.0, "messages are arriving: {first}");
    assert_eq!(a[6], "1", "one slot: {first}");
    assert!(a[7].parse::<f64>().is_ok() && a[8].parse::<f64>().is_ok(), "ρ and Wq measured: {first}");
    assert!(a[9].parse::<f64>().is_ok(), "Lq measured: {first}");
    assert!(a[10].parse::<f64>().is_ok() && a[11].parse::<f64>().is_ok(), "M/M/c and M/M/1 predicted: {first}");
    assert!(first.contains("M/M/1 Wq"), "{first}");
    let (depth_before, depth_after): (u64, u64) = (a[1].parse().unwrap(), b[1].parse().unwrap());
    assert!(depth_after > depth_before + 50, "the burst shows in the depth: {a:?} then {b:?}");
    assert_ne!(first, second, "the view refreshes");
}
