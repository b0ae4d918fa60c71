//! What the RabbitMQ test files share: where the broker is.

/// The RabbitMQ server `scripts/brokers up` starts, or `$COURIER_TEST_AMQP`.
pub fn url() -> String {
    std::env::var("COURIER_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// [`url`] with one more query option.
#[allow(dead_code)] // not every test file sets options
pub fn with_option(option: &str) -> String {
    let url = url();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{option}")
}
