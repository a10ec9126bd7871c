//! Rate limiting (rolling window per credential) and fault injection.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `max_requests` per rolling `window`, counted per credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub max_requests: u32,
    pub window: Duration,
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}s", self.max_requests, self.window.as_secs_f64())
    }
}

impl FromStr for RateLimit {
    type Err = String;

    /// Parses `N/WINDOW` where WINDOW is a number (default 1) followed by a
    /// unit `ms`, `s`, `m` or `h`: `1000/1h`, `50/10s`, `100/1m`, `10/h`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || format!("invalid rate limit {s:?}: expected N/WINDOW like 1000/1h, 50/10s or 100/1m");
        let (n, w) = s.trim().split_once('/').ok_or_else(err)?;
        let max_requests: u32 = n.trim().parse().map_err(|_| err())?;
        if max_requests == 0 {
            return Err(format!("invalid rate limit {s:?}: N must be at least 1"));
        }
        let w = w.trim();
        let split = w.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
        let (num, unit) = w.split_at(split);
        let num: u64 = if num.is_empty() {
            1
        } else {
            num.parse().map_err(|_| err())?
        };
        let unit_ms: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(err()),
        };
        let window = Duration::from_millis(num.checked_mul(unit_ms).ok_or_else(err)?);
        if window.is_zero() {
            return Err(format!("invalid rate limit {s:?}: the window must be positive"));
        }
        Ok(RateLimit { max_requests, window })
    }
}

/// Rolling-window limiter keyed by credential.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    hits: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        RateLimiter {
            limit,
            hits: Mutex::new(HashMap::new()),
        }
    }

    /// Records a request at `now` for `key`. `Err(retry_after)` when the key
    /// already made `max_requests` requests in the last `window`; rejected
    /// requests are not counted.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut hits = self.hits.lock().unwrap_or_else(|e| e.into_inner());
        let q = hits.entry(key.to_string()).or_default();
        while let Some(&front) = q.front() {
            if now.saturating_duration_since(front) >= self.limit.window {
                q.pop_front();
            } else {
                break;
            }
        }
        if q.len() >= self.limit.max_requests as usize {
            let front = *q.front().expect("non-empty when over the limit");
            return Err((front + self.limit.window).saturating_duration_since(now));
        }
        q.push_back(now);
        Ok(())
    }
}

/// `Retry-After` seconds: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let ms = wait.as_millis() as u64;
    ms.div_ceil(1000).max(1)
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Whether request number `n` fails, and with which status. Deterministic
/// for a seed and request counter.
pub fn fault_for(seed: u64, n: u64, rate: f64) -> Option<u16> {
    if rate <= 0.0 {
        return None;
    }
    let h = splitmix64(seed ^ splitmix64(n));
    let u = (h >> 11) as f64 / (1u64 << 53) as f64;
    if u < rate {
        Some([500, 502, 503][(h % 3) as usize])
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rate_limits() {
        let p = |s: &str| s.parse::<RateLimit>();
        assert_eq!(
            p("1000/1h").unwrap(),
            RateLimit {
                max_requests: 1000,
                window: Duration::from_secs(3600)
            }
        );
        assert_eq!(p("50/10s").unwrap().window, Duration::from_secs(10));
        assert_eq!(p("100/1m").unwrap().window, Duration::from_secs(60));
        assert_eq!(p("5/h").unwrap().window, Duration::from_secs(3600));
        assert_eq!(p("5/250ms").unwrap().window, Duration::from_millis(250));
        for bad in ["", "1000", "x/1h", "10/1d", "0/1s", "10/0s", "10/s1", "-1/1s"] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rolling_window() {
        let rl = RateLimiter::new(RateLimit {
            max_requests: 2,
            window: Duration::from_secs(10),
        });
        let t0 = Instant::now();
        assert!(rl.check("a", t0).is_ok());
        assert!(rl.check("a", t0 + Duration::from_secs(4)).is_ok());
        let wait = rl.check("a", t0 + Duration::from_secs(5)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(5));
        assert_eq!(retry_after_secs(wait), 5);
        // Another credential has its own budget.
        assert!(rl.check("b", t0 + Duration::from_secs(5)).is_ok());
        // After the first hit leaves the window one slot frees.
        assert!(rl.check("a", t0 + Duration::from_secs(10)).is_ok());
        assert!(rl.check("a", t0 + Duration::from_secs(11)).is_err());
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
    }

    #[test]
    fn faults_are_deterministic_and_proportional() {
        let a: Vec<_> = (0..1000).map(|n| fault_for(7, n, 0.1)).collect();
        let b: Vec<_> = (0..1000).map(|n| fault_for(7, n, 0.1)).collect();
        assert_eq!(a, b);
        let failed = a.iter().filter(|f| f.is_some()).count();
        assert!((50..150).contains(&failed), "{failed}");
        assert!((0..100).all(|n| fault_for(1, n, 1.0).is_some()));
        assert!((0..100).all(|n| fault_for(1, n, 0.0).is_none()));
    }
}
