//! `courier stats --model`: reads a running worker's metrics twice and shows the route's
//! measured λ, μ, c, ρ, Wq and Lq beside M/M/1 and M/M/c.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use courier::{DynBroker, LocalBroker, Source};

mod common;
use common::ObservedWorker;

/// The number after `name = ` in `text`.
fn figure(text: &str, name: &str) -> f64 {
    let at = text.find(&format!("{name} = ")).unwrap_or_else(|| panic!("no {name} in:\n{text}"));
    let rest = &text[at + name.len() + 3..];
    let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
    rest[..end].parse().unwrap_or_else(|_| panic!("{name} is not a number in:\n{text}"))
}

#[test]
fn the_model_of_a_running_route_is_measured_from_its_metrics() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let broker: DynBroker = Arc::new(LocalBroker::new());
    // A worker with one slot taking about 10 ms a message, fed about 40 messages a second.
    let worker = ObservedWorker::start(
        &runtime,
        broker,
        Source::queue("modelled").unwrap(),
        Duration::from_millis(25),
        Duration::from_millis(10),
    );
    let addr = worker.addr;
    std::thread::sleep(Duration::from_millis(500)); // the worker is up and has handled some
    let out = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["stats", "--model", "--metrics", &format!("http://{addr}/metrics"), "--window", "2", "queue:modelled"])
        .output()
        .unwrap();
    drop(worker);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    // Loose bounds: the figures come from live traffic on a shared machine; what is
    // checked is that each is measured, of the right size, and used in the model.
    let (lambda, t, rho) = (figure(&text, "λ"), figure(&text, "t"), figure(&text, "ρ"));
    assert!((10.0..=45.0).contains(&lambda), "about 40 msg/s offered: {text}");
    assert!((9.0..=100.0).contains(&t), "handler time about 10 ms: {text}");
    assert!(text.contains("c = 1"), "{text}");
    assert!((rho - lambda * t / 1000.0).abs() < 0.01, "ρ = λ·t / c: {text}");
    assert!(text.contains("Wq = ") && text.contains("Lq = λ·Wq"), "{text}");
    assert!(text.contains("M/M/c"), "the prediction beside it: {text}");
}

#[test]
fn a_metrics_url_that_is_not_a_worker_is_a_clear_error() {
    for (url, says) in [
        ("https://127.0.0.1:1/metrics", "only http://"),
        ("http://127.0.0.1:1/metrics", "cannot read"),
        ("ftp://x", "only http://"),
        ("http:///metrics", "no host:port"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_courier"))
            .args(["stats", "--model", "--metrics", url, "--window", "0.1", "queue:x"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{url} accepted");
        assert!(err.contains(says), "{url}: {err}");
    }
}
