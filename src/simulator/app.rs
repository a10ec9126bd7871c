//! The state every endpoint shares: the organisation behind one lock,
//! credentials, the rate limiter, fault injection and request counters.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};

use super::SimConfig;
use super::auth::Auth;
use super::limits::{RateLimiter, fault_for};
use super::org::Organisation;
use super::reply::ApiError;
use super::state::OrgState;

/// Request counters, see [`super::SimulatorHandle::stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RequestStats {
    /// Every request received.
    pub total: u64,
    /// Requests per endpoint class (`user`, `members`, `groups-1.0`, …).
    pub by_class: BTreeMap<String, u64>,
    /// Responses per HTTP status.
    pub by_status: BTreeMap<u16, u64>,
    /// Requests answered 429.
    pub rate_limited: u64,
    /// Requests answered with an injected 5xx.
    pub injected_faults: u64,
}

/// `(repository, user, rank)` triples of a workspace.
pub(super) type Effective = Arc<Vec<(usize, usize, u8)>>;

/// Shared server state.
pub struct App {
    pub base_url: String,
    pub seed: u64,
    pub max_pagelen: usize,
    pub latency: Duration,
    pub state: RwLock<OrgState>,
    pub auth: Auth,
    pub limiter: Option<RateLimiter>,
    pub fail_rate_bits: AtomicU64,
    /// Until then every authenticated request answers 429 (an injected
    /// throttle, [`super::SimulatorHandle::throttle_for`]).
    pub throttled_until: Mutex<Option<std::time::Instant>>,
    pub counter: AtomicU64,
    pub stats: Mutex<RequestStats>,
    effective_cache: Mutex<HashMap<usize, (u64, Effective)>>,
    /// Who an access token is: a user of its own, not a workspace member.
    pub(super) pseudo_user: Value,
}

impl App {
    pub fn new(config: &SimConfig, base_url: String, org: Organisation, auth: Auth) -> App {
        let pseudo_uuid = {
            use rand::SeedableRng;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(config.seed ^ 0xacce55);
            super::org::random_uuid(&mut rng)
        };
        App {
            pseudo_user: json!({
                "type": "user",
                "uuid": pseudo_uuid,
                "display_name": "Simulator access token",
                "nickname": "access-token",
                "account_status": "active",
                "links": {"avatar": {"href": "https://bitbucket.org/account/avatar/access-token"}},
            }),
            base_url,
            seed: config.seed,
            max_pagelen: config.max_pagelen.max(1),
            latency: config.latency,
            state: RwLock::new(OrgState::new(org)),
            auth,
            limiter: config.rate_limit.map(RateLimiter::new),
            fail_rate_bits: AtomicU64::new(config.fail_rate.to_bits()),
            throttled_until: Mutex::new(None),
            counter: AtomicU64::new(0),
            stats: Mutex::new(RequestStats::default()),
            effective_cache: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn read(&self) -> RwLockReadGuard<'_, OrgState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn write(&self) -> RwLockWriteGuard<'_, OrgState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Effective repository permissions of a workspace, recomputed only
    /// after a write.
    pub(super) fn effective(&self, st: &OrgState, w: usize) -> Effective {
        let mut cache = self.effective_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((g, v)) = cache.get(&w)
            && *g == st.generation
        {
            return v.clone();
        }
        let v = Arc::new(st.effective(w));
        cache.insert(w, (st.generation, v.clone()));
        v
    }

    /// Every request, known path or not, waits the configured latency and
    /// takes the next number, which decides its injected fault.
    pub(super) async fn admit(&self) -> u64 {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    /// The 5xx request number `n` answers, if the fault injector picks it.
    pub(super) fn injected_fault(&self, n: u64) -> Option<ApiError> {
        let fail_rate = f64::from_bits(self.fail_rate_bits.load(Ordering::Relaxed));
        let status = fault_for(self.seed, n, fail_rate)?;
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).injected_faults += 1;
        let msg = match status {
            500 => "Something went wrong",
            502 => "Bad gateway",
            _ => "Service unavailable",
        };
        Some(ApiError::new(status, msg))
    }

    pub(super) fn record(&self, class: &str, status: u16) {
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.total += 1;
        *s.by_class.entry(class.to_string()).or_default() += 1;
        *s.by_status.entry(status).or_default() += 1;
        if status == 429 {
            s.rate_limited += 1;
        }
    }
}
