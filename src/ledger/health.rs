//! Every token's health record (`breaker.rs`), and the ledger's health operations: the
//! admission of a grant, the record of a release's outcome, an admin's reset, a status
//! read. The twin of the health hashes that `breaker_scripts.rs` keeps in Redis.

use std::collections::{BTreeSet, HashMap};

use super::Ledger;
use super::breaker::{HealthRecord, quarantine_end};
use super::types::{Admitted, OutcomeReport, Recorded, StatusReport, Transition};
use crate::domain::Id;

/// Every token's record, plus the leases whose outcome was applied (so a repeated
/// release does not count twice).
#[derive(Default)]
pub(super) struct HealthBook {
    records: HashMap<String, HealthRecord>,
    /// Applied leases: `upstream/nonce` → until when to remember it.
    applied: HashMap<String, i64>,
    applied_by_end: BTreeSet<(i64, String)>,
}

fn record_key(upstream: &Id, token: &Id) -> String {
    format!("{upstream}/{token}")
}

impl HealthBook {
    /// The record, settled at `now`; transitions that became due go to `out`.
    fn settled(
        &mut self,
        upstream: &Id,
        token: &Id,
        now: i64,
        out: &mut Vec<Transition>,
    ) -> &mut HealthRecord {
        let record = self.records.entry(record_key(upstream, token)).or_default();
        record.settle(token, now, out);
        record
    }

    /// Drops blank records so the map only holds tokens with something to say.
    fn tidy(&mut self, upstream: &Id, token: &Id) {
        let key = record_key(upstream, token);
        if self.records.get(&key).is_some_and(HealthRecord::is_blank) {
            self.records.remove(&key);
        }
    }

    /// When the token's health admits a lease, as its record stands (not settled).
    pub(super) fn usable_from(&self, upstream: &Id, token: &Id, now: i64) -> i64 {
        self.records
            .get(&record_key(upstream, token))
            .map_or(now, |record| record.usable_from(now))
    }

    /// Marks a lease applied; false if it already was.
    fn mark_applied(&mut self, lease: String, now: i64, keep_until: i64) -> bool {
        while let Some(first) = self.applied_by_end.first() {
            if first.0 >= now {
                break;
            }
            let (_, old) = self.applied_by_end.pop_first().expect("checked non-empty");
            self.applied.remove(&old);
        }
        if self.applied.contains_key(&lease) {
            return false;
        }
        self.applied.insert(lease.clone(), keep_until);
        self.applied_by_end.insert((keep_until, lease));
        true
    }
}

impl Ledger {
    /// A token's health record, its pacing schedule and where its pool index names it,
    /// one line (the differential test compares it with the token's Redis hash).
    #[cfg(test)]
    pub fn health_line(&self, upstream: &Id, token: &Id) -> String {
        let record = self
            .health
            .records
            .get(&record_key(upstream, token))
            .cloned()
            .unwrap_or_default();
        let schedule = self.paces.get(&super::token_key(upstream, token));
        let named = self
            .index_of(upstream)
            .and_then(|index| index.named_at(token));
        format!(
            "{}, schedule {schedule:?}, named at {named:?}",
            record.describe()
        )
    }

    /// May a lease of `token` (valid until `lease_expires`) be handed out? On a
    /// half-open token with no probe out, this lease becomes the probe.
    pub fn admit_grant(
        &mut self,
        upstream: &Id,
        token: &Id,
        nonce: &str,
        lease_expires: i64,
        now: i64,
    ) -> Admitted {
        let mut transitions = Vec::new();
        let admission = self
            .health
            .settled(upstream, token, now, &mut transitions)
            .admit(nonce, lease_expires);
        self.health.tidy(upstream, token);
        Admitted {
            admission,
            now_ms: now,
            transitions,
        }
    }

    /// Feeds a released lease's outcome to its token's health, once per lease.
    pub fn record_outcome(&mut self, report: &OutcomeReport, now: i64) -> Recorded {
        let key = &report.key;
        let book = &mut self.health;
        let mut transitions = Vec::new();
        let relevant = book
            .settled(&key.upstream_id, &key.token_id, now, &mut transitions)
            .is_relevant(&key.nonce, report.outcome);
        let keep_until = now + report.repeat_for.as_millis() as i64 + 1_000;
        let lease = format!("{}/{}", key.upstream_id, key.nonce);
        let applied = relevant && book.mark_applied(lease, now, keep_until);
        if applied {
            let end = quarantine_end(now, report);
            book.settled(&key.upstream_id, &key.token_id, now, &mut transitions)
                .apply(report, end, now, &mut transitions);
        }
        book.tidy(&key.upstream_id, &key.token_id);
        Recorded {
            now_ms: now,
            applied,
            transitions,
        }
    }

    /// Forgets the token's health record; returns its health just before.
    pub fn reset_health(&mut self, upstream: &Id, token: &Id, now: i64) -> StatusReport {
        let report = self.token_status(upstream, std::slice::from_ref(token), now);
        let key = record_key(upstream, token);
        self.health.records.remove(&key);
        self.refresh_named(upstream, token, now);
        report
    }

    /// The health of `tokens` at `now` (settling transitions that became due).
    pub fn token_status(&mut self, upstream: &Id, tokens: &[Id], now: i64) -> StatusReport {
        let mut transitions = Vec::new();
        let book = &mut self.health;
        let statuses = tokens
            .iter()
            .map(|token| {
                let status = book
                    .settled(upstream, token, now, &mut transitions)
                    .status(token);
                book.tidy(upstream, token);
                status
            })
            .collect();
        StatusReport {
            now_ms: now,
            tokens: statuses,
            transitions,
        }
    }
}
