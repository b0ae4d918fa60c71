//! Fault test: a worker's `/readyz` while its real broker goes away and comes back.
//! RabbitMQ's app is stopped (`rabbitmqctl stop_app`): readiness turns 503, naming the
//! fetch loops that cannot receive, and liveness stays 200; the app is started again
//! (`start_app`): readiness returns to 200 by itself.
//!
//! It stops the broker for every other test, so it is a `faults_*` binary, run alone
//! after the rest (`COURIER_TEST_AMQP_STOP`/`_START` as in `faults_amqp.rs`).

use std::time::Duration;

use courier::{App, Message, Source};
use courier_contract_tests::{amqp_url, endpoint, shell};
use courier_core::conformance::unique_name;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET `path`: the status and the body (a connection refused is status 0).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else { return (0, String::new()) };
    stream.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// Polls `/readyz` until it answers `want`, for at most `within`: its body, or what it
/// answered last.
async fn ready_becomes(addr: std::net::SocketAddr, want: u16, within: Duration) -> Result<String, String> {
    let started = tokio::time::Instant::now();
    loop {
        let (status, body) = get(addr, "/readyz").await;
        if status == want {
            return Ok(body);
        }
        if started.elapsed() > within {
            return Err(format!("/readyz did not answer {want} within {within:?}: {status} {body}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_broker_going_away_and_coming_back() {
    let broker = courier::connect(&amqp_url().await).await.expect("RabbitMQ is up (scripts/brokers up)");
    let source = Source::queue(&unique_name("fault-ready")).unwrap();
    broker.declare(&source).await.unwrap();
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let probe = tokio::spawn(async move {
        ready_becomes(addr, 200, Duration::from_secs(30)).await.expect("ready before the fault");
        shell(&endpoint("COURIER_TEST_AMQP_STOP", "rabbitmqctl -q stop_app")).await;
        // Whatever happens, the broker is started again before anything is asserted.
        let away = ready_becomes(addr, 503, Duration::from_secs(60)).await;
        let alive = get(addr, "/livez").await.0;
        shell(&endpoint("COURIER_TEST_AMQP_START", "rabbitmqctl -q start_app")).await;
        let back = ready_becomes(addr, 200, Duration::from_secs(120)).await;
        let why = away.expect("not ready while the broker is away");
        assert_eq!(alive, 200, "alive while the broker is away");
        back.expect("ready again once the broker is back");
        why
    });
    let report = App::new(broker)
        .observe(addr)
        .route(source, |_: Message| async {})
        .run_until(async {
            let why = probe.await.expect("the probe");
            assert!(why.contains("cannot receive from the broker"), "the reason: {why}");
        })
        .await
        .expect("the worker ran to the end, never restarted");
    assert_eq!(report.loops_ended_early, 0);
}
