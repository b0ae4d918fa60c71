//! The Lambda entry point against a stand-in for the Lambda Runtime API (the HTTP
//! interface a Lambda host gives a function process): events go in through
//! `/invocation/next`, answers come back to `/invocation/{id}/response` or `/error`.
#![cfg(feature = "lambda")]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::Router;
use courier::trigger::Trigger;
use courier::{Context, Outcome};
use serde_json::{json, Value};

#[derive(Default)]
struct RuntimeApi {
    events: Mutex<VecDeque<(String, Value)>>,
    answers: Mutex<Vec<(String, &'static str, Value)>>,
}

async fn next(State(api): State<Arc<RuntimeApi>>) -> (HeaderMap, String) {
    loop {
        let event = api.events.lock().unwrap().pop_front();
        if let Some((id, event)) = event {
            let mut headers = HeaderMap::new();
            headers.insert("lambda-runtime-aws-request-id", id.parse().unwrap());
            headers.insert("lambda-runtime-deadline-ms", "4102444800000".parse().unwrap());
            headers.insert(
                "lambda-runtime-invoked-function-arn",
                "arn:aws:lambda:eu-west-1:123456789012:function:orders".parse().unwrap(),
            );
            return (headers, event.to_string());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn answer(State(api): State<Arc<RuntimeApi>>, Path((id, kind)): Path<(String, String)>, body: String) {
    let kind = if kind == "response" { "response" } else { "error" };
    api.answers.lock().unwrap().push((id, kind, serde_json::from_str(&body).unwrap_or(Value::String(body))));
}

#[tokio::test]
async fn one_binary_answers_sqs_kafka_and_rabbitmq_invocations() {
    let api = Arc::new(RuntimeApi::default());
    let sqs = json!({"Records": [
        {"messageId": "ok", "body": "fine", "attributes": {"ApproximateReceiveCount": "1"}, "eventSource": "aws:sqs"},
        {"messageId": "bad", "body": "fail", "attributes": {"ApproximateReceiveCount": "3"}, "eventSource": "aws:sqs"},
    ]});
    let kafka = json!({"eventSource": "SelfManagedKafka", "records": {"t-0": [
        {"topic": "t", "partition": 0, "offset": 5, "value": "ZmFpbA==", "headers": []}]}});
    let rabbit = json!({"eventSource": "aws:rmq", "rmqMessagesByQueue": {"q::/": [
        {"basicProperties": {"priority": null}, "redelivered": false, "data": "ZmluZQ=="}]}});
    api.events.lock().unwrap().extend([("1".to_owned(), sqs), ("2".to_owned(), kafka), ("3".to_owned(), rabbit)]);

    let app = Router::new()
        .route("/2018-06-01/runtime/invocation/next", get(next))
        .route("/2018-06-01/runtime/invocation/{id}/{kind}", post(answer))
        .with_state(api.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    // The variables a Lambda host sets for the function process.
    for (k, v) in [
        ("AWS_LAMBDA_RUNTIME_API", address.to_string()),
        ("AWS_LAMBDA_FUNCTION_NAME", "orders".into()),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128".into()),
        ("AWS_LAMBDA_FUNCTION_VERSION", "1".into()),
        ("AWS_LAMBDA_LOG_STREAM_NAME", "s".into()),
        ("AWS_LAMBDA_LOG_GROUP_NAME", "g".into()),
    ] {
        // SAFETY: set before the runtime starts; this test binary has no other threads reading them.
        unsafe { std::env::set_var(k, v) };
    }
    let trigger = Trigger::new(|ctx: Context, body: courier::Bytes| async move {
        let _ = ctx;
        if &body[..] == b"fail" {
            Outcome::retry("payment service down")
        } else {
            Outcome::Ack
        }
    });
    let runtime = tokio::spawn(courier::trigger::lambda::run(trigger));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while api.answers.lock().unwrap().len() < 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    runtime.abort();
    let mut answers = api.answers.lock().unwrap().clone();
    answers.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert_eq!(answers[0].1, "response");
    assert_eq!(answers[0].2, json!({"batchItemFailures": [{"itemIdentifier": "bad"}]}), "SQS: partial batch");
    assert_eq!(answers[1].1, "error", "Kafka: a failure fails the invocation, so Lambda retries the batch");
    assert!(answers[1].2.to_string().contains("payment service down"), "{:?}", answers[1].2);
    assert_eq!((answers[2].1, &answers[2].2), ("response", &Value::Null), "RabbitMQ: all succeeded");
}
