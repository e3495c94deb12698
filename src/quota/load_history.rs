//! The usage history rebalancing plans from, pure: samples of each tenant's use of its
//! pool's tokens (requests per window), kept for a span, averaged on demand.
//!
//! A sample is what the shared counters held at one instant: the slots each tenant held
//! in the last window. Averaging the samples of the last `span` gives requests per
//! window over that span, so a spike shorter than the span moves the average only by
//! its share of it. A tenant missing from a sample (it did not exist yet, or held
//! nothing) counts 0 in it.

use std::collections::{HashMap, VecDeque};

use crate::domain::Id;

/// One reading of the counters.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    at_ms: i64,
    used: HashMap<Id, f64>,
}

/// The samples of the last `span_ms` of one upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadHistory {
    span_ms: i64,
    samples: VecDeque<Sample>,
}

/// The averages of a history.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Averages {
    /// Per tenant, requests per window.
    pub used: HashMap<Id, f64>,
    /// From the oldest sample averaged to now (0 without samples).
    pub covered_ms: i64,
    /// How many samples were averaged.
    pub samples: usize,
}

impl LoadHistory {
    pub fn new(span_ms: i64) -> Self {
        Self {
            span_ms: span_ms.max(1),
            samples: VecDeque::new(),
        }
    }

    /// Adds the reading taken at `at_ms` (per tenant, slots held in the last window),
    /// dropping samples older than the span. Readings arrive in time order; one older
    /// than the newest is ignored.
    pub fn record(&mut self, at_ms: i64, used: HashMap<Id, f64>) {
        if self.samples.back().is_some_and(|s| s.at_ms > at_ms) {
            return;
        }
        self.samples.push_back(Sample { at_ms, used });
        self.forget_before(at_ms - self.span_ms);
    }

    fn forget_before(&mut self, horizon_ms: i64) {
        while self.samples.front().is_some_and(|s| s.at_ms < horizon_ms) {
            self.samples.pop_front();
        }
    }

    /// The mean of the samples of the last span as of `now_ms`.
    pub fn averages(&self, now_ms: i64) -> Averages {
        let horizon = now_ms - self.span_ms;
        let kept: Vec<&Sample> = self.samples.iter().filter(|s| s.at_ms >= horizon).collect();
        let Some(oldest) = kept.first() else {
            return Averages::default();
        };
        let mut sums: HashMap<Id, f64> = HashMap::new();
        for sample in &kept {
            for (tenant, used) in &sample.used {
                *sums.entry(tenant.clone()).or_default() += used;
            }
        }
        let n = kept.len() as f64;
        Averages {
            used: sums.into_iter().map(|(t, sum)| (t, sum / n)).collect(),
            covered_ms: (now_ms - oldest.at_ms).max(0),
            samples: kept.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Id {
        Id::parse("test", s).unwrap()
    }

    fn reading(pairs: &[(&str, f64)]) -> HashMap<Id, f64> {
        pairs.iter().map(|(t, u)| (id(t), *u)).collect()
    }

    #[test]
    fn averages_the_span_and_counts_missing_tenants_as_zero() {
        let mut h = LoadHistory::new(10_000);
        assert_eq!(h.averages(0), Averages::default());
        h.record(0, reading(&[("a", 90.0)]));
        h.record(5_000, reading(&[("a", 30.0), ("b", 10.0)]));
        let avg = h.averages(5_000);
        assert_eq!(avg.used[&id("a")], 60.0);
        assert_eq!(avg.used[&id("b")], 5.0);
        assert_eq!((avg.covered_ms, avg.samples), (5_000, 2));
    }

    #[test]
    fn old_samples_leave_and_a_spike_weighs_its_share() {
        let mut h = LoadHistory::new(10_000);
        for i in 0..=10 {
            let used = if i == 10 { 100.0 } else { 0.0 };
            h.record(i * 1_000, reading(&[("a", used)]));
        }
        // 11 samples from 0 to 10 s, one of them the spike.
        let avg = h.averages(10_000);
        assert!((avg.used[&id("a")] - 100.0 / 11.0).abs() < 1e-9);
        // Later, the calm samples age out and the spike goes with them.
        h.record(25_000, reading(&[("a", 0.0)]));
        let avg = h.averages(25_000);
        assert_eq!((avg.samples, avg.used[&id("a")]), (1, 0.0));
        // Reading averages without a new sample also drops what left the span.
        assert_eq!(h.averages(40_000), Averages::default());
    }

    #[test]
    fn a_reading_older_than_the_newest_is_ignored() {
        let mut h = LoadHistory::new(10_000);
        h.record(5_000, reading(&[("a", 10.0)]));
        h.record(4_000, reading(&[("a", 1_000.0)]));
        assert_eq!(h.averages(5_000).used[&id("a")], 10.0);
    }
}
