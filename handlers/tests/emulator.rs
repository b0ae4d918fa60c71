//! The local FaaS emulator: events built from real broker messages, failed records going
//! back to the source, on the in-process backend and on the RabbitMQ server on this machine.
#![cfg(feature = "trigger")]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier::trigger::{emulator::Emulator, EventKind, Trigger};
use courier::{Incoming, Message, Outcome, Source};

/// A handler that fails each message's first attempt and records every attempt it sees.
fn flaky(seen: Arc<Mutex<HashMap<String, Vec<u32>>>>) -> Trigger {
    Trigger::new(move |incoming: Incoming| {
        let seen = seen.clone();
        async move {
            let body = String::from_utf8(incoming.message.payload.to_vec()).unwrap();
            seen.lock().unwrap().entry(body.clone()).or_default().push(incoming.attempt);
            assert_eq!(incoming.message.header("tenant"), Some("acme"), "headers travel through the event");
            if incoming.attempt == 1 && body.ends_with('0') {
                Outcome::retry("first attempt fails")
            } else {
                Outcome::Ack
            }
        }
    })
}

async fn run(url: &str, kind: EventKind) {
    let broker = courier::connect(url).await.unwrap();
    let source = Source::queue(&courier_core::conformance::unique_name("faas")).unwrap();
    broker.declare(&source).await.unwrap();
    let messages = (0..40).map(|i| Message::new(format!("m{i}")).with_header("tenant", "acme")).collect();
    broker.send_batch(&source.destination(), messages).await.unwrap();
    let seen = Arc::default();
    let report = Emulator::new(broker, source, flaky(Arc::clone(&seen)), kind)
        .batch_size(8)
        .window(Duration::from_millis(20))
        .concurrency(3)
        .cold_start(Duration::from_millis(50))
        .run_until_idle(Duration::from_millis(800))
        .await
        .unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 40, "{kind:?}: every message reached the handler");
    for (body, attempts) in seen.iter() {
        if body.ends_with('0') {
            // SQS answers per record, so each record first runs as attempt 1. A Kafka or
            // RabbitMQ invocation stops at its first failure and the whole batch comes
            // back, so a record behind a failing one in its batch first runs as attempt 2
            // (seen under load, when batches of one instance mix records of the others).
            if kind == EventKind::Sqs {
                assert_eq!(attempts.first(), Some(&1), "{kind:?} {body}: {attempts:?}");
            }
            assert!(attempts.last() > Some(&1), "{kind:?} {body} came back: {attempts:?}");
        }
    }
    match kind {
        // SQS answers per record: exactly the 4 failing records went back.
        EventKind::Sqs => assert_eq!(report.records_failed, 4, "{report}"),
        // Kafka and RabbitMQ fail whole invocations: at least those records went back.
        _ => assert!(report.records_failed >= 4, "{report}"),
    }
    assert!(report.records_ok >= 40, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_records_come_back_in_every_event_form_in_process() {
    for kind in [EventKind::Sqs, EventKind::Kafka, EventKind::RabbitMq] {
        run("memory://", kind).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_built_from_rabbitmq_messages() {
    let url = std::env::var("COURIER_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    for kind in [EventKind::Sqs, EventKind::RabbitMq] {
        run(&url, kind).await;
    }
}
