//! Settlement that fails on Kafka: a dead letter the producer refuses (larger than
//! `message.max.bytes`, which the original was not) costs that message alone. The
//! partition's other keys keep flowing, no fetch loop ends, and the offset is never
//! committed past the unsettled message: it is delivered again afterwards, not lost.
//! Against the Kafka broker `scripts/brokers up` starts (or `$COURIER_TEST_KAFKA`).

use std::sync::Arc;
use std::time::Duration;

use courier::{App, RouteOptions};
use courier_contract_tests::{kafka_url, run_recording_orders};
use courier_core::{conformance::unique_name, ConsumerOptions, DynBroker, Message, Source};

const OTHERS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_dead_letter_holds_neither_the_partition_nor_other_keys() {
    let url = kafka_url().await;
    let sep = if url.contains('?') { '&' } else { '?' };
    // One partition, so every key shares it; records of 2,000 bytes at most.
    let url = format!("{url}{sep}partitions=1&message.max.bytes=2000");
    let broker: DynBroker = Arc::new(courier_kafka::KafkaBroker::connect(&url).await.unwrap());
    let source = Source::queue(&unique_name("refused-dl")).unwrap();
    broker.declare(&source).await.unwrap();
    let to = source.destination();

    // Not JSON, so the handler's decoding rejects it; it fits, its dead letter (the same
    // record plus reason, attempts and origin headers) does not.
    let poison = Message::new(vec![b'x'; 1_800]).with_ordering_key("bad").with_id("poison");
    broker.send(&to, poison).await.expect("the original fits");
    for n in 0..OTHERS {
        let m = Message::new(format!(r#"{{"n":{n}}}"#)).with_ordering_key(format!("k{}", n % 5));
        broker.send(&to, m).await.unwrap();
    }

    let app = App::new(broker.clone()).shutdown_grace(Duration::from_secs(2));
    let options = RouteOptions::default().concurrency(4);
    // `after`: long enough for the refused dead letter to be tried, failed and handed back.
    let (handled, run) =
        run_recording_orders(app, source.clone(), options, OTHERS, Duration::from_secs(60), Duration::from_secs(2))
            .await;
    let report = run.expect("the worker ran to the end");
    assert_eq!(handled.len(), OTHERS, "the partition's other keys flowed past the stuck one");
    assert_eq!(report.loops_ended_early, 0);
    assert_eq!(report.dead_lettered, 0, "the dead letter was refused: {report:?}");
    // Each failed settlement handed the message back, and it came again in the same run
    // (before, a receipt dropped unsettled kept its prefetch slot and never came back).
    assert!(report.settlements_failed >= 2, "handed back and tried again: {report:?}");

    // The offset was not committed past it: the group gets it again.
    let consumer = broker.consumer(&source, ConsumerOptions::default()).await.unwrap();
    let again = consumer.receive_one(Duration::from_secs(20)).await.unwrap().expect("the unsettled message again");
    assert_eq!(again.id.as_str(), "poison");
    consumer.close().await.unwrap();
}
