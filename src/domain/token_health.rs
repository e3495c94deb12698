//! A token's health as leasing sees it: its circuit breaker (seed §3) and the upstream's
//! quarantine after a rate-limit answer. The state machine itself lives with the
//! counters (`store/counters/breaker.rs`), where every replica shares it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The state of a token, as `TokenState` in `events.proto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenState {
    /// Usable: breaker closed, not quarantined.
    Active,
    /// Breaker open after consecutive upstream errors: not leased until it half-opens.
    BreakerOpen,
    /// Breaker half-open: only one probe lease at a time.
    BreakerHalfOpen,
    /// Blocked by the upstream after a rate-limit answer: not leased until it ends.
    Quarantined,
    /// Disabled by an admin.
    Disabled,
}

impl TokenState {
    /// The code used in `events.proto` and in the Redis scripts.
    pub fn code(self) -> i64 {
        match self {
            Self::Active => 1,
            Self::BreakerOpen => 2,
            Self::BreakerHalfOpen => 3,
            Self::Quarantined => 4,
            Self::Disabled => 5,
        }
    }

    pub fn from_code(code: i64) -> Option<Self> {
        [
            Self::Active,
            Self::BreakerOpen,
            Self::BreakerHalfOpen,
            Self::Quarantined,
            Self::Disabled,
        ]
        .into_iter()
        .find(|s| s.code() == code)
    }
}

/// When the circuit breaker of a token opens and closes. Defaults from the seed (§3):
/// 5 consecutive upstream errors open it for 30 s; then 2 consecutive successful probe
/// leases (one outstanding at a time) close it, and a failed probe re-opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Consecutive UPSTREAM_ERROR releases (breaker closed) that open it.
    pub failures_to_open: u32,
    /// How long it stays open before half-opening.
    pub open_for: Duration,
    /// Consecutive successful probes (half-open) that close it.
    pub successes_to_close: u32,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            failures_to_open: 5,
            open_for: Duration::from_secs(30),
            successes_to_close: 2,
        }
    }
}

/// The shortest quarantine. A `blocked_until` in the past (a worker's clock behind, or a
/// stale answer) still means the upstream just refused the token: keep it away briefly
/// rather than lease it straight back into the block.
pub const QUARANTINE_MIN: Duration = Duration::from_secs(1);

/// The longest quarantine. A `blocked_until` further ahead is treated as a parsing or
/// clock error on the worker's side: one bad report must not take a token out of
/// service for weeks. Matches the longest `block_duration` an upstream profile may have.
pub const QUARANTINE_MAX: Duration = Duration::from_secs(86_400);

/// A reported block may last at most this many times the upstream profile's block
/// duration: an upstream that blocks tokens for minutes does not block one for a day,
/// so a `blocked_until` further ahead is a worker's misparsed date or a hostile report
/// (one worker key must not take its pool out of service), and is cut.
pub const MAX_BLOCK_FACTOR: u32 = 4;

/// The longest quarantine one report may set, for an upstream whose block lasts `block`
/// and whose profile sets `max_block` (or not: `MAX_BLOCK_FACTOR` × `block`).
pub fn quarantine_max(block: Duration, max_block: Option<Duration>) -> Duration {
    max_block
        .unwrap_or_else(|| block.saturating_mul(MAX_BLOCK_FACTOR))
        .clamp(QUARANTINE_MIN, QUARANTINE_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Token state codes round-trip and match events.proto's TokenState numbers.
    #[test]
    fn state_codes_roundtrip() {
        for (state, code) in [
            (TokenState::Active, 1),
            (TokenState::BreakerOpen, 2),
            (TokenState::BreakerHalfOpen, 3),
            (TokenState::Quarantined, 4),
            (TokenState::Disabled, 5),
        ] {
            assert_eq!(state.code(), code);
            assert_eq!(TokenState::from_code(code), Some(state));
        }
        assert_eq!(TokenState::from_code(0), None);
    }
}
