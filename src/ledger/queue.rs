//! In-process versions of two small structures the Redis scripts keep as keys: a
//! tenant's recent demand, and a pool's wait queue. See `scripts::ACQUIRE`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// How many buckets make a window: demand is counted in buckets of W/10 and read over
/// the last 10 *completed* ones, so replicas reading during the same bucket get the
/// same numbers.
pub const BUCKETS_PER_WINDOW: i64 = 10;

/// How far ahead of its virtual deadline a waiter is queued while its tenant is within
/// its guarantee (this call included): more than any spread of deadlines among live
/// waiters (ms; ~31 years), so every such waiter ranks before every waiter of a tenant
/// beyond its guarantee, and within each class the deadlines (priority, then arrival)
/// keep their order. The class is decided again at each attempt from the tenant's use
/// then; the deadline the caller carries between attempts stays the plain one.
///
/// Why: the 80 % rule reserves every guarantee's capacity in each window, but a slot
/// that frees goes to the waiters ahead, and a flooding tenant keeps waiters queued
/// all the time. Without this, a quiet tenant asking within its guarantee waited
/// behind all of them, up to the flooder's `max_wait`.
pub const GUARANTEED_AHEAD_MS: i64 = 1_000_000_000_000;

/// A tenant's demand over the last window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DemandCount {
    /// Requests asked for (each call once, however long it waited).
    pub asked: u32,
    /// Requests denied on their first attempt: demand its quota did not meet.
    pub unmet: u32,
}

/// Bucket length for a window, at least 1 ms.
pub fn bucket_ms(window_ms: i64) -> i64 {
    (window_ms / BUCKETS_PER_WINDOW).max(1)
}

/// Adds `cost` to `bucket`, dropping buckets older than two windows before it.
fn add_to_bucket(counts: &mut BTreeMap<i64, u64>, bucket: i64, cost: u32) {
    *counts.entry(bucket).or_default() += u64::from(cost);
    let oldest_kept = bucket - 2 * BUCKETS_PER_WINDOW;
    while counts
        .first_key_value()
        .is_some_and(|(b, _)| *b < oldest_kept)
    {
        counts.pop_first();
    }
}

/// Requests asked for, and denied on their first attempt, per bucket.
#[derive(Default)]
pub(super) struct Demand {
    buckets: BTreeMap<i64, u64>,
    unmet: BTreeMap<i64, u64>,
}

impl Demand {
    pub fn record(&mut self, bucket: i64, cost: u32) {
        add_to_bucket(&mut self.buckets, bucket, cost);
    }

    pub fn record_unmet(&mut self, bucket: i64, cost: u32) {
        add_to_bucket(&mut self.unmet, bucket, cost);
    }

    /// Asked and unmet over the `BUCKETS_PER_WINDOW` buckets before `current`.
    pub fn completed(&self, current: i64) -> DemandCount {
        let sum = |map: &BTreeMap<i64, u64>| {
            let total: u64 = map
                .range(current - BUCKETS_PER_WINDOW..current)
                .map(|(_, v)| v)
                .sum();
            total.min(u32::MAX as u64) as u32
        };
        DemandCount {
            asked: sum(&self.buckets),
            unmet: sum(&self.unmet),
        }
    }
}

struct Waiter {
    score: i64,
    expires: i64,
    eligible: i64,
}

/// A pool's waiters, by virtual deadline.
#[derive(Default)]
pub(super) struct WaitQueue {
    by_score: BTreeSet<(i64, String)>,
    by_expiry: BTreeSet<(i64, String)>,
    waiters: HashMap<String, Waiter>,
}

impl WaitQueue {
    /// Drops waiters whose wait ended (they answered, or their caller went away).
    pub fn purge(&mut self, now: i64) {
        while let Some((expires, _)) = self.by_expiry.first() {
            if *expires >= now {
                break;
            }
            let (_, nonce) = self.by_expiry.pop_first().expect("checked non-empty");
            self.remove(&nonce);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }

    /// The waiters strictly ahead of `score`, in order, other than `nonce`, that could
    /// use a slot now.
    pub fn eligible_ahead<'a>(
        &'a self,
        score: i64,
        nonce: &'a str,
        now: i64,
    ) -> impl Iterator<Item = &'a str> + 'a {
        self.by_score
            .range(..(score, String::new()))
            .map(|(_, other)| other.as_str())
            .filter(move |other| *other != nonce && self.waiters[*other].eligible <= now)
    }

    /// Adds or refreshes a waiter.
    pub fn enqueue(&mut self, nonce: &str, score: i64, expires: i64, eligible: i64) {
        self.remove(nonce);
        self.by_score.insert((score, nonce.to_owned()));
        self.by_expiry.insert((expires, nonce.to_owned()));
        self.waiters.insert(
            nonce.to_owned(),
            Waiter {
                score,
                expires,
                eligible,
            },
        );
    }

    /// The waiters whose wait lasts until `now` or later, as `(score, nonce, eligible)`
    /// in queue order (the differential test).
    #[cfg(test)]
    pub fn live(&self, now: i64) -> Vec<(i64, String, i64)> {
        self.by_score
            .iter()
            .map(|(score, nonce)| (*score, nonce, &self.waiters[nonce]))
            .filter(|(.., w)| w.expires >= now)
            .map(|(score, nonce, w)| (score, nonce.clone(), w.eligible))
            .collect()
    }

    pub fn remove(&mut self, nonce: &str) {
        if let Some(w) = self.waiters.remove(nonce) {
            self.by_score.remove(&(w.score, nonce.to_owned()));
            self.by_expiry.remove(&(w.expires, nonce.to_owned()));
        }
    }
}
