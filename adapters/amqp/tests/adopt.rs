//! Queues and exchanges that other applications declared, with their own settings, are
//! used as they are (`declare=adopt`, the default), against the RabbitMQ server on this
//! machine (`scripts/brokers up`, or `$COURIER_TEST_AMQP`).

use std::time::Duration;

use courier_amqp::AmqpBroker;
use courier_core::{conformance::unique_name, Broker, ConsumerOptions, Destination, Error, Message, Source};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

mod common;
use common::{url, with_option};

/// Another application: lapin used raw, as a pika or Bunny program would use its client.
struct OtherApp {
    _connection: Connection,
    channel: lapin::Channel,
}

impl OtherApp {
    async fn connect() -> Self {
        let connection =
            Connection::connect(&url(), ConnectionProperties::default()).await.expect("raw lapin connects");
        let channel = connection.create_channel().await.unwrap();
        channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        OtherApp { _connection: connection, channel }
    }

    /// `queue_declare(queue=name)` with the client's defaults: a transient classic queue.
    async fn declare_default_queue(&self, name: &str, args: FieldTable) {
        self.channel.queue_declare(name.into(), QueueDeclareOptions::default(), args).await.unwrap();
    }

    async fn publish(&self, exchange: &str, routing_key: &str, body: &str) {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }

    /// Whether `queue` exists, asked on a channel of its own (a 404 closes it).
    async fn queue_exists(&self, queue: &str) -> bool {
        let channel = self._connection.create_channel().await.unwrap();
        let options = QueueDeclareOptions { passive: true, ..Default::default() };
        channel.queue_declare(queue.into(), options, FieldTable::default()).await.is_ok()
    }

    /// Whether `queue` is transient: a non-passive declare succeeds only with equal settings.
    async fn queue_is_transient(&self, queue: &str) -> bool {
        let channel = self._connection.create_channel().await.unwrap();
        channel.queue_declare(queue.into(), QueueDeclareOptions::default(), FieldTable::default()).await.is_ok()
    }
}

async fn receive_text(broker: &AmqpBroker, source: &Source) -> Vec<String> {
    let consumer = broker.consumer(source, ConsumerOptions::default()).await.expect("the consumer opens");
    let mut texts = Vec::new();
    while let Some(d) = consumer.receive_one(Duration::from_secs(5)).await.unwrap() {
        texts.push(String::from_utf8(d.payload.to_vec()).unwrap());
        d.ack().await.unwrap();
        if texts.len() == 2 {
            break;
        }
    }
    consumer.close().await.unwrap();
    texts
}

#[tokio::test]
async fn a_queue_declared_with_a_clients_defaults_is_consumed_as_it_is() {
    let other = OtherApp::connect().await;
    let name = unique_name("hello");
    other.declare_default_queue(&name, FieldTable::default()).await;
    other.publish("", &name, "from the other app").await;

    // No option set: the transient queue is adopted, and its dead-letter queue made at start.
    let broker = AmqpBroker::connect(&url()).await.unwrap();
    let source = Source::queue(&name).unwrap();
    broker.declare(&source).await.expect("an existing queue is adopted, not refused");
    broker.send(&source.destination(), Message::new("from courier")).await.unwrap();
    assert_eq!(receive_text(&broker, &source).await, ["from the other app", "from courier"]);
    assert!(other.queue_exists(&format!("{name}.dlq")).await, "the dead-letter queue exists before any failure");
    assert!(other.queue_is_transient(&name).await, "the queue keeps its owner's settings");

    // Asking for Courier's exact settings still can: the error names the difference and the way out.
    let strict = AmqpBroker::connect(&with_option("declare=create")).await.unwrap();
    let err = strict.declare(&source).await.unwrap_err().to_string();
    assert!(err.contains("durable") && err.contains("declare=adopt"), "{err}");
    // And the refused declare cost only its own channel.
    strict.send(&source.destination(), Message::new("still works")).await.unwrap();
}

#[tokio::test]
async fn a_quorum_queue_with_its_own_dead_letter_exchange_is_adopted() {
    let other = OtherApp::connect().await;
    let name = unique_name("quorum-owned");
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(LongString::from("their-dlx")));
    let options = QueueDeclareOptions { durable: true, ..Default::default() };
    other.channel.queue_declare(name.as_str().into(), options, args).await.unwrap();
    other.publish("", &name, "replicated").await;

    let broker = AmqpBroker::connect(&url()).await.unwrap(); // classic by default
    assert_eq!(receive_text(&broker, &Source::queue(&name).unwrap()).await, ["replicated"]);
}

#[tokio::test]
async fn a_topic_exchange_made_elsewhere_feeds_a_subscription() {
    let other = OtherApp::connect().await;
    let topic = unique_name("events-owned");
    other
        .channel
        .exchange_declare(
            topic.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(), // transient, as the client makes it
            FieldTable::default(),
        )
        .await
        .unwrap();

    let broker = AmqpBroker::connect(&url()).await.unwrap();
    let source = Source::subscription(&topic, "billing").unwrap();
    broker.declare(&source).await.expect("the topic exchange is adopted");
    // The other app publishes with its routing keys; the subscription takes them all.
    other.publish(&topic, "orders.created", "routed by pattern").await;
    broker.send(&Destination::topic(&topic).unwrap(), Message::new("from courier")).await.unwrap();
    assert_eq!(receive_text(&broker, &source).await, ["routed by pattern", "from courier"]);
}

#[tokio::test]
async fn verify_mode_fails_at_start_naming_a_missing_dead_letter_queue() {
    let other = OtherApp::connect().await;
    let name = unique_name("verify-dlq");
    other.declare_default_queue(&name, FieldTable::default()).await;

    let verify = AmqpBroker::connect(&with_option("declare=verify")).await.unwrap();
    let source = Source::queue(&name).unwrap();
    verify.declare(&source).await.expect("the queue itself exists");
    match verify.consumer(&source, ConsumerOptions::default()).await {
        Err(e @ Error::NotFound { kind: "dead-letter queue", .. }) => {
            assert!(e.to_string().contains(&format!("{name}.dlq")), "{e}")
        }
        Err(other) => panic!("expected the missing dead-letter queue named, got {other}"),
        Ok(_) => panic!("expected the missing dead-letter queue named, got a consumer"),
    }
}

#[tokio::test]
async fn durable_false_makes_transient_queues() {
    let broker = AmqpBroker::connect(&with_option("durable=false")).await.unwrap();
    let name = unique_name("transient");
    broker.declare(&Source::queue(&name).unwrap()).await.unwrap();
    assert!(OtherApp::connect().await.queue_is_transient(&name).await);
}
