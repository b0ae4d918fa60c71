//! Helpers the Kafka adapter's tests share (the crate's unit tests include this file by
//! path too).

/// The Kafka broker on this machine (`scripts/brokers up`), or `$COURIER_TEST_KAFKA`;
/// one record a batch, so a test sees each send at once.
pub fn url() -> String {
    std::env::var("COURIER_TEST_KAFKA")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "kafka://127.0.0.1:9092?batch.num.messages=1".into())
}
