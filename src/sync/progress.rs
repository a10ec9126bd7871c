//! Live progress of sync runs, as data: per resource type, units of work
//! done out of those known so far (projects or repositories whose
//! permissions are read; one unit per workspace for the small types), the
//! requests spent and an ETA. The CLI draws it; the controller can put it in
//! status. Counters are atomics, so syncers update them without locks.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::model::SyncKind;

/// Progress of every resource type an engine syncs. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ProgressBoard {
    kinds: Arc<Mutex<BTreeMap<SyncKind, Arc<KindProgress>>>>,
}

/// One type's counters for its current (or last) run.
#[derive(Debug)]
pub struct KindProgress {
    done: AtomicU64,
    total: AtomicU64,
    /// Units taken over from a resumed run (done without requests).
    resumed: AtomicU64,
    finished: AtomicU64,
    started: Mutex<Instant>,
}

/// A snapshot of one type's progress.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProgressSnapshot {
    pub kind: SyncKind,
    pub done: u64,
    /// Units known so far; grows while listings are read.
    pub total: u64,
    pub resumed: u64,
    pub finished: bool,
    #[serde(skip)]
    pub elapsed: Duration,
    /// Estimated time left, from the pace of the units done in this run.
    #[serde(skip)]
    pub eta: Option<Duration>,
}

impl ProgressSnapshot {
    /// A run that has not started its work yet: nothing known, nothing done.
    pub fn starting(kind: SyncKind) -> Self {
        ProgressSnapshot {
            kind,
            done: 0,
            total: 0,
            resumed: 0,
            finished: false,
            elapsed: Duration::ZERO,
            eta: None,
        }
    }
}

impl ProgressBoard {
    /// The counters of `kind`, reset for a new run.
    pub fn start(&self, kind: SyncKind) -> Arc<KindProgress> {
        let progress = Arc::new(KindProgress {
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            started: Mutex::new(Instant::now()),
        });
        lock(&self.kinds).insert(kind, Arc::clone(&progress));
        progress
    }

    /// Every type seen so far, in type order.
    pub fn snapshot(&self) -> Vec<ProgressSnapshot> {
        lock(&self.kinds).iter().map(|(kind, p)| p.snapshot(*kind)).collect()
    }

    /// One type's progress, if it ran.
    pub fn of(&self, kind: SyncKind) -> Option<ProgressSnapshot> {
        lock(&self.kinds).get(&kind).map(|p| p.snapshot(kind))
    }
}

impl KindProgress {
    /// `n` more units are known to be needed.
    pub fn add_total(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    /// One unit finished with requests.
    pub fn done_one(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    /// One unit taken over from the resumed run.
    pub fn resumed_one(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
        self.resumed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn finish(&self) {
        self.finished.store(1, Ordering::Relaxed);
    }

    fn snapshot(&self, kind: SyncKind) -> ProgressSnapshot {
        let done = self.done.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed).max(done);
        let resumed = self.resumed.load(Ordering::Relaxed);
        let elapsed = lock(&self.started).elapsed();
        let finished = self.finished.load(Ordering::Relaxed) == 1;
        // Pace from the units fetched in this run only: resumed ones were free.
        let fetched = done - resumed.min(done);
        let eta = (fetched > 0 && !finished).then(|| elapsed.mul_f64((total - done) as f64 / fetched as f64));
        ProgressSnapshot {
            kind,
            done,
            total,
            resumed,
            finished,
            elapsed,
            eta,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_comes_from_the_pace_of_fetched_units_only() {
        let board = ProgressBoard::default();
        let p = board.start(SyncKind::Repositories);
        p.add_total(10);
        for _ in 0..4 {
            p.resumed_one();
        }
        let s = board.of(SyncKind::Repositories).unwrap();
        assert_eq!((s.done, s.total, s.resumed), (4, 10, 4));
        assert_eq!(s.eta, None, "no pace yet: every unit done so far was free");
        p.done_one();
        let s = board.of(SyncKind::Repositories).unwrap();
        assert!(s.eta.is_some());
        p.finish();
        assert_eq!(board.snapshot()[0].eta, None);
    }
}
