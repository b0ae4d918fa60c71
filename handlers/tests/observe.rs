//! `App::observe`: the Prometheus text format scraped and parsed while a worker runs;
//! readiness false while a fetch loop cannot reach its broker and back when it can, and
//! false while draining; liveness throughout.

#![cfg(feature = "observe")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use courier::{
    App, Broker, Capabilities, Consumer, ConsumerOptions, Delivery, Destination, DynBroker, Error, LocalBroker,
    Message, MessageId, Result, Source,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The in-process broker, whose receives fail while `down` is set: a broker outage as
/// the worker sees it.
#[derive(Debug)]
struct Outage {
    inner: LocalBroker,
    down: Arc<AtomicBool>,
}

struct OutageConsumer {
    inner: Box<dyn Consumer>,
    down: Arc<AtomicBool>,
}

#[async_trait]
impl Broker for Outage {
    fn capabilities(&self) -> &Capabilities {
        self.inner.capabilities()
    }
    async fn send(&self, destination: &Destination, message: Message) -> Result<MessageId> {
        self.inner.send(destination, message).await
    }
    async fn consumer(&self, source: &Source, options: ConsumerOptions) -> Result<Box<dyn Consumer>> {
        let inner = self.inner.consumer(source, options).await?;
        Ok(Box::new(OutageConsumer { inner, down: self.down.clone() }))
    }
    async fn declare(&self, source: &Source) -> Result<()> {
        self.inner.declare(source).await
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

#[async_trait]
impl Consumer for OutageConsumer {
    fn source(&self) -> &Source {
        self.inner.source()
    }
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        if self.down.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Err(Error::transient("test", "connection refused", std::io::Error::other("refused")));
        }
        self.inner.receive(max, wait).await
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

/// GET `path` on `addr`: the status code and the body. The endpoint may not listen yet
/// (the worker binds it as it starts): connecting is tried for up to 10 s.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut tries = 0;
    let mut stream = loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(stream) => break stream,
            Err(_) if tries < 200 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("nothing listens on {addr}: {e}"),
        }
    };
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// Polls `path` until its status is `want` (or 10 s pass).
async fn until_status(addr: std::net::SocketAddr, path: &str, want: u16) -> String {
    for _ in 0..200 {
        let (status, body) = get(addr, path).await;
        if status == want {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{path} never answered {want}: last {:?}", get(addr, path).await);
}

/// The value of the sample `name{labels}` in Prometheus text, every other line parsed.
fn sample(text: &str, name: &str, source: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample line: {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number in {line:?}"));
        let metric = series.split('{').next().unwrap();
        assert!(
            metric.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "a bad metric name: {line:?}"
        );
        if metric == name && series.contains(&format!("source=\"{source}\"")) && !series.contains("le=") {
            found = Some(value);
        }
    }
    found
}

fn free_address() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_readiness_and_liveness_follow_the_worker() {
    let down = Arc::new(AtomicBool::new(false));
    let broker: DynBroker = Arc::new(Outage { inner: LocalBroker::new(), down: down.clone() });
    let source = Source::queue("observed").unwrap();
    broker.declare(&source).await.unwrap();
    for i in 0..20 {
        broker.send(&source.destination(), Message::new(format!("m{i}"))).await.unwrap();
    }
    let addr = free_address();
    let label = source.to_string();
    let release = Arc::new(tokio::sync::Notify::new());
    let (probe_down, probe_release) = (down.clone(), release.clone());
    let handler = {
        let release = release.clone();
        move |message: Message| {
            let release = release.clone();
            async move {
                if message.payload.as_ref() == b"slow" {
                    release.notified().await; // held until the test has seen the worker drain
                }
            }
        }
    };
    let probe = tokio::spawn(async move {
        until_status(addr, "/readyz", 200).await;
        assert_eq!(get(addr, "/livez").await.0, 200);
        // Scraped and parsed: every line a comment or a sample, the route's counts there.
        let mut text = String::new();
        for _ in 0..200 {
            text = get(addr, "/metrics").await.1;
            if sample(&text, "courier_messages_succeeded_total", &label) == Some(20.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(sample(&text, "courier_messages_received_total", &label), Some(20.0), "{text}");
        assert_eq!(sample(&text, "courier_messages_succeeded_total", &label), Some(20.0), "{text}");
        assert_eq!(sample(&text, "courier_fetch_loops_alive", &label), Some(2.0), "{text}");
        assert_eq!(sample(&text, "courier_message_queue_wait_seconds_count", &label), Some(20.0), "{text}");
        assert_eq!(sample(&text, "courier_message_processing_seconds_count", &label), Some(20.0), "{text}");
        assert!(text.contains("# TYPE courier_message_queue_wait_seconds histogram"), "{text}");
        assert!(text.contains("courier_message_queue_wait_seconds_bucket{"), "{text}");
        // The queueing model, published every model window (100 ms here).
        let mut model = String::new();
        for _ in 0..100 {
            model = get(addr, "/metrics").await.1;
            if sample(&model, "courier_route_utilisation", &label).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for gauge in ["courier_route_arrival_rate", "courier_route_service_seconds", "courier_route_utilisation"] {
            let value = sample(&model, gauge, &label).unwrap_or_else(|| panic!("no {gauge}: {model}"));
            assert!(value.is_finite() && value >= 0.0, "{gauge} = {value}");
        }
        for gauge in ["courier_route_predicted_queue_wait_seconds", "courier_route_predicted_queue_length"] {
            assert!(sample(&model, gauge, &label).is_some(), "no {gauge}: {model}");
        }

        // The broker unreachable: not ready, saying why; reachable again: ready.
        probe_down.store(true, Ordering::SeqCst);
        let why = until_status(addr, "/readyz", 503).await;
        assert!(why.contains("cannot receive from the broker"), "{why}");
        assert_eq!(get(addr, "/livez").await.0, 200, "alive while the broker is away");
        probe_down.store(false, Ordering::SeqCst);
        until_status(addr, "/readyz", 200).await;
    });
    // Draining: once the slow message is in a handler and the stop has come, readiness
    // says so; then the held handler is let go.
    let slow_sent = Arc::new(tokio::sync::Notify::new());
    let checker = {
        let slow_sent = slow_sent.clone();
        tokio::spawn(async move {
            slow_sent.notified().await;
            let why = until_status(addr, "/readyz", 503).await;
            assert!(why.contains("draining"), "{why}");
            assert_eq!(get(addr, "/livez").await.0, 200, "alive while draining");
            probe_release.notify_one();
        })
    };
    let (sender, to) = (broker.clone(), source.destination());
    let report = App::new(broker.clone())
        .observe(addr)
        .model_window(Duration::from_millis(100))
        .shutdown_grace(Duration::from_secs(20))
        .route_with(source.clone(), handler, courier::RouteOptions::default().concurrency(2))
        .run_until(async move {
            probe.await.expect("the probes passed");
            sender.send(&to, Message::new("slow")).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await; // taken by a handler
            slow_sent.notify_one();
        })
        .await
        .expect("the worker ran to the end");
    checker.await.expect("readiness said draining");
    assert_eq!(report.acked, 21, "{report:?}");
    assert_eq!(report.loops_ended_early, 0);
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "the endpoint stops with the worker");
}
