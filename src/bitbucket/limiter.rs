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
//! # Lanes
//!
//! Every request travels in a [`Lane`]. Grants, revokes and expiries
//! ([`Lane::Provisioning`]) must not wait behind an hour of sync pages: an
//! expiring grant is a promise to a person. So:
//!
//! - **A reserved share of the budget.** Sync requests may start only while
//!   fewer than `max_requests - reserved` requests are in the window, where
//!   `reserved` is the [`ProvisioningReserve`] (default 10 %) of the budget,
//!   rounded down (and sync always keeps at least one request). Provisioning
//!   may use the whole budget. A sync that spends its share therefore leaves
//!   `reserved` requests for revokes, whatever it does.
//! - **First in line.** While any provisioning request waits (for budget, for
//!   an in-flight slot, or for a 429 pause to end), no sync request starts;
//!   when a slot frees, a provisioning request takes it.
//! - **After a 429, provisioning honours the pause.** Bitbucket said stop for
//!   the whole credential, and does not say whether refused requests count
//!   (API-CONTRACT section 6 documents neither `Retry-After` nor a reset
//!   header), so a probe before `Retry-After` could only earn another 429 and
//!   possibly lengthen the wait. Provisioning waits out the pause like
//!   everyone, and is first in line when it ends: its lateness is bounded by
//!   `Retry-After` plus its own requests (see BENCHMARKS.md).
//!
//! Sharing is keyed by the *whole* credential (origin and secret included,
//! see [`crate::bitbucket::Credentials::limiter_key`]), never by a username
//! alone: otherwise a tenant could name someone else's username with a fake
//! token and a tiny budget and throttle the victim. Each sharer registers
//! its own settings through a [`LimiterShare`]; the strictest of them apply
//! (fewest requests, longest window, fewest in flight), and a sharer's
//! settings stop counting when it is dropped. The reserve is the operator's
//! (one process-wide setting, [`set_default_provisioning_reserve`]): a tenant
//! cannot lower it for a shared credential.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Which queue a request waits in (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Lane {
    /// Inventory reads: may use the budget less the provisioning reserve.
    #[default]
    Sync,
    /// Grants, revokes, restores and expiries: the whole budget, first in line.
    Provisioning,
}

impl Lane {
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Sync => "sync",
            Lane::Provisioning => "provisioning",
        }
    }
}

impl fmt::Display for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The share of each credential's budget that sync requests leave to
/// provisioning: a fraction from 0 to 0.5 (`0.1`, or `10%`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProvisioningReserve(f64);

impl ProvisioningReserve {
    /// Half the budget at most: sync must still make progress.
    pub const MAX: f64 = 0.5;

    pub fn new(fraction: f64) -> Result<Self, String> {
        if fraction.is_finite() && (0.0..=Self::MAX).contains(&fraction) {
            Ok(ProvisioningReserve(fraction))
        } else {
            Err(format!(
                "the provisioning reserve must be a fraction from 0 to {} (e.g. 0.1 or 10%), not {fraction}",
                Self::MAX
            ))
        }
    }

    pub fn fraction(self) -> f64 {
        self.0
    }

    /// Requests of a `max_requests` budget reserved for provisioning:
    /// rounded down, so that a tiny budget (under 10 requests at 10 %) keeps
    /// what its owner asked for; and sync always keeps at least one.
    pub fn reserved(self, max_requests: u32) -> u32 {
        // The epsilon keeps 0.29 x 100 (28.999…) at 29.
        let reserved = (f64::from(max_requests) * self.0 + 1e-9).floor() as u32;
        reserved.min(max_requests.saturating_sub(1))
    }
}

impl Default for ProvisioningReserve {
    /// 10 %: 100 of Bitbucket's 1,000 requests an hour, enough for about a
    /// dozen grants or revokes while a sync has spent the rest.
    fn default() -> Self {
        ProvisioningReserve(0.1)
    }
}

impl fmt::Display for ProvisioningReserve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for ProvisioningReserve {
    type Err = String;

    /// `0.1` or `10%`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let parsed = match text.strip_suffix('%') {
            Some(percent) => percent.trim().parse::<f64>().map(|p| p / 100.0),
            None => text.parse::<f64>(),
        };
        let fraction = parsed.map_err(|_| {
            format!("invalid provisioning reserve {s:?}: expected a fraction such as 0.1 or a percentage such as 10%")
        })?;
        ProvisioningReserve::new(fraction)
    }
}

/// The reserve new limiters start with, as `f64` bits (0 = unset: default).
static DEFAULT_RESERVE_BITS: AtomicU64 = AtomicU64::new(0);

/// Sets the reserve of every limiter created from now on (the operator's
/// `--provisioning-reserve`, set once at start, before any client exists).
pub fn set_default_provisioning_reserve(reserve: ProvisioningReserve) {
    // 0.0 has bits 0; store it as -0.0 so that "unset" stays distinct.
    let bits = if reserve.0 == 0.0 {
        (-0.0f64).to_bits()
    } else {
        reserve.0.to_bits()
    };
    DEFAULT_RESERVE_BITS.store(bits, Ordering::Relaxed);
}

/// The reserve new limiters start with.
pub fn default_provisioning_reserve() -> ProvisioningReserve {
    match DEFAULT_RESERVE_BITS.load(Ordering::Relaxed) {
        0 => ProvisioningReserve::default(),
        bits => ProvisioningReserve(f64::from_bits(bits).abs()),
    }
}

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

/// A sliding-window limiter plus an in-flight cap, with two lanes.
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<State>,
    /// Woken whenever a waiter may be able to start: a request finished, a
    /// provisioning waiter left, the limits changed.
    changed: Notify,
}

#[derive(Debug)]
struct State {
    /// The limits in force: the strictest of `requested`, else `base`.
    limits: Limits,
    /// What [`Limiter::new`] was given; used while nobody shares it.
    base: Limits,
    /// Each sharer's settings, by share id.
    requested: BTreeMap<u64, Limits>,
    reserve: ProvisioningReserve,
    /// Start times of the requests in the current window, oldest first.
    log: VecDeque<Instant>,
    /// No request starts before this (set after a 429).
    paused_until: Option<Instant>,
    /// Requests holding a [`Permit`].
    in_flight: usize,
    /// Provisioning requests waiting to start: sync holds back while any do.
    provisioning_waiting: usize,
}

/// Why a request cannot start yet.
enum Wait {
    /// Look again at this instant (budget or pause), or when woken.
    Until(Instant),
    /// Look again when woken (an in-flight slot, or provisioning ahead).
    Woken,
}

/// Held while a request is in flight. Dropping it frees the in-flight slot
/// and moves the request's entry in the log from its start to its end: the
/// server saw the request somewhere in between, so counting from the end keeps
/// the client's window behind the server's, whatever the network delay.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<Limiter>,
    started: Instant,
}

impl Drop for Permit {
    fn drop(&mut self) {
        {
            let mut state = self.limiter.lock();
            if let Some(index) = state.log.iter().position(|&t| t == self.started) {
                state.log.remove(index);
                // Every entry is at or before now, so the log stays ordered.
                state.log.push_back(Instant::now());
            }
            state.in_flight = state.in_flight.saturating_sub(1);
        }
        self.limiter.changed.notify_waiters();
    }
}

/// Counts one provisioning request as waiting while it lives, so that a
/// cancelled acquire (a dropped future) stops holding sync back.
struct Waiting {
    limiter: Arc<Limiter>,
    armed: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.armed {
            {
                let mut state = self.limiter.lock();
                state.provisioning_waiting = state.provisioning_waiting.saturating_sub(1);
            }
            self.limiter.changed.notify_waiters();
        }
    }
}

impl Limiter {
    /// A limiter with the process-wide provisioning reserve.
    pub fn new(limits: Limits) -> Self {
        let limits = sanitize(limits);
        Limiter {
            changed: Notify::new(),
            state: Mutex::new(State {
                limits,
                base: limits,
                requested: BTreeMap::new(),
                reserve: default_provisioning_reserve(),
                log: VecDeque::new(),
                paused_until: None,
                in_flight: 0,
                provisioning_waiting: 0,
            }),
        }
    }

    /// Replaces the provisioning reserve of this limiter.
    pub fn set_reserve(&self, reserve: ProvisioningReserve) {
        self.lock().reserve = reserve;
        self.changed.notify_waiters();
    }

    pub fn reserve(&self) -> ProvisioningReserve {
        self.lock().reserve
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
        {
            let mut state = self.lock();
            match limits {
                Some(limits) => state.requested.insert(share, sanitize(limits)),
                None => state.requested.remove(&share),
            };
            state.limits = state
                .requested
                .values()
                .copied()
                .reduce(strictest)
                .unwrap_or(state.base);
        }
        self.changed.notify_waiters();
    }

    /// Applies new limits (while nobody shares the limiter; with sharers,
    /// their settings decide). Requests already logged still count, and a
    /// smaller in-flight cap takes effect as the requests in flight finish.
    pub fn reconfigure(&self, limits: Limits) {
        let limits = sanitize(limits);
        {
            let mut state = self.lock();
            if state.requested.is_empty() {
                state.base = limits;
                state.limits = limits;
            }
        }
        self.changed.notify_waiters();
    }

    /// A sync request: waits for an in-flight slot and for room in the
    /// sync share of the window, then records the request.
    pub async fn acquire(self: &Arc<Self>) -> Permit {
        self.acquire_in(Lane::Sync).await
    }

    /// Waits, by the rules of `lane` (module docs), for an in-flight slot
    /// and for room in the window, then records the request.
    pub async fn acquire_in(self: &Arc<Self>, lane: Lane) -> Permit {
        let mut waiting: Option<Waiting> = None;
        loop {
            // Registered before the state is read, so that a wake-up between
            // the check and the wait is not lost.
            let woken = self.changed.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let wait = {
                let mut state = self.lock();
                let now = Instant::now();
                match state.wait(lane, now) {
                    None => {
                        state.log.push_back(now);
                        state.in_flight += 1;
                        if let Some(mut guard) = waiting.take() {
                            guard.armed = false;
                            state.provisioning_waiting = state.provisioning_waiting.saturating_sub(1);
                            if state.provisioning_waiting == 0 {
                                // Sync may go again.
                                drop(state);
                                self.changed.notify_waiters();
                            }
                        }
                        return Permit {
                            limiter: Arc::clone(self),
                            started: now,
                        };
                    }
                    Some(wait) => {
                        if lane == Lane::Provisioning && waiting.is_none() {
                            state.provisioning_waiting += 1;
                            waiting = Some(Waiting {
                                limiter: Arc::clone(self),
                                armed: true,
                            });
                        }
                        wait
                    }
                }
            };
            match wait {
                Wait::Until(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = &mut woken => {}
                    }
                }
                Wait::Woken => woken.await,
            }
        }
    }

    /// Stops every caller from starting a request before `until` (after a 429).
    pub fn pause_until(&self, until: Instant) {
        let mut state = self.lock();
        if state.paused_until.is_none_or(|current| current < until) {
            state.paused_until = Some(until);
        }
    }

    /// When the next sync request may start as far as the budget and a 429
    /// pause go, if not now: for progress displays.
    pub fn next_free_slot(&self) -> Option<Instant> {
        self.next_free_slot_in(Lane::Sync)
    }

    /// When the next request of `lane` may start as far as the budget and a
    /// 429 pause go (not counting requests in flight), if not now.
    pub fn next_free_slot_in(&self, lane: Lane) -> Option<Instant> {
        let mut state = self.lock();
        let now = Instant::now();
        state.budget_wait(lane, now)
    }

    /// Requests recorded in the current window.
    pub fn used_in_window(&self) -> usize {
        let mut state = self.lock();
        let now = Instant::now();
        state.expire(now);
        state.log.len()
    }

    /// Requests of the window that sync may use (the budget less the reserve).
    pub fn sync_share(&self) -> u32 {
        self.lock().cap(Lane::Sync) as u32
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

    /// Requests of the window `lane` may fill.
    fn cap(&self, lane: Lane) -> usize {
        let max = self.limits.max_requests;
        match lane {
            Lane::Provisioning => max as usize,
            Lane::Sync => (max - self.reserve.reserved(max)) as usize,
        }
    }

    /// `None` if a request of `lane` may start now, else how to wait.
    fn wait(&mut self, lane: Lane, now: Instant) -> Option<Wait> {
        if let Some(at) = self.budget_wait(lane, now) {
            return Some(Wait::Until(at));
        }
        let behind_provisioning = lane == Lane::Sync && self.provisioning_waiting > 0;
        if behind_provisioning || self.in_flight >= self.limits.max_in_flight {
            return Some(Wait::Woken);
        }
        None
    }

    /// When the pause and the window let a request of `lane` start, if not now.
    fn budget_wait(&mut self, lane: Lane, now: Instant) -> Option<Instant> {
        if let Some(until) = self.paused_until {
            if now < until {
                return Some(until);
            }
            self.paused_until = None;
        }
        self.expire(now);
        let cap = self.cap(lane);
        if self.log.len() < cap {
            return None;
        }
        // The lane's share is full: room comes when the request that makes
        // the log exceed it leaves the window.
        let excess = self.log.len() - cap;
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

    fn lanes(max_requests: u32, max_in_flight: usize, reserve: f64) -> Arc<Limiter> {
        let limiter = Limiter::new(Limits {
            max_requests,
            window: Duration::from_secs(60),
            max_in_flight,
        });
        limiter.set_reserve(ProvisioningReserve::new(reserve).unwrap());
        Arc::new(limiter)
    }

    #[tokio::test(start_paused = true)]
    async fn sync_leaves_the_reserve_to_provisioning() {
        let limiter = lanes(10, 100, 0.2);
        let start = Instant::now();
        for _ in 0..8 {
            drop(limiter.acquire().await);
        }
        assert_eq!(Instant::now(), start, "sync may use 8 of 10 at once");
        let ninth = tokio::time::timeout(Duration::from_secs(1), limiter.acquire()).await;
        assert!(ninth.is_err(), "sync started a 9th request inside the reserve");
        assert_eq!(
            limiter.next_free_slot(),
            Some(start + Duration::from_secs(60)),
            "sync waits for the window"
        );
        assert_eq!(limiter.next_free_slot_in(Lane::Provisioning), None);
        let at = Instant::now();
        drop(limiter.acquire_in(Lane::Provisioning).await);
        drop(limiter.acquire_in(Lane::Provisioning).await);
        assert_eq!(Instant::now(), at, "provisioning used the reserve without waiting");
        // The whole budget is spent: provisioning waits for the window too.
        drop(limiter.acquire_in(Lane::Provisioning).await);
        assert_eq!(Instant::now(), start + Duration::from_secs(60));
    }

    /// Spawns an acquire in `lane` that records its name when it starts and
    /// holds the permit for a second.
    fn contender(
        limiter: &Arc<Limiter>,
        lane: Lane,
        name: &'static str,
        order: &Arc<Mutex<Vec<(&'static str, Duration)>>>,
        start: Instant,
    ) -> tokio::task::JoinHandle<()> {
        let (limiter, order) = (Arc::clone(limiter), Arc::clone(order));
        tokio::spawn(async move {
            let permit = limiter.acquire_in(lane).await;
            order.lock().unwrap().push((name, Instant::now() - start));
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(permit);
        })
    }

    #[tokio::test(start_paused = true)]
    async fn provisioning_takes_the_next_in_flight_slot_before_earlier_sync_waiters() {
        let limiter = lanes(1000, 1, 0.1);
        let order = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        let held = limiter.acquire().await;
        let mut tasks = Vec::new();
        for name in ["sync-1", "sync-2"] {
            tasks.push(contender(&limiter, Lane::Sync, name, &order, start));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tasks.push(contender(&limiter, Lane::Provisioning, "provisioning", &order, start));
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(held);
        for task in tasks {
            task.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        let names: Vec<_> = order.iter().map(|(n, _)| *n).collect();
        assert_eq!(names[0], "provisioning", "{order:?}");
        assert_eq!(
            order[0].1,
            Duration::from_millis(30),
            "started as soon as the slot freed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_429_pause_provisioning_is_first_and_not_earlier() {
        let limiter = lanes(1000, 1, 0.1);
        let order = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        limiter.pause_until(start + Duration::from_secs(30));
        let mut tasks = vec![
            contender(&limiter, Lane::Sync, "sync-1", &order, start),
            contender(&limiter, Lane::Sync, "sync-2", &order, start),
        ];
        tokio::time::sleep(Duration::from_secs(5)).await;
        tasks.push(contender(&limiter, Lane::Provisioning, "provisioning", &order, start));
        for task in tasks {
            task.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(
            order[0],
            ("provisioning", Duration::from_secs(30)),
            "provisioning waits out Retry-After, then goes first: {order:?}"
        );
        assert!(
            order[1..].iter().all(|(_, at)| *at >= Duration::from_secs(31)),
            "{order:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_provisioning_wait_stops_holding_sync_back() {
        let limiter = lanes(1000, 1, 0.1);
        let held = limiter.acquire().await;
        let gave_up = tokio::time::timeout(Duration::from_secs(1), limiter.acquire_in(Lane::Provisioning)).await;
        assert!(gave_up.is_err());
        assert_eq!(limiter.lock().provisioning_waiting, 0);
        let sync = tokio::spawn({
            let limiter = Arc::clone(&limiter);
            async move { drop(limiter.acquire().await) }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(held);
        tokio::time::timeout(Duration::from_secs(1), sync)
            .await
            .expect("sync got the slot")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn sync_waiting_for_its_share_does_not_block_provisioning_slots() {
        // Sync tasks queued behind their spent share must not hold in-flight
        // slots: provisioning still starts at once.
        let limiter = lanes(10, 2, 0.1);
        for _ in 0..9 {
            drop(limiter.acquire().await);
        }
        let waiting: Vec<_> = (0..4)
            .map(|_| {
                let limiter = Arc::clone(&limiter);
                tokio::spawn(async move { drop(limiter.acquire().await) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let at = Instant::now();
        let permit = limiter.acquire_in(Lane::Provisioning).await;
        assert_eq!(Instant::now(), at);
        drop(permit);
        for task in waiting {
            task.abort();
        }
    }

    #[test]
    fn reserve_parses_fractions_and_percentages_within_range() {
        assert_eq!("0.1".parse::<ProvisioningReserve>().unwrap().fraction(), 0.1);
        assert_eq!("10%".parse::<ProvisioningReserve>().unwrap().fraction(), 0.1);
        assert_eq!("0".parse::<ProvisioningReserve>().unwrap().fraction(), 0.0);
        assert_eq!("0.5".parse::<ProvisioningReserve>().unwrap().fraction(), 0.5);
        for bad in ["0.6", "-0.1", "NaN", "inf", "ten", "", "%"] {
            let err = bad.parse::<ProvisioningReserve>().unwrap_err();
            assert!(err.contains("provisioning reserve"), "{bad}: {err}");
        }
        let default = ProvisioningReserve::default();
        assert_eq!(default.reserved(1000), 100);
        assert_eq!(default.reserved(1), 0, "sync keeps at least one request");
        assert_eq!(ProvisioningReserve::new(0.15).unwrap().reserved(10), 1, "rounded down");
        assert_eq!(ProvisioningReserve::new(0.29).unwrap().reserved(100), 29);
        assert_eq!(default.reserved(2), 0, "a budget of 2 keeps both for sync");
        assert_eq!(ProvisioningReserve::new(0.5).unwrap().reserved(1000), 500);
        assert_eq!(ProvisioningReserve::new(0.0).unwrap().reserved(1000), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn never_exceeds_the_rolling_window() {
        let limiter = Limiter::new(Limits {
            max_requests: 5,
            window: Duration::from_secs(10),
            max_in_flight: 100,
        });
        // The whole budget, for this test of the window alone.
        limiter.set_reserve(ProvisioningReserve::new(0.0).unwrap());
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
