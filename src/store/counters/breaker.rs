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

use super::{
    Admitted, CounterError, Counters, OutcomeReport, Recorded, Space, StatusReport, Transition,
    TransitionCause,
};
use crate::domain::{Id, TokenState};

impl Counters {
    /// After the counters granted `nonce` on `token` (valid until `lease_expires_ms`):
    /// may the lease be handed out? On a half-open token with no probe out, this lease
    /// becomes the probe (atomically, so at most one is out). See the module doc.
    pub async fn admit_grant(
        &self,
        space: Space<'_>,
        token_id: &Id,
        nonce: &str,
        lease_expires_ms: i64,
    ) -> Result<Admitted, CounterError> {
        match self {
            Self::Memory(m) => Ok(m.admit_grant(space.upstream, token_id, nonce, lease_expires_ms)),
            Self::Redis(r) => {
                r.admit_grant(space, token_id, nonce, lease_expires_ms)
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
        space: Space<'_>,
        token_id: &Id,
    ) -> Result<StatusReport, CounterError> {
        match self {
            Self::Memory(m) => Ok(m.reset_health(space.upstream, token_id)),
            Self::Redis(r) => r.reset_health(space, token_id).await,
        }
    }

    /// The health of `tokens` (all of one space) now, settling transitions that became
    /// due.
    pub async fn token_status(
        &self,
        space: Space<'_>,
        tokens: &[Id],
    ) -> Result<StatusReport, CounterError> {
        match self {
            Self::Memory(m) => Ok(m.token_status(space.upstream, tokens)),
            Self::Redis(r) => r.token_status(space, tokens).await,
        }
    }
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
