//! Exponential backoff with jitter, one rule for every retry in the operator
//! (the Bitbucket client, the sync loops and both reconcilers): the wait
//! doubles from `base` with each failure, is capped at `cap`, and is then
//! shortened by up to 20% at random so that retries spread out instead of
//! arriving together.

use std::time::Duration;

/// The wait before retry number `attempt` (1 for the first retry).
pub fn exponential(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let doubled = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    doubled.min(cap).mul_f64(0.8 + rand::random::<f64>() * 0.2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps_with_at_most_20_percent_jitter() {
        let (base, cap) = (Duration::from_secs(5), Duration::from_secs(300));
        for attempt in 1..40 {
            let ideal = base.saturating_mul(1 << (attempt - 1).min(20)).min(cap);
            let wait = exponential(base, cap, attempt);
            assert!(
                wait <= ideal && wait >= ideal.mul_f64(0.8),
                "attempt {attempt}: {wait:?} vs {ideal:?}"
            );
        }
        assert_eq!(exponential(Duration::ZERO, cap, 3), Duration::ZERO);
    }
}
