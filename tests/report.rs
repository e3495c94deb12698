//! `tokenlease report` and the forecast: the forecast's token count agrees with
//! `simulate::plan` on the demand the history shows; the report's table and chart.

use std::collections::BTreeMap;

use tokenlease::domain::SharedAccess;
use tokenlease::forecast::{self, DAY_MS, PoolDemand, TenantDemand, cross_check};

const HOUR: i64 = 3_600_000;
/// 2026-11-01, in days since the Unix epoch.
const FIRST_DAY: i64 = 20_758;

/// A tenant asking `peak(d)` requests per window at 14:00 UTC of day d and `quiet`
/// the rest of the day, for `days` days from [`FIRST_DAY`].
fn tenant(
    id: &str,
    guaranteed: u32,
    burst: u32,
    days: i64,
    peak: impl Fn(i64) -> u64,
    quiet: u64,
) -> TenantDemand {
    let mut asked = BTreeMap::new();
    for d in 0..days {
        for h in 0..24 {
            let per_window = if h == 14 { peak(d) } else { quiet };
            asked.insert((FIRST_DAY + d) * DAY_MS + h * HOUR, per_window * 60);
        }
    }
    TenantDemand {
        id: id.into(),
        guaranteed,
        burst,
        weight: 1.0,
        shared_access: SharedAccess::Normal,
        dedicated_tokens: 0,
        asked,
    }
}

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

/// A week whose daily peak grows by 20 per day (a: 60 + 12·d, b: 40 + 8·d per window),
/// on 2 tokens: the trend (90 + 20·x) is above 190 already and ends today at 250, so
/// the forecast needs 3 tokens (285); the plan, running that demand through real
/// leases against the emulator, finds 2 tokens short (190 of 250, 76 % < 95 %) and 3
/// enough: both say 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forecast_and_plan_agree_on_the_tokens() {
    let a = tenant("a", 50, 150, 7, |d| 60 + 12 * d as u64, 20);
    let b = tenant("b", 50, 150, 7, |d| 40 + 8 * d as u64, 10);
    let pool = pool(2, vec![a, b]);
    assert_eq!(
        forecast::date_of_day(FIRST_DAY).unwrap().to_string(),
        "2026-11-01"
    );
    let now = (FIRST_DAY + 7) * DAY_MS;
    let f = forecast::forecast(&pool, FIRST_DAY * DAY_MS, now, now);
    assert_eq!(f.days_until_full, Some(0.0), "{f:?}");
    assert!((f.peak_then.unwrap() - 250.0).abs() < 1e-9, "{f:?}");
    assert_eq!(f.tokens_needed_then, Some(3));
    let check = cross_check::cross_check(&pool, &f).await.unwrap().unwrap();
    println!("{check:?}");
    assert_eq!(check.forecast_tokens, 3);
    assert_eq!(check.plan_tokens, Some(3), "{check:?}");
    assert!(check.agrees());
}

mod store_report {
    use super::{DAY_MS, FIRST_DAY, HOUR};
    use tokenlease::domain::{Id, Pool, Tenant, TokenOwner, TokenRecord};
    use tokenlease::history::{GrantRow, HistoryRow, Subject, Tally};
    use tokenlease::report::{self, chart, table};
    use tokenlease::store::ConfigStore;

    fn id(s: &str) -> Id {
        Id::parse("test", s).unwrap()
    }

    /// An embedded store with pool "shared" (2 BaseLinker tokens), tenants acme
    /// (premium, guarantee 50, burst 150) and beta (basic: 20 + 10) in it, and solo
    /// (basic, no pool).
    async fn store(dir: &std::path::Path) -> ConfigStore {
        let url = format!("sqlite://{}", dir.join("report.db").display());
        let store = ConfigStore::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        store.seed_defaults().await.unwrap();
        let pool = Pool {
            id: id("shared"),
            upstream_id: id("baselinker"),
            display_name: String::new(),
            create_time_ms: 0,
            update_time_ms: 0,
        };
        store.create_pool(pool).await.unwrap();
        for name in ["tok-1", "tok-2"] {
            let token = TokenRecord {
                id: id(name),
                upstream_id: id("baselinker"),
                display_name: String::new(),
                owner: TokenOwner::Pool(id("shared")),
                disabled: false,
                monthly_cost_minor: 3000,
                key_id: "k".into(),
                sealed_secret: vec![0; 40],
                create_time_ms: 0,
                update_time_ms: 0,
            };
            store.create_token(token).await.unwrap();
        }
        let tenant = |name: &str, tier: &str, pool: bool, g: Option<u32>, b: Option<u32>| Tenant {
            id: id(name),
            display_name: String::new(),
            tier_id: id(tier),
            pool_id: pool.then(|| id("shared")),
            weight_override: None,
            guaranteed_override: g,
            burst_override: b,
            create_time_ms: 0,
            update_time_ms: 0,
        };
        store
            .create_tenant(tenant("acme", "premium", true, Some(50), Some(150)))
            .await
            .unwrap();
        store
            .create_tenant(tenant("beta", "basic", true, None, None))
            .await
            .unwrap();
        store
            .create_tenant(tenant("solo", "basic", false, None, None))
            .await
            .unwrap();
        store
    }

    /// A week of hourly history, written by two replicas that each counted half:
    /// acme asks 100 + 10·d per minute at 14:00 UTC on day d (10 the rest of the day)
    /// and is granted all of it; beta asks 20 per minute all day, granted 15.
    fn history(replica_half: u64) -> Vec<HistoryRow> {
        let mut rows = vec![];
        for d in 0..7 {
            for h in 0..24 {
                let start = (FIRST_DAY + d) * DAY_MS + h * HOUR;
                let acme = if h == 14 { 100 + 10 * d as u64 } else { 10 } * 60;
                let row = |who: &str, asked: u64, granted: u64| HistoryRow {
                    bucket_start_ms: start,
                    subject: Subject::tenant(who),
                    tally: Tally {
                        asked: asked / replica_half,
                        granted: granted / replica_half,
                        ..Tally::default()
                    },
                };
                rows.push(row("acme", acme, acme));
                rows.push(row("beta", 20 * 60, 15 * 60));
            }
        }
        rows
    }

    /// The week's grants per tenant on the pool "shared".
    fn grants() -> Vec<GrantRow> {
        let total = |who: &str| -> u64 {
            (history(1).iter())
                .filter(|r| r.subject.id == who)
                .map(|r| r.tally.granted)
                .sum()
        };
        ["acme", "beta"]
            .map(|tenant| GrantRow {
                bucket_start_ms: FIRST_DAY * DAY_MS,
                tenant_id: tenant.into(),
                pool_id: "shared".into(),
                upstream_id: "baselinker".into(),
                granted: total(tenant),
            })
            .to_vec()
    }

    /// The report of that week, read back from the store: a row per tenant with its
    /// counts, trend and peak hours; the pool's forecast (the daily peak 120 + 10·d per
    /// minute passes 2 tokens' 190 half a day after the week: 3 tokens needed); the
    /// chart has a line per tenant and for the pool, its capacity and a marker per day.
    /// Cost: each token costs 30.00 EUR a month, 7.00 for these 7 days of November, so
    /// the pool 14.00; acme's 151,200 grants are 7.9 % of its 1,915,200 usable (2 × 95
    /// a minute for a week): 110.53 cents, beta's the same. Largest remainder: floors
    /// 110 + 110 + 1178 leave 2 cents, to unused (.95) then acme (.53, first of the
    /// tie by id): acme 1.11, beta 1.10, unused 11.79.
    #[tokio::test]
    async fn report_table_and_chart_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path()).await;
        for replica in ["r1", "r2"] {
            store.write_history(replica, &history(2), 0).await.unwrap();
        }
        let (from, to) = (FIRST_DAY * DAY_MS, (FIRST_DAY + 7) * DAY_MS);
        store.write_grants("r1", &grants(), 0).await.unwrap();
        let r = report::load(&store, (from, to), HOUR, to, "EUR")
            .await
            .unwrap();
        let text = table::table(&r);
        println!("{text}");
        let row = |name: &str| {
            text.lines()
                .find(|l| l.split_whitespace().next() == Some(name))
                .unwrap_or_else(|| panic!("no row for {name}:\n{text}"))
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        // acme: 7 days × (23 h × 600 + 60 × (100 + 10·d)) = 96,600 + 54,600 asked.
        let acme_asked = 7 * 23 * 600 + (0..7).map(|d| 60 * (100 + 10 * d)).sum::<u64>();
        assert_eq!(row("acme")[6], "1.11", "{text}");
        assert_eq!(row("beta")[6], "1.10", "{text}");
        assert_eq!(row("solo")[6], "0.00", "{text}");
        assert!(
            text.contains("total 14.00 EUR, of which 11.79 unused"),
            "{text}"
        );
        assert_eq!(
            row("acme")[..6],
            [
                "acme",
                "shared",
                &acme_asked.to_string(),
                &acme_asked.to_string(),
                "0",
                "100.0%"
            ]
        );
        assert_eq!(row("acme")[8], "14:00-15:00", "{text}");
        // beta: flat, granted 75 %, asks the same every hour: every hour is a peak hour.
        assert_eq!(
            row("beta")[..6],
            ["beta", "shared", "201600", "151200", "50400", "75.0%"]
        );
        assert_eq!(row("beta")[7..], ["+0.0%", "00:00-24:00"]);
        assert_eq!(row("solo")[..6], ["solo", "-", "0", "0", "0", "-"]);
        assert_eq!(row("solo")[7..], ["-", "-"]);
        // Tokens, capacity, drawn guarantees, cost and unused.
        let pool = row("shared");
        assert_eq!(
            pool[..6],
            ["shared", "2", "190", "70", "14.00", "11.79"],
            "{text}"
        );
        assert!(
            text.contains("full in 0.5 days (2026-11-08): needs 3 token(s) then, has 2"),
            "{text}"
        );
        let svg = chart::chart(&r, "week");
        let named = |class: &str| -> Vec<String> {
            let tag = format!(r#"<polyline class="{class}" data-name=""#);
            svg.split(&tag)
                .skip(1)
                .map(|rest| rest.split('"').next().unwrap().to_owned())
                .collect()
        };
        assert_eq!(named("tenant"), ["acme", "beta", "solo"], "{svg}");
        assert_eq!(named("granted").len(), 3);
        assert_eq!(named("pool"), ["shared"]);
        assert_eq!(named("trend"), ["shared"]);
        assert_eq!(svg.matches("pool shared: 2 token(s) = 190/min").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 7, "a marker per day");
        assert!(svg.contains("shared: 3 tokens by 2026-11-08"), "{svg}");
        // The week's 7 daily peaks, and the trend carried on to the day after the
        // pool fills (2026-11-09): 9 days.
        let points = |class: &str| {
            let tag = format!(r#"<polyline class="{class}" data-name="shared""#);
            let rest = svg.split(&tag).nth(1).unwrap();
            let points = rest.split(r#"points=""#).nth(1).unwrap();
            points.split('"').next().unwrap().split(' ').count()
        };
        assert_eq!((points("pool"), points("trend")), (7, 9));
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
