//! A plain AMQP 0-9-1 client (lapin used raw, without Courier) and Courier exchange
//! messages both ways through the RabbitMQ server on this machine (`scripts/brokers up`,
//! or `$COURIER_TEST_AMQP`).

use std::time::Duration;

use courier_amqp::AmqpBroker;
use courier_core::{conformance::unique_name, Broker, ConsumerOptions, Destination, Message, Source};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

mod common;
use common::url;

async fn raw_channel() -> (Connection, lapin::Channel) {
    let connection = Connection::connect(&url(), ConnectionProperties::default()).await.expect("raw lapin connects");
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    (connection, channel)
}

#[tokio::test]
async fn a_plain_client_message_reaches_a_courier_handler_intact() {
    let broker = AmqpBroker::connect(&url()).await.unwrap();
    let name = unique_name("interop-in");
    let source = Source::queue(&name).unwrap();
    broker.declare(&source).await.unwrap();
    let consumer = broker.consumer(&source, ConsumerOptions::default()).await.unwrap();

    let (_connection, channel) = raw_channel().await;
    let body: Vec<u8> = (0..=255u8).collect(); // not UTF-8
    let mut headers = FieldTable::default();
    headers.insert("tenant".into(), AMQPValue::LongString(LongString::from("acme")));
    headers.insert("count".into(), AMQPValue::LongInt(-7));
    headers.insert("urgent".into(), AMQPValue::Boolean(true));
    headers.insert("ratio".into(), AMQPValue::Double(0.5));
    let props = BasicProperties::default()
        .with_content_type("application/octet-stream".into())
        .with_correlation_id("corr-1".into())
        .with_reply_to("replies".into())
        .with_timestamp(1_700_000_000)
        .with_headers(headers);
    // No message_id: Courier gives the message one and keeps it across retries.
    let confirm = channel
        .basic_publish("".into(), name.as_str().into(), BasicPublishOptions::default(), &body, props)
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());

    let first = consumer.receive_one(Duration::from_secs(10)).await.unwrap().expect("the plain message arrives");
    assert_eq!(&first.payload[..], &body[..], "binary body intact");
    assert_eq!(first.content_type.as_deref(), Some("application/octet-stream"));
    assert_eq!(first.header("tenant"), Some("acme"));
    assert_eq!(first.header("count"), Some("-7"));
    assert_eq!(first.header("urgent"), Some("true"));
    assert_eq!(first.header("ratio"), Some("0.5"));
    assert_eq!(first.header("amqp-correlation-id"), Some("corr-1"));
    assert_eq!(first.header("amqp-reply-to"), Some("replies"));
    assert_eq!(first.timestamp.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(), 1_700_000_000);
    assert_eq!(first.attempt(), 1);

    first.retry().await.unwrap();
    let second = consumer.receive_one(Duration::from_secs(10)).await.unwrap().expect("the retry arrives");
    assert_eq!((second.id.clone(), second.attempt()), (first.id.clone(), 2));
    assert_eq!(second.headers, first.headers, "headers and properties survive a retry");
    assert_eq!(second.payload, first.payload);
    second.ack().await.unwrap();
    broker.close().await.unwrap();
}

#[tokio::test]
async fn a_courier_message_is_readable_by_a_plain_client() {
    let broker = AmqpBroker::connect(&url()).await.unwrap();
    let name = unique_name("interop-out");
    broker.declare(&Source::queue(&name).unwrap()).await.unwrap();
    let message = Message::new(vec![0u8, 159, 146, 150, 255])
        .with_id("order-42")
        .with_content_type("application/x-order")
        .with_header("tenant", "acme")
        .with_header("amqp-correlation-id", "corr-9");
    broker.send(&Destination::queue(&name).unwrap(), message).await.unwrap();

    let (_connection, channel) = raw_channel().await;
    let mut stream = channel
        .basic_consume(name.as_str().into(), "raw".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(delivery.data, vec![0u8, 159, 146, 150, 255]);
    let p = &delivery.properties;
    assert_eq!(p.message_id().as_ref().map(ShortString::as_str), Some("order-42"));
    assert_eq!(p.content_type().as_ref().map(ShortString::as_str), Some("application/x-order"));
    assert_eq!(p.correlation_id().as_ref().map(ShortString::as_str), Some("corr-9"), "a property again, not a header");
    assert_eq!(*p.delivery_mode(), Some(2), "persistent");
    let headers = p.headers().as_ref().expect("headers table");
    assert_eq!(headers.inner().get("tenant"), Some(&AMQPValue::LongString(LongString::from("acme"))));
    assert!(!headers.contains_key("amqp-correlation-id"));
    assert!(!headers.contains_key("x-courier-attempt"), "a first attempt carries no bookkeeping");
    delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
    broker.close().await.unwrap();
}

/// Message ids, content types and header names are AMQP short strings (255 bytes at
/// most). An over-long one is refused before anything is written, and the connection
/// carries the next message as if nothing happened.
#[tokio::test]
async fn an_over_long_header_name_is_refused_and_the_connection_lives_on() {
    let broker = AmqpBroker::connect(&url()).await.unwrap();
    let name = unique_name("short-strings");
    let source = Source::queue(&name).unwrap();
    broker.declare(&source).await.unwrap();
    let destination = Destination::queue(&name).unwrap();

    let long = "h".repeat(300);
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        broker.send(&destination, Message::new("too long").with_header(long.as_str(), "v")),
    )
    .await
    .expect("the send returns");
    let err = refused.expect_err("a 300-byte header name is refused");
    assert!(!err.is_retryable(), "{err}");
    assert!(err.to_string().contains("header name") && err.to_string().contains("255"), "{err}");
    let refused = broker.send(&destination, Message::new("too long").with_id("i".repeat(256))).await;
    assert!(refused.unwrap_err().to_string().contains("message id"));

    let sent = tokio::time::timeout(Duration::from_secs(10), broker.send(&destination, Message::new("next")))
        .await
        .expect("the next send returns");
    sent.expect("the next message goes through");
    let consumer = broker.consumer(&source, ConsumerOptions::default()).await.unwrap();
    let d = consumer.receive_one(Duration::from_secs(10)).await.unwrap().expect("the next message arrives");
    assert_eq!(&d.message().payload[..], b"next");
    d.ack().await.unwrap();
    assert!(consumer.receive_one(Duration::from_millis(300)).await.unwrap().is_none(), "nothing else arrived");
    broker.close().await.unwrap();
}
