//! The capacity forecast gauge (`tokenlease_pool_capacity_forecast_days`) end to end:
//! a synthetic history written to the store (Postgres) shows up on /metrics with the
//! forecast's number of days, and a flat pool shows +Inf (no token needed).

use std::time::Duration;

use tokenlease::domain::{Id, Pool, Tenant, TokenOwner, TokenRecord};
use tokenlease::forecast::DAY_MS;
use tokenlease::history::{HistoryRow, Subject, Tally};
use tokenlease::metrics::names;
use tokenlease::store::ConfigStore;

use super::helpers::{Counters, Db, TestEnv, eventually, now_ms, sample, scrape};

const HOUR: i64 = 3_600_000;

fn id(s: &str) -> Id {
    Id::parse("test", s).unwrap()
}

/// Pool `pool` with `tokens` BaseLinker tokens (95 usable per minute) and one tenant
/// `tenant` (basic tier, guarantee 50, burst 250), written straight to the store.
async fn pool_with_tenant(store: &ConfigStore, pool: &str, tokens: usize, tenant: &str) {
    let p = Pool {
        id: id(pool),
        upstream_id: id("baselinker"),
        display_name: String::new(),
        create_time_ms: 0,
        update_time_ms: 0,
    };
    store.create_pool(p).await.unwrap();
    for i in 0..tokens {
        let token = TokenRecord {
            id: id(&format!("{pool}-{i}")),
            upstream_id: id("baselinker"),
            display_name: String::new(),
            owner: TokenOwner::Pool(id(pool)),
            disabled: false,
            monthly_cost_minor: 0,
            key_id: "k1".into(),
            sealed_secret: vec![0; 40],
            create_time_ms: 0,
            update_time_ms: 0,
        };
        store.create_token(token).await.unwrap();
    }
    let t = Tenant {
        id: id(tenant),
        display_name: String::new(),
        tier_id: id("basic"),
        pool_id: Some(id(pool)),
        weight_override: None,
        guaranteed_override: Some(50),
        burst_override: Some(250),
        create_time_ms: 0,
        update_time_ms: 0,
    };
    store.create_tenant(t).await.unwrap();
}

/// The 7 whole days before today: `tenant` asks `peak(k)` per minute at 14:00 UTC of
/// the k-th (k = 0 the oldest) and 10 per minute every other hour.
fn week(tenant: &str, today: i64, peak: impl Fn(i64) -> u64) -> Vec<HistoryRow> {
    let mut rows = vec![];
    for k in 0..7 {
        for h in 0..24 {
            let per_minute = if h == 14 { peak(k) } else { 10 };
            rows.push(HistoryRow {
                bucket_start_ms: (today - 7 + k) * DAY_MS + h * HOUR,
                subject: Subject::tenant(tenant),
                tally: Tally {
                    asked: per_minute * 60,
                    granted: per_minute * 60,
                    ..Tally::default()
                },
            });
        }
    }
    rows
}

/// A pool of 3 tokens (285 per minute) whose daily peak grew by 10 a day over the last
/// week (100 → 160: the trend is 165 + 10·(x − today) at mid-day points) fills 12
/// days after today's midnight: the gauge shows 12 − (the day's elapsed fraction). A
/// pool whose demand is flat well below its capacity shows +Inf.
#[tokio::test]
async fn gauge_shows_days_until_a_pool_is_full() {
    let env = TestEnv::new(Db::Postgres, Counters::Memory).await;
    let mut settings = env.settings();
    settings.history.forecast_interval_ms = 200;
    let app = env.spawn_with(settings).await;
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (growing, flat) = (format!("fc-grow-{suffix}"), format!("fc-flat-{suffix}"));
    let store = app.leaser.config.store().clone();
    pool_with_tenant(&store, &growing, 3, &format!("{growing}-t")).await;
    pool_with_tenant(&store, &flat, 1, &format!("{flat}-t")).await;
    let today = now_ms().div_euclid(DAY_MS);
    let mut rows = week(&format!("{growing}-t"), today, |k| 100 + 10 * k as u64);
    rows.extend(week(&format!("{flat}-t"), today, |_| 40));
    store
        .write_history("synthetic", &rows, now_ms())
        .await
        .unwrap();

    let metrics = app.metrics_addr.expect("metrics are served");
    let days = eventually(Duration::from_secs(10), "the forecast gauge", || async {
        let text = scrape(metrics).await;
        let grow = sample(
            &text,
            names::POOL_CAPACITY_FORECAST_DAYS,
            &[("pool", &growing)],
        )?;
        let flat = sample(
            &text,
            names::POOL_CAPACITY_FORECAST_DAYS,
            &[("pool", &flat)],
        )?;
        // NaN until a computation after the history was written.
        (!grow.is_nan() && !flat.is_nan()).then_some((grow, flat))
    })
    .await;
    let elapsed_today = now_ms().rem_euclid(DAY_MS) as f64 / DAY_MS as f64;
    assert!(
        (days.0 - (12.0 - elapsed_today)).abs() < 0.001,
        "{} days, expected {}",
        days.0,
        12.0 - elapsed_today
    );
    assert_eq!(days.1, f64::INFINITY);
    app.stop().await;
}
