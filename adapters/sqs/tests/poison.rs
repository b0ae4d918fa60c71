//! A message Courier cannot decode costs that message a trip to the dead-letter queue,
//! never the receive it came in; a body that only claims to be base64 stays data. Against
//! the SQS server `scripts/brokers up` starts (moto), or `$COURIER_TEST_SQS`.

use std::collections::BTreeSet;
use std::time::Duration;

use aws_sdk_sqs::types::MessageAttributeValue;
use base64::Engine;
use courier_core::{conformance::unique_name, headers, Broker, ConsumerOptions, Source};
use courier_sqs::SqsBroker;

mod support;
use support::url;

/// The SDK used raw, as another producer would.
fn raw_client() -> aws_sdk_sqs::Client {
    // sqs://REGION?endpoint=URL
    let url = url();
    let region = url.trim_start_matches("sqs://").split(['/', '?']).next().unwrap().to_owned();
    let endpoint = url.split_once("endpoint=").expect("a local SQS endpoint").1.split('&').next().unwrap();
    let endpoint = endpoint.replace("%3A", ":").replace("%2F", "/");
    let conf = aws_sdk_sqs::Config::builder()
        .behavior_version_latest()
        .region(aws_sdk_sqs::config::Region::new(region))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_sqs::config::Credentials::new("courier-test", "courier-test", None, None, "test"))
        .build();
    aws_sdk_sqs::Client::from_conf(conf)
}

fn base64_claim() -> MessageAttributeValue {
    MessageAttributeValue::builder().data_type("String").string_value("base64").build().unwrap()
}

#[tokio::test]
async fn an_undecodable_message_is_dead_lettered_alone_and_the_rest_arrive() {
    support::test_credentials_unless_set();
    let broker = SqsBroker::connect(&url()).await.unwrap();
    let name = unique_name("poison");
    let source = Source::queue(&name).unwrap();
    broker.declare(&source).await.unwrap();
    let raw = raw_client();
    let queue_url = raw.get_queue_url().queue_name(&name).send().await.unwrap().queue_url.unwrap();
    let send = |body: String, claim: bool| {
        let mut send = raw.send_message().queue_url(&queue_url).message_body(body);
        if claim {
            send = send.message_attributes("courier-encoding", base64_claim());
        }
        send.send()
    };
    for i in 0..4 {
        send(format!("good {i}"), false).await.unwrap();
    }
    send("not base64!!".into(), true).await.unwrap();
    let forged = base64::engine::general_purpose::STANDARD.encode("plain words");
    send(forged.clone(), true).await.unwrap();

    let consumer = broker.consumer(&source, ConsumerOptions::default()).await.unwrap();
    let mut bodies = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while bodies.len() < 5 && tokio::time::Instant::now() < deadline {
        for d in consumer.receive(10, Duration::from_secs(1)).await.expect("a poison message never fails a receive") {
            if d.payload[..] == forged.as_bytes()[..] {
                assert_eq!(d.header("courier-encoding"), Some("base64"), "the claim stays, as data");
            }
            bodies.insert(String::from_utf8(d.payload.to_vec()).unwrap());
            d.ack().await.unwrap();
        }
    }
    let expected: BTreeSet<String> = (0..4).map(|i| format!("good {i}")).chain([forged]).collect();
    assert_eq!(bodies, expected, "every decodable message, the forged claim as it was sent");

    let dlq =
        broker.consumer(&Source::queue(&format!("{name}.dlq")).unwrap(), ConsumerOptions::default()).await.unwrap();
    let dead = dlq.receive_one(Duration::from_secs(10)).await.unwrap().expect("the poison message is dead-lettered");
    assert_eq!(&dead.payload[..], b"not base64!!", "as it arrived");
    let reason = dead.header(headers::DEAD_LETTER_REASON).unwrap_or_default();
    assert!(reason.contains("undecodable") && reason.contains("base64"), "{reason}");
    dead.ack().await.unwrap();
}
