//! One token's circuit breaker and quarantine, as a state machine (see
//! `store::counters::breaker` for the rules); `breaker_scripts.rs` is its Lua twin.

use super::types::{
    Admission, OutcomeReport, ReleaseOutcome, TokenStatus, Transition, TransitionCause,
};
use crate::domain::{Id, QUARANTINE_MIN, TokenState};

/// The end of a quarantine reported at `now`, clamped (see `QUARANTINE_MIN`/`MAX`).
pub(super) fn quarantine_end(now: i64, report: &OutcomeReport) -> i64 {
    let block = report.block_duration.as_millis() as i64;
    let wanted = report.blocked_until_ms.unwrap_or(now.saturating_add(block));
    let max = report.max_block.max(QUARANTINE_MIN);
    wanted.clamp(
        now + QUARANTINE_MIN.as_millis() as i64,
        now + max.as_millis() as i64,
    )
}

/// A half-open breaker's outstanding probe lease.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Probe {
    nonce: String,
    expires: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Breaker {
    Closed {
        failures: u32,
    },
    Open {
        until: i64,
    },
    HalfOpen {
        probe: Option<Probe>,
        successes: u32,
    },
}

/// One token's breaker and quarantine: the in-process twin of the Redis hash that
/// `breaker_scripts.rs` keeps. Same decisions, step by step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HealthRecord {
    breaker: Breaker,
    quarantine_until: Option<i64>,
}

impl Default for HealthRecord {
    fn default() -> Self {
        Self {
            breaker: Breaker::Closed { failures: 0 },
            quarantine_until: None,
        }
    }
}

impl HealthRecord {
    /// True when the record says nothing an absent one would not.
    pub(super) fn is_blank(&self) -> bool {
        *self == Self::default()
    }

    /// What the record says, field by field, as the differential test compares it
    /// with the Redis hash (`health_line` in the test): fields a state does not use
    /// are left out, since Redis may keep stale ones there.
    #[cfg(test)]
    pub(super) fn describe(&self) -> String {
        let breaker = match &self.breaker {
            Breaker::Closed { failures } => format!("closed, {failures} failures"),
            Breaker::Open { until } => format!("open until {until}"),
            Breaker::HalfOpen { probe, successes } => format!(
                "half-open, probe {:?}, {successes} successes",
                probe.as_ref().map(|p| (p.nonce.as_str(), p.expires))
            ),
        };
        format!("{breaker}, quarantine {:?}", self.quarantine_until)
    }

    fn breaker_state(&self) -> TokenState {
        match self.breaker {
            Breaker::Closed { .. } => TokenState::Active,
            Breaker::Open { .. } => TokenState::BreakerOpen,
            Breaker::HalfOpen { .. } => TokenState::BreakerHalfOpen,
        }
    }

    fn open_until(&self) -> Option<i64> {
        match self.breaker {
            Breaker::Open { until } => Some(until),
            _ => None,
        }
    }

    /// Applies the transitions that time made due by `now`, in the order they happened.
    pub(super) fn settle(&mut self, token: &Id, now: i64, out: &mut Vec<Transition>) {
        let open_due = self.open_until().filter(|until| *until <= now);
        let quarantine_due = self.quarantine_until.filter(|until| *until <= now);
        let quarantine_first = quarantine_due.is_some_and(|q| open_due.is_none_or(|open| q < open));
        if quarantine_first {
            self.end_quarantine(token, out);
        }
        if let Some(at) = open_due {
            self.breaker = Breaker::HalfOpen {
                probe: None,
                successes: 0,
            };
            out.push(Transition {
                token_id: token.clone(),
                at_ms: at,
                previous: TokenState::BreakerOpen,
                new: TokenState::BreakerHalfOpen,
                until_ms: None,
                cause: TransitionCause::OpenElapsed,
            });
        }
        if quarantine_due.is_some() && !quarantine_first {
            self.end_quarantine(token, out);
        }
        // A probe lease that expired unreleased frees the probe slot (a lease may be
        // released up to and including its expiry instant).
        if let Breaker::HalfOpen { probe, .. } = &mut self.breaker
            && probe.as_ref().is_some_and(|p| p.expires < now)
        {
            *probe = None;
        }
    }

    fn end_quarantine(&mut self, token: &Id, out: &mut Vec<Transition>) {
        let Some(at) = self.quarantine_until.take() else {
            return;
        };
        out.push(Transition {
            token_id: token.clone(),
            at_ms: at,
            previous: TokenState::Quarantined,
            new: self.breaker_state(),
            until_ms: self.open_until(),
            cause: TransitionCause::QuarantineElapsed,
        });
    }

    /// When the record admits a lease: `now`, or the end of its quarantine, of its open
    /// breaker, or of its half-open probe (+1 ms). Read only, unsettled: the twin of
    /// `health_from` in `index_scripts.rs`.
    pub(super) fn usable_from(&self, now: i64) -> i64 {
        let mut at = now;
        if let Some(quarantine) = self.quarantine_until.filter(|q| *q > now) {
            at = quarantine;
        }
        match &self.breaker {
            Breaker::Open { until } => at.max(*until),
            Breaker::HalfOpen {
                probe: Some(probe), ..
            } if probe.expires >= now => at.max(probe.expires + 1),
            _ => at,
        }
    }

    /// See `Counters::admit_grant`. Call after `settle`.
    pub(super) fn admit(&mut self, nonce: &str, lease_expires: i64) -> Admission {
        if let Some(quarantine) = self.quarantine_until {
            let until = quarantine.max(self.open_until().unwrap_or(0));
            return Admission::Refused {
                state: TokenState::Quarantined,
                until_ms: until,
            };
        }
        match &mut self.breaker {
            Breaker::Closed { .. } => Admission::Leasable,
            Breaker::Open { until } => Admission::Refused {
                state: TokenState::BreakerOpen,
                until_ms: *until,
            },
            Breaker::HalfOpen {
                probe: Some(probe), ..
            } if probe.nonce != nonce => Admission::Refused {
                state: TokenState::BreakerHalfOpen,
                until_ms: probe.expires + 1,
            },
            Breaker::HalfOpen { probe, .. } => {
                *probe = Some(Probe {
                    nonce: nonce.to_owned(),
                    expires: lease_expires,
                });
                Admission::Probe
            }
        }
    }

    fn is_probe(&self, nonce: &str) -> bool {
        matches!(&self.breaker, Breaker::HalfOpen { probe: Some(p), .. } if p.nonce == nonce)
    }

    /// Whether `outcome` of lease `nonce` changes anything. Releases that change nothing
    /// (a success on a healthy token: nearly all of them) skip the once-only marker.
    pub(super) fn is_relevant(&self, nonce: &str, outcome: ReleaseOutcome) -> bool {
        match outcome {
            ReleaseOutcome::UpstreamRateLimited => true,
            ReleaseOutcome::NotUsed => self.is_probe(nonce),
            ReleaseOutcome::Success => {
                self.is_probe(nonce)
                    || matches!(self.breaker, Breaker::Closed { failures } if failures > 0)
            }
            ReleaseOutcome::UpstreamError => {
                self.is_probe(nonce) || matches!(self.breaker, Breaker::Closed { .. })
            }
        }
    }

    /// Applies one release. Call after `settle`, when `is_relevant`.
    pub(super) fn apply(
        &mut self,
        report: &OutcomeReport,
        quarantine_end: i64,
        now: i64,
        out: &mut Vec<Transition>,
    ) {
        let (token, nonce) = (&report.key.token_id, report.key.nonce.as_str());
        let (outcome, policy) = (report.outcome, &report.policy);
        let is_probe = self.is_probe(nonce);
        let open_until = now + policy.open_for.as_millis() as i64;
        let mut change = |previous, new, until_ms, cause| {
            out.push(Transition {
                token_id: token.clone(),
                at_ms: now,
                previous,
                new,
                until_ms,
                cause,
            })
        };
        if is_probe && let Breaker::HalfOpen { probe, .. } = &mut self.breaker {
            *probe = None;
        }
        match outcome {
            ReleaseOutcome::UpstreamRateLimited => match self.quarantine_until {
                None => {
                    change(
                        self.breaker_state(),
                        TokenState::Quarantined,
                        Some(quarantine_end),
                        TransitionCause::RateLimited,
                    );
                    self.quarantine_until = Some(quarantine_end);
                }
                Some(current) => self.quarantine_until = Some(current.max(quarantine_end)),
            },
            ReleaseOutcome::NotUsed => {}
            ReleaseOutcome::Success => match &mut self.breaker {
                Breaker::Closed { failures } => *failures = 0,
                Breaker::HalfOpen { successes, .. } if is_probe => {
                    *successes += 1;
                    if *successes >= policy.successes_to_close {
                        self.breaker = Breaker::Closed { failures: 0 };
                        change(
                            TokenState::BreakerHalfOpen,
                            TokenState::Active,
                            None,
                            TransitionCause::ProbesSucceeded,
                        );
                    }
                }
                _ => {}
            },
            ReleaseOutcome::UpstreamError => match &mut self.breaker {
                Breaker::Closed { failures } => {
                    *failures += 1;
                    if *failures >= policy.failures_to_open {
                        self.breaker = Breaker::Open { until: open_until };
                        change(
                            TokenState::Active,
                            TokenState::BreakerOpen,
                            Some(open_until),
                            TransitionCause::UpstreamErrors,
                        );
                    }
                }
                Breaker::HalfOpen { .. } if is_probe => {
                    self.breaker = Breaker::Open { until: open_until };
                    change(
                        TokenState::BreakerHalfOpen,
                        TokenState::BreakerOpen,
                        Some(open_until),
                        TransitionCause::ProbeFailed,
                    );
                }
                _ => {}
            },
        }
    }

    /// The token's health. Call after `settle`.
    pub(super) fn status(&self, token: &Id) -> TokenStatus {
        let (state, until_ms) = match self.quarantine_until {
            Some(q) => (
                TokenState::Quarantined,
                Some(q.max(self.open_until().unwrap_or(0))),
            ),
            None => (self.breaker_state(), self.open_until()),
        };
        TokenStatus {
            token_id: token.clone(),
            state,
            until_ms,
            breaker: self.breaker_state(),
            consecutive_failures: match self.breaker {
                Breaker::Closed { failures } => failures,
                _ => 0,
            },
        }
    }
}
