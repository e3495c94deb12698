//! Known-answer tests of the forecast: synthetic hourly histories whose daily peak grows
//! by a known rate, and flat ones.

use std::collections::BTreeMap;

use super::*;
use crate::domain::SharedAccess;

const HOUR: i64 = 3_600_000;

/// Days since the epoch of a UTC date.
fn day_of(y: i16, m: i8, d: i8) -> i64 {
    let at = jiff::tz::Offset::UTC.to_timestamp(jiff::civil::date(y, m, d).at(0, 0, 0, 0));
    at.unwrap().as_millisecond() / DAY_MS
}

fn tenant(id: &str, guaranteed: u32, burst: u32) -> TenantDemand {
    TenantDemand {
        id: id.into(),
        guaranteed,
        burst,
        weight: 1.0,
        shared_access: SharedAccess::Normal,
        dedicated_tokens: 0,
        asked: BTreeMap::new(),
    }
}

/// A pool of `tokens` BaseLinker tokens (95 usable per 60 s window), hourly buckets.
fn pool(tokens: u32, tenants: Vec<TenantDemand>) -> PoolDemand {
    PoolDemand {
        pool: "shared".into(),
        upstream: "baselinker".into(),
        tokens,
        limit_per_window: 100,
        safety_margin: 0.05,
        usable_per_token: 95,
        window_ms: 60_000,
        bucket_ms: HOUR,
        tenants,
    }
}

/// Fills `days` days from `first_day`: each hour the tenant asks `quiet(d)` requests
/// per window, except at 14:00 UTC where it asks `peak(d)` (60 windows an hour).
fn fill(t: &mut TenantDemand, first_day: i64, days: i64, peak: impl Fn(i64) -> u64, quiet: u64) {
    for d in 0..days {
        for h in 0..24 {
            let per_window = if h == 14 { peak(d) } else { quiet };
            t.asked
                .insert((first_day + d) * DAY_MS + h * HOUR, per_window * 60);
        }
    }
}

/// Two tenants whose daily peaks add up to 100 + 10·d requests per window on day d
/// (a: 60 + 6·d, b: 40 + 4·d), a week of history, 2 tokens (190 per window): the
/// trend (95 + 10·x at mid-day points) crosses 190 at day 9.5, i.e. 2.5 days after
/// "now" (the start of day 7, 2026-11-08): full on 2026-11-10, whose end peaks at 195,
/// which needs 3 tokens.
#[test]
fn growing_history_names_the_day_and_the_tokens() {
    let first = day_of(2026, 11, 1);
    let (mut a, mut b) = (tenant("a", 50, 100), tenant("b", 50, 100));
    fill(&mut a, first, 7, |d| 60 + 6 * d as u64, 20);
    fill(&mut b, first, 7, |d| 40 + 4 * d as u64, 10);
    let pool = pool(2, vec![a, b]);
    let now = (first + 7) * DAY_MS;
    let f = forecast(&pool, first * DAY_MS, now, now);
    assert_eq!(f.days_fitted, 7);
    let line = f.trend.unwrap();
    assert!((line.slope - 10.0).abs() < 1e-9, "{line:?}");
    assert!((f.days_until_full.unwrap() - 2.5).abs() < 1e-9, "{f:?}");
    assert_eq!(f.date, Some(jiff::civil::date(2026, 11, 10)));
    assert!((f.peak_then.unwrap() - 195.0).abs() < 1e-9, "{f:?}");
    assert_eq!(f.tokens_needed_then, Some(3));
    assert_eq!(
        f.summary(),
        "full in 2.5 days (2026-11-10): needs 3 token(s) then, has 2"
    );
    // Three tokens (285) push the day out: 95 + 10·x = 285 at x = 19, 12 days on.
    let mut bigger = pool.clone();
    bigger.tokens = 3;
    let f = forecast(&bigger, first * DAY_MS, now, now);
    assert!((f.days_until_full.unwrap() - 12.0).abs() < 1e-9, "{f:?}");
    assert_eq!(f.date, Some(jiff::civil::date(2026, 11, 20)));
    assert_eq!(f.tokens_needed_then, Some(4));
}

/// A flat history within capacity needs no token; so does a falling one.
#[test]
fn flat_or_falling_history_needs_no_token() {
    let first = day_of(2026, 11, 1);
    let mut a = tenant("a", 50, 100);
    fill(&mut a, first, 7, |_| 120, 30);
    let now = (first + 7) * DAY_MS;
    let f = forecast(&pool(2, vec![a.clone()]), first * DAY_MS, now, now);
    assert_eq!(f.trend.unwrap().slope, 0.0);
    assert_eq!((f.days_until_full, f.tokens_needed_then), (None, None));
    assert_eq!(f.summary(), "no token needed within 90 days");
    let mut falling = tenant("a", 50, 100);
    fill(&mut falling, first, 7, |d| 150 - 5 * d as u64, 30);
    let f = forecast(&pool(2, vec![falling]), first * DAY_MS, now, now);
    assert_eq!(f.days_until_full, None, "{f:?}");
    // Slow growth that reaches capacity after the horizon is "no token needed" too:
    // 100 + 0.5·d reaches 190 after 180 days.
    let mut slow = tenant("a", 50, 100);
    fill(&mut slow, first, 7, |_| 100, 30);
    slow.asked
        .insert((first + 6) * DAY_MS + 14 * HOUR, 101 * 60);
    let f = forecast(&pool(2, vec![slow]), first * DAY_MS, now, now);
    assert!(f.trend.unwrap().slope > 0.0);
    assert_eq!(f.days_until_full, None, "{f:?}");
}

/// A pool already asked for more than it has is full now, and the tokens needed
/// cover the trend's peak at the end of today.
#[test]
fn above_capacity_now() {
    let first = day_of(2026, 11, 1);
    let mut a = tenant("a", 50, 200);
    fill(&mut a, first, 3, |_| 200, 30);
    let now = (first + 3) * DAY_MS + 6 * HOUR;
    let f = forecast(&pool(2, vec![a]), first * DAY_MS, now, now);
    assert_eq!(f.days_until_full, Some(0.0));
    assert_eq!(f.date, Some(jiff::civil::date(2026, 11, 4)));
    assert_eq!(f.tokens_needed_then, Some(3));
    assert!(
        f.summary().starts_with("above capacity now"),
        "{}",
        f.summary()
    );
}

/// Demand counts at most guarantee + burst (its tier refuses the rest whatever the
/// tokens) and less what the tenant's own tokens serve; the partial current day and
/// days before the range are left out.
#[test]
fn demand_is_capped_and_whole_days_only() {
    let first = day_of(2026, 11, 1);
    let mut flood = tenant("flood", 20, 10);
    fill(&mut flood, first, 2, |_| 1000, 0);
    let mut owner = tenant("owner", 50, 100);
    owner.dedicated_tokens = 1;
    fill(&mut owner, first, 2, |_| 120, 0);
    let p = pool(1, vec![flood, owner]);
    // 30 (the flood's ceiling) + 150 − 95 (its own token covers 95 of owner's 120+).
    let peaks = p.daily_peaks(first * DAY_MS, (first + 2) * DAY_MS);
    assert_eq!(peaks.len(), 2);
    assert!((peaks[0].peak - (30.0 + 25.0)).abs() < 1e-9, "{peaks:?}");
    assert_eq!(peaks[0].bucket_start_ms, first * DAY_MS + 14 * HOUR);
    // Owner's guarantee 50 is all covered by its own token: only the flood's 20 is drawn.
    assert_eq!(p.drawn_guarantees(), 20);
    // A range ending mid-day keeps only the whole day before it; one starting mid-day
    // skips its first, partial day.
    assert_eq!(
        p.daily_peaks(first * DAY_MS, (first + 1) * DAY_MS + HOUR)
            .len(),
        1
    );
    assert_eq!(
        p.daily_peaks(first * DAY_MS + HOUR, (first + 2) * DAY_MS)
            .len(),
        1
    );
    // No whole day: no trend, and the summary says why.
    let f = forecast(
        &p,
        first * DAY_MS,
        first * DAY_MS + HOUR,
        first * DAY_MS + HOUR,
    );
    assert_eq!(f.trend, None);
    assert!(f.summary().starts_with("not enough history"));
}

/// Tokens: enough for the demand and for the 80 % rule on the drawn guarantees.
#[test]
fn tokens_cover_demand_and_guarantees() {
    assert_eq!(tokens_for(190.0, 0, 95), 2);
    assert_eq!(tokens_for(190.5, 0, 95), 3);
    assert_eq!(tokens_for(100.0, 200, 95), 3); // 200 / 0.8 = 250 > 190
    assert_eq!(tokens_for(0.0, 0, 95), 1);
}

/// The pools' demand from the configuration and history rows: replicas summed, each
/// tenant with its tier's numbers, tokens counted per pool.
#[test]
fn pool_demands_from_configuration_and_rows() {
    use crate::domain::{ConfigView, Id, Pool, Tenant, Tier, TokenOwner, TokenRecord, Upstream};
    use crate::history::{HistoryRow, Subject, Tally};
    let id = |s: &str| Id::parse("t", s).unwrap();
    let upstream = Upstream::baselinker(0);
    let tiers = Tier::seed_defaults(0);
    let token = |name: &str, owner: TokenOwner| TokenRecord {
        id: id(name),
        upstream_id: upstream.id.clone(),
        display_name: String::new(),
        owner,
        disabled: name == "t2",
        monthly_cost_minor: 0,
        key_id: "k".into(),
        sealed_secret: vec![],
        create_time_ms: 0,
        update_time_ms: 0,
    };
    let tenant = |name: &str, tier: &str| Tenant {
        id: id(name),
        display_name: String::new(),
        tier_id: id(tier),
        pool_id: Some(id("shared")),
        weight_override: None,
        guaranteed_override: None,
        burst_override: None,
        create_time_ms: 0,
        update_time_ms: 0,
    };
    let view = ConfigView {
        tokens: vec![
            token("t1", TokenOwner::Pool(id("shared"))),
            token("t2", TokenOwner::Pool(id("shared"))),
            token("own", TokenOwner::Dedicated(id("acme"))),
        ],
        pools: vec![Pool {
            id: id("shared"),
            upstream_id: upstream.id.clone(),
            display_name: String::new(),
            create_time_ms: 0,
            update_time_ms: 0,
        }],
        tenants: vec![tenant("acme", "premium"), tenant("beta", "basic")],
        tiers,
        upstreams: vec![upstream],
    };
    let row = |replica_asked: u64, who: &str| HistoryRow {
        bucket_start_ms: 5 * HOUR,
        subject: Subject::tenant(who),
        tally: Tally {
            asked: replica_asked,
            ..Tally::default()
        },
    };
    let rows = vec![row(100, "beta"), row(50, "beta"), row(7, "acme")];
    let pools = pool_demands(&view, rows, HOUR);
    assert_eq!(pools.len(), 1);
    let p = &pools[0];
    assert_eq!((p.tokens, p.usable_per_token, p.window_ms), (2, 95, 60_000));
    let beta = p.tenants.iter().find(|t| t.id == "beta").unwrap();
    assert_eq!((beta.guaranteed, beta.burst), (20, 10));
    assert_eq!(beta.asked[&(5 * HOUR)], 150);
    let acme = p.tenants.iter().find(|t| t.id == "acme").unwrap();
    assert_eq!((acme.guaranteed, acme.dedicated_tokens), (150, 1));
    // premium 150 − 95 own + basic 20.
    assert_eq!(p.drawn_guarantees(), 55 + 20);
}
