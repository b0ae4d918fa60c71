//! `courier dlq redrive` sends a subscription's dead letters back to that subscription
//! alone, and to the source named on the command line whatever a header says, against
//! the RabbitMQ server `scripts/brokers up` starts (or `$COURIER_TEST_AMQP`).
#![cfg(feature = "amqp")]

use std::process::Command;

fn courier(url: &str, args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(args)
        .env("COURIER_BACKEND", url)
        .env_remove("COURIER_CONFIG")
        .output()
        .unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "courier {args:?} failed: {stderr}");
    (stdout, stderr)
}

#[test]
fn a_subscriptions_dead_letters_go_back_to_it_alone() {
    let url = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(courier_contract_tests::amqp_url());
    let topic = format!("redrive-{}", std::process::id());
    let (billing, shipping) = (format!("topic:{topic}/billing"), format!("topic:{topic}/shipping"));
    courier(&url, &["declare", &billing, &shipping]);
    // Two dead letters in billing's dead-letter queue: one of its own, and one whose
    // origin header names another queue (a header anyone writing there could set).
    let dlq = format!("queue:{topic}.billing.dlq");
    let origin = format!("courier-dead-letter-origin={billing}");
    courier(&url, &["send", "--to", &dlq, "own", "--header", &origin]);
    courier(&url, &["send", "--to", &dlq, "forged", "--header", "courier-dead-letter-origin=queue:elsewhere"]);

    let (_, said) = courier(&url, &["dlq", "redrive", "--from", &billing]);
    assert!(said.contains("redrove 2 message(s)"), "{said}");
    assert!(said.contains("names queue:elsewhere as its origin"), "{said}");
    let (got, _) = courier(&url, &["consume", "--from", &billing, "--count", "2", "--wait", "5"]);
    assert!(got.contains("own") && got.contains("forged"), "both went back to billing: {got}");
    let (other, said) = courier(&url, &["consume", "--from", &shipping, "--wait", "1"]);
    assert!(other.is_empty() && said.contains("0 message(s)"), "shipping got a copy: {other}");
}
