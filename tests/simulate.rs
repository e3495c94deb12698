//! `tokenlease simulate`: a run yields a table naming every tenant and a readable SVG;
//! the planning answer is right on a scenario whose answer is known.

use tokenlease::simulate::{self, Scenario, svg};

/// 3 tenants, 20 guaranteed and 50 asked per window each, target share 0.9, tokens of
/// 100 with a 5 % margin (95 usable). Planning starts at 1 token (60 guaranteed ≤ 80 %
/// of 95 = 76, so 1 is allowed): 1 token serves 95 of the 150 asked per window (~63 %;
/// a little more is measured, as requests of the last window wait past the run's end)
/// → below 0.9; 2 tokens serve 190 ≥ 150 → every tenant gets all it asks → 2.
const KNOWN: &str = r#"
time_scale = 30
windows = 4
target_share = 0.9

[[pools]]
id = "shared"
tokens = 1

[[tiers]]
id = "flat"
guaranteed = 20
burst = 200

[[tenants]]
id = "a"
tier = "flat"
[[tenants.demand]]
per_window = 50

[[tenants]]
id = "b"
tier = "flat"
[[tenants.demand]]
per_window = 50

[[tenants]]
id = "c"
tier = "flat"
[[tenants.demand]]
priority = "high"
per_window = 50
"#;

/// The known scenario plans to exactly 2 tokens: 1 falls short of the share, 2 meet it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_finds_the_known_token_count() {
    let scenario = Scenario::parse(KNOWN).unwrap();
    assert_eq!(simulate::plan::lower_bound(&scenario), 1);
    let answer = simulate::plan(&scenario, false).await.unwrap();
    for (k, v) in &answer.tries {
        println!("{k} token(s): ok {} {:?}", v.ok, v.reasons);
    }
    assert_eq!(answer.tokens, Some(2), "tries: {:?}", answer.tries);
    assert!(!answer.tries[0].1.ok, "1 token must fall short");
}

/// A run prints a row for every tenant and writes an SVG with one polyline per tenant
/// and one per token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_writes_table_and_chart() {
    let mut scenario = Scenario::parse(KNOWN).unwrap();
    scenario.windows = 2;
    let result = simulate::run(&scenario, Some(2), false).await.unwrap();
    let table = simulate::table(&result);
    println!("{table}");
    for tenant in ["a", "b", "c"] {
        assert!(
            table
                .lines()
                .any(|l| l.split_whitespace().next() == Some(tenant)),
            "no row for {tenant}:\n{table}"
        );
    }
    assert!(result.tokens.iter().all(|t| t.violations == 0));
    let chart = svg::chart(&result, "known");
    assert!(chart.contains("<svg") && chart.trim_end().ends_with("</svg>"));
    // Every tenant and token is named by a line (alone, or with those it coincides with),
    // and each tenant line has its demand and guarantee beside it.
    let named = |class: &str| -> Vec<String> {
        let tag = format!(r#"<polyline class="{class}" data-name=""#);
        chart
            .split(&tag)
            .skip(1)
            .flat_map(|rest| rest.split('"').next().unwrap().split(", "))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        named("tenant"),
        ["a", "b", "c"].map(String::from),
        "{chart}"
    );
    let lines = |class: &str| {
        chart
            .matches(&format!(r#"<polyline class="{class}""#))
            .count()
    };
    assert_eq!(lines("demand"), lines("tenant"));
    assert!(chart.contains("guaranteed 20/min: a, b, c"), "{chart}");
    assert_eq!(named("token").len(), 2, "{chart}");
    // Balanced: every element is self-closed or closed.
    assert_eq!(
        chart.matches("<svg").count(),
        chart.matches("</svg>").count()
    );
    assert_eq!(
        chart.matches("<text").count(),
        chart.matches("</text>").count()
    );
}

/// A result drawn by hand: three quiet tenants granted the same, a busy one, and one
/// token at exactly its usable capacity (95 of 95) beside an idle one.
fn drawn_by_hand() -> simulate::RunResult {
    let tenant = |id: &str, asked: u64, granted: u64| simulate::TenantResult {
        id: id.to_owned(),
        guaranteed: 10,
        asked: 3 * asked,
        granted: 3 * granted,
        asked_per_window: vec![asked; 3],
        granted_per_window: vec![granted; 3],
        ..Default::default()
    };
    let token = |id: &str, calls: u64| simulate::TokenResult {
        id: id.to_owned(),
        accepted: 3 * calls,
        accepted_per_window: vec![calls; 3],
        ..Default::default()
    };
    simulate::RunResult {
        windows: 3,
        window_secs: 60.0,
        time_scale: 30.0,
        limit: 100,
        usable: 95,
        pool_tokens: 2,
        tenants: vec![
            tenant("quiet-1", 5, 5),
            tenant("quiet-2", 5, 5),
            tenant("quiet-3", 5, 5),
            tenant("busy", 120, 85),
        ],
        tokens: vec![token("full", 95), token("idle", 0)],
        ..Default::default()
    }
}

/// Coinciding series are drawn once and named together; a token at its usable
/// capacity is at 100 %, on the usable line, with markers; the time axis says what
/// time it is.
#[test]
fn the_chart_shows_every_series() {
    let chart = svg::chart(&drawn_by_hand(), "by hand");
    assert_eq!(
        chart.matches(r#"<polyline class="tenant""#).count(),
        2,
        "{chart}"
    );
    assert!(
        chart.contains(r#"data-name="quiet-1, quiet-2, quiet-3""#),
        "{chart}"
    );
    assert!(chart.contains(r#"data-name="busy""#));
    assert!(chart.contains("guaranteed 10/min: quiet-1, quiet-2, quiet-3, busy"));
    // The usable line (the second reference: the first is the guarantee) and the full
    // token's points share their height.
    let usable_y = chart
        .split(r#"<line class="reference""#)
        .nth(2)
        .and_then(|l| l.split(r#"y1=""#).nth(1))
        .and_then(|y| y.split('"').next())
        .expect("a usable reference line")
        .to_owned();
    let full = chart
        .split(r#"<polyline class="token" data-name="full""#)
        .nth(1)
        .expect("the full token's line");
    let points = full
        .split(r#"points=""#)
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    for point in points.split(' ') {
        assert_eq!(
            point.split(',').nth(1),
            Some(usable_y.as_str()),
            "{point} vs {usable_y}"
        );
    }
    assert!(chart.contains("usable: 95 per window = 100 %"));
    assert_eq!(
        chart.matches("<circle").count(),
        6,
        "a marker per token point"
    );
    assert!(chart.contains("the run took 6 s"), "{chart}");
}

/// The table counts utilization of the usable capacity, as GetUsage does: 95 of 95 is
/// 100 %.
#[test]
fn the_table_counts_utilization_of_the_usable_capacity() {
    let table = simulate::table(&drawn_by_hand());
    let full = table
        .lines()
        .find(|l| l.starts_with("full "))
        .expect("a row for the full token");
    assert!(full.contains("100.0%"), "{table}");
    assert!(table.contains("per simulated minute"), "{table}");
}

/// Three replicas on one Postgres database and one Redis share the tokens: with 2
/// tokens (190 usable) for 150 asked per window, every tenant gets all it asks and the
/// emulator counts no violation. Needs PostgreSQL and Redis on 127.0.0.1, as CI has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_tokens() {
    use sqlx::Connection;
    let name = format!("tl_sim_{}", uuid::Uuid::new_v4().simple());
    let admin_url = "postgres://postgres@127.0.0.1:5432/postgres";
    let mut pg = sqlx::PgConnection::connect(admin_url)
        .await
        .expect("PostgreSQL at 127.0.0.1:5432 must be running for this test");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut pg)
        .await
        .unwrap();
    let mut scenario = Scenario::parse(KNOWN).unwrap();
    scenario.windows = 3;
    scenario.replicas = 3;
    let store = simulate::SharedStore {
        database_url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
        redis_url: "redis://127.0.0.1:6379".into(),
    };
    let result = simulate::run_on(&scenario, Some(2), false, Some(store)).await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut pg)
    .await;
    let result = result.unwrap();
    println!("{}", simulate::table(&result));
    let verdict = simulate::verdict(&result);
    assert!(verdict.ok, "{:?}", verdict.reasons);
    assert_eq!(result.tenants.len(), 3);
}

/// Scenario errors name the field.
#[test]
fn scenario_errors_name_the_field() {
    let bad = KNOWN.replace(
        "tier = \"flat\"\n[[tenants.demand]]\npriority = \"high\"",
        "tier = \"gold\"\n[[tenants.demand]]\npriority = \"high\"",
    );
    let error = Scenario::parse(&bad).unwrap_err().to_string();
    assert!(error.contains("tenants[2].tier"), "{error}");
    let bad = KNOWN.replace("priority = \"high\"", "priority = \"urgent\"");
    let error = Scenario::parse(&bad).unwrap_err().to_string();
    assert!(error.contains("tenants[2].demand[0].priority"), "{error}");
}

/// The examples parse.
#[test]
fn examples_parse() {
    for file in ["examples/seed-hybrid.toml", "examples/noisy-neighbour.toml"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        Scenario::load(&path).unwrap_or_else(|e| panic!("{file}: {e:#}"));
    }
}
