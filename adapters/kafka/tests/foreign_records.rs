//! Records written by producers that are not Courier, as Courier reads them: whatever a
//! foreign producer sends becomes a message (or that message's dead letter), never a
//! panic. Against the Kafka broker on this machine (`scripts/brokers up`, or
//! `$COURIER_TEST_KAFKA`).

use std::time::Duration;

use courier_core::conformance::unique_name;
use courier_core::{Broker, ConsumerOptions, Source};
use courier_kafka::KafkaBroker;
use rdkafka::message::{BorrowedHeaders, Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

mod support;
use support::url;

/// `host:port,…` of a `kafka://` URL, for a plain rdkafka client.
fn bootstrap(url: &str) -> String {
    let rest = url.strip_prefix("kafka://").expect("a kafka:// URL");
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    authority.rsplit_once('@').map_or(authority, |(_, hosts)| hosts).to_owned()
}

/// `headers` with one more header whose key is the raw bytes `key`. rdkafka's safe API
/// takes keys as `&str`, so this goes through librdkafka itself.
fn with_raw_key(headers: OwnedHeaders, key: &[u8], value: &[u8]) -> OwnedHeaders {
    // rdkafka's `BorrowedHeaders` is a view of librdkafka's `rd_kafka_headers_t`: the
    // reference's address is the native pointer (see rdkafka's `OwnedHeaders::as_borrowed`).
    let native = headers.as_borrowed() as *const BorrowedHeaders as *mut rdkafka_sys::RDKafkaHeaders;
    // SAFETY: `native` is the live headers list `headers` owns; librdkafka copies the key
    // and value (with the sizes given) before returning.
    let err = unsafe {
        rdkafka_sys::rd_kafka_header_add(
            native,
            key.as_ptr().cast(),
            key.len() as isize,
            value.as_ptr().cast(),
            value.len() as isize,
        )
    };
    assert_eq!(err, rdkafka_sys::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR);
    headers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_key_that_is_not_utf8_does_not_stop_its_record() {
    let url = url();
    let broker = KafkaBroker::connect(&url).await.unwrap();
    let queue = unique_name("foreign-key");
    let source = Source::queue(&queue).unwrap();
    broker.declare(&source).await.unwrap();
    let consumer = broker.consumer(&source, ConsumerOptions::default()).await.unwrap();

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap(&url))
        .set("batch.num.messages", "1")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("a plain rdkafka producer");
    let headers = OwnedHeaders::new().insert(Header { key: "tenant", value: Some("acme") });
    let headers = with_raw_key(headers, b"bad\xff\xfekey", b"value");
    let headers = headers.insert(Header { key: "after", value: Some("kept") });
    for (payload, headers) in [("foreign", Some(headers)), ("plain", None)] {
        let mut record = FutureRecord::<(), str>::to(&queue).payload(payload);
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).expect("the record is produced");
    }

    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while got.len() < 2 && tokio::time::Instant::now() < deadline {
        for d in consumer.receive(10, Duration::from_secs(1)).await.expect("receive works") {
            got.push((d.message().clone(), d.attempt()));
            d.ack().await.unwrap();
        }
    }
    assert_eq!(got.len(), 2, "both records arrive: {got:?}");
    got.sort_by(|a, b| a.0.payload.cmp(&b.0.payload));
    let (foreign, attempt) = &got[0];
    assert_eq!((&foreign.payload[..], *attempt), (&b"foreign"[..], 1));
    assert_eq!(foreign.header("tenant"), Some("acme"), "{:?}", foreign.headers);
    assert_eq!(foreign.header("after"), Some("kept"), "{:?}", foreign.headers);
    // The key that is not UTF-8 is skipped (see `courier_kafka`'s mapping): no header
    // carries its value.
    assert!(foreign.headers.values().all(|v| v != "value"), "{:?}", foreign.headers);
    assert_eq!(&got[1].0.payload[..], b"plain");
    consumer.close().await.unwrap();
    broker.close().await.unwrap();
}
