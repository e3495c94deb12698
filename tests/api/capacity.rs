//! Quotas follow the capacity in service: a quarantined token's capacity leaves its
//! pool's allocation until the quarantine ends, so quotas never promise slots no token
//! can grant (property 2 during an upstream block).

use std::time::{Duration, Instant};

use tokenlease::domain::Id;

use super::breaker::{configure, quarantine};
use super::helpers::now_ms;
use super::helpers::{Counters, Db, TestApp, TestEnv};

macro_rules! for_each_backend {
    ($($name:ident),* $(,)?) => {
        mod memory { $( #[tokio::test] async fn $name() { super::$name(super::Db::Sqlite, super::Counters::Memory).await } )* }
        mod redis { $( #[tokio::test] async fn $name() { super::$name(super::Db::Postgres, super::Counters::Redis).await } )* }
    };
}

for_each_backend!(a_quarantined_tokens_capacity_leaves_the_quotas);

fn quota(app: &TestApp) -> u32 {
    let key = (
        Id::parse("t", "acme").unwrap(),
        Id::parse("u", "up").unwrap(),
    );
    let quotas = app.leaser.allocator.current();
    quotas.by_tenant.get(&key).copied().unwrap_or(0)
}

/// Waits up to 10 s for acme's quota to become `expected`; returns when it did (Unix ms).
async fn quota_becomes(app: &TestApp, expected: u32) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    while quota(app) != expected {
        assert!(
            Instant::now() < deadline,
            "acme's quota stayed {}, expected {expected}",
            quota(app)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    now_ms()
}

/// Two tokens of 95 usable; acme alone in the pool with room to burst: its quota is the
/// pool's 190. tok-0 reported rate-limited until now + 3 s → 95 until then, 190 after.
async fn a_quarantined_tokens_capacity_leaves_the_quotas(db: Db, counters: Counters) {
    let env = TestEnv::new(db, counters).await;
    let app = env.spawn().await;
    configure(&app, 2).await;
    quota_becomes(&app, 190).await;
    let blocked_until = quarantine(&app, "tok-0", 3_000).await;
    let shrunk_at = quota_becomes(&app, 95).await;
    assert!(
        shrunk_at < blocked_until,
        "the quota shrank only after the block had ended (at {shrunk_at}, the block \
         ended at {blocked_until})"
    );
    let restored_at = quota_becomes(&app, 190).await;
    // The capacity returns to the quotas 100 ms before the token does, so that a caller
    // retrying at that instant finds the quota raised already (`health::RETURN_LEAD`).
    assert!(
        restored_at >= blocked_until - 150,
        "the quota came back at {restored_at}, before the block ended at {blocked_until}"
    );
}
