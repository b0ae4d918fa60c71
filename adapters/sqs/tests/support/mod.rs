//! Helpers the SQS adapter's integration tests share.
#![allow(dead_code)] // each test file uses what it needs

/// The SQS server `scripts/brokers up` starts (moto), or `$COURIER_TEST_SQS`.
pub fn url() -> String {
    std::env::var("COURIER_TEST_SQS").unwrap_or_else(|_| "sqs://us-east-1?endpoint=http://127.0.0.1:4566".into())
}

/// Credentials for the SDK's default chain where none are set: a local server checks none,
/// but the SDK will not sign a request without them.
pub fn test_credentials_unless_set() {
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
        std::env::set_var("AWS_ACCESS_KEY_ID", "courier-test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "courier-test");
    }
}
