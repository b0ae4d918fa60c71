//! The queueing model of a route: how many handler slots a rate of traffic needs.
//!
//! A route with `c` concurrent handler slots, fed by arrivals at rate λ (messages per
//! second, Poisson) and taking a mean time `t` per message (exponentially distributed,
//! so a slot's service rate is μ = 1/t), is an M/M/c queue. Its utilisation is
//! ρ = λ/(c·μ); while ρ < 1 the mean number of messages waiting is
//! Lq = C(c, λ/μ)·ρ/(1−ρ), where C is the Erlang C probability that a message has to
//! wait, and the mean wait is Wq = Lq/λ (Little's law). With one slot, C = ρ and these are
//! the M/M/1 formulas Lq = ρ²/(1−ρ) and Wq = Lq/λ.
//!
//! ```
//! use std::time::Duration;
//! use courier::queueing::Queue;
//!
//! // 80 messages a second, 10 ms each, one slot: 80% busy, 3.2 waiting, 40 ms wait.
//! let p = Queue::new(80.0, Duration::from_millis(10), 1).predict().unwrap();
//! assert!((p.utilisation - 0.8).abs() < 1e-9);
//! assert!((p.queue_length - 3.2).abs() < 1e-9);
//! assert!((p.queue_wait.as_secs_f64() - 0.040).abs() < 1e-9);
//!
//! // Two slots: 40% busy, and a message waits about 1.9 ms on average.
//! let p = Queue::new(80.0, Duration::from_millis(10), 2).predict().unwrap();
//! assert!((p.queue_wait.as_secs_f64() - 0.001905).abs() < 1e-6);
//! ```

use std::time::Duration;

/// An M/M/c queue: Poisson arrivals, exponential service times, `servers` slots.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Queue {
    /// λ: arrivals per second.
    pub arrival_rate: f64,
    /// t: the mean time one slot takes per message (μ = 1/t).
    pub service_time: Duration,
    /// c: handler slots working at once (a route's concurrency).
    pub servers: u32,
}

/// What the model predicts for a stable queue (ρ < 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// ρ = λ/(c·μ): the share of time a slot is busy.
    pub utilisation: f64,
    /// C(c, λ/μ): the probability that an arriving message waits for a slot.
    pub wait_probability: f64,
    /// Lq: mean number of messages waiting (not counting those being handled).
    pub queue_length: f64,
    /// Wq: mean time a message waits before a slot takes it.
    pub queue_wait: Duration,
}

impl Queue {
    /// A queue with `servers` slots, fed at `arrival_rate` per second, `service_time` each.
    pub fn new(arrival_rate: f64, service_time: Duration, servers: u32) -> Self {
        Queue { arrival_rate, service_time, servers }
    }

    /// μ: messages per second one slot handles.
    pub fn service_rate(&self) -> f64 {
        1.0 / self.service_time.as_secs_f64()
    }

    /// ρ = λ/(c·μ). At 1 or more the queue grows without bound.
    pub fn utilisation(&self) -> f64 {
        self.arrival_rate * self.service_time.as_secs_f64() / f64::from(self.servers.max(1))
    }

    /// The steady state, or `None` when there is none: ρ ≥ 1 (the queue only grows), no
    /// slots, no arrivals, or a zero service time.
    pub fn predict(&self) -> Option<Prediction> {
        let (lambda, c) = (self.arrival_rate, self.servers);
        let rho = self.utilisation();
        if !(lambda > 0.0 && lambda.is_finite()) || c == 0 || self.service_time.is_zero() || rho >= 1.0 {
            return None;
        }
        // Erlang B by its recurrence (no factorials, no overflow), then Erlang C from it.
        let offered = lambda * self.service_time.as_secs_f64(); // a = λ/μ
        let mut blocking = 1.0;
        for k in 1..=c {
            blocking = offered * blocking / (f64::from(k) + offered * blocking);
        }
        let wait_probability = blocking / (1.0 - rho * (1.0 - blocking));
        let queue_length = wait_probability * rho / (1.0 - rho);
        Some(Prediction {
            utilisation: rho,
            wait_probability,
            queue_length,
            queue_wait: Duration::from_secs_f64(queue_length / lambda),
        })
    }
}

/// Slots needed for a rate: the model for c = 1, 2, … until the wait is met.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Each c tried, with its prediction (`None` while ρ ≥ 1).
    pub rows: Vec<(u32, Option<Prediction>)>,
    /// The smallest c whose mean wait is within the bound asked for (or, with no bound,
    /// the smallest stable c).
    pub enough: Option<u32>,
}

/// The plan for `arrival_rate` messages a second taking `service_time` each: c from 1 up
/// to the first c whose mean wait is at most `max_wait` (with no bound, the first stable
/// c), and two more to show the trend; at most 10,000 slots.
pub fn plan(arrival_rate: f64, service_time: Duration, max_wait: Option<Duration>) -> Plan {
    let mut rows = Vec::new();
    let mut enough = None;
    if !(arrival_rate > 0.0 && arrival_rate.is_finite()) || service_time.is_zero() {
        return Plan { rows, enough };
    }
    for c in 1..=10_000u32 {
        let prediction = Queue::new(arrival_rate, service_time, c).predict();
        let meets = prediction.is_some_and(|p| max_wait.is_none_or(|w| p.queue_wait <= w));
        if meets && enough.is_none() {
            enough = Some(c);
        }
        rows.push((c, prediction));
        if enough.is_some_and(|e| c >= e + 2) {
            break;
        }
    }
    Plan { rows, enough }
}

/// FaaS capacity: `n` instances each taking `invocation` per message handle P = n/t a
/// second; this is the smallest n with P ≥ `arrival_rate` (`None` for no or endless rate).
pub fn faas_instances(arrival_rate: f64, invocation: Duration) -> Option<u64> {
    let n = (arrival_rate * invocation.as_secs_f64()).ceil();
    (n.is_finite() && n >= 0.0).then_some(n.max(1.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn one_slot_is_mm1() {
        for rho in [0.1, 0.5, 0.8, 0.9, 0.99] {
            let q = Queue::new(rho * 100.0, Duration::from_millis(10), 1);
            let p = q.predict().unwrap();
            assert!(close(p.utilisation, rho));
            assert!(close(p.wait_probability, rho), "C(1, ρ) = ρ");
            assert!(close(p.queue_length, rho * rho / (1.0 - rho)), "Lq = ρ²/(1−ρ)");
            assert!(close(p.queue_wait.as_secs_f64(), p.queue_length / (rho * 100.0)), "Wq = Lq/λ");
        }
    }

    #[test]
    fn erlang_c_matches_the_textbook_sum() {
        // C(c, a) = (a^c/c!)·(c/(c−a)) / (Σ_{k<c} a^k/k! + (a^c/c!)·(c/(c−a))).
        for (c, a) in [(2u32, 1.5), (4, 3.2), (8, 7.0), (16, 12.0)] {
            let mut term = 1.0; // a^k/k!
            let mut sum = 0.0;
            for k in 0..c {
                sum += term;
                term *= a / f64::from(k + 1);
            }
            let last = term * f64::from(c) / (f64::from(c) - a);
            let expected = last / (sum + last);
            let p = Queue::new(a, Duration::from_secs(1), c).predict().unwrap();
            assert!((p.wait_probability - expected).abs() < 1e-12, "c={c} a={a}: {} vs {expected}", p.wait_probability);
        }
    }

    #[test]
    fn unstable_and_degenerate_queues_have_no_steady_state() {
        assert_eq!(Queue::new(100.0, Duration::from_millis(10), 1).predict(), None, "ρ = 1");
        assert_eq!(Queue::new(500.0, Duration::from_millis(10), 4).predict(), None, "ρ > 1");
        assert_eq!(Queue::new(10.0, Duration::from_millis(10), 0).predict(), None, "no slots");
        assert_eq!(Queue::new(0.0, Duration::from_millis(10), 1).predict(), None, "no arrivals");
        assert_eq!(Queue::new(f64::NAN, Duration::from_millis(10), 1).predict(), None);
        assert_eq!(Queue::new(f64::INFINITY, Duration::from_millis(10), 1).predict(), None);
        assert_eq!(Queue::new(10.0, Duration::ZERO, 1).predict(), None);
        // Many slots: no overflow.
        let p = Queue::new(9_000.0, Duration::from_secs(1), 10_000).predict().unwrap();
        assert!(p.wait_probability.is_finite() && p.wait_probability < 1e-6);
    }

    #[test]
    fn the_plan_stops_at_the_smallest_c_meeting_the_wait() {
        let plan = plan(80.0, Duration::from_millis(10), Some(Duration::from_millis(5)));
        assert_eq!(plan.enough, Some(2), "c = 1 waits 40 ms, c = 2 about 1.9 ms");
        assert_eq!(plan.rows.len(), 4);
        let plan = super::plan(250.0, Duration::from_millis(10), None);
        assert_eq!(plan.enough, Some(3), "the first stable c");
        assert!(plan.rows[..2].iter().all(|(_, p)| p.is_none()));
        assert_eq!(super::plan(f64::NAN, Duration::from_millis(10), None).enough, None);
    }

    #[test]
    fn faas_needs_n_of_rate_times_t() {
        assert_eq!(faas_instances(80.0, Duration::from_millis(10)), Some(1));
        assert_eq!(faas_instances(1000.0, Duration::from_millis(250)), Some(250));
        assert_eq!(faas_instances(1000.0, Duration::from_micros(250_100)), Some(251));
        assert_eq!(faas_instances(f64::INFINITY, Duration::from_millis(1)), None);
    }
}
