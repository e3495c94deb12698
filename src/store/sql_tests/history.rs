//! Usage history in the configuration store: replicas writing at once, roll-ups,
//! retention, paging and a restart, on both backends.

use std::time::Duration;

use crate::history::{
    Acquired, Flusher, GrantOf, HistoryQuery, HistoryRow, HistorySettings, PageCursor, Recorder,
    Selection, SubjectKind, roll_up,
};
use crate::ledger::ReleaseOutcome;
use crate::store::ConfigStore;

use super::harness::*;

const HOUR: i64 = 3_600_000;

fn flusher(store: &ConfigStore, replica: &str) -> Flusher {
    Flusher {
        recorder: Recorder::new(HOUR),
        store: store.clone(),
        replica_id: replica.to_owned(),
        settings: HistorySettings {
            bucket_ms: HOUR,
            flush_every: Duration::from_secs(10),
            retention: Duration::from_secs(2 * 86_400),
        },
    }
}

/// A grant as the lease path records it, on a token of the pool "shared".
fn grant(recorder: &Recorder, now_ms: i64, tenant: &str, token: &str) {
    grant_in(recorder, now_ms, tenant, token, "shared");
}

fn grant_in(recorder: &Recorder, now_ms: i64, tenant: &str, token: &str, pool: &str) {
    let granted = GrantOf {
        tenant_id: tenant,
        token_id: token,
        pool_id: Some(pool),
        upstream_id: "baselinker",
    };
    recorder.record_grant(now_ms, granted, false);
    recorder.record_acquire(now_ms, tenant, 3, Acquired::Granted);
}

/// Everything stored in `0..to_ms`, summed per stored bucket and subject.
async fn all(store: &ConfigStore, to_ms: i64) -> Vec<HistoryRow> {
    let rows = store
        .read_history(0, to_ms, &Selection::default())
        .await
        .expect("reading history");
    roll_up(rows, HOUR)
}

fn granted_of(rows: &[HistoryRow], kind: SubjectKind) -> u64 {
    rows.iter()
        .filter(|r| r.subject.kind == kind)
        .map(|r| r.tally.granted)
        .sum()
}

pub(super) async fn three_replicas_count_every_grant_once(db: &TestDb) {
    let store = &db.store;
    let mut tasks = Vec::new();
    for replica in ["r1", "r2", "r3"] {
        let flusher = flusher(store, replica);
        tasks.push(tokio::spawn(async move {
            // 40 grants each, flushed every 10 and again at the end (the last flush
            // rewrites rows already written: cumulative values, counted once).
            for i in 0..40_i64 {
                let tenant = if i % 2 == 0 { "acme" } else { "beta" };
                grant(&flusher.recorder, 1_000 + i, tenant, "tok1");
                if i % 10 == 9 {
                    flusher.flush(2_000).await.expect("flushing");
                }
            }
            flusher.flush(2_000).await.expect("flushing again");
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let rows = all(store, HOUR).await;
    assert_eq!(granted_of(&rows, SubjectKind::Tenant), 120);
    assert_eq!(granted_of(&rows, SubjectKind::Token), 120);
    let acme = rows.iter().find(|r| r.subject.id == "acme").unwrap();
    assert_eq!((acme.tally.asked, acme.tally.granted), (60, 60));
    assert_eq!(acme.tally.waits.total(), 60);
    assert_eq!(acme.tally.waits.percentile(99), Some(5));
    let pairs = store.read_grants(0, HOUR, None).await.unwrap();
    let pairs: Vec<(&str, &str, u64)> = pairs
        .iter()
        .map(|p| (p.tenant_id.as_str(), p.pool_id.as_str(), p.granted))
        .collect();
    assert_eq!(pairs, vec![("acme", "shared", 60), ("beta", "shared", 60)]);
}

/// Grants per tenant and pool are summed over replicas, tokens and the buckets that
/// start in the range (not those before or after it), and filtered by pool.
pub(super) async fn grants_per_pool_sum_replicas_within_the_range(db: &TestDb) {
    let store = &db.store;
    let (r1, r2) = (flusher(store, "r1"), flusher(store, "r2"));
    grant_in(&r1.recorder, 10, "acme", "tok1", "eu");
    grant_in(&r1.recorder, HOUR + 10, "acme", "tok1", "eu");
    grant_in(&r2.recorder, HOUR + 20, "acme", "tok2", "eu");
    grant_in(&r2.recorder, HOUR + 30, "acme", "tok3", "us");
    grant_in(&r2.recorder, HOUR + 40, "beta", "tok3", "us");
    grant_in(&r1.recorder, 2 * HOUR + 10, "beta", "tok3", "us");
    r1.flush(3 * HOUR).await.unwrap();
    r2.flush(3 * HOUR).await.unwrap();
    let read = |pools: Option<Vec<String>>| async move {
        let grants = store
            .read_grants(HOUR, 2 * HOUR, pools.as_deref())
            .await
            .unwrap();
        grants
            .into_iter()
            .map(|p| (p.tenant_id, p.pool_id, p.granted))
            .collect::<Vec<_>>()
    };
    let row = |tenant: &str, pool: &str, n| (tenant.to_owned(), pool.to_owned(), n);
    assert_eq!(
        read(None).await,
        vec![
            row("acme", "eu", 2),
            row("acme", "us", 1),
            row("beta", "us", 1)
        ]
    );
    assert_eq!(
        read(Some(vec!["us".into()])).await,
        vec![row("acme", "us", 1), row("beta", "us", 1)]
    );
    assert!(read(Some(vec![])).await.is_empty());
}

pub(super) async fn buckets_roll_up_and_filters_select(db: &TestDb) {
    let store = &db.store;
    let f = flusher(store, "r1");
    grant(&f.recorder, 10, "acme", "tok1");
    grant(&f.recorder, HOUR + 10, "acme", "tok1");
    grant(&f.recorder, HOUR + 20, "beta", "tok2");
    f.recorder.record_acquire(
        2 * HOUR + 5,
        "acme",
        0,
        Acquired::Denied {
            reason: "tenant_quota",
        },
    );
    f.recorder.record_release(
        2 * HOUR + 6,
        "acme",
        "tok1",
        "baselinker",
        ReleaseOutcome::UpstreamError,
    );
    f.flush(3 * HOUR).await.unwrap();

    let query = |bucket_ms, selection| HistoryQuery {
        start_ms: 0,
        end_ms: 4 * HOUR,
        bucket_ms,
        selection,
        page_size: 100,
        after: None,
    };
    let acme_only = Selection {
        tenants: Some(vec!["acme".into()]),
        tokens: Some(vec![]),
        upstream_id: None,
    };
    let page = crate::history::read(store, &query(2 * HOUR, acme_only))
        .await
        .unwrap();
    let summary: Vec<(i64, u64, u64, u64, u64)> = page
        .rows
        .iter()
        .map(|r| {
            let t = &r.tally;
            (
                r.bucket_start_ms,
                t.asked,
                t.granted,
                t.denied[0],
                t.upstream_errors,
            )
        })
        .collect();
    assert_eq!(summary, vec![(0, 2, 2, 0, 0), (2 * HOUR, 1, 0, 1, 1)]);

    let tokens_of_upstream = Selection {
        tenants: Some(vec![]),
        tokens: None,
        upstream_id: Some("baselinker".into()),
    };
    let page = crate::history::read(store, &query(4 * HOUR, tokens_of_upstream))
        .await
        .unwrap();
    let tokens: Vec<(&str, u64)> = page
        .rows
        .iter()
        .map(|r| (r.subject.id.as_str(), r.tally.granted))
        .collect();
    assert_eq!(tokens, vec![("tok1", 2), ("tok2", 1)]);
    let elsewhere = Selection {
        tenants: Some(vec![]),
        tokens: None,
        upstream_id: Some("other".into()),
    };
    let page = crate::history::read(store, &query(HOUR, elsewhere))
        .await
        .unwrap();
    assert!(page.rows.is_empty());
}

pub(super) async fn retention_deletes_old_buckets_only(db: &TestDb) {
    let store = &db.store;
    let f = flusher(store, "r1");
    let day = 24 * HOUR;
    grant(&f.recorder, 10, "acme", "tok1");
    grant(&f.recorder, day + 10, "acme", "tok1");
    grant(&f.recorder, 2 * day + 10, "acme", "tok1");
    f.flush(2 * day + 20).await.unwrap();
    // Retention is two days: at 3 days, the buckets that started on day 1 or later
    // stay (the one starting exactly two days before is kept).
    let gone = f.prune(3 * day).await.unwrap();
    assert_eq!(
        gone, 3,
        "the tenant's, the token's and the tenant-in-pool row of day 0"
    );
    let pairs = store.read_grants(0, 3 * day, None).await.unwrap();
    assert_eq!(pairs[0].granted, 2, "days 1 and 2 are kept");
    let starts: Vec<i64> = all(store, 3 * day)
        .await
        .iter()
        .filter(|r| r.subject.kind == SubjectKind::Tenant)
        .map(|r| r.bucket_start_ms)
        .collect();
    assert_eq!(starts, vec![day, 2 * day]);
}

pub(super) async fn pages_cover_every_row_once(db: &TestDb) {
    let store = &db.store;
    let f = flusher(store, "r1");
    for bucket in 0..3 {
        for tenant in ["a", "b", "c"] {
            grant(&f.recorder, bucket * HOUR + 1, tenant, "tok1");
        }
    }
    f.flush(3 * HOUR).await.unwrap();
    let mut query = HistoryQuery {
        start_ms: 0,
        end_ms: 3 * HOUR,
        bucket_ms: HOUR,
        selection: Selection::default(),
        page_size: 4,
        after: None,
    };
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = crate::history::read(store, &query).await.unwrap();
        pages += 1;
        seen.extend(
            page.rows
                .iter()
                .map(|r| (r.bucket_start_ms, r.subject.id.clone())),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        query.after = Some(PageCursor::parse(&page.next_page_token).unwrap());
    }
    assert_eq!(pages, 3, "12 rows (9 tenant, 3 token) in pages of 4");
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((seen.len(), unique.len()), (12, 12));

    // Rolled up into 2-hour buckets, in pages of 3: a next page reads from its cursor's
    // bucket on, and still sums every stored hour of that bucket.
    query.bucket_ms = 2 * HOUR;
    query.page_size = 3;
    query.after = None;
    let mut granted = Vec::new();
    loop {
        let page = crate::history::read(store, &query).await.unwrap();
        granted.extend(page.rows.iter().map(|r| {
            let id = r.subject.id.clone();
            (r.bucket_start_ms, id, r.tally.granted)
        }));
        if page.next_page_token.is_empty() {
            break;
        }
        query.after = Some(PageCursor::parse(&page.next_page_token).unwrap());
    }
    let a: Vec<_> = granted.iter().filter(|(_, id, _)| id == "a").collect();
    assert_eq!(a, [&(0, "a".to_owned(), 2), &(2 * HOUR, "a".to_owned(), 1)]);
    assert_eq!(
        granted.len(),
        8,
        "4 subjects in each of 2 buckets: {granted:?}"
    );
}

pub(super) async fn a_restart_loses_only_what_was_not_flushed(db: &TestDb) {
    let f = flusher(&db.store, "before-restart");
    // A closed bucket, flushed; then the open bucket, partly flushed.
    grant(&f.recorder, 10, "acme", "tok1");
    grant(&f.recorder, HOUR + 10, "acme", "tok1");
    f.flush(HOUR + 20).await.unwrap();
    grant(&f.recorder, HOUR + 30, "acme", "tok1"); // never flushed: lost
    drop(f);

    let reopened = ConfigStore::connect(&db.url).await.expect("reopening");
    reopened.migrate().await.unwrap();
    let after = flusher(&reopened, "after-restart");
    grant(&after.recorder, HOUR + 40, "acme", "tok1");
    after.flush(HOUR + 50).await.unwrap();

    let tenants: Vec<(i64, u64)> = all(&reopened, 2 * HOUR)
        .await
        .iter()
        .filter(|r| r.subject.kind == SubjectKind::Tenant)
        .map(|r| (r.bucket_start_ms, r.tally.granted))
        .collect();
    assert_eq!(tenants, vec![(0, 1), (HOUR, 2)]);
}
