//! The failure policy of a consumer: how many deliveries a message gets and how far
//! apart, before it goes to the dead-letter destination.

use std::time::Duration;

/// How often and how far apart a failing message is retried before it is dead-lettered.
///
/// One value, one owner: a consumer carries its policy in
/// [`ConsumerOptions::retry`](crate::ConsumerOptions::retry), and every [`Receipt`](crate::Receipt)
/// of that consumer decides retry versus dead letter from it. A backend never decides; it
/// uses [`SettlePolicy::is_last`](crate::SettlePolicy::is_last) with the same value where only it can
/// count attempts (a lease that expired).
///
/// ```
/// use std::time::Duration;
/// use courier_core::RetryPolicy;
///
/// let policy = RetryPolicy::default().max_attempts(4).backoff(Duration::from_millis(100), Duration::from_secs(10));
/// assert!(policy.is_last(4));
/// let delay = policy.delay_after(2); // second failure: about 200 ms, jittered
/// assert!(delay >= Duration::from_millis(100) && delay <= Duration::from_millis(200));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Deliveries in all, including the first. At least 1; `u32::MAX` retries forever.
    pub max_attempts: u32,
    /// The delay after the first failure.
    pub initial_backoff: Duration,
    /// The longest delay.
    pub max_backoff: Duration,
    /// Each failure multiplies the delay by this.
    pub multiplier: f64,
    /// Randomise each delay into its upper half, so retries of many messages spread out.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(300),
            multiplier: 2.0,
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// Sets the attempt limit.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Retries forever: no delivery is the last (a poison message then never leaves
    /// its source unless a handler rejects it).
    pub fn unlimited_attempts(mut self) -> Self {
        self.max_attempts = u32::MAX;
        self
    }

    /// Sets the first and the longest delay.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// Turns jitter off, for predictable timings in tests and demos.
    pub fn without_jitter(mut self) -> Self {
        self.jitter = false;
        self
    }

    /// Whether delivery number `attempt` is the last one allowed.
    pub fn is_last(&self, attempt: u32) -> bool {
        attempt >= self.max_attempts
    }

    /// The delay before redelivering a message whose delivery number `attempt` failed.
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let exp = self.multiplier.powi(attempt.saturating_sub(1).min(64) as i32);
        let full = self.initial_backoff.as_secs_f64() * exp;
        let capped = full.min(self.max_backoff.as_secs_f64());
        let secs = if self.jitter { capped * rand::Rng::gen_range(&mut rand::thread_rng(), 0.5..=1.0) } else { capped };
        // Past what a Duration holds (an unbounded max backoff): the longest allowed.
        Duration::try_from_secs_f64(secs).unwrap_or(self.max_backoff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_then_caps() {
        let p = RetryPolicy::default().backoff(Duration::from_millis(100), Duration::from_secs(1)).without_jitter();
        let delays: Vec<_> = (1..=6).map(|a| p.delay_after(a).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn an_unbounded_backoff_saturates_instead_of_panicking() {
        let p = RetryPolicy::default().backoff(Duration::from_secs(10), Duration::MAX).without_jitter();
        assert!(p.delay_after(u32::MAX) >= Duration::from_secs(10 * (1 << 40)));
        let p = RetryPolicy::default().backoff(Duration::MAX, Duration::MAX);
        assert!(p.delay_after(1) > Duration::from_secs(1 << 40));
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        let p = RetryPolicy::default().backoff(Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..100 {
            let d = p.delay_after(3);
            assert!(d >= Duration::from_secs(2) && d <= Duration::from_secs(4), "{d:?}");
        }
    }
}
