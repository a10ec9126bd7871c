//! A size-capped, time-limited, single-flight cache for authorization
//! decisions.
//!
//! Every caller of the data API could send a fresh junk token per request;
//! each would cost a TokenReview on the API server. This cache bounds that:
//! decisions (positive and negative) are remembered for a TTL, at most
//! `capacity` of them (the oldest go first), and concurrent requests for the
//! same key wait for the one review in progress instead of starting their
//! own. A failed review (the API server unavailable) is not remembered.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

pub(crate) struct TtlCache<K, V> {
    ttl: Duration,
    capacity: usize,
    inner: Mutex<Inner<K, V>>,
}

struct Inner<K, V> {
    slots: HashMap<K, Slot<V>>,
    /// Insertion order, for evicting the oldest; entries whose sequence
    /// number no longer matches their slot are stale and skipped.
    order: VecDeque<(u64, K)>,
    next_seq: u64,
}

struct Slot<V> {
    seq: u64,
    created: Instant,
    cell: Arc<OnceCell<V>>,
}

impl<K: Hash + Eq + Clone, V: Clone> TtlCache<K, V> {
    pub(crate) fn new(capacity: usize, ttl: Duration) -> Self {
        TtlCache {
            ttl,
            capacity: capacity.max(1),
            inner: Mutex::new(Inner {
                slots: HashMap::new(),
                order: VecDeque::new(),
                next_seq: 0,
            }),
        }
    }

    /// The remembered value for `key`, or the result of `decide` (run once
    /// for all concurrent callers). An `Err` is returned to this caller only
    /// and not remembered.
    pub(crate) async fn get_or_decide<E, F, Fut>(&self, key: K, decide: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let cell = self.slot(key);
        cell.get_or_try_init(decide).await.cloned()
    }

    /// Remembered entries (decided or in progress, expired ones included
    /// until replaced or evicted).
    pub(crate) fn len(&self) -> usize {
        self.lock().slots.len()
    }

    fn slot(&self, key: K) -> Arc<OnceCell<V>> {
        let mut inner = self.lock();
        if let Some(slot) = inner.slots.get(&key)
            && slot.created.elapsed() < self.ttl
        {
            return Arc::clone(&slot.cell);
        }
        // Make room: the oldest entries go first.
        while inner.slots.len() >= self.capacity {
            let Some((seq, old)) = inner.order.pop_front() else {
                break;
            };
            if inner.slots.get(&old).is_some_and(|s| s.seq == seq) {
                inner.slots.remove(&old);
            }
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let cell = Arc::new(OnceCell::new());
        inner.slots.insert(
            key.clone(),
            Slot {
                seq,
                created: Instant::now(),
                cell: Arc::clone(&cell),
            },
        );
        inner.order.push_back((seq, key));
        // Replaced (expired) entries leave stale order entries behind: drop
        // them before they outnumber the live ones.
        if inner.order.len() > 2 * self.capacity {
            let Inner { slots, order, .. } = &mut *inner;
            order.retain(|(seq, k)| slots.get(k).is_some_and(|s| s.seq == *seq));
        }
        cell
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<K, V>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn decides_once_per_key_within_the_ttl() {
        let cache = TtlCache::new(8, Duration::from_secs(60));
        let calls = AtomicU32::new(0);
        for _ in 0..5 {
            let v: Result<u32, ()> = cache
                .get_or_decide("k", || async {
                    calls.fetch_add(1, Ordering::Relaxed);
                    Ok(7)
                })
                .await;
            assert_eq!(v, Ok(7));
        }
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_decision() {
        let cache = Arc::new(TtlCache::new(8, Duration::from_secs(60)));
        let calls = Arc::new(AtomicU32::new(0));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (cache, calls) = (Arc::clone(&cache), Arc::clone(&calls));
                tokio::spawn(async move {
                    cache
                        .get_or_decide("same", || async {
                            calls.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Ok::<_, ()>(1)
                        })
                        .await
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), Ok(1));
        }
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn failures_are_not_remembered_and_expiry_decides_again() {
        let cache = TtlCache::new(8, Duration::from_millis(30));
        assert_eq!(
            cache.get_or_decide("k", || async { Err::<u32, _>("down") }).await,
            Err("down")
        );
        assert_eq!(cache.get_or_decide("k", || async { Ok::<_, &str>(1) }).await, Ok(1));
        assert_eq!(cache.get_or_decide("k", || async { Ok::<_, &str>(2) }).await, Ok(1));
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(cache.get_or_decide("k", || async { Ok::<_, &str>(3) }).await, Ok(3));
    }

    #[tokio::test]
    async fn never_holds_more_than_its_capacity() {
        let cache = TtlCache::new(16, Duration::from_secs(60));
        for i in 0..10_000u32 {
            let _ = cache.get_or_decide(i, || async move { Ok::<_, ()>(i) }).await;
            assert!(cache.len() <= 16);
            assert!(cache.lock().order.len() <= 32);
        }
        // The newest are kept, the oldest went.
        let calls = AtomicU32::new(0);
        let recent = |k: u32| {
            let calls = &calls;
            let cache = &cache;
            async move {
                cache
                    .get_or_decide(k, || async {
                        calls.fetch_add(1, Ordering::Relaxed);
                        Ok::<_, ()>(0)
                    })
                    .await
            }
        };
        assert_eq!(recent(9_999).await, Ok(9_999));
        assert_eq!(calls.load(Ordering::Relaxed), 0);
        assert_eq!(recent(0).await, Ok(0));
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn expired_entries_replaced_keep_the_order_bounded() {
        let cache = TtlCache::new(4, Duration::ZERO);
        for i in 0..1000u32 {
            let _ = cache.get_or_decide(i % 2, || async move { Ok::<_, ()>(i) }).await;
        }
        assert!(cache.lock().order.len() <= 8);
        assert!(cache.len() <= 4);
    }
}
