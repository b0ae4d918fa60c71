//! Hostile input, generated: Lambda events, HTTP pushes and backend URLs of any shape
//! never panic, and every record of an event is answered for (handled, dead-lettered or
//! reported failed), never lost. A short run is part of `scripts/test`; a long one:
//! `PROPTEST_CASES=100000 cargo test -p courier --all-features --test properties`.
#![cfg(all(feature = "http", feature = "amqp"))]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::Engine;
use courier::trigger::Trigger;
use courier::{Incoming, Outcome, Source};
use proptest::prelude::*;
use serde_json::{json, Value};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A trigger that counts what it is given and fails some of it.
fn counting() -> (Trigger, Arc<AtomicUsize>) {
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let trigger = Trigger::new(move |incoming: Incoming| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            match incoming.message.payload.first() {
                Some(b'r') => Outcome::retry("asked to"),
                Some(b'x') => Outcome::reject("asked to"),
                _ => Outcome::Ack,
            }
        }
    });
    (trigger, seen)
}

/// Any JSON value, nested a little.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,6}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Text that is base64 sometimes, and sometimes anything.
fn maybe_base64() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..32).prop_map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
        ".{0,24}",
    ]
}

fn kafka_record() -> impl Strategy<Value = Value> {
    (
        "[a-zA-Z0-9._:/ -]{0,260}",
        any::<i64>(),
        any::<i64>(),
        prop::option::of(maybe_base64()),
        prop::option::of(maybe_base64()),
        prop::collection::vec(("[a-z-]{0,12}", prop::collection::vec(any::<i16>(), 0..6)), 0..4),
        prop::option::of(any::<i64>()),
    )
        .prop_map(|(topic, partition, offset, key, value, headers, timestamp)| {
            let headers: Vec<Value> = headers.into_iter().map(|(k, v)| json!({ k: v })).collect();
            json!({"topic": topic, "partition": partition, "offset": offset, "key": key, "value": value,
                   "headers": headers, "timestamp": timestamp})
        })
}

fn sqs_record() -> impl Strategy<Value = Value> {
    (
        ".{0,12}",
        prop::option::of(maybe_base64()),
        prop::option::of(Just("base64")),
        prop::option::of(".{0,10}"),
        prop::option::of(".{0,60}"),
    )
        .prop_map(|(id, body, encoding, receive_count, arn)| {
            let mut attributes = json!({});
            if let Some(n) = receive_count {
                attributes["ApproximateReceiveCount"] = json!(n);
            }
            let mut message_attributes = json!({});
            if let Some(e) = encoding {
                message_attributes["courier-encoding"] = json!({"stringValue": e, "dataType": "String"});
            }
            json!({"messageId": id, "body": body, "attributes": attributes,
                   "messageAttributes": message_attributes, "eventSourceARN": arn})
        })
}

fn rabbitmq_message() -> impl Strategy<Value = Value> {
    (prop::option::of(maybe_base64()), any_json(), prop::option::of(any::<bool>()), prop::option::of(".{0,10}"))
        .prop_map(|(data, headers, redelivered, id)| {
            json!({"data": data, "redelivered": redelivered,
                   "basicProperties": {"headers": headers, "messageId": id, "timestamp": "Jan 1, 1970"}})
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Every Kafka record is handled or reported: a partition stops at its first failure,
    /// and the records after it are counted as skipped, never dropped.
    #[test]
    fn kafka_events_of_any_shape(records in prop::collection::vec(kafka_record(), 0..6), junk in any::<Vec<u8>>()) {
        let (trigger, seen) = counting();
        let n = records.len();
        let event = json!({"eventSource": "SelfManagedKafka", "records": {"t-0": records}});
        let result = runtime().block_on(trigger.kafka_json(&serde_json::to_vec(&event).unwrap()));
        if result.is_ok() {
            prop_assert!(seen.load(Ordering::SeqCst) <= n);
        }
        let _ = runtime().block_on(trigger.kafka_json(&junk));
    }

    /// Every SQS record is handled or named in the failures.
    #[test]
    fn sqs_events_of_any_shape(records in prop::collection::vec(sqs_record(), 0..6), junk in any::<Vec<u8>>()) {
        let (trigger, _) = counting();
        let event = json!({"Records": records});
        if let Ok(response) = runtime().block_on(trigger.sqs_json(&serde_json::to_vec(&event).unwrap())) {
            prop_assert!(response.batch_item_failures.len() <= records.len());
        }
        let _ = runtime().block_on(trigger.sqs_json(&junk));
    }

    #[test]
    fn rabbitmq_events_of_any_shape(
        queue in ".{0,40}",
        messages in prop::collection::vec(rabbitmq_message(), 0..6),
        junk in any::<Vec<u8>>(),
    ) {
        let (trigger, _) = counting();
        let event = json!({"eventSource": "aws:rmq", "rmqMessagesByQueue": {format!("{queue}::/"): messages}});
        let _ = runtime().block_on(trigger.rabbitmq_json(&serde_json::to_vec(&event).unwrap()));
        let _ = runtime().block_on(trigger.rabbitmq_json(&junk));
    }

    /// HTTP pushes: any headers and body parse or fail with an error, never a panic.
    #[test]
    fn http_pushes_of_any_shape(
        headers in prop::collection::vec(("(ce-[a-z]{0,8})|content-type", "[ -~]{0,30}"), 0..6),
        body in prop_oneof![any::<Vec<u8>>(), any_json().prop_map(|v| serde_json::to_vec(&json!({"message": v})).unwrap())],
    ) {
        let mut map = axum::http::HeaderMap::new();
        for (name, value) in headers {
            if let (Ok(name), Ok(value)) = (name.parse::<axum::http::HeaderName>(), value.parse()) {
                map.insert(name, value);
            }
        }
        let _ = courier::trigger::http::parse(&map, body.into(), Source::queue("orders").unwrap());
    }

    /// Backend URLs of any shape are parsed or refused with an error.
    #[test]
    fn backend_urls_of_any_shape(
        scheme in prop_oneof![Just("amqp".to_owned()), Just("amqps".to_owned()), Just("memory".to_owned()), "[a-z]{0,6}"],
        rest in "[ -~]{0,60}",
    ) {
        let url = format!("{scheme}://{rest}");
        let _ = courier_core::backend::BackendUrl::parse(&url);
        let _ = courier_amqp::AmqpConfig::from_url(&url);
        let _ = courier_local::LocalConfig::from_url(&url);
        let _ = courier_core::redact_url(&url);
    }
}
