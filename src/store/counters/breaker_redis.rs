//! Token health in Redis: invokes `breaker_scripts.rs` and decodes the replies. The
//! failure policy is the counters' (`redis_backend.rs`): bounded calls, errors become
//! `CounterError::Unavailable`, and callers fail closed.

use std::sync::LazyLock;

use redis::Script;

use super::breaker::parse_transitions;
use super::breaker_scripts;
use super::redis_backend::RedisCounters;
use super::{
    Admission, Admitted, CounterError, OutcomeReport, Recorded, Space, StatusReport, TokenStatus,
};
use crate::domain::{Id, QUARANTINE_MIN, TokenState};

// Built once: `Script::new` hashes the source, and the scripts never change.
static ADMIT: LazyLock<Script> = LazyLock::new(|| Script::new(breaker_scripts::ADMIT));
static RECORD: LazyLock<Script> = LazyLock::new(|| Script::new(breaker_scripts::RECORD));
static STATUS: LazyLock<Script> = LazyLock::new(|| Script::new(breaker_scripts::STATUS));
static RESET: LazyLock<Script> = LazyLock::new(|| Script::new(breaker_scripts::RESET));

pub(super) fn bad_reply(what: &str, reply: &[i64]) -> CounterError {
    CounterError::Internal(format!("unexpected {what} reply {reply:?}"))
}

/// The breaker policy and quarantine bounds of a report, as `RECORD` reads them (eight
/// arguments; `RELEASE` passes the same).
pub(super) fn policy_args(report: &OutcomeReport) -> [String; 8] {
    let policy = &report.policy;
    let blocked_until = report
        .blocked_until_ms
        .map(|ms| ms.to_string())
        .unwrap_or_default();
    [
        policy.failures_to_open.to_string(),
        policy.open_for.as_millis().to_string(),
        policy.successes_to_close.to_string(),
        blocked_until,
        report.block_duration.as_millis().to_string(),
        QUARANTINE_MIN.as_millis().to_string(),
        report.max_block.max(QUARANTINE_MIN).as_millis().to_string(),
        (report.repeat_for.as_millis() + 1_000).to_string(),
    ]
}

impl RedisCounters {
    fn health_key(&self, space: Space<'_>, token: &Id) -> String {
        self.key(space, "health", token.as_str())
    }

    pub(super) async fn run_ints(
        &self,
        what: &str,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<Vec<i64>, CounterError> {
        super::redis_backend::ints(what, self.run(invocation).await?)
    }

    pub(super) async fn admit_grant(
        &self,
        space: Space<'_>,
        token: &Id,
        nonce: &str,
        lease_expires_ms: i64,
    ) -> Result<Admitted, CounterError> {
        let mut inv = ADMIT.prepare_invoke();
        inv.key(self.health_key(space, token))
            .arg(nonce)
            .arg(lease_expires_ms);
        let reply = self.run_ints("admit", inv).await?;
        let bad = || bad_reply("admit", &reply);
        let [now, verdict, state, until, ref rest @ ..] = reply[..] else {
            return Err(bad());
        };
        let admission = match verdict {
            1 => Admission::Leasable,
            2 => Admission::Probe,
            0 => Admission::Refused {
                state: TokenState::from_code(state).ok_or_else(bad)?,
                until_ms: until,
            },
            _ => return Err(bad()),
        };
        Ok(Admitted {
            admission,
            now_ms: now,
            transitions: parse_transitions(rest, &[token]).ok_or_else(bad)?,
        })
    }

    pub(super) async fn record_outcome(
        &self,
        report: &OutcomeReport,
    ) -> Result<Recorded, CounterError> {
        let key = &report.key;
        let mut inv = RECORD.prepare_invoke();
        inv.key(self.health_key(key.space(), &key.token_id))
            .key(self.key(key.space(), "health-done", &key.nonce))
            .arg(&key.nonce)
            .arg(report.outcome.as_str());
        for arg in policy_args(report) {
            inv.arg(arg);
        }
        let reply = self.run_ints("record", inv).await?;
        let bad = || bad_reply("record", &reply);
        let [now, applied, ref rest @ ..] = reply[..] else {
            return Err(bad());
        };
        Ok(Recorded {
            now_ms: now,
            applied: applied == 1,
            transitions: parse_transitions(rest, &[&key.token_id]).ok_or_else(bad)?,
        })
    }

    /// The token's health just before (as `token_status` reads it), and its record
    /// deleted, in one script.
    pub(super) async fn reset_health(
        &self,
        space: Space<'_>,
        token: &Id,
    ) -> Result<StatusReport, CounterError> {
        let mut inv = RESET.prepare_invoke();
        inv.key(self.health_key(space, token))
            .arg(self.key_base(space))
            .arg(token.as_str());
        let reply = self.run_ints("reset", inv).await?;
        parse_status("reset", &reply, std::slice::from_ref(token))
    }

    pub(super) async fn token_status(
        &self,
        space: Space<'_>,
        tokens: &[Id],
    ) -> Result<StatusReport, CounterError> {
        let mut inv = STATUS.prepare_invoke();
        for token in tokens {
            inv.key(self.health_key(space, token));
        }
        let reply = self.run_ints("status", inv).await?;
        parse_status("status", &reply, tokens)
    }
}

/// A `STATUS` (or `RESET`) reply about `tokens`.
fn parse_status(script: &str, reply: &[i64], tokens: &[Id]) -> Result<StatusReport, CounterError> {
    let bad = || bad_reply(script, reply);
    let [now, n, ref rest @ ..] = reply[..] else {
        return Err(bad());
    };
    if n as usize != tokens.len() || rest.len() < 4 * tokens.len() {
        return Err(bad());
    }
    let (states, flat) = rest.split_at(4 * tokens.len());
    let statuses = tokens
        .iter()
        .zip(states.chunks(4))
        .map(|(token, s)| {
            Some(TokenStatus {
                token_id: token.clone(),
                state: TokenState::from_code(s[0])?,
                breaker: TokenState::from_code(s[1])?,
                until_ms: (s[2] > 0).then_some(s[2]),
                consecutive_failures: s[3] as u32,
            })
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(bad)?;
    let refs: Vec<&Id> = tokens.iter().collect();
    Ok(StatusReport {
        now_ms: now,
        tokens: statuses,
        transitions: parse_transitions(flat, &refs).ok_or_else(bad)?,
    })
}
