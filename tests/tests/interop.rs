//! Courier next to applications that do not use it: each broker's ordinary client (pika
//! for RabbitMQ, confluent-kafka for Kafka, boto3 for SQS, all from PyPI and run by
//! `interop/clients.py`) sends bare bodies that Courier receives, and reads what Courier
//! sends as a plain body plus headers it shows. `scripts/brokers up` installs the clients;
//! without them these tests fail, naming the missing module.

use std::sync::Arc;
use std::time::Duration;

use courier::{App, Delivery, Message};
use courier_contract_tests::{amqp_url, kafka_bootstrap, kafka_url, sqs_endpoint_and_region, sqs_url};
use courier_core::{conformance::unique_name, Broker, ConsumerOptions, Destination, DynBroker, Source};

/// Runs one command of `interop/clients.py`; its JSON output, parsed loosely.
async fn client(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/interop/clients.py");
    let output = tokio::process::Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .await
        .expect("python3 runs (install it, and pip install pika confluent-kafka boto3)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "clients.py {args:?} failed ({}): {}{stdout}\nscripts/brokers up installs the clients",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The URL without Courier's query options, as another client takes it.
fn without_query(url: &str) -> &str {
    url.split('?').next().unwrap()
}

async fn receive_one(broker: &dyn Broker, source: &Source) -> Delivery {
    let consumer = broker.consumer(source, ConsumerOptions::default()).await.unwrap();
    let d = consumer.receive_one(Duration::from_secs(30)).await.unwrap().expect("the foreign message arrives");
    d.ack().await.unwrap();
    consumer.close().await.unwrap();
    d
}

fn courier_message() -> Message {
    Message::new("from courier").with_header("tenant", "acme").with_content_type("text/plain")
}

// RabbitMQ

#[tokio::test]
async fn rabbitmq_a_bare_pika_message_reaches_courier() {
    let url = amqp_url().await;
    let broker = courier_amqp::AmqpBroker::connect(&url).await.unwrap();
    let name = unique_name("pika-in");
    let source = Source::queue(&name).unwrap();
    broker.declare(&source).await.unwrap();
    client(&["pika-send", without_query(&url), &name, "bare body"]).await;
    let d = receive_one(&broker, &source).await;
    assert_eq!(&d.payload[..], b"bare body");
    assert!(!d.id.as_str().is_empty(), "a message without an id gets one");
    assert_eq!((d.attempt(), d.headers.len(), d.content_type.as_deref()), (1, 0, None));
}

#[tokio::test]
async fn rabbitmq_pika_reads_a_courier_message_as_body_and_headers() {
    let url = amqp_url().await;
    let broker = courier_amqp::AmqpBroker::connect(&url).await.unwrap();
    let name = unique_name("pika-out");
    let source = Source::queue(&name).unwrap();
    broker.declare(&source).await.unwrap();
    let id = broker.send(&source.destination(), courier_message().with_id("order-7")).await.unwrap();
    let seen = client(&["pika-receive", without_query(&url), &name]).await;
    assert!(seen.contains(r#""body": "from courier""#), "{seen}");
    assert!(seen.contains(r#""tenant": "acme""#), "{seen}");
    assert!(seen.contains(&format!(r#""message_id": "{id}""#)), "{seen}");
    assert!(seen.contains(r#""content_type": "text/plain""#), "{seen}");
}

/// The issue's case: `queue_declare(queue='hello')` in a Python program makes a transient
/// classic queue, and a worker route with no option set consumes it as it is.
#[tokio::test]
async fn rabbitmq_a_worker_route_consumes_a_queue_pika_declared_with_defaults() {
    let url = amqp_url().await;
    let name = unique_name("hello");
    client(&["pika-declare-send", without_query(&url), &name, "hi from pika"]).await;
    let broker: DynBroker = Arc::new(courier_amqp::AmqpBroker::connect(&url).await.unwrap());
    let (seen, mut got) = tokio::sync::mpsc::unbounded_channel::<String>();
    let report = App::new(broker)
        .route(Source::queue(&name).unwrap(), move |m: Message| {
            let seen = seen.clone();
            async move {
                seen.send(String::from_utf8_lossy(&m.payload).into_owned()).unwrap();
                Ok::<(), courier::Error>(())
            }
        })
        .run_until(async {
            tokio::time::timeout(Duration::from_secs(30), got.recv()).await.ok();
        })
        .await
        .expect("the route starts on the adopted queue");
    assert_eq!(report.acked, 1);
}

// Kafka

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_a_bare_confluent_record_reaches_courier() {
    let url = kafka_url().await;
    let broker = courier_kafka::KafkaBroker::connect(&url).await.unwrap();
    let topic = unique_name("confluent-in");
    let source = Source::queue(&topic).unwrap();
    broker.declare(&source).await.unwrap();
    client(&["kafka-send", &kafka_bootstrap(&url), &topic, "bare record"]).await;
    let d = receive_one(&broker, &source).await;
    assert_eq!(&d.payload[..], b"bare record");
    assert!(d.id.as_str().starts_with(&format!("{topic}-")), "topic-partition-offset: {}", d.id);
    assert_eq!((d.attempt(), d.headers.len()), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_confluent_reads_a_courier_record_as_body_and_headers() {
    let url = kafka_url().await;
    let broker = courier_kafka::KafkaBroker::connect(&url).await.unwrap();
    let topic = unique_name("confluent-out");
    broker.declare_destination(&Destination::topic(&topic).unwrap()).await.unwrap();
    let id = broker.send(&Destination::topic(&topic).unwrap(), courier_message()).await.unwrap();
    let seen = client(&["kafka-receive", &kafka_bootstrap(&url), &topic, &unique_name("confluent-group")]).await;
    assert!(seen.contains(r#""body": "from courier""#), "{seen}");
    assert!(seen.contains(r#""tenant": "acme""#), "{seen}");
    assert!(seen.contains(&format!(r#""courier-id": "{id}""#)), "{seen}");
    assert!(seen.contains(r#""content-type": "text/plain""#), "{seen}");
}

// SQS

#[tokio::test]
async fn sqs_a_bare_boto3_message_reaches_courier() {
    let url = sqs_url().await;
    let broker = courier_sqs::SqsBroker::connect(&url).await.unwrap();
    let queue = unique_name("boto3-in");
    let source = Source::queue(&queue).unwrap();
    broker.declare(&source).await.unwrap();
    let (endpoint, region) = sqs_endpoint_and_region(&url);
    let sent = client(&["sqs-send", &endpoint, &region, &queue, "bare body"]).await;
    let d = receive_one(&broker, &source).await;
    assert_eq!(&d.payload[..], b"bare body");
    assert!(sent.contains(&format!(r#""message_id": "{}""#, d.id)), "SQS's own id: {sent} vs {}", d.id);
    assert_eq!((d.attempt(), d.headers.len()), (1, 0));
}

#[tokio::test]
async fn sqs_a_python_lambda_style_handler_reads_a_courier_message() {
    let url = sqs_url().await;
    let broker = courier_sqs::SqsBroker::connect(&url).await.unwrap();
    let queue = unique_name("boto3-out");
    let source = Source::queue(&queue).unwrap();
    broker.declare(&source).await.unwrap();
    let id = broker.send(&source.destination(), courier_message()).await.unwrap();
    let (endpoint, region) = sqs_endpoint_and_region(&url);
    let seen = client(&["sqs-receive", &endpoint, &region, &queue]).await;
    assert!(seen.contains(r#""body": "from courier""#), "{seen}");
    assert!(seen.contains(r#""tenant": "acme""#), "{seen}");
    assert!(seen.contains(&format!(r#""courier-id": "{id}""#)), "{seen}");
    // delete_message settled it: Courier finds nothing left.
    let consumer = broker.consumer(&source, ConsumerOptions::default()).await.unwrap();
    assert!(consumer.receive(10, Duration::from_secs(2)).await.unwrap().is_empty());
}
