//! The Lambda triggers over the public sample events (`tests/fixtures/faas`, from the
//! aws_lambda_events crate, MIT) and over events shaped like real ones: partial failures,
//! FIFO stop-at-first-failure, panics confined to their record, malformed events.
#![cfg(feature = "trigger")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use courier::trigger::sqs::SqsBatchResponse;
use courier::trigger::Trigger;
use courier::{headers, Context, Destination, Error, Incoming, LocalBroker, Outcome, Source};
use serde_json::json;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/../tests/fixtures/faas/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A handler that records what it saw and fails the ids it is told to.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<Incoming>>>,
}

impl Recorder {
    fn failing(&self, fail: &'static [&'static str]) -> Trigger {
        let seen = self.seen.clone();
        Trigger::new(move |incoming: Incoming| {
            let seen = seen.clone();
            async move {
                let id = incoming.message.id.to_string();
                seen.lock().unwrap().push(incoming);
                if fail.contains(&id.as_str()) {
                    Outcome::retry(format!("{id} failed"))
                } else {
                    Outcome::Ack
                }
            }
        })
    }

    fn ids(&self) -> Vec<String> {
        self.seen.lock().unwrap().iter().map(|i| i.message.id.to_string()).collect()
    }
}

fn sqs_record(id: &str, group: Option<&str>) -> serde_json::Value {
    let mut attributes = json!({"ApproximateReceiveCount": "1", "SentTimestamp": "1520621625029"});
    if let Some(g) = group {
        attributes["MessageGroupId"] = json!(g);
    }
    let queue = if group.is_some() { "orders.fifo" } else { "orders" };
    json!({"messageId": id, "receiptHandle": "h", "body": format!("body of {id}"), "attributes": attributes,
           "messageAttributes": {}, "eventSource": "aws:sqs",
           "eventSourceARN": format!("arn:aws:sqs:eu-west-1:123456789012:{queue}")})
}

#[tokio::test]
async fn sqs_sample_event_maps_every_field() {
    let recorder = Recorder::default();
    let response = recorder.failing(&[]).sqs_json(&fixture("example-sqs-event.json")).await.unwrap();
    assert_eq!(response, SqsBatchResponse::default(), "a success lists nothing");
    let seen = recorder.seen.lock().unwrap();
    let incoming = &seen[0];
    let m = &incoming.message;
    assert_eq!((m.id.as_str(), &m.payload[..]), ("MessageID_1", &b"Message Body"[..]));
    assert_eq!(incoming.attempt, 2, "ApproximateReceiveCount");
    assert_eq!(incoming.source, Source::queue("SQSQueue").unwrap());
    assert_eq!(m.header("Attribute1"), Some("AttributeValue1"));
    assert_eq!(m.header("Attribute2"), Some("123"), "Number attributes as written");
    assert_eq!(m.header("Attribute3"), Some("1100"), "Binary attributes decoded");
    assert_eq!(m.timestamp.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis(), 1_520_621_625_029);
}

#[tokio::test]
async fn sqs_partial_failure_answers_like_the_sample_response() {
    let records: Vec<_> = ["id1", "id2", "id3", "id4"].iter().map(|id| sqs_record(id, None)).collect();
    let event = serde_json::to_vec(&json!({ "Records": records })).unwrap();
    let recorder = Recorder::default();
    let response = recorder.failing(&["id2", "id4"]).sqs_json(&event).await.unwrap();
    let expected: SqsBatchResponse = serde_json::from_slice(&fixture("example-sqs-batch-response.json")).unwrap();
    assert_eq!(response, expected);
    assert_eq!(recorder.ids().len(), 4, "every record of a standard queue runs");
    assert_eq!(
        serde_json::to_value(&response).unwrap(),
        serde_json::from_slice::<serde_json::Value>(&fixture("example-sqs-batch-response.json")).unwrap()
    );
}

#[tokio::test]
async fn sqs_fifo_stops_at_the_first_failure_and_reports_the_rest() {
    let records: Vec<_> = ["a1", "a2", "b1", "a3"].iter().map(|id| sqs_record(id, Some(&id[..1]))).collect();
    let event = serde_json::to_vec(&json!({ "Records": records })).unwrap();
    let recorder = Recorder::default();
    let response = recorder.failing(&["a2"]).sqs_json(&event).await.unwrap();
    let failed: Vec<_> = response.batch_item_failures.iter().map(|f| f.item_identifier.as_str()).collect();
    assert_eq!(failed, ["a2", "b1", "a3"]);
    assert_eq!(recorder.ids(), ["a1", "a2"], "nothing after the failure ran");
    assert_eq!(recorder.seen.lock().unwrap()[0].message.ordering_key.as_deref(), Some("a"));
}

#[tokio::test]
async fn a_panicking_handler_fails_only_its_record() {
    let records: Vec<_> = ["ok1", "boom", "ok2"].iter().map(|id| sqs_record(id, None)).collect();
    let event = serde_json::to_vec(&json!({ "Records": records })).unwrap();
    let in_the_future = Trigger::new(|ctx: Context| async move {
        if ctx.id.as_str() == "boom" {
            panic!("handler bug");
        }
    });
    // A panic in the call itself, before any future exists, is confined the same way.
    let in_the_call = Trigger::new(|ctx: Context| {
        if ctx.id.as_str() == "boom" {
            panic!("handler bug");
        }
        std::future::ready(())
    });
    for trigger in [in_the_future, in_the_call] {
        let response = trigger.sqs_json(&event).await.unwrap();
        let failed: Vec<_> = response.batch_item_failures.iter().map(|f| f.item_identifier.as_str()).collect();
        assert_eq!(failed, ["boom"]);
    }
}

#[tokio::test]
async fn malformed_events_are_clear_errors() {
    let trigger = Recorder::default().failing(&[]);
    let err = trigger.sqs_json(br#"{"Records":[{"body":"x"}]}"#).await.unwrap_err();
    assert!(matches!(err, Error::Decode { .. }) && err.to_string().contains("messageId"), "{err}");
    let err = trigger.sqs_json(b"not json").await.unwrap_err();
    assert!(err.to_string().contains("SQS event"), "{err}");
    let err = trigger.kafka_json(br#"{"eventSource":"aws:kafka"}"#).await.unwrap_err();
    assert!(err.to_string().contains("records"), "{err}");
    let err = trigger.rabbitmq_json(br#"{"rmqMessagesByQueue":{"q::/":[{"data":"%%%"}]}}"#).await.unwrap_err();
    assert!(err.to_string().contains("data is not base64"), "{err}");
    // A record with a bad binary attribute fails alone.
    let mut bad = sqs_record("bad", None);
    bad["messageAttributes"] = json!({"b": {"binaryValue": "***", "dataType": "Binary"}});
    let event = serde_json::to_vec(&json!({ "Records": [bad, sqs_record("good", None)] })).unwrap();
    let response = trigger.sqs_json(&event).await.unwrap();
    assert_eq!(response.batch_item_failures.len(), 1);
    assert_eq!(response.batch_item_failures[0].item_identifier, "bad");
}

#[tokio::test]
async fn rejected_records_go_to_the_dead_letter_destination_when_one_is_set() {
    let broker: courier::DynBroker = Arc::new(LocalBroker::new());
    let dlq = Source::queue("orders.dlq").unwrap();
    broker.declare(&dlq).await.unwrap();
    let trigger = Trigger::new(|| async { Outcome::reject("invalid total") })
        .dead_letter(broker.clone(), Destination::queue("orders.dlq").unwrap());
    let event = serde_json::to_vec(&json!({ "Records": [sqs_record("r1", None)] })).unwrap();
    let response = trigger.sqs_json(&event).await.unwrap();
    assert!(response.batch_item_failures.is_empty(), "settled by dead-lettering");
    let consumer = broker.consumer(&dlq, Default::default()).await.unwrap();
    let dead = consumer.receive_one(std::time::Duration::from_secs(1)).await.unwrap().unwrap();
    assert_eq!(dead.header(headers::DEAD_LETTER_REASON), Some("invalid total"));
    assert_eq!(dead.header(headers::DEAD_LETTER_ORIGIN), Some("queue:orders"));
    // Without one, a rejection goes back to the platform's redrive policy.
    let response = Trigger::new(|| async { Outcome::reject("invalid total") }).sqs_json(&event).await.unwrap();
    assert_eq!(response.batch_item_failures.len(), 1);
}

#[tokio::test]
async fn kafka_sample_event_decodes_key_value_and_headers() {
    let recorder = Recorder::default();
    recorder.failing(&[]).kafka_json(&fixture("example-kafka-event.json")).await.unwrap();
    let seen = recorder.seen.lock().unwrap();
    let m = &seen[0].message;
    assert_eq!(m.id.as_str(), "AWSKafkaTopic-0@0");
    assert_eq!(&m.payload[..], b"8d5596b4-1813-4238-b24b-6dad8e3d1c0c");
    assert_eq!(m.ordering_key.as_deref(), Some("8d5596b4-1813-4238-b24b-6dad8e3d1c0c"));
    assert_eq!(m.header("headerKey"), Some("headerValue"));
    assert_eq!(seen[0].source, Source::queue("AWSKafkaTopic").unwrap());
}

#[tokio::test]
async fn self_managed_kafka_runs_partitions_in_order_and_stops_a_failing_one() {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let record = |partition: i64, offset: i64| {
        json!({"topic": "orders", "partition": partition, "offset": offset, "timestamp": 1_700_000_000_000i64,
               "timestampType": "CREATE_TIME", "key": b64(&format!("k{partition}")), "value": b64(&format!("v{offset}")),
               "headers": [{"sig": [-61, -87]}]}) // "é" as signed bytes
    };
    // Self-managed Kafka: no ARN.
    let event = json!({"eventSource": "SelfManagedKafka", "bootstrapServers": "b:9092", "records": {
        "orders-0": [record(0, 0), record(0, 1), record(0, 2)],
        "orders-1": [record(1, 0), record(1, 1)],
    }});
    let recorder = Recorder::default();
    let failure = recorder.failing(&["orders-0@1"]).kafka(serde_json::from_value(event).unwrap()).await.unwrap_err();
    assert_eq!(failure.failed.len(), 1);
    assert_eq!(failure.failed[0].0, "orders-0@1");
    assert_eq!(failure.skipped, 1, "orders-0@2 did not overtake the failure");
    let ids = recorder.ids();
    let p0: Vec<_> = ids.iter().filter(|i| i.starts_with("orders-0")).collect();
    let p1: Vec<_> = ids.iter().filter(|i| i.starts_with("orders-1")).collect();
    assert_eq!(p0, ["orders-0@0", "orders-0@1"]);
    assert_eq!(p1, ["orders-1@0", "orders-1@1"], "the other partition ran to the end");
    assert_eq!(recorder.seen.lock().unwrap()[0].message.header("sig"), Some("é"));
}

#[tokio::test]
async fn rabbitmq_sample_event_and_null_properties() {
    let recorder = Recorder::default();
    recorder.failing(&[]).rabbitmq_json(&fixture("example-rabbitmq-event.json")).await.unwrap();
    {
        let seen = recorder.seen.lock().unwrap();
        let m = &seen[0].message;
        assert_eq!(&m.payload[..], br#"{"timeout":0,"data":"CZrmf0Gw8Ov4bqLQxD4E"}"#);
        assert_eq!(m.header("header1"), Some("value1"));
        assert_eq!(m.header("numberInHeader"), Some("10"));
        assert_eq!(m.content_type.as_deref(), Some("text/plain"));
        assert_eq!(seen[0].source, Source::queue("test").unwrap());
        assert_eq!(seen[0].attempt, 1);
    }
    // Real events carry null properties, including priority; and all-or-nothing failure.
    let event = json!({"eventSource": "aws:rmq", "rmqMessagesByQueue": {"orders::/": [
        {"basicProperties": {"priority": null, "headers": null, "messageId": "m1", "contentType": null}, "redelivered": true, "data": "b25l"},
        {"basicProperties": null, "redelivered": false, "data": "dHdv"},
        {"basicProperties": {"messageId": "m3"}, "redelivered": false, "data": "dGhyZWU="},
    ]}});
    let recorder = Recorder::default();
    let err = recorder.failing(&["m1"]).rabbitmq(serde_json::from_value(event).unwrap()).await.unwrap_err();
    assert!(err.is_retryable() && err.to_string().contains("Lambda requeues the batch"), "{err}");
    assert_eq!(recorder.ids(), ["m1"], "the batch stops at the failure");
    assert_eq!(recorder.seen.lock().unwrap()[0].attempt, 2, "redelivered counts");
}

/// A record that cannot be decoded is that record's problem: with a dead-letter
/// destination it is dead-lettered as it came, with the reason, and the records around
/// it run; a queue name Courier's names cannot hold fails nothing.
#[tokio::test]
async fn undecodable_records_are_dead_lettered_alone_on_every_event() {
    let broker: courier::DynBroker = Arc::new(LocalBroker::new());
    let dlq = Source::queue("lambda.dlq").unwrap();
    broker.declare(&dlq).await.unwrap();
    let recorder = Recorder::default();
    let trigger = recorder.failing(&[]).dead_letter(broker.clone(), Destination::queue("lambda.dlq").unwrap());

    // Kafka: a value that is not base64, between two good records of one partition.
    let record =
        |offset: i64, value: &str| json!({"topic": "orders", "partition": 0, "offset": offset, "value": value});
    let event = json!({"eventSource": "SelfManagedKafka", "records": {
        "orders-0": [record(0, "b25l"), record(1, "%%% not base64"), record(2, "dHdv")]}});
    trigger.kafka(serde_json::from_value(event).unwrap()).await.expect("the batch succeeds");
    // RabbitMQ: the same, from a queue whose name has a ':' Courier names do not allow.
    let event = json!({"eventSource": "aws:rmq", "rmqMessagesByQueue": {"orders:v2::/": [
        {"basicProperties": {"messageId": "r1"}, "data": "b25l"},
        {"basicProperties": {"messageId": "r2"}, "data": "%%% not base64"},
        {"basicProperties": {"messageId": "r3"}, "data": "dHdv"},
    ]}});
    trigger.rabbitmq(serde_json::from_value(event).unwrap()).await.expect("the batch succeeds");
    // SQS: a body that claims base64 and is not.
    let mut bad = sqs_record("s2", None);
    bad["body"] = json!("%%% not base64");
    bad["messageAttributes"] = json!({"courier-encoding": {"stringValue": "base64", "dataType": "String"}});
    let event =
        serde_json::to_vec(&json!({ "Records": [sqs_record("s1", None), bad, sqs_record("s3", None)] })).unwrap();
    assert!(trigger.sqs_json(&event).await.unwrap().batch_item_failures.is_empty());

    assert_eq!(recorder.ids(), ["orders-0@0", "orders-0@2", "r1", "r3", "s1", "s3"]);
    assert_eq!(recorder.seen.lock().unwrap()[2].source, Source::queue("orders_v2").unwrap());
    let consumer = broker.consumer(&dlq, Default::default()).await.unwrap();
    let dead = consumer.receive(10, std::time::Duration::from_secs(1)).await.unwrap();
    let ids: Vec<_> = dead.iter().map(|d| d.id.to_string()).collect();
    assert_eq!(ids, ["orders-0@1", "r2", "s2"]);
    for d in &dead {
        assert_eq!(&d.payload[..], b"%%% not base64", "as it came");
        assert!(d.header(headers::DEAD_LETTER_REASON).unwrap().starts_with("undecodable record"), "{:?}", d.headers);
    }
}

#[tokio::test]
async fn the_same_handler_runs_under_the_worker_and_a_trigger() {
    // One function, two runtimes, one outcome type.
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = calls.clone();
        move |courier::Json(order): courier::Json<serde_json::Value>| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                if order["total"].as_i64().unwrap_or(0) <= 0 {
                    return Err(Error::fatal("non-positive total"));
                }
                Ok(())
            }
        }
    };
    let mut ok = sqs_record("good", None);
    ok["body"] = json!(r#"{"total": 5}"#);
    let mut bad = sqs_record("bad", None);
    bad["body"] = json!(r#"{"total": 0}"#);
    let event = serde_json::to_vec(&json!({ "Records": [ok, bad] })).unwrap();
    let response = Trigger::new(handler.clone()).sqs_json(&event).await.unwrap();
    assert_eq!(response.batch_item_failures.len(), 1);

    let broker: courier::DynBroker = Arc::new(LocalBroker::new());
    let source = Source::queue("orders").unwrap();
    broker.declare(&source).await.unwrap();
    broker.send(&source.destination(), courier::Message::new(r#"{"total": 5}"#)).await.unwrap();
    let report = courier::App::new(broker)
        .route(source, handler)
        .run_until(tokio::time::sleep(std::time::Duration::from_millis(200)))
        .await
        .unwrap();
    assert_eq!(report.acked, 1);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}
