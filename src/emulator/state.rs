//! What the emulator remembers per token — its limiter, counters and faults — behind one
//! lock, and the admission decision every `connector.php` request goes through.
//!
//! A std `Mutex`, not a tokio one: every critical section is a few map operations with
//! no `.await` inside, and the clock is read *inside* the lock so that accepted
//! timestamps are recorded in the same order the limiter judged them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::limiter::{Decision, LimitRules, TokenLimiter};
use super::methods::OrderBook;
use crate::baselinker::BlockZone;
use crate::clock::Clock;

/// Faults injected for one token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Fault {
    /// Fraction of requests answered HTTP 502 with an HTML body, 0 (none) to 1 (all).
    /// Spread evenly and deterministically (0.25 = every 4th request), not at random, so
    /// tests can count on it.
    pub bad_gateway_fraction: f64,
    /// Added before the request reaches the limiter, as a slow network would: the
    /// request is judged (and time-stamped) when it "arrives", after the delay.
    #[serde(rename = "latency_ms", with = "duration_ms")]
    pub latency: Duration,
    /// Whether a request answered 502 still counts toward the limit (default true: the
    /// upstream may well have seen it before its gateway failed, so a careful client
    /// must count it). When false the 502 is served before the limiter.
    pub bad_gateway_counts_toward_limit: bool,
}

impl Default for Fault {
    fn default() -> Self {
        Self {
            bad_gateway_fraction: 0.0,
            latency: Duration::ZERO,
            bad_gateway_counts_toward_limit: true,
        }
    }
}

impl Fault {
    /// No fault.
    pub fn none() -> Self {
        Self::default()
    }

    /// HTTP 502 for `fraction` of requests (clamped to 0..=1).
    pub fn bad_gateway(fraction: f64) -> Self {
        Self {
            bad_gateway_fraction: fraction,
            ..Self::default()
        }
        .clamped()
    }

    /// This fault plus `latency` before each request.
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Whether the fraction is a number in 0..=1.
    pub fn is_valid(&self) -> bool {
        (0.0..=1.0).contains(&self.bad_gateway_fraction)
    }

    fn clamped(mut self) -> Self {
        self.bad_gateway_fraction = if self.bad_gateway_fraction.is_nan() {
            0.0
        } else {
            self.bad_gateway_fraction.clamp(0.0, 1.0)
        };
        self
    }
}

mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// What the emulator observed for one token. Served as JSON by `GET /_emulator/stats`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenStats {
    /// Requests that entered the window (whatever the method then answered).
    pub accepted: u64,
    /// Refused requests: the first one over the limit plus every one during a block.
    pub violations: u64,
    /// Blocks started (first-over-limit requests).
    pub blocks: u64,
    /// HTTP 502 answers served by an injected fault.
    pub bad_gateway: u64,
    /// Unix ms of every accepted request, in the order they were judged.
    pub accepted_at_ms: Vec<i64>,
    /// The end of the current or last block, Unix ms.
    pub blocked_until_ms: Option<i64>,
}

impl TokenStats {
    /// The most accepted requests found in any half-open interval `[s, s + window)`:
    /// a check of the sliding-window limit that does not trust the emulator's limiter.
    pub fn max_accepted_in_any_window(&self, window: Duration) -> usize {
        let window_ms = window.as_millis() as i64;
        let mut times = self.accepted_at_ms.clone();
        times.sort_unstable();
        let mut end = 0;
        let mut best = 0;
        for (start, &first) in times.iter().enumerate() {
            while end < times.len() && times[end] - first < window_ms {
                end += 1;
            }
            best = best.max(end - start);
        }
        best
    }
}

/// How one request fared at the gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Entered the window: answer the method.
    Accepted,
    /// Refused; blocked until this Unix ms.
    Blocked { until_ms: i64 },
    /// Answer HTTP 502 with HTML.
    BadGateway,
}

/// Everything the server and the handle share.
pub(crate) struct Shared {
    /// The rules for tokens without their own limit.
    pub rules: LimitRules,
    /// The zone of "blocked until" messages.
    pub zone: BlockZone,
    /// Where time comes from.
    pub clock: Clock,
    /// Accept any non-empty token (else only the known ones).
    pub accept_any_token: bool,
    /// The account's orders.
    pub orders: OrderBook,
    tokens: Mutex<TokenTable>,
}

#[derive(Default)]
struct TokenTable {
    /// Tokens accepted when `accept_any_token` is off.
    known: HashSet<String>,
    /// State of every token seen or configured.
    entries: HashMap<String, TokenEntry>,
}

#[derive(Default)]
struct TokenEntry {
    /// A limit replacing `rules.limit` for this token.
    limit_override: Option<u32>,
    limiter: TokenLimiter,
    stats: TokenStats,
    fault: Fault,
    /// Error-diffusion accumulator spreading 502s evenly at `fault.bad_gateway_fraction`.
    bad_gateway_debt: f64,
}

impl TokenEntry {
    /// Whether the next request gets a 502; advances the spreading.
    fn next_is_bad_gateway(&mut self) -> bool {
        self.bad_gateway_debt += self.fault.bad_gateway_fraction;
        if self.bad_gateway_debt >= 1.0 - 1e-9 {
            self.bad_gateway_debt -= 1.0;
            return true;
        }
        false
    }
}

impl Shared {
    pub fn new(
        rules: LimitRules,
        zone: BlockZone,
        clock: Clock,
        tokens: Option<&[String]>,
        orders: OrderBook,
    ) -> Self {
        let table = TokenTable {
            known: tokens.unwrap_or_default().iter().cloned().collect(),
            entries: HashMap::new(),
        };
        Self {
            rules,
            zone,
            clock,
            accept_any_token: tokens.is_none(),
            orders,
            tokens: Mutex::new(table),
        }
    }

    fn table(&self) -> MutexGuard<'_, TokenTable> {
        // A panic while holding the lock leaves plain counters behind, still usable.
        self.tokens
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether `token` may call at all.
    pub fn is_known(&self, token: &str) -> bool {
        self.accept_any_token || self.table().known.contains(token)
    }

    /// Accepts `token` from now on.
    pub fn add_token(&self, token: &str) {
        self.table().known.insert(token.to_owned());
    }

    /// Gives `token` its own limit per window.
    pub fn set_limit(&self, token: &str, limit: u32) {
        let mut table = self.table();
        table
            .entries
            .entry(token.to_owned())
            .or_default()
            .limit_override = Some(limit);
    }

    /// Replaces `token`'s faults (fraction clamped to 0..=1).
    pub fn set_fault(&self, token: &str, fault: Fault) {
        let mut table = self.table();
        let entry = table.entries.entry(token.to_owned()).or_default();
        entry.fault = fault.clamped();
        entry.bad_gateway_debt = 0.0;
    }

    /// The latency fault of `token`.
    pub fn latency(&self, token: &str) -> Duration {
        let table = self.table();
        table
            .entries
            .get(token)
            .map_or(Duration::ZERO, |entry| entry.fault.latency)
    }

    /// Judges one request of a known `token` and records what happened.
    pub fn admit(&self, token: &str) -> Admission {
        let mut table = self.table();
        let entry = table.entries.entry(token.to_owned()).or_default();
        let now_ms = self.clock.now_ms();
        let bad_gateway = entry.next_is_bad_gateway();
        if bad_gateway && !entry.fault.bad_gateway_counts_toward_limit {
            entry.stats.bad_gateway += 1;
            return Admission::BadGateway;
        }
        let rules = LimitRules {
            limit: entry.limit_override.unwrap_or(self.rules.limit),
            ..self.rules
        };
        match entry.limiter.check(&rules, now_ms) {
            Decision::Refused {
                until_ms,
                started_block,
            } => {
                entry.stats.violations += 1;
                entry.stats.blocks += u64::from(started_block);
                entry.stats.blocked_until_ms = Some(until_ms);
                Admission::Blocked { until_ms }
            }
            Decision::Accepted => {
                entry.stats.accepted += 1;
                entry.stats.accepted_at_ms.push(now_ms);
                if bad_gateway {
                    entry.stats.bad_gateway += 1;
                    return Admission::BadGateway;
                }
                Admission::Accepted
            }
        }
    }

    /// What was observed for `token` (all zero if nothing).
    pub fn stats(&self, token: &str) -> TokenStats {
        let table = self.table();
        table
            .entries
            .get(token)
            .map(|entry| entry.stats.clone())
            .unwrap_or_default()
    }

    /// What was observed for every token seen, by token.
    pub fn all_stats(&self) -> BTreeMap<String, TokenStats> {
        let table = self.table();
        table
            .entries
            .iter()
            .map(|(token, entry)| (token.clone(), entry.stats.clone()))
            .collect()
    }
}
