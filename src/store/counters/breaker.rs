//! Token health in the counters store: each token's circuit breaker and quarantine,
//! shared by every replica like the windows are.
//!
//! # The state machine (per token)
//! - **Breaker** (seed §3). *Closed*: an UPSTREAM_ERROR release adds one to a count of
//!   consecutive failures, a SUCCESS resets it; at `failures_to_open` the breaker
//!   *opens* for `open_for`. *Open*: nothing is leased; outcomes of leases granted
//!   before it opened are ignored. Once `open_for` has passed it is *half-open*: one
//!   lease at a time is admitted as a probe; a SUCCESS probe counts, `successes_to_close`
//!   of them in a row *close* it, an UPSTREAM_ERROR probe re-opens it. Outcomes of other
//!   leases do not count while half-open. NOT_USED and UPSTREAM_RATE_LIMITED never count;
//!   a probe released that way (or expired unreleased) frees the probe slot.
//! - **Quarantine**, beside the breaker: an UPSTREAM_RATE_LIMITED release blocks the
//!   token until the upstream's `blocked_until` (or now + the profile's block duration),
//!   clamped to [`QUARANTINE_MIN`, the profile's `max_block`] from now (by default 4
//!   times its block duration; at most a day). A later report only ever extends it; only an
//!   admin's `reset_health` lifts it early.
//!
//! Transitions that time alone causes (open → half-open, quarantine over) have no release
//! to trigger them: every operation first *settles* the record, applying those due by
//! its clock and reporting them. Because the settle-and-save is one atomic step (a Lua
//! script, or one critical section), exactly one caller observes — and reports — each
//! transition, whichever replica it runs on.
//!
//! # Why a grant is admitted *after* the counters granted it
//! The acquire script (`scripts::ACQUIRE`) knows nothing of health. Reading the states
//! before acquiring would leave a gap: a token quarantined by another replica between
//! the read and the grant would be leased after the quarantining release returned. So
//! leasing asks `admit_grant` once the slot is recorded: that read is atomic with the
//! probe claim, and ordered after the grant, so a quarantine whose release returned
//! before the grant is always seen. A refused grant is given back (NOT_USED).
//!
//! Time is the store's clock, as for the windows.

use std::time::Duration;

use super::{CounterError, Counters, LeaseKey, ReleaseOutcome};
use crate::domain::{BreakerPolicy, Id, QUARANTINE_MIN, TokenState};

/// Why a token changed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransitionCause {
    /// Consecutive upstream errors opened the breaker.
    UpstreamErrors,
    /// The breaker's open time passed: half-open.
    OpenElapsed,
    /// Enough probes succeeded: closed.
    ProbesSucceeded,
    /// A probe failed: open again.
    ProbeFailed,
    /// The upstream answered "rate limited": quarantined.
    RateLimited,
    /// The quarantine ended.
    QuarantineElapsed,
}

impl TransitionCause {
    const ALL: [Self; 6] = [
        Self::UpstreamErrors,
        Self::OpenElapsed,
        Self::ProbesSucceeded,
        Self::ProbeFailed,
        Self::RateLimited,
        Self::QuarantineElapsed,
    ];

    /// The code the Redis scripts use (`C_*` in `breaker_scripts.rs`).
    fn code(self) -> i64 {
        Self::ALL.iter().position(|c| *c == self).expect("listed") as i64 + 1
    }

    fn from_code(code: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// For people: the `cause` of a TokenStateChanged event.
    pub fn describe(self, policy: &BreakerPolicy) -> String {
        match self {
            Self::UpstreamErrors => format!(
                "circuit breaker opened after {} consecutive upstream errors",
                policy.failures_to_open
            ),
            Self::OpenElapsed => {
                "circuit breaker half-open: one probe lease at a time is granted".into()
            }
            Self::ProbesSucceeded => format!(
                "circuit breaker closed after {} successful probe leases",
                policy.successes_to_close
            ),
            Self::ProbeFailed => "circuit breaker re-opened: the probe lease failed".into(),
            Self::RateLimited => {
                "quarantined: the upstream answered that the token is rate limited".into()
            }
            Self::QuarantineElapsed => "quarantine over".into(),
        }
    }
}

/// One change of a token's state, observed (and so reported) exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub token_id: Id,
    /// When it happened, store clock (for lazy transitions: when it became due).
    pub at_ms: i64,
    pub previous: TokenState,
    pub new: TokenState,
    /// For BREAKER_OPEN and QUARANTINED: when that state ends.
    pub until_ms: Option<i64>,
    pub cause: TransitionCause,
}

/// Whether a granted lease may be handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Healthy token.
    Leasable,
    /// Half-open token: this lease is its probe.
    Probe,
    /// Not now: quarantined, open, or half-open with a probe already out. The token
    /// may be usable again at `until_ms` (store clock), earlier for a probe released.
    Refused { state: TokenState, until_ms: i64 },
}

/// The answer to `admit_grant`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub admission: Admission,
    pub now_ms: i64,
    pub transitions: Vec<Transition>,
}

/// What a release tells the breaker.
#[derive(Debug, Clone)]
pub struct OutcomeReport {
    pub key: LeaseKey,
    pub outcome: ReleaseOutcome,
    /// With UPSTREAM_RATE_LIMITED: when the upstream said the block ends (Unix ms).
    pub blocked_until_ms: Option<i64>,
    /// The upstream profile's block duration, used when `blocked_until_ms` is absent.
    pub block_duration: Duration,
    /// The longest quarantine this report may set (`Upstream::max_block`).
    pub max_block: Duration,
    /// The service's lease TTL: a release can be repeated at most this long after it.
    pub lease_ttl: Duration,
    pub policy: BreakerPolicy,
}

/// The answer to `record_outcome`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub now_ms: i64,
    /// Whether this call changed the record. False when the outcome changes nothing (a
    /// success on a healthy token) or this lease's outcome was applied already (a
    /// repeated release).
    pub applied: bool,
    pub transitions: Vec<Transition>,
}

/// A token's health now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenStatus {
    pub token_id: Id,
    /// QUARANTINED while quarantined, otherwise the breaker's state.
    pub state: TokenState,
    /// When `state` is QUARANTINED or BREAKER_OPEN: when the token may be leased again.
    pub until_ms: Option<i64>,
    /// The breaker alone (ACTIVE when closed).
    pub breaker: TokenState,
    /// Consecutive upstream errors counted while closed.
    pub consecutive_failures: u32,
}

/// The answer to `token_status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    pub now_ms: i64,
    pub tokens: Vec<TokenStatus>,
    pub transitions: Vec<Transition>,
}

impl Counters {
    /// After the counters granted `nonce` on `token` (valid until `lease_expires_ms`):
    /// may the lease be handed out? On a half-open token with no probe out, this lease
    /// becomes the probe (atomically, so at most one is out). See the module doc.
    pub async fn admit_grant(
        &self,
        upstream_id: &Id,
        token_id: &Id,
        nonce: &str,
        lease_expires_ms: i64,
    ) -> Result<Admitted, CounterError> {
        match self {
            Self::Memory(m) => Ok(m.admit_grant(upstream_id, token_id, nonce, lease_expires_ms)),
            Self::Redis(r) => {
                r.admit_grant(upstream_id, token_id, nonce, lease_expires_ms)
                    .await
            }
        }
    }

    /// Feeds a released lease's outcome to its token's breaker and quarantine. Safe to
    /// repeat for the same lease: an outcome is applied once.
    pub async fn record_outcome(&self, report: &OutcomeReport) -> Result<Recorded, CounterError> {
        match self {
            Self::Memory(m) => Ok(m.record_outcome(report)),
            Self::Redis(r) => r.record_outcome(report).await,
        }
    }

    /// Puts a token back in service: forgets its quarantine and breaker (an admin's
    /// decision). Returns its health just before.
    pub async fn reset_health(
        &self,
        upstream_id: &Id,
        token_id: &Id,
    ) -> Result<StatusReport, CounterError> {
        match self {
            Self::Memory(m) => Ok(m.reset_health(upstream_id, token_id)),
            Self::Redis(r) => r.reset_health(upstream_id, token_id).await,
        }
    }

    /// The health of `tokens` now (settling transitions that became due).
    pub async fn token_status(
        &self,
        upstream_id: &Id,
        tokens: &[Id],
    ) -> Result<StatusReport, CounterError> {
        match self {
            Self::Memory(m) => Ok(m.token_status(upstream_id, tokens)),
            Self::Redis(r) => r.token_status(upstream_id, tokens).await,
        }
    }
}

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

/// Decodes transitions from a script reply: groups of
/// `token_index (1-based), at, previous, new, until (0 = none), cause`.
pub(super) fn parse_transitions(flat: &[i64], tokens: &[&Id]) -> Option<Vec<Transition>> {
    if !flat.len().is_multiple_of(6) {
        return None;
    }
    flat.chunks(6)
        .map(|t| {
            Some(Transition {
                token_id: (*tokens.get((t[0] as usize).checked_sub(1)?)?).clone(),
                at_ms: t[1],
                previous: TokenState::from_code(t[2])?,
                new: TokenState::from_code(t[3])?,
                until_ms: (t[4] > 0).then_some(t[4]),
                cause: TransitionCause::from_code(t[5])?,
            })
        })
        .collect()
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
