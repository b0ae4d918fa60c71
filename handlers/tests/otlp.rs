//! `courier::otel::init`: spans leave over OTLP/HTTP to the endpoint the standard
//! variables name, with the service name they give. A stand-in collector (an HTTP server
//! in this test) receives the export.

#![cfg(feature = "otel")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::HeaderMap;
use courier::{App, Message, Source};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_where_the_variables_say() {
    // The collector: records each POST to /v1/traces.
    let received: Arc<Mutex<Vec<(String, Bytes)>>> = Arc::default();
    let seen = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let seen = seen.clone();
            async move {
                let kind = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                seen.lock().unwrap().push((kind, body));
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    // Set before anything reads them; this test binary has this one test.
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}"));
    std::env::set_var("OTEL_SERVICE_NAME", "courier-otlp-test");
    let guard = courier::otel::init().expect("OTLP set up from the variables");

    let broker = courier::otel::traced(courier::connect("memory://").await.unwrap());
    let source = Source::queue("exported").unwrap();
    broker.declare(&source).await.unwrap();
    broker.send(&source.destination(), Message::new("traced")).await.unwrap();
    let report = App::new(broker)
        .route(source, |_: Message| async {})
        .run_until(tokio::time::sleep(Duration::from_millis(500)))
        .await
        .unwrap();
    assert_eq!(report.acked, 1);
    // Shutting the exporter down flushes it; its blocking client runs off the runtime.
    tokio::task::spawn_blocking(move || drop(guard)).await.unwrap();

    let received = received.lock().unwrap();
    assert!(!received.is_empty(), "the collector got no export");
    let all: Vec<u8> = received.iter().flat_map(|(_, body)| body.to_vec()).collect();
    assert!(
        received.iter().all(|(kind, _)| kind == "application/x-protobuf"),
        "OTLP/HTTP protobuf: {:?}",
        received.iter().map(|r| &r.0).collect::<Vec<_>>()
    );
    let has = |text: &str| all.windows(text.len()).any(|w| w == text.as_bytes());
    assert!(has("courier-otlp-test"), "the service name from OTEL_SERVICE_NAME");
    assert!(has("courier.send") && has("courier.handle"), "the send and handler spans");
}
