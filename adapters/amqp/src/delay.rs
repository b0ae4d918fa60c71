//! Delays without a plugin: bucketed TTL queues that dead-letter back to the target.
//!
//! RabbitMQ has no native delay (the `rabbitmq_delayed_message_exchange` plugin is
//! optional and not replicated). A delayed message goes to the fanout exchange
//! `courier.delay.<ms>`, whose durable queue of the same name holds it for exactly
//! `<ms>` (`x-message-ttl`) and then dead-letters it, with its original routing key, to the
//! default exchange, which puts it in the target queue. Per-message TTLs in one shared
//! queue would wait behind a longer-lived head message, so each bucket has one TTL and
//! expires strictly in order. Delays round *up* to the next bucket (1, 1.2, 1.5, 2, 2.5,
//! 3, 4, 5, 6 or 8 × 10ⁿ ms), so a message is never early and at most a third late.
//!
//! Topics use a second family, `courier.delay.topic.<ms>`, that dead-letters to the direct
//! exchange `courier.delay.topic`, to which each delayed-to topic's exchange is bound by
//! its own name.

use std::time::Duration;

/// The longest delay: the largest bucket fits RabbitMQ's 32-bit TTL with room to spare.
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where topic-bound delayed messages come back to.
pub(crate) const TOPIC_RETURN_EXCHANGE: &str = "courier.delay.topic";

const STEPS: [u64; 10] = [10, 12, 15, 20, 25, 30, 40, 50, 60, 80];

/// The bucket, in milliseconds, that holds a message for `delay` or a little longer. A
/// delay past [`MAX_DELAY`] (a `retry_after` may ask for any) waits [`MAX_DELAY`]: the
/// arithmetic would otherwise overflow, and RabbitMQ's TTL is 32 bits.
pub(crate) fn bucket_ms(delay: Duration) -> u64 {
    let ms = delay.min(MAX_DELAY).as_millis().max(1) as u64;
    let mut scale = 1u64; // STEPS are tenths of the decade
    loop {
        for step in STEPS {
            let bucket = step * scale / 10;
            if bucket >= ms && bucket > 0 {
                return bucket;
            }
        }
        scale *= 10;
    }
}

/// The exchange and queue name of a bucket.
pub(crate) fn bucket_name(ms: u64, for_topic: bool) -> String {
    if for_topic {
        format!("courier.delay.topic.{ms}")
    } else {
        format!("courier.delay.{ms}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_up_by_at_most_a_third() {
        for ms in [1u64, 2, 7, 10, 11, 99, 100, 101, 400, 499, 500, 999, 1_001, 6_001, 86_400_000, 604_800_000] {
            let b = bucket_ms(Duration::from_millis(ms));
            assert!(b >= ms, "{ms} -> {b}");
            assert!(b as f64 <= ms as f64 * 1.34 + 1.0, "{ms} -> {b}");
        }
        assert_eq!(bucket_ms(Duration::from_millis(400)), 400);
        assert_eq!(bucket_ms(Duration::ZERO), 1);
        assert!(bucket_ms(MAX_DELAY) < u32::MAX as u64, "fits x-message-ttl");
    }

    #[test]
    fn an_unbounded_delay_waits_the_longest_bucket_instead_of_overflowing() {
        for delay in [Duration::MAX, Duration::from_secs(u64::MAX / 1000), MAX_DELAY * 2] {
            assert_eq!(bucket_ms(delay), bucket_ms(MAX_DELAY));
        }
    }
}
