//! The per-tenant table and the verdict a plan needs: every guarantee met in every
//! window where the tenant asked for it, the target share of demand served, and no
//! request refused by the upstream.

use std::fmt::Write;

use super::run::{RunResult, TenantResult};

/// How much a window's grants may fall short of the guarantee and still count as met:
/// open-loop arrivals and window edges move a request or two across a boundary.
pub fn guarantee_slack(guaranteed: u32) -> u64 {
    (f64::from(guaranteed) * 0.05).ceil().max(1.0) as u64
}

/// Windows in which `t` asked for at least some of its guarantee and got less
/// (beyond the slack).
pub fn missed_windows(t: &TenantResult) -> usize {
    t.asked_per_window
        .iter()
        .zip(&t.granted_per_window)
        .filter(|(asked, granted)| {
            let need = (**asked).min(u64::from(t.guaranteed));
            **granted + guarantee_slack(t.guaranteed) < need
        })
        .count()
}

pub fn share(t: &TenantResult) -> f64 {
    if t.asked == 0 {
        1.0
    } else {
        t.granted as f64 / t.asked as f64
    }
}

fn percentile(values: &[u64], p: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    Some(v[i])
}

/// Whether a run meets the scenario's goals, and why not.
#[derive(Clone, Debug)]
pub struct Verdict {
    pub ok: bool,
    pub reasons: Vec<String>,
}

pub fn verdict(result: &RunResult) -> Verdict {
    let mut reasons = vec![];
    if let Some(why) = &result.refused {
        reasons.push(format!("the service refused the configuration: {why}"));
    }
    let violations: u64 = result.tokens.iter().map(|t| t.violations).sum();
    if violations > 0 {
        reasons.push(format!("the upstream counted {violations} violation(s)"));
    }
    for t in &result.tenants {
        let missed = missed_windows(t);
        if missed > 0 {
            reasons.push(format!("{}: guarantee missed in {missed} window(s)", t.id));
        }
        // A small absolute slack: one request of a short run is not a missed target.
        if t.asked > 0 && (t.granted + 1) as f64 / (t.asked as f64) < t.target_share {
            reasons.push(format!(
                "{}: served {:.1} % of demand, below the target {:.1} %",
                t.id,
                100.0 * share(t),
                100.0 * t.target_share
            ));
        }
        if t.upstream_refusals > 0 {
            reasons.push(format!(
                "{}: {} call(s) refused by the upstream",
                t.id, t.upstream_refusals
            ));
        }
    }
    Verdict {
        ok: reasons.is_empty(),
        reasons,
    }
}

/// Requests per simulated minute (the upstream's clock) from a count over the whole run.
fn per_minute(result: &RunResult, count: u64) -> f64 {
    let minutes = f64::from(result.windows) * result.window_secs / 60.0;
    count as f64 / minutes.max(f64::MIN_POSITIVE)
}

/// The per-tenant table (rates per simulated minute, waits in simulated ms) and a token
/// summary (utilization of the usable capacity, as GetUsage and the metrics count it).
pub fn table(result: &RunResult) -> String {
    let mut out = String::new();
    if let Some(why) = &result.refused {
        let _ = writeln!(out, "configuration refused by the service: {why}");
        return out;
    }
    let name_w = result
        .tenants
        .iter()
        .map(|t| t.id.len())
        .chain([6])
        .max()
        .unwrap_or(6);
    let _ = writeln!(
        out,
        "{:<name_w$}  {:>9}  {:>10}  {:>9}  {:>6}  {:>9}  {:>9}  {:>6}  {:>6}  {:>10}",
        "tenant",
        "guar/min",
        "demand/min",
        "grant/min",
        "share",
        "wait p50",
        "wait p99",
        "denied",
        "missed",
        "violations"
    );
    for t in &result.tenants {
        let ms = |v: Option<u64>| v.map_or("-".to_owned(), |v| format!("{v} ms"));
        let _ = writeln!(
            out,
            "{:<name_w$}  {:>9.0}  {:>10.1}  {:>9.1}  {:>5.1}%  {:>9}  {:>9}  {:>6}  {:>6}  {:>10}",
            t.id,
            f64::from(t.guaranteed) * 60.0 / result.window_secs,
            per_minute(result, t.asked),
            per_minute(result, t.granted),
            100.0 * share(t),
            ms(percentile(&t.waits_ms, 0.5)),
            ms(percentile(&t.waits_ms, 0.99)),
            t.denied,
            missed_windows(t),
            t.upstream_refusals
        );
    }
    let _ = writeln!(
        out,
        "(rates per simulated minute, the upstream's clock; waits in simulated time; missed = \
         windows below the guarantee; violations = calls the upstream refused)"
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<16}  {:>9}  {:>11}  {:>10}",
        "token", "calls/min", "utilization", "violations"
    );
    for t in &result.tokens {
        // Calls within the run's windows (late grants of the last window fall outside).
        let within: u64 = t.accepted_per_window.iter().sum();
        // Of the usable capacity (limit minus margin): 95 of 95 is 100 %.
        let capacity = f64::from(result.usable) * f64::from(result.windows);
        let _ = writeln!(
            out,
            "{:<16}  {:>9.1}  {:>10.1}%  {:>10}",
            t.id,
            per_minute(result, within),
            100.0 * within as f64 / capacity.max(1.0),
            t.violations
        );
    }
    out
}
