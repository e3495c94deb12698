//! Planning: the fewest tokens in the scenario's first pool that meet every guarantee
//! and the target share of every tenant's demand, with no upstream violation.
//!
//! Tries k = lower bound, lower bound + 1, … up to `plan_max_tokens`, running the
//! whole scenario each time. The lower bound is what the 80 % rule needs for the
//! guarantees the pool's tenants draw from it (guarantee minus their dedicated
//! tokens' capacity), and never below 1; fewer tokens would be refused anyway.

use super::report::{Verdict, verdict};
use super::run::{RunResult, run};
use super::scenario::Scenario;
use crate::domain::MAX_GUARANTEED_SHARE;

/// The planning answer.
#[derive(Debug)]
pub struct PlanAnswer {
    /// The fewest tokens that met the goals, if any up to the maximum did.
    pub tokens: Option<u32>,
    /// Every try: (tokens, verdict).
    pub tries: Vec<(u32, Verdict)>,
    /// The run with the answer (or the last one tried).
    pub last: Option<RunResult>,
}

/// `ceil(drawn guarantees / (0.8 × usable per token))`, at least 1.
pub fn lower_bound(s: &Scenario) -> u32 {
    let pool = &s.pools[0].id;
    let usable = f64::from(s.upstream.usable());
    let drawn: f64 = s
        .tenants
        .iter()
        .filter(|t| s.pool_of(t) == pool)
        .map(|t| {
            let own = f64::from(t.dedicated_tokens) * usable;
            (f64::from(s.guaranteed(t)) - own).max(0.0)
        })
        .sum();
    ((drawn / (MAX_GUARANTEED_SHARE * usable.max(1.0))).ceil() as u32).max(1)
}

pub async fn plan(s: &Scenario, progress: bool) -> anyhow::Result<PlanAnswer> {
    let mut answer = PlanAnswer {
        tokens: None,
        tries: vec![],
        last: None,
    };
    let from = lower_bound(s);
    if progress {
        eprintln!(
            "[plan] starting at {from} token(s): fewer cannot hold the pool's guarantees within 80 % of its capacity"
        );
    }
    for k in from..=s.plan_max_tokens.max(from) {
        if progress {
            eprintln!("[plan] trying {k} token(s) in pool {}", s.pools[0].id);
        }
        let result = run(s, Some(k), progress).await?;
        let v = verdict(&result);
        if progress {
            let how = if v.ok {
                "meets the goals"
            } else {
                "falls short"
            };
            eprintln!("[plan] {k} token(s) {how}");
            for reason in &v.reasons {
                eprintln!("[plan]   {reason}");
            }
        }
        let ok = v.ok;
        answer.tries.push((k, v));
        answer.last = Some(result);
        if ok {
            answer.tokens = Some(k);
            break;
        }
    }
    Ok(answer)
}
