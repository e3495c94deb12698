//! Configuration that scales: random sequences of admin writes of every kind, where
//! each write is checked only on the pools it affects and each replica patches its
//! snapshot from the change log. `Write::finish` (in test builds) also runs the full
//! check on the whole configuration and asserts both give the same verdict and
//! message; these tests add that the patched snapshot equals a full build.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use secrecy::{ExposeSecret, SecretString};

use crate::crypto::KeyRing;
use crate::domain::{ApiKeyRole, TokenOwner, check_guarantees};
use crate::lease::Snapshot;
use crate::store::{ConfigStore, StoreError};

use super::harness::*;

const TENANTS: [&str; 6] = ["ta", "tb", "tc", "td", "te", "tf"];
const POOLS: [&str; 3] = ["pa", "pb", "pc"];
const TIERS: [&str; 4] = ["premium", "standard", "basic", "tx"];
const UPSTREAMS: [&str; 2] = ["baselinker", "other"];
const TOKENS: usize = 8;
const KEYS: usize = 4;

fn ring() -> KeyRing {
    let mut keys = BTreeMap::new();
    keys.insert("k1".to_owned(), KeyRing::generate_key_base64());
    KeyRing::from_base64(&keys, "k1").expect("a key ring")
}

fn pick<'a>(rng: &mut StdRng, from: &[&'a str]) -> &'a str {
    from[rng.random_range(0..from.len())]
}

/// One random admin write; refusals (NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION)
/// are part of the game. Returns whether it was made.
async fn random_write(store: &ConfigStore, ring: &KeyRing, rng: &mut StdRng) -> bool {
    let result: Result<(), StoreError> = match rng.random_range(0..16) {
        0 => {
            let mut u = upstream(pick(rng, &UPSTREAMS));
            u.limit_per_window = [40, 60, 100, 300][rng.random_range(0..4)];
            u.safety_margin = [0.05, 0.1, 0.5][rng.random_range(0..3)];
            u.window = Duration::from_secs(60);
            match store.create_upstream(u.clone()).await {
                Err(StoreError::AlreadyExists { .. }) => store.update_upstream(u).await.map(drop),
                other => other.map(drop),
            }
        }
        1 => {
            let mut p = pool(pick(rng, &POOLS));
            p.upstream_id = id(pick(rng, &UPSTREAMS));
            match store.create_pool(p.clone()).await {
                Err(StoreError::AlreadyExists { .. }) => store.update_pool(p).await.map(drop),
                other => other.map(drop),
            }
        }
        2 => store.delete_pool(&id(pick(rng, &POOLS))).await.map(drop),
        3 => {
            let g = [0, 10, 30, 60, 120][rng.random_range(0..5)];
            let t = tier(pick(rng, &TIERS), g, 10);
            match store.create_tier(t.clone()).await {
                Err(StoreError::AlreadyExists { .. }) => store.update_tier(t).await.map(drop),
                other => other.map(drop),
            }
        }
        4 => store.delete_tier(&id(pick(rng, &TIERS))).await.map(drop),
        5..=8 => {
            let pool = rng.random_bool(0.8).then(|| pick(rng, &POOLS));
            let mut t = tenant(pick(rng, &TENANTS), pick(rng, &TIERS), pool);
            t.guaranteed_override = rng
                .random_bool(0.4)
                .then(|| [0, 5, 40, 90][rng.random_range(0..4)]);
            match store.create_tenant(t.clone()).await {
                Err(StoreError::AlreadyExists { .. }) => store.update_tenant(t).await.map(drop),
                other => other.map(drop),
            }
        }
        9 => store
            .delete_tenant(&id(pick(rng, &TENANTS)))
            .await
            .map(drop),
        10..=12 => {
            let token_id = format!("tok{}", rng.random_range(0..TOKENS));
            let owner = if rng.random_bool(0.7) {
                TokenOwner::Pool(id(pick(rng, &POOLS)))
            } else {
                TokenOwner::Dedicated(id(pick(rng, &TENANTS)))
            };
            let mut t = token(&token_id, owner);
            t.upstream_id = id(if rng.random_bool(0.85) {
                "baselinker"
            } else {
                "other"
            });
            t.disabled = rng.random_bool(0.2);
            match rng.random_range(0..4) {
                // A secret that does not open: kept out of every route.
                0 => t.sealed_secret = vec![1, 2, 3],
                // Keep the stored secret (an update only).
                1 => t.sealed_secret = Vec::new(),
                _ => {
                    let secret = SecretString::from(format!("secret-{}", rng.random::<u32>()));
                    (t.key_id, t.sealed_secret) = ring.seal(&token_id, &secret);
                }
            }
            if t.sealed_secret.is_empty() {
                store.update_token(t).await.map(drop)
            } else {
                match store.create_token(t.clone()).await {
                    Err(StoreError::AlreadyExists { .. }) => store.update_token(t).await.map(drop),
                    other => other.map(drop),
                }
            }
        }
        13 => {
            let token_id = format!("tok{}", rng.random_range(0..TOKENS));
            store.delete_token(&id(&token_id)).await.map(drop)
        }
        14 => {
            let key_id = format!("key{}", rng.random_range(0..KEYS));
            let scope: Vec<&str> = (0..rng.random_range(1..4))
                .map(|_| pick(rng, &TENANTS))
                .collect();
            let k = api_key(&key_id, ApiKeyRole::Worker, &scope);
            match store.create_api_key(k.clone()).await {
                Err(StoreError::AlreadyExists { .. }) => store.update_api_key(k).await.map(drop),
                other => other.map(drop),
            }
        }
        _ => {
            let key_id = format!("key{}", rng.random_range(0..KEYS));
            store.delete_api_key(&key_id).await.map(drop)
        }
    };
    match result {
        Ok(()) => true,
        Err(
            StoreError::NotFound { .. }
            | StoreError::AlreadyExists { .. }
            | StoreError::FailedPrecondition(_),
        ) => false,
        Err(other) => panic!("unexpected store error: {other}"),
    }
}

/// Starts a random configuration: the defaults and a few tokens in pool `pa`.
async fn start(store: &ConfigStore, ring: &KeyRing) {
    store.seed_defaults().await.unwrap();
    let mut other = upstream("other");
    other.window = Duration::from_secs(60);
    store.create_upstream(other).await.unwrap();
    store.create_pool(pool("pa")).await.unwrap();
    for i in 0..3 {
        let mut t = token(&format!("tok{i}"), in_pool("pa"));
        (t.key_id, t.sealed_secret) = ring.seal(t.id.as_str(), &SecretString::from("s"));
        store.create_token(t).await.unwrap();
    }
}

/// Over random writes of every kind the check of the affected pools refuses exactly
/// what the check of the whole configuration refuses (asserted by `Write::finish` in
/// test builds), some writes are refused by it, and what is stored always passes the
/// full check.
pub(super) async fn scoped_check_refuses_what_the_full_check_refuses(db: &TestDb) {
    let store = &db.store;
    let ring = ring();
    start(store, &ring).await;
    let (mut made, mut refused) = (0, 0);
    for seed in 0..4 {
        let mut rng = StdRng::seed_from_u64(seed);
        for _ in 0..150 {
            let before = store.version().await.unwrap();
            if random_write(store, &ring, &mut rng).await {
                made += 1;
            } else {
                refused += 1;
                assert_eq!(
                    store.version().await.unwrap(),
                    before,
                    "a refusal changes nothing"
                );
            }
        }
        let view = store.load().await.unwrap().view;
        check_guarantees(&view).expect("what is stored passes the full check");
    }
    assert!(
        made > 100 && refused > 100,
        "made {made}, refused {refused}"
    );
}

/// A snapshot patched from the change log after each random write (or after several)
/// equals a snapshot built from a full load: objects, opened secrets, key scopes,
/// routes and pool reports.
pub(super) async fn patched_snapshot_equals_full_build(db: &TestDb) {
    let store = &db.store;
    let ring = ring();
    start(store, &ring).await;
    let mut snapshot = Snapshot::build(store.load().await.unwrap(), &ring);
    let mut rng = StdRng::seed_from_u64(7);
    for step in 0..400 {
        random_write(store, &ring, &mut rng).await;
        // Sometimes several writes at once, as a replica that polls sees them.
        if rng.random_bool(0.3) {
            continue;
        }
        let delta = store
            .changes_since(snapshot.version)
            .await
            .unwrap()
            .expect("the log covers every version since the first load");
        snapshot = snapshot.patched(delta, &ring);
        let full = Snapshot::build(store.load().await.unwrap(), &ring);
        assert_same(&snapshot, &full, step);
    }
}

/// A version the log does not cover (a write by a replica that predates it) makes the
/// reader load everything instead of patching.
pub(super) async fn a_gap_in_the_change_log_means_a_full_load(db: &TestDb) {
    let store = &db.store;
    store.seed_defaults().await.unwrap();
    let version = store.version().await.unwrap();
    store.create_pool(pool("pa")).await.unwrap();
    assert!(store.changes_since(version).await.unwrap().is_some());
    let mut raw = db.raw().await;
    sqlx::query("UPDATE config_meta SET version = version + 1")
        .execute(&mut raw)
        .await
        .unwrap();
    assert!(store.changes_since(version).await.unwrap().is_none());
    let now = store.version().await.unwrap();
    let delta = store
        .changes_since(now)
        .await
        .unwrap()
        .expect("nothing since");
    assert!(delta.is_empty());
}

fn assert_same(patched: &Snapshot, full: &Snapshot, step: usize) {
    let at = format!("after step {step}");
    assert_eq!(patched.version, full.version, "{at}");
    assert_eq!(patched.upstreams, full.upstreams, "{at}");
    assert_eq!(patched.pools, full.pools, "{at}");
    assert_eq!(patched.tiers, full.tiers, "{at}");
    assert_eq!(patched.tenants, full.tenants, "{at}");
    assert_eq!(patched.api_keys, full.api_keys, "{at}");
    for key in full.api_keys.values() {
        let mine = &patched.api_keys[&key.id];
        assert_eq!(
            patched.scope(mine),
            full.scope(key),
            "{at}: scope of {}",
            key.id
        );
    }
    let opened = |s: &Snapshot| -> BTreeMap<String, (bool, Result<String, String>)> {
        s.tokens
            .iter()
            .map(|(id, t)| {
                let secret = t.secret.as_ref().map(|s| s.expose_secret().to_owned());
                (
                    id.to_string(),
                    (
                        t.record == full.tokens[id].record,
                        secret.map_err(Clone::clone),
                    ),
                )
            })
            .collect()
    };
    let ids = |s: &Snapshot| s.tokens.keys().cloned().collect::<BTreeSet<_>>();
    assert_eq!(ids(patched), ids(full), "{at}");
    assert_eq!(opened(patched), opened(full), "{at}");
    assert_eq!(patched.routes, full.routes, "{at}");
    assert_eq!(patched.pool_reports, full.pool_reports, "{at}");
}

/// A worker key may name thousands of tenants (stored a batch per statement); a
/// missing one is NOT_FOUND naming the first missing id, and nothing is stored.
pub(super) async fn a_key_may_name_thousands_of_tenants(db: &TestDb) {
    let store = &db.store;
    store.seed_defaults().await.unwrap();
    let mut raw = db.raw().await;
    let ids: Vec<String> = (0..2_500).map(|i| format!("t{i:05}")).collect();
    for tenant_id in &ids {
        sqlx::query(
            "INSERT INTO tenants (id, display_name, tier_id, create_time_ms, update_time_ms) \
             VALUES ($1, '', 'basic', 0, 0)",
        )
        .bind(tenant_id.clone())
        .execute(&mut raw)
        .await
        .unwrap();
    }
    let scope: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut with_missing = scope.clone();
    with_missing.push("t01200x");
    with_missing.push("t99999");
    let refused = store
        .create_api_key(api_key("k-many", ApiKeyRole::Worker, &with_missing))
        .await;
    assert_eq!(
        not_found(refused),
        ("t01200x".to_owned(), "api_key.tenant_ids".to_owned())
    );
    assert!(store.list_api_keys(None, 10).await.unwrap().is_empty());
    let (stored, _) = store
        .create_api_key(api_key("k-many", ApiKeyRole::Worker, &scope))
        .await
        .unwrap();
    assert_eq!(stored.tenant_ids.len(), 2_500);
    let loaded = store.load().await.unwrap();
    assert_eq!(loaded.api_keys[0].tenant_ids.len(), 2_500);
}
