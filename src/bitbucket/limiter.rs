//! Request pacing shared by every client that uses the same credential.
//!
//! Bitbucket counts requests per credential over a *rolling* hour (1,000 by
//! default). A token bucket (GCRA, as in `governor`) would allow a full burst
//! plus the refill within one window, nearly twice the limit, so this is an
//! exact sliding log instead: at most `max_requests` start times inside any
//! `window`. The log holds at most `max_requests` instants, a few KiB.
//!
//! The limiter also caps requests in flight and, after a 429, pauses every
//! caller sharing it until `Retry-After` has passed, so one throttled request
//! does not let its siblings keep hammering the API.
//!
//! Sharing is keyed by the *whole* credential (origin and secret included,
//! see [`crate::bitbucket::Credentials::limiter_key`]), never by a username
//! alone: otherwise a tenant could name someone else's username with a fake
//! token and a tiny budget and throttle the victim. Each sharer registers
//! its own settings through a [`LimiterShare`]; the strictest of them apply
//! (fewest requests, longest window, fewest in flight), and a sharer's
//! settings stop counting when it is dropped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Pacing settings for one credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests allowed in any rolling `window`.
    pub max_requests: u32,
    pub window: Duration,
    /// Requests in flight at once.
    pub max_in_flight: usize,
}

impl Default for Limits {
    /// Bitbucket's documented default: 1,000 requests per rolling hour. Four
    /// in flight keeps a sync quick without bursting.
    fn default() -> Self {
        Limits {
            max_requests: 1000,
            window: Duration::from_secs(3600),
            max_in_flight: 4,
        }
    }
}

/// A sliding-window limiter plus an in-flight cap.
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<State>,
    in_flight: Arc<Semaphore>,
}

#[derive(Debug)]
struct State {
    /// The limits in force: the strictest of `requested`, else `base`.
    limits: Limits,
    /// What [`Limiter::new`] was given; used while nobody shares it.
    base: Limits,
    /// Each sharer's settings, by share id.
    requested: BTreeMap<u64, Limits>,
    /// Start times of the requests in the current window, oldest first.
    log: VecDeque<Instant>,
    /// No request starts before this (set after a 429).
    paused_until: Option<Instant>,
    /// Permits the semaphore should hold in all (in flight or free), to
    /// resize it on reconfigure.
    in_flight_permits: usize,
    /// Permits still to be retired after a reduction while they were in use:
    /// each comes back from a finished request and is forgotten then.
    in_flight_deficit: usize,
}

/// Held while a request is in flight. Dropping it frees the in-flight slot
/// and moves the request's entry in the log from its start to its end: the
/// server saw the request somewhere in between, so counting from the end keeps
/// the client's window behind the server's, whatever the network delay.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<Limiter>,
    started: Instant,
    in_flight: Option<OwnedSemaphorePermit>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = self.limiter.lock();
        if let Some(index) = state.log.iter().position(|&t| t == self.started) {
            state.log.remove(index);
            // Every entry is at or before now, so the log stays ordered.
            state.log.push_back(Instant::now());
        }
        if state.in_flight_deficit > 0
            && let Some(permit) = self.in_flight.take()
        {
            permit.forget();
            state.in_flight_deficit -= 1;
        }
    }
}

impl Limiter {
    pub fn new(limits: Limits) -> Self {
        let limits = sanitize(limits);
        Limiter {
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
            state: Mutex::new(State {
                limits,
                base: limits,
                requested: BTreeMap::new(),
                log: VecDeque::new(),
                paused_until: None,
                in_flight_permits: limits.max_in_flight,
                in_flight_deficit: 0,
            }),
        }
    }

    /// A share of the limiter for `key` (a credential's
    /// [`limiter_key`](crate::bitbucket::Credentials::limiter_key)), shared
    /// process-wide with every other client presenting the same credential,
    /// with this sharer's `limits` registered: the strictest registered
    /// settings apply. The registry keeps a limiter while anyone uses it or
    /// its window still holds requests, so a client rebuilt within the hour
    /// (a connector suspended and resumed, a Secret briefly missing) does
    /// not start with a fresh budget.
    pub fn share(key: &str, limits: Limits) -> LimiterShare {
        static REGISTRY: LazyLock<Mutex<HashMap<String, Arc<Limiter>>>> = LazyLock::new(Default::default);
        static NEXT_SHARE: AtomicU64 = AtomicU64::new(1);
        let limiter = {
            let mut registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
            registry.retain(|_, limiter| Arc::strong_count(limiter) > 1 || limiter.used_in_window() > 0);
            Arc::clone(
                registry
                    .entry(key.to_owned())
                    .or_insert_with(|| Arc::new(Limiter::new(limits))),
            )
        };
        let id = NEXT_SHARE.fetch_add(1, Ordering::Relaxed);
        limiter.register(id, Some(limits));
        LimiterShare { limiter, id }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.lock().limits
    }

    /// Records (or with `None` forgets) one sharer's settings and applies
    /// the strictest of all.
    fn register(&self, share: u64, limits: Option<Limits>) {
        let mut state = self.lock();
        match limits {
            Some(limits) => state.requested.insert(share, sanitize(limits)),
            None => state.requested.remove(&share),
        };
        let effective = state
            .requested
            .values()
            .copied()
            .reduce(strictest)
            .unwrap_or(state.base);
        self.apply(&mut state, effective);
    }

    /// Applies new limits (while nobody shares the limiter; with sharers,
    /// their settings decide). Requests already logged still count.
    pub fn reconfigure(&self, limits: Limits) {
        let limits = sanitize(limits);
        let mut state = self.lock();
        if state.requested.is_empty() {
            state.base = limits;
            self.apply(&mut state, limits);
        }
    }

    fn apply(&self, state: &mut State, limits: Limits) {
        state.limits = limits;
        // Undo a pending reduction first, then grow or shrink.
        let effective = state.in_flight_permits - state.in_flight_deficit;
        if limits.max_in_flight > effective {
            let mut grow = limits.max_in_flight - effective;
            let cancelled = grow.min(state.in_flight_deficit);
            state.in_flight_deficit -= cancelled;
            grow -= cancelled;
            self.in_flight.add_permits(grow);
            state.in_flight_permits += grow;
        } else if limits.max_in_flight < effective {
            let surplus = effective - limits.max_in_flight;
            // Free permits go now; those in use go as their requests finish.
            let forgotten = self.in_flight.forget_permits(surplus);
            state.in_flight_permits -= forgotten;
            state.in_flight_deficit += surplus - forgotten;
        }
    }

    /// Waits for an in-flight slot and for room in the window, then records
    /// the request.
    pub async fn acquire(self: &Arc<Self>) -> Permit {
        let in_flight = Arc::clone(&self.in_flight)
            .acquire_owned()
            .await
            .expect("the limiter's semaphore is never closed");
        loop {
            let wait_until = {
                let mut state = self.lock();
                let now = Instant::now();
                match state.next_slot(now) {
                    None => {
                        state.log.push_back(now);
                        return Permit {
                            limiter: Arc::clone(self),
                            started: now,
                            in_flight: Some(in_flight),
                        };
                    }
                    Some(at) => at,
                }
            };
            tokio::time::sleep_until(wait_until).await;
        }
    }

    /// Stops every caller from starting a request before `until` (after a 429).
    pub fn pause_until(&self, until: Instant) {
        let mut state = self.lock();
        if state.paused_until.is_none_or(|current| current < until) {
            state.paused_until = Some(until);
        }
    }

    /// Requests recorded in the current window.
    pub fn used_in_window(&self) -> usize {
        let mut state = self.lock();
        let now = Instant::now();
        state.expire(now);
        state.log.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn expire(&mut self, now: Instant) {
        while let Some(&oldest) = self.log.front() {
            if now.saturating_duration_since(oldest) >= self.limits.window {
                self.log.pop_front();
            } else {
                break;
            }
        }
    }

    /// `None` if a request may start now, else when to look again.
    fn next_slot(&mut self, now: Instant) -> Option<Instant> {
        if let Some(until) = self.paused_until {
            if now < until {
                return Some(until);
            }
            self.paused_until = None;
        }
        self.expire(now);
        if self.log.len() < self.limits.max_requests as usize {
            return None;
        }
        // The window is full: the slot frees when the request that makes the
        // log exceed the limit leaves the window.
        let excess = self.log.len() - self.limits.max_requests as usize;
        self.log.get(excess).map(|&t| t + self.limits.window)
    }
}

/// One sharer's hold on a shared [`Limiter`]: its settings count while it
/// lives.
#[derive(Debug)]
pub struct LimiterShare {
    limiter: Arc<Limiter>,
    id: u64,
}

impl LimiterShare {
    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    /// Replaces this sharer's settings; the strictest of all sharers apply.
    pub fn set_limits(&self, limits: Limits) {
        self.limiter.register(self.id, Some(limits));
    }
}

impl Drop for LimiterShare {
    fn drop(&mut self) {
        self.limiter.register(self.id, None);
    }
}

/// The stricter of two settings in every part.
fn strictest(a: Limits, b: Limits) -> Limits {
    Limits {
        max_requests: a.max_requests.min(b.max_requests),
        window: a.window.max(b.window),
        max_in_flight: a.max_in_flight.min(b.max_in_flight),
    }
}

fn sanitize(limits: Limits) -> Limits {
    Limits {
        max_requests: limits.max_requests.max(1),
        window: limits.window.max(Duration::from_millis(1)),
        max_in_flight: limits.max_in_flight.clamp(1, 1024),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn never_exceeds_the_rolling_window() {
        let limiter = Limiter::new(Limits {
            max_requests: 5,
            window: Duration::from_secs(10),
            max_in_flight: 100,
        });
        let limiter = Arc::new(limiter);
        let start = Instant::now();
        let mut starts = Vec::new();
        for _ in 0..12 {
            let _permit = limiter.acquire().await;
            starts.push(Instant::now() - start);
        }
        // Any 10 s window holds at most 5 starts.
        for (i, &t) in starts.iter().enumerate() {
            let in_window = starts[i..].iter().filter(|&&s| s < t + Duration::from_secs(10)).count();
            assert!(in_window <= 5, "window at {t:?} holds {in_window}");
        }
        assert_eq!(starts[4], Duration::ZERO);
        assert_eq!(starts[5], Duration::from_secs(10));
        assert_eq!(starts[10], Duration::from_secs(20));
    }

    #[tokio::test(start_paused = true)]
    async fn window_counts_from_the_end_of_a_request() {
        let limiter = Arc::new(Limiter::new(Limits {
            max_requests: 1,
            window: Duration::from_secs(10),
            max_in_flight: 10,
        }));
        let start = Instant::now();
        let permit = limiter.acquire().await;
        tokio::time::sleep(Duration::from_secs(3)).await; // a slow response
        drop(permit);
        let _next = limiter.acquire().await;
        assert_eq!(Instant::now() - start, Duration::from_secs(13));
    }

    #[tokio::test(start_paused = true)]
    async fn caps_requests_in_flight() {
        let limiter = Arc::new(Limiter::new(Limits {
            max_requests: 1000,
            window: Duration::from_secs(1),
            max_in_flight: 2,
        }));
        let a = limiter.acquire().await;
        let _b = limiter.acquire().await;
        let third = tokio::spawn({
            let limiter = Arc::clone(&limiter);
            async move { limiter.acquire().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!third.is_finished(), "a third request started while two were in flight");
        drop(a);
        tokio::time::timeout(Duration::from_secs(1), third)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn pause_holds_back_every_caller() {
        let limiter = Arc::new(Limiter::new(Limits::default()));
        let start = Instant::now();
        limiter.pause_until(start + Duration::from_secs(7));
        let _permit = limiter.acquire().await;
        assert!(Instant::now() - start >= Duration::from_secs(7));
    }

    #[test]
    fn shared_by_key_and_the_strictest_settings_apply() {
        let a = Limiter::share("test-identity-a", Limits::default());
        let b = Limiter::share(
            "test-identity-a",
            Limits {
                max_requests: 7,
                window: Duration::from_secs(60),
                max_in_flight: 9,
            },
        );
        let c = Limiter::share("test-identity-c", Limits::default());
        assert!(Arc::ptr_eq(a.limiter(), b.limiter()));
        assert!(!Arc::ptr_eq(a.limiter(), c.limiter()));
        let both = a.limiter().limits();
        assert_eq!(
            (both.max_requests, both.window, both.max_in_flight),
            (7, Duration::from_secs(3600), 4),
            "fewest requests, longest window, fewest in flight"
        );
        b.set_limits(Limits {
            max_requests: 5000,
            ..Limits::default()
        });
        assert_eq!(
            a.limiter().limits().max_requests,
            1000,
            "raising one share cannot lift another's"
        );
        drop(a);
        assert_eq!(
            b.limiter().limits().max_requests,
            5000,
            "a dropped share stops counting"
        );
        assert_eq!(c.limiter().limits(), Limits::default());
    }

    #[tokio::test(start_paused = true)]
    async fn shrinking_while_requests_are_in_flight_takes_effect_as_they_finish() {
        let limiter = Arc::new(Limiter::new(Limits {
            max_in_flight: 3,
            ..Limits::default()
        }));
        let held: Vec<_> = futures::future::join_all((0..3).map(|_| limiter.acquire())).await;
        limiter.reconfigure(Limits {
            max_in_flight: 1,
            ..Limits::default()
        });
        drop(held);
        let _one = limiter.acquire().await;
        let second = tokio::time::timeout(Duration::from_secs(1), limiter.acquire()).await;
        assert!(second.is_err(), "only one request in flight after shrinking to 1");
    }

    #[test]
    fn a_rebuilt_client_keeps_the_window_of_its_credential() {
        let limits = Limits {
            max_requests: 5,
            ..Limits::default()
        };
        let first = Limiter::share("test-identity-window", limits);
        first.limiter().lock().log.push_back(Instant::now());
        drop(first);
        let again = Limiter::share("test-identity-window", limits);
        assert_eq!(
            again.limiter().used_in_window(),
            1,
            "the request made before the rebuild still counts"
        );
    }

    #[tokio::test]
    async fn reconfigure_resizes_in_flight() {
        let limiter = Limiter::new(Limits {
            max_in_flight: 1,
            ..Limits::default()
        });
        let limiter = Arc::new(limiter);
        limiter.reconfigure(Limits {
            max_in_flight: 3,
            ..Limits::default()
        });
        let _a = limiter.acquire().await;
        let _b = limiter.acquire().await;
        let _c = limiter.acquire().await;
        assert_eq!(limiter.used_in_window(), 3);
    }
}
