//! One trace from send to handler on every backend: a message sent through a traced
//! broker inside a span reaches the worker's handler, whose `courier.handle` span is the
//! child of the `courier.send` span, itself the child of the producer's span; an
//! in-memory OpenTelemetry exporter sees all three in one trace. The same through the
//! Lambda triggers (SQS, Kafka and RabbitMQ event forms, built by the local emulator),
//! and through HTTP push with the CloudEvents tracing extension.

use std::sync::Arc;
use std::time::Duration;

use courier::{App, DynBroker, Message, Source};
use courier_contract_tests::{amqp_url, kafka_url, postgres_url, sqlite_test_path, sqs_url};
use courier_core::conformance::unique_name;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

async fn one_trace_from_send_to_handler(backend: &str, broker: DynBroker, spans: &InMemorySpanExporter) {
    let broker = courier::otel::traced(broker);
    let source = Source::queue(&unique_name("otel")).unwrap();
    broker.declare(&source).await.unwrap();
    let producer = tracing::info_span!("produce", backend);
    broker.send(&source.destination(), Message::new("traced")).instrument(producer.clone()).await.unwrap();
    let produced = courier::otel::traceparent_of(&producer).expect("the producer's span has a context");
    drop(producer);

    let handled = Arc::new(tokio::sync::Notify::new());
    let done = handled.clone();
    let handler = move |_: Message| {
        let done = done.clone();
        async move { done.notify_one() }
    };
    let report = App::new(broker)
        .route(source, handler)
        .run_until(async move {
            let _ = tokio::time::timeout(Duration::from_secs(30), handled.notified()).await;
            tokio::time::sleep(Duration::from_millis(200)).await; // settled, its span closed
        })
        .await
        .unwrap();
    assert_eq!(report.acked, 1, "{backend}: {report:?}");

    let trace_id = opentelemetry::trace::TraceId::from_bytes(produced.trace_id.to_be_bytes());
    let finished = spans.get_finished_spans().unwrap();
    let in_trace: Vec<_> = finished.iter().filter(|s| s.span_context.trace_id() == trace_id).collect();
    let named = |name: &str| {
        in_trace.iter().find(|s| s.name == name).unwrap_or_else(|| {
            panic!(
                "{backend}: no {name} span in the trace; it has {:?}",
                in_trace.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        })
    };
    let (produce, send, handle) = (named("produce"), named("courier.send"), named("courier.handle"));
    assert_eq!(send.parent_span_id, produce.span_context.span_id(), "{backend}: send is the producer's child");
    assert_eq!(handle.parent_span_id, send.span_context.span_id(), "{backend}: the handler's span is the send's child");
    eprintln!("{backend}: one trace {trace_id}: produce -> courier.send -> courier.handle");
    spans.reset();
}

/// The same through the FaaS triggers: the emulator builds each platform's event from
/// the delivery, and the trigger's `courier.handle` span is the send's child.
async fn one_trace_through_a_trigger(kind: courier::trigger::EventKind, spans: &InMemorySpanExporter) {
    use courier::trigger::{emulator::Emulator, Trigger};
    let broker = courier::otel::traced(courier::connect("memory://").await.unwrap());
    let source = Source::queue(&unique_name("otel-faas")).unwrap();
    broker.declare(&source).await.unwrap();
    let producer = tracing::info_span!("produce");
    broker.send(&source.destination(), Message::new("traced")).instrument(producer.clone()).await.unwrap();
    drop(producer);
    let trigger = Trigger::new(|_: Message| async {});
    let report = Emulator::new(broker, source, trigger, kind).run_until_idle(Duration::from_millis(300)).await.unwrap();
    assert_eq!(report.records_ok, 1, "{kind:?}: {report}");
    let finished = spans.get_finished_spans().unwrap();
    let send = finished.iter().find(|s| s.name == "courier.send").expect("a send span");
    let handle = finished
        .iter()
        .find(|s| s.name == "courier.handle" && s.span_context.trace_id() == send.span_context.trace_id())
        .unwrap_or_else(|| panic!("{kind:?}: no handler span in the send's trace"));
    assert_eq!(handle.parent_span_id, send.span_context.span_id(), "{kind:?}: the trigger's span is the send's child");
    eprintln!("{kind:?} trigger: one trace {}: courier.send -> courier.handle", send.span_context.trace_id());
    spans.reset();
}

/// HTTP push: a CloudEvent carrying the distributed-tracing extension (binary mode's
/// `ce-traceparent` header, structured mode's `traceparent` attribute) makes the
/// trigger's `courier.handle` span a child of the sender's span.
async fn one_trace_through_http_push(spans: &InMemorySpanExporter) {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;
    for structured in [false, true] {
        let sender = tracing::info_span!("sender");
        let parent = courier::otel::traceparent_of(&sender).expect("the sender's span has a context");
        drop(sender);
        let trigger = courier::trigger::Trigger::new(|_: Message| async {});
        let router = courier::trigger::http::router(trigger, Source::queue("pushed").unwrap());
        let request = if structured {
            let event = serde_json::json!({"specversion": "1.0", "id": "e2", "source": "test", "type": "t",
                                            "data": "hi", "traceparent": parent.to_string()});
            Request::post("/")
                .header("content-type", "application/cloudevents+json")
                .body(Body::from(event.to_string()))
                .unwrap()
        } else {
            Request::post("/")
                .header("ce-specversion", "1.0")
                .header("ce-id", "e1")
                .header("ce-source", "test")
                .header("ce-type", "t")
                .header("ce-traceparent", parent.to_string())
                .body(Body::from("hi"))
                .unwrap()
        };
        let response = router.oneshot(request).await.unwrap();
        assert!(response.status().is_success(), "structured {structured}: {}", response.status());
        let trace_id = opentelemetry::trace::TraceId::from_bytes(parent.trace_id.to_be_bytes());
        let finished = spans.get_finished_spans().unwrap();
        let handle = finished
            .iter()
            .find(|s| s.name == "courier.handle" && s.span_context.trace_id() == trace_id)
            .unwrap_or_else(|| panic!("structured {structured}: no handler span in the sender's trace"));
        assert_eq!(
            handle.parent_span_id,
            opentelemetry::trace::SpanId::from_bytes(parent.span_id.to_be_bytes()),
            "structured {structured}: the handler's span is the sender's child"
        );
        eprintln!("HTTP push (structured {structured}): one trace {trace_id}: sender -> courier.handle");
        spans.reset();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_span_is_the_child_of_its_send_on_every_backend() {
    let spans = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(spans.clone()).build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("courier-test")));
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber of this test binary");

    let sqlite = format!("sqlite://{}", sqlite_test_path("otel").display());
    for (backend, url) in [
        ("memory", "memory://".to_owned()),
        ("sqlite", sqlite),
        ("postgres", postgres_url().await),
        ("rabbitmq", amqp_url().await),
        ("kafka", kafka_url().await),
        ("sqs", sqs_url().await),
    ] {
        let broker = courier::connect(&url).await.unwrap_or_else(|e| panic!("{backend}: {e}"));
        one_trace_from_send_to_handler(backend, broker, &spans).await;
    }
    for kind in
        [courier::trigger::EventKind::Sqs, courier::trigger::EventKind::Kafka, courier::trigger::EventKind::RabbitMq]
    {
        one_trace_through_a_trigger(kind, &spans).await;
    }
    one_trace_through_http_push(&spans).await;
}
