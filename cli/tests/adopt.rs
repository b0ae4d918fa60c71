//! `courier consume` on a queue another application declared with its client's
//! defaults (a Python program's `queue_declare(queue='hello')`: a transient classic
//! queue), with no option set: the queue is used as it is. The other application is
//! pika, run by `tests/interop/clients.py` (`scripts/brokers up` installs it).
#![cfg(feature = "amqp")]

use std::process::Command;

#[test]
fn courier_consume_reads_a_queue_pika_declared_with_defaults() {
    let url = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(courier_contract_tests::amqp_url());
    let queue = format!("hello-{}", std::process::id());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/interop/clients.py");
    let pika_url = url.split('?').next().unwrap();
    let sent = Command::new("python3").args([script, "pika-declare-send", pika_url, &queue, "hi from pika"]).output();
    let sent = sent.expect("python3 runs");
    assert!(sent.status.success(), "pika: {}", String::from_utf8_lossy(&sent.stderr));

    let out = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["consume", "--from", &format!("queue:{queue}"), "--count", "1"])
        .env("COURIER_BACKEND", &url)
        .env_remove("COURIER_CONFIG")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "courier consume failed: {stderr}");
    assert!(stdout.contains("hi from pika"), "{stdout}{stderr}");
    assert!(stderr.contains("1 message(s)"), "{stderr}");
}
