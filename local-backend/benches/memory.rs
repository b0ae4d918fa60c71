//! Resident memory of 1,000,000 queued 100-byte messages in the in-process backend.
//!
//! `cargo bench -p courier-local --bench memory` (Linux: reads VmRSS from /proc).

use courier_core::{Broker, Message, Source};
use courier_local::LocalBroker;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("VmRSS line");
    kb * 1024
}

fn main() {
    let count: usize = std::env::var("BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let broker = LocalBroker::new();
        let source = Source::queue("memory").unwrap();
        broker.declare(&source).await.unwrap();
        let before = rss_bytes();
        let dest = source.destination();
        for chunk in 0..count / 1000 {
            let batch = (0..1000)
                .map(|i| {
                    let mut payload = vec![0u8; 100];
                    payload[..8].copy_from_slice(&((chunk * 1000 + i) as u64).to_le_bytes());
                    Message::new(payload)
                })
                .collect();
            broker.send_batch(&dest, batch).await.unwrap();
        }
        let after = rss_bytes();
        let depth = broker.stats(&source).await.unwrap().depth;
        assert_eq!(depth as usize, count / 1000 * 1000);
        println!("| queued 100-byte messages | RSS before | RSS after | growth | per message |");
        println!("|---:|---:|---:|---:|---:|");
        println!(
            "| {depth} | {:.1} MB | {:.1} MB | {:.1} MB | {} bytes |",
            before as f64 / 1e6,
            after as f64 / 1e6,
            (after - before) as f64 / 1e6,
            (after - before) / depth
        );
    });
}
