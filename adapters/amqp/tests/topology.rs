//! Declaration modes and unroutable publishes, against the RabbitMQ server on this machine
//! (`scripts/brokers up`, or `$COURIER_TEST_AMQP`).

use courier_amqp::AmqpBroker;
use courier_core::{conformance::unique_name, Broker, Destination, Error, Message, Source};

mod common;
use common::{url, with_option};

#[tokio::test]
async fn verify_mode_names_what_is_missing_and_creates_nothing() {
    let verify = AmqpBroker::connect(&with_option("declare=verify")).await.unwrap();
    let queue = Source::queue(&unique_name("verify")).unwrap();
    match verify.declare(&queue).await {
        Err(Error::NotFound { kind: "queue", name }) => assert_eq!(Source::queue(&name).unwrap(), queue),
        other => panic!("expected NotFound, got {other:?}"),
    }
    let sub = Source::subscription(&unique_name("verify-topic"), "billing").unwrap();
    assert!(matches!(verify.declare(&sub).await, Err(Error::NotFound { kind: "topic", .. })));
    // The failed checks closed only their own channel: the broker still works.
    let create = AmqpBroker::connect(&url()).await.unwrap();
    create.declare(&queue).await.unwrap();
    create.declare(&sub).await.unwrap();
    verify.declare(&queue).await.expect("exists now");
    verify.declare(&sub).await.expect("exists now");
}

#[tokio::test]
async fn an_unroutable_send_is_an_error_not_a_loss() {
    let broker = AmqpBroker::connect(&url()).await.unwrap();
    let missing = Destination::queue(&unique_name("nowhere")).unwrap();
    let err = broker.send(&missing, Message::new("lost?")).await.unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    assert!(err.to_string().contains("unroutable") && err.to_string().contains("declare"), "{err}");
    // A topic nobody subscribes to.
    let topic = unique_name("lonely");
    broker.declare(&Source::subscription(&topic, "s").unwrap()).await.unwrap();
    broker.purge(&Source::subscription(&topic, "s").unwrap()).await.unwrap();
    let missing_topic = Destination::topic(&unique_name("no-topic")).unwrap();
    let err = broker.send(&missing_topic, Message::new("x")).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { kind: "topic", .. }), "{err}");
    // The publisher channel that the missing exchange closed is replaced transparently.
    broker.send(&Destination::topic(&topic).unwrap(), Message::new("fine")).await.expect("sends again");
}

#[tokio::test]
async fn quorum_queues_count_broker_redeliveries_as_attempts() {
    use courier_core::ConsumerOptions;
    use std::time::Duration;
    let broker = AmqpBroker::connect(&with_option("queue_type=quorum")).await.unwrap();
    let source = Source::queue(&unique_name("quorum")).unwrap();
    broker.declare(&source).await.unwrap();
    broker.send(&source.destination(), Message::new("replicated")).await.unwrap();
    for expected_attempt in 1..=3 {
        // A consumer that goes away unsettled: the broker counts the redelivery.
        let consumer = broker.consumer(&source, ConsumerOptions::default()).await.unwrap();
        let d = consumer.receive_one(Duration::from_secs(10)).await.unwrap().expect("delivered");
        assert_eq!(d.attempt(), expected_attempt);
        assert_eq!(d.header("x-delivery-count"), None, "broker bookkeeping stays hidden");
        if expected_attempt == 3 {
            d.retry().await.unwrap();
            let again = consumer.receive_one(Duration::from_secs(10)).await.unwrap().expect("retried");
            assert_eq!(again.attempt(), 4, "a retry continues the count");
            again.ack().await.unwrap();
        }
        consumer.close().await.unwrap();
    }
}
