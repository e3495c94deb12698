//! Token health in process memory: `HealthRecord`s under one mutex, the clock of the
//! counters. The decisions are `breaker.rs`'s; this file only stores them.

use std::collections::{BTreeSet, HashMap};

use super::breaker::{
    Admission, Admitted, HealthRecord, OutcomeReport, Recorded, StatusReport, quarantine_end,
};
use super::memory::MemoryCounters;
use super::{AcquireOutcome, AcquireRequest, LeaseKey, ReleaseOutcome, ReleaseResult, Unhealthy};
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
        out: &mut Vec<super::breaker::Transition>,
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

impl MemoryCounters {
    fn health(&self) -> std::sync::MutexGuard<'_, HealthBook> {
        // Every update completes before the guard drops; a panic elsewhere leaves no
        // half-written record, so a poisoned lock is still consistent.
        self.health
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn admit_grant(
        &self,
        upstream: &Id,
        token: &Id,
        nonce: &str,
        lease_expires: i64,
    ) -> Admitted {
        let now = self.clock.now_ms();
        let mut transitions = Vec::new();
        let mut book = self.health();
        let admission = book
            .settled(upstream, token, now, &mut transitions)
            .admit(nonce, lease_expires);
        book.tidy(upstream, token);
        Admitted {
            admission,
            now_ms: now,
            transitions,
        }
    }

    /// The tokens of `upstream` whose health refuses a lease now, with the instant it
    /// may (records are few: only tokens with something to say have one).
    pub(super) fn health_blocked(&self, upstream: &Id, now: i64) -> HashMap<Id, i64> {
        let prefix = format!("{upstream}/");
        self.health()
            .records
            .iter()
            .filter_map(|(key, record)| {
                let token = Id::parse("token_id", key.strip_prefix(&prefix)?).ok()?;
                let at = record.usable_from(now);
                (at > now).then_some((token, at))
            })
            .collect()
    }

    /// `acquire`, then the chosen token's health decides (as the Redis script does in
    /// one step): a refused grant is taken back and reported as `Unhealthy`.
    pub(super) fn acquire_admitted(&self, req: &AcquireRequest) -> AcquireOutcome {
        let mut grant = match self.acquire(req) {
            AcquireOutcome::Granted(grant) => grant,
            other => return other,
        };
        let admitted = self.admit_grant(
            &req.upstream_id,
            &grant.token_id,
            &req.nonce,
            grant.expires_at_ms,
        );
        match admitted.admission {
            Admission::Leasable | Admission::Probe => {
                grant.probe = admitted.admission == Admission::Probe;
                grant.transitions = admitted.transitions;
                AcquireOutcome::Granted(grant)
            }
            Admission::Refused { state, until_ms } => {
                let key = LeaseKey {
                    upstream_id: req.upstream_id.clone(),
                    tenant_id: req.tenant_id.clone(),
                    token_id: grant.token_id.clone(),
                    nonce: req.nonce.clone(),
                };
                self.release(&key, ReleaseOutcome::NotUsed);
                AcquireOutcome::Unhealthy(Unhealthy {
                    token_id: grant.token_id,
                    state,
                    until_ms,
                    now_ms: admitted.now_ms,
                    transitions: admitted.transitions,
                })
            }
        }
    }

    /// `release`, then the outcome fed to the token's health (`Counters::release_reporting`).
    pub(super) fn release_reporting(
        &self,
        report: &OutcomeReport,
    ) -> (ReleaseResult, Option<Recorded>) {
        let result = self.release(&report.key, report.outcome);
        let fed = matches!(
            result,
            ReleaseResult::Released | ReleaseResult::AlreadyReleased
        );
        (result, fed.then(|| self.record_outcome(report)))
    }

    pub(super) fn record_outcome(&self, report: &OutcomeReport) -> Recorded {
        let now = self.clock.now_ms();
        let key = &report.key;
        let mut transitions = Vec::new();
        let mut book = self.health();
        let relevant = book
            .settled(&key.upstream_id, &key.token_id, now, &mut transitions)
            .is_relevant(&key.nonce, report.outcome);
        let keep_until = now + report.lease_ttl.as_millis() as i64 + 1_000;
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

    /// Forgets the token's health record (`Counters::reset_health`).
    pub(super) fn reset_health(&self, upstream: &Id, token: &Id) -> StatusReport {
        let report = self.token_status(upstream, std::slice::from_ref(token));
        self.health().records.remove(&record_key(upstream, token));
        report
    }

    pub(super) fn token_status(&self, upstream: &Id, tokens: &[Id]) -> StatusReport {
        let now = self.clock.now_ms();
        let mut transitions = Vec::new();
        let mut book = self.health();
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
