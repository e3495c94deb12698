//! The per-token limit, pure: time (Unix ms) is passed in, nothing is read.
//!
//! # Boundaries
//! - **Sliding** (default): a request at `t` is accepted iff fewer than `limit` accepted
//!   requests have timestamps in the half-open interval `(t − W, t]`. Equivalently: the
//!   `limit`-th previous accepted request must be at least `W` old. So every half-open
//!   window `[s, s + W)` holds at most `limit` accepted requests; a request exactly `W`
//!   after the one it replaces is accepted, one millisecond earlier is not.
//! - **Fixed**: windows `[k·W, (k+1)·W)` aligned on the Unix epoch (with W = 60 s: calendar
//!   minutes); a request is accepted iff its window holds fewer than `limit`. This is the
//!   lenient reading that lets `2 × limit` through in a moment across a boundary.
//!
//! # Blocks
//! The first request over the limit starts a block ending at `t + block`, **rounded up to
//! a whole second** — BaseLinker's message shows whole seconds, and a client that trusts
//! it must not be refused again at the time it was told. The token is blocked while
//! `now < until`; at `until` exactly it is free. Requests during a block are refused and
//! never enter the window. Whether they extend the block is a rule (`extend_block`):
//! the default is no, because nothing public says BaseLinker does. A request after the
//! block is judged by the window as usual (with a block shorter than the window, a full
//! window blocks it again).

use std::collections::VecDeque;

/// Whether windows slide or sit on fixed boundaries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowKind {
    /// Strict: no half-open interval of the window's length holds more than the limit.
    #[default]
    Sliding,
    /// Counters reset at multiples of the window length since the Unix epoch.
    Fixed,
}

/// The rules one token is judged by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitRules {
    /// Accepted requests per window.
    pub limit: u32,
    /// Window length, ms (> 0).
    pub window_ms: i64,
    /// Sliding or fixed windows.
    pub kind: WindowKind,
    /// Block length after a violation, ms.
    pub block_ms: i64,
    /// Whether a request during a block pushes its end to `now + block`.
    pub extend_block: bool,
}

/// What the limiter decided for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The request entered the window.
    Accepted,
    /// Refused; the token is blocked until `until_ms`.
    Refused {
        /// When the block ends, Unix ms (a whole second).
        until_ms: i64,
        /// True for the request that started the block, false for one during it.
        started_block: bool,
    },
}

/// One token's window and block.
#[derive(Clone, Debug, Default)]
pub struct TokenLimiter {
    /// Sliding: accepted timestamps not yet older than the window, oldest first.
    recent: VecDeque<i64>,
    /// Fixed: the index of the current window and its count.
    fixed_window: i64,
    fixed_count: u32,
    /// The end of the current (or last) block, Unix ms.
    blocked_until_ms: Option<i64>,
}

impl TokenLimiter {
    /// Judges a request arriving at `now_ms` and records it if accepted.
    pub fn check(&mut self, rules: &LimitRules, now_ms: i64) -> Decision {
        if let Some(until_ms) = self.blocked_until_ms.filter(|until| now_ms < *until) {
            let until_ms = if rules.extend_block {
                until_ms.max(block_end(rules, now_ms))
            } else {
                until_ms
            };
            self.blocked_until_ms = Some(until_ms);
            return Decision::Refused {
                until_ms,
                started_block: false,
            };
        }
        if !self.has_room(rules, now_ms) {
            let until_ms = block_end(rules, now_ms);
            self.blocked_until_ms = Some(until_ms);
            return Decision::Refused {
                until_ms,
                started_block: true,
            };
        }
        match rules.kind {
            WindowKind::Sliding => self.recent.push_back(now_ms),
            WindowKind::Fixed => self.fixed_count += 1,
        }
        Decision::Accepted
    }

    /// The end of the current or last block, Unix ms.
    #[cfg(test)]
    pub fn blocked_until_ms(&self) -> Option<i64> {
        self.blocked_until_ms
    }

    /// Forgets expired entries and says whether one more request fits.
    fn has_room(&mut self, rules: &LimitRules, now_ms: i64) -> bool {
        match rules.kind {
            WindowKind::Sliding => {
                while self
                    .recent
                    .front()
                    .is_some_and(|&oldest| now_ms - oldest >= rules.window_ms)
                {
                    self.recent.pop_front();
                }
                self.recent.len() < rules.limit as usize
            }
            WindowKind::Fixed => {
                let window = now_ms.div_euclid(rules.window_ms);
                if window != self.fixed_window {
                    self.fixed_window = window;
                    self.fixed_count = 0;
                }
                self.fixed_count < rules.limit
            }
        }
    }
}

/// `now + block`, rounded up to a whole second.
fn block_end(rules: &LimitRules, now_ms: i64) -> i64 {
    (now_ms + rules.block_ms + 999).div_euclid(1000) * 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(kind: WindowKind, extend_block: bool) -> LimitRules {
        LimitRules {
            limit: 3,
            window_ms: 1000,
            kind,
            block_ms: 2000,
            extend_block,
        }
    }

    /// Sliding: the limit-th previous request must be at least W old — W − 1 ms is
    /// refused, W exactly is accepted (the interval is (t − W, t]).
    #[test]
    fn sliding_window_boundary_is_half_open() {
        let rules = rules(WindowKind::Sliding, false);
        for edge in [999, 1000] {
            let mut limiter = TokenLimiter::default();
            for t in [10_000, 10_100, 10_200] {
                assert_eq!(limiter.check(&rules, t), Decision::Accepted);
            }
            let late = limiter.check(&rules, 10_000 + edge);
            assert_eq!(late == Decision::Accepted, edge == 1000, "edge {edge}");
        }
    }

    /// A block starts at the first refusal, ends on a whole second, refuses until then
    /// without extending (by default), and frees the token at `until` exactly.
    #[test]
    fn block_rounds_up_and_ends_exactly() {
        let rules = rules(WindowKind::Sliding, false);
        let mut limiter = TokenLimiter::default();
        for _ in 0..3 {
            limiter.check(&rules, 10_400);
        }
        let first = limiter.check(&rules, 10_500);
        assert_eq!(
            first,
            Decision::Refused {
                until_ms: 13_000,
                started_block: true
            }
        );
        let during = limiter.check(&rules, 12_999);
        assert_eq!(
            during,
            Decision::Refused {
                until_ms: 13_000,
                started_block: false
            }
        );
        assert_eq!(limiter.check(&rules, 13_000), Decision::Accepted);
    }

    /// With `extend_block`, a request during the block pushes its end out.
    #[test]
    fn block_extends_when_configured() {
        let rules = rules(WindowKind::Sliding, true);
        let mut limiter = TokenLimiter::default();
        for t in [0, 0, 0, 0] {
            limiter.check(&rules, t);
        }
        assert_eq!(limiter.blocked_until_ms(), Some(2000));
        let during = limiter.check(&rules, 1500);
        assert!(matches!(during, Decision::Refused { until_ms: 4000, .. }));
        assert!(matches!(
            limiter.check(&rules, 3999),
            Decision::Refused { .. }
        ));
    }

    /// Fixed windows reset on epoch-aligned boundaries; sliding ones do not.
    #[test]
    fn fixed_windows_reset_on_boundaries() {
        for (kind, accepted_after_boundary) in
            [(WindowKind::Fixed, true), (WindowKind::Sliding, false)]
        {
            let rules = rules(kind, false);
            let mut limiter = TokenLimiter::default();
            for _ in 0..3 {
                assert_eq!(limiter.check(&rules, 1999), Decision::Accepted);
            }
            let next = limiter.check(&rules, 2000);
            assert_eq!(
                next == Decision::Accepted,
                accepted_after_boundary,
                "{kind:?}"
            );
        }
    }
}
