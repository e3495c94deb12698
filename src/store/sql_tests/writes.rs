//! How writes behave as a whole: secrets kept as given, re-sealing, versions, snapshots
//! and concurrent writers.

use std::collections::BTreeSet;

use sqlx::Row;

use crate::crypto::CryptoError;
use crate::domain::{ApiKeyRole, check_guarantees};
use crate::store::{Kind, StoreError};

use super::harness::*;

/// Updating a token with an empty sealed secret keeps the stored secret and key id;
/// a non-empty one replaces both.
pub(super) async fn update_token_with_empty_secret_keeps_it(db: &TestDb) {
    let store = &db.store;
    seeded_pool(store, 1).await;
    let mut change = store.get_token(&id("tok1")).await.unwrap();
    change.display_name = "renamed".into();
    change.key_id = "ignored".into();
    change.sealed_secret = Vec::new();
    let (kept, _) = store.update_token(change.clone()).await.unwrap();
    assert_eq!(kept.display_name, "renamed");
    assert_eq!(
        (kept.key_id.as_str(), kept.sealed_secret.clone()),
        ("k1", sealed_for("tok1"))
    );

    change.key_id = "k2".into();
    change.sealed_secret = vec![9, 9, 9];
    let (replaced, _) = store.update_token(change).await.unwrap();
    assert_eq!(
        (replaced.key_id.as_str(), replaced.sealed_secret),
        ("k2", vec![9, 9, 9])
    );
}

/// Re-sealing rewrites the tokens it is given new secrets for, and an error on any
/// token rolls back all of them, keeping the error's message.
pub(super) async fn reseal_rewrites_or_rolls_back_everything(db: &TestDb) {
    let store = &db.store;
    seeded_pool(store, 3).await;
    let version = store.version().await.unwrap();
    let failing = |t: &crate::domain::TokenRecord| {
        if t.id.as_str() == "tok3" {
            return Err(CryptoError::WrongKey {
                token_id: t.id.to_string(),
                key_id: t.key_id.clone(),
            });
        }
        Ok(Some(("k2".to_string(), vec![2, 2])))
    };
    let err = store.reseal_tokens(&failing).await.unwrap_err();
    assert!(matches!(err, StoreError::Internal(_)));
    assert!(
        err.to_string()
            .contains("did not decrypt with master key 'k1'"),
        "{err}"
    );
    let tokens = store.list_tokens(None, 10).await.unwrap();
    assert!(
        tokens
            .iter()
            .all(|t| t.key_id == "k1" && t.sealed_secret == sealed_for(t.id.as_str()))
    );
    assert_eq!(store.version().await.unwrap(), version);

    let skip_tok1 = |t: &crate::domain::TokenRecord| {
        Ok((t.id.as_str() != "tok1").then(|| ("k2".to_string(), vec![2, 2])))
    };
    assert_eq!(store.reseal_tokens(&skip_tok1).await.unwrap(), 2);
    let keys: Vec<_> = store
        .list_tokens(None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.key_id)
        .collect();
    assert_eq!(keys, ["k1", "k2", "k2"]);
    assert_eq!(store.version().await.unwrap(), version + 1);
    assert_eq!(store.reseal_tokens(&|_| Ok(None)).await.unwrap(), 0);
    assert_eq!(
        store.version().await.unwrap(),
        version + 1,
        "nothing changed, no bump"
    );
}

/// Every write returns and stores a version one higher; reads and refused writes
/// leave it.
pub(super) async fn version_grows_on_writes_only(db: &TestDb) {
    let store = &db.store;
    store.seed_defaults().await.unwrap();
    let mut expected = store.version().await.unwrap();
    let (_, v) = store.create_pool(pool("p")).await.unwrap();
    expected += 1;
    assert_eq!(v, expected);
    let (_, v) = store.create_token(token("t", in_pool("p"))).await.unwrap();
    assert_eq!(v, expected + 1);
    let (_, v) = store
        .create_tenant(tenant("acme", "basic", None))
        .await
        .unwrap();
    assert_eq!(v, expected + 2);
    let (_, v) = store
        .create_api_key(api_key("k", ApiKeyRole::Worker, &["acme"]))
        .await
        .unwrap();
    assert_eq!(v, expected + 3);
    assert_eq!(store.delete_api_key("k").await.unwrap(), expected + 4);
    expected += 4;
    store.load().await.unwrap();
    store.list_tenants(None, 10).await.unwrap();
    store.get_pool(&id("p")).await.unwrap();
    store.count_admin_keys().await.unwrap();
    store.create_pool(pool("p")).await.unwrap_err();
    assert_eq!(store.version().await.unwrap(), expected);
}

/// `load` returns everything with the version it belongs to, even while writes run:
/// each write adds one tenant, so every snapshot holds exactly `version − v0` of them.
pub(super) async fn load_is_one_consistent_snapshot(db: &TestDb) {
    let store = &db.store;
    seeded_pool(store, 1).await;
    store
        .create_tenant(tenant("t-first", "basic", Some("shared")))
        .await
        .unwrap();
    store
        .create_api_key(api_key("k", ApiKeyRole::Worker, &["t-first"]))
        .await
        .unwrap();
    let loaded = store.load().await.unwrap();
    assert_eq!(loaded.version, store.version().await.unwrap());
    assert_eq!(
        (
            loaded.view.upstreams.len(),
            loaded.view.tiers.len(),
            loaded.view.pools.len()
        ),
        (1, 3, 1)
    );
    assert_eq!(
        (loaded.view.tokens.len(), loaded.view.tenants.len()),
        (1, 1)
    );
    assert_eq!(loaded.api_keys[0].tenant_ids, vec![id("t-first")]);
    assert!(check_guarantees(&loaded.view).is_ok());

    let v0 = loaded.version - loaded.view.tenants.len() as i64;
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..15 {
                store
                    .create_tenant(tenant(&format!("t{i:02}"), "standard", None))
                    .await
                    .unwrap();
            }
        })
    };
    loop {
        let writer_done = writer.is_finished();
        let snapshot = store.load().await.unwrap();
        let tenants = snapshot.view.tenants.len() as i64;
        assert_eq!(
            tenants,
            snapshot.version - v0,
            "version and rows from one snapshot"
        );
        if writer_done {
            break;
        }
    }
    writer.await.unwrap();
    assert_eq!(store.load().await.unwrap().view.tenants.len(), 16);
}

/// Ten admin writes at once all succeed, each with its own version, and none is lost.
pub(super) async fn concurrent_writes_lose_nothing(db: &TestDb) {
    let store = &db.store;
    store.seed_defaults().await.unwrap();
    let v0 = store.version().await.unwrap();
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .create_tenant(tenant(&format!("c{i}"), "basic", None))
                    .await
            })
        })
        .collect();
    let mut versions = BTreeSet::new();
    for task in tasks {
        let (_, version) = task.await.unwrap().expect("a concurrent write succeeds");
        versions.insert(version);
    }
    assert_eq!(versions, (v0 + 1..=v0 + 10).collect::<BTreeSet<_>>());
    assert_eq!(store.list_tenants(None, 100).await.unwrap().len(), 10);
    assert_eq!(store.version().await.unwrap(), v0 + 10);
}

/// Concurrent writes cannot together break the 80 % rule (no write skew): of 15
/// tenants racing into a pool with room for 11 guarantees, exactly 11 get in.
pub(super) async fn concurrent_writes_cannot_overcommit_a_pool(db: &TestDb) {
    let store = &db.store;
    seeded_pool(store, 3).await; // 228 may be guaranteed; basic guarantees 20
    let tasks: Vec<_> = (0..15)
        .map(|i| {
            let store = store.clone();
            let t = tenant(&format!("r{i:02}"), "basic", Some("shared"));
            tokio::spawn(async move { store.create_tenant(t).await })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => admitted += 1,
            Err(StoreError::FailedPrecondition(_)) => {}
            Err(other) => panic!("a refused write must be FailedPrecondition: {other:?}"),
        }
    }
    assert_eq!(admitted, 11);
    let loaded = store.load().await.unwrap();
    assert_eq!(loaded.view.tenants.len(), 11);
    assert!(check_guarantees(&loaded.view).is_ok());
}

/// The pools' running guarantee totals stay exact under concurrent writers that
/// create tenants, move them between pools and delete them: the pool they crowd
/// admits exactly as many as 80 % of its capacity allows, and every total equals a
/// fresh sum afterwards.
pub(super) async fn concurrent_moves_keep_the_guarantee_totals_exact(db: &TestDb) {
    let store = &db.store;
    seeded_pool(store, 3).await; // `shared`: 228 may be guaranteed; basic guarantees 20
    store.create_pool(pool("second")).await.unwrap();
    for i in 1..=3 {
        let t = token(&format!("sec{i}"), in_pool("second"));
        store.create_token(t).await.unwrap();
    }
    for i in 0..6 {
        let t = tenant(&format!("m{i}"), "basic", Some("shared"));
        store.create_tenant(t).await.unwrap();
    }
    let mut tasks = Vec::new();
    for i in 0..15 {
        let store = store.clone();
        let t = tenant(&format!("n{i:02}"), "basic", Some("second"));
        tasks.push(tokio::spawn(async move {
            store.create_tenant(t).await.map(|_| ())
        }));
    }
    for i in 0..6 {
        let store = store.clone();
        let moved = tenant(&format!("m{i}"), "basic", Some("second"));
        tasks.push(tokio::spawn(async move {
            store.update_tenant(moved).await.map(|_| ())
        }));
    }
    for i in 0..4 {
        let store = store.clone();
        let extra = tenant(&format!("x{i}"), "basic", Some("shared"));
        tasks.push(tokio::spawn(async move {
            store.create_tenant(extra.clone()).await?;
            store.delete_tenant(&extra.id).await.map(|_| ())
        }));
    }
    for task in tasks {
        match task.await.unwrap() {
            Ok(()) | Err(StoreError::FailedPrecondition(_)) => {}
            Err(other) => panic!("a refused write must be FailedPrecondition: {other:?}"),
        }
    }
    let loaded = store.load().await.unwrap();
    assert!(check_guarantees(&loaded.view).is_ok());
    let in_pool = |pool: &str| {
        let pool = id(pool);
        let tenants = loaded.view.tenants.iter();
        tenants
            .filter(|t| t.pool_id.as_ref() == Some(&pool))
            .count()
    };
    assert_eq!(in_pool("second"), 11, "21 candidates for 11 places");
    let moved = (0..6)
        .filter(|i| {
            let t = loaded
                .view
                .tenants
                .iter()
                .find(|t| t.id == id(&format!("m{i}")));
            t.unwrap().pool_id == Some(id("second"))
        })
        .count();
    assert_eq!(in_pool("shared"), 6 - moved);
    let totals: Vec<(String, i64)> =
        sqlx::query_as("SELECT pool_id, guaranteed FROM pool_guarantees ORDER BY pool_id")
            .fetch_all(&mut db.raw().await)
            .await
            .unwrap();
    let expected = vec![
        ("second".to_owned(), 11 * 20),
        ("shared".to_owned(), (6 - moved as i64) * 20),
    ];
    assert_eq!(totals, expected);
}

/// A write that did not keep the guarantee totals (a replica that predates them, here
/// a raw insert with a version bump) makes the next write recount them, so it cannot
/// admit a guarantee the pool no longer has room for.
pub(super) async fn a_write_that_kept_no_totals_makes_the_next_recount(db: &TestDb) {
    let store = &db.store;
    seeded_pool(store, 3).await; // 228 may be guaranteed; basic guarantees 20
    for i in 0..10 {
        let t = tenant(&format!("r{i}"), "basic", Some("shared"));
        store.create_tenant(t).await.unwrap();
    }
    let mut raw = db.raw().await;
    sqlx::query(
        "INSERT INTO tenants (id, display_name, tier_id, pool_id, create_time_ms, \
         update_time_ms) VALUES ('old', 'old', 'basic', 'shared', 0, 0)",
    )
    .execute(&mut raw)
    .await
    .unwrap();
    sqlx::query("UPDATE config_meta SET version = version + 1")
        .execute(&mut raw)
        .await
        .unwrap();
    // 11 × 20 = 220 are guaranteed now; one more would make 240 > 228.
    let refused = store
        .create_tenant(tenant("one-too-many", "basic", Some("shared")))
        .await;
    let (field, reason) = precondition(refused);
    assert_eq!(field, "guaranteed_per_window");
    assert!(reason.contains("240 guaranteed"), "{reason}");
    let total: i64 =
        sqlx::query_scalar("SELECT guaranteed FROM pool_guarantees WHERE pool_id = 'shared'")
            .fetch_one(&mut raw)
            .await
            .unwrap();
    assert_eq!(total, 200, "the refused write rolled its recount back");
    store.delete_tenant(&id("r0")).await.unwrap();
    let total: i64 =
        sqlx::query_scalar("SELECT guaranteed FROM pool_guarantees WHERE pool_id = 'shared'")
            .fetch_one(&mut raw)
            .await
            .unwrap();
    assert_eq!(total, 200, "recounted (220), then r0 left (200)");
}

/// The database holds exactly the sealed bytes and key hashes it was given.
pub(super) async fn secrets_are_stored_as_given(db: &TestDb) {
    let store = &db.store;
    seeded_pool(store, 2).await;
    store
        .create_api_key(api_key("k", ApiKeyRole::Admin, &[]))
        .await
        .unwrap();
    let mut raw = db.raw().await;
    let rows = sqlx::query("SELECT id, sealed_secret FROM tokens ORDER BY id")
        .fetch_all(&mut raw)
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    for row in rows {
        let token_id: String = row.get("id");
        let sealed: Vec<u8> = row.get("sealed_secret");
        assert_eq!(sealed, sealed_for(&token_id));
    }
    let hash: Vec<u8> = sqlx::query_scalar("SELECT secret_hash FROM api_keys")
        .fetch_one(&mut raw)
        .await
        .unwrap();
    assert_eq!(hash, api_key("k", ApiKeyRole::Admin, &[]).secret_hash);
    let err = store
        .create_token(token("tok1", in_pool("shared")))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        StoreError::AlreadyExists {
            kind: Kind::Token,
            ..
        }
    ));
    assert_eq!(err.to_string(), "token 'tok1' already exists");
}
