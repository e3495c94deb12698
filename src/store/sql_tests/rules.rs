//! The rules that span objects: deletes of what is in use, the 80 % guarantee rule, and
//! the schema's own constraints behind them.

use sqlx::error::ErrorKind;

use crate::domain::ApiKeyRole;

use super::harness::*;

/// The portable kind of the database error in `result`, or a panic.
fn db_error_kind<T: std::fmt::Debug>(result: Result<T, sqlx::Error>) -> ErrorKind {
    match result {
        // SQLite reports an ON DELETE RESTRICT violation as a trigger constraint
        // (code 1811), which sqlx files under `Other`; the store maps it the same way.
        Err(sqlx::Error::Database(e)) if e.message() == "FOREIGN KEY constraint failed" => {
            ErrorKind::ForeignKeyViolation
        }
        Err(sqlx::Error::Database(e)) => e.kind(),
        other => panic!("expected a database error, got {other:?}"),
    }
}

/// Deleting a tier that tenants use is refused, naming the tier and its tenants.
pub(super) async fn delete_tier_in_use_names_its_tenants(db: &TestDb) {
    let store = &db.store;
    store.seed_defaults().await.unwrap();
    for t in ["acme", "beta", "c1", "c2", "c3", "c4", "c5"] {
        store
            .create_tenant(tenant(t, "premium", None))
            .await
            .unwrap();
    }
    let (field, reason) = precondition(store.delete_tier(&id("premium")).await);
    assert_eq!(field, "tier.id");
    assert!(
        reason.contains("tier 'premium' is used by 7 tenants (acme, beta, c1, c2, c3, …)"),
        "{reason}"
    );
    assert!(reason.contains("move them to another tier"), "{reason}");
    assert!(store.get_tier(&id("premium")).await.is_ok());
}

/// Deleting what others use is refused: a pool with tokens or tenants, an upstream
/// with pools or tokens, a tenant with dedicated tokens.
pub(super) async fn delete_in_use_is_refused(db: &TestDb) {
    let store = &db.store;
    seeded_pool(store, 1).await;
    let (_, reason) = precondition(store.delete_pool(&id("shared")).await);
    assert!(
        reason.contains("pool 'shared' holds 1 token (tok1)"),
        "{reason}"
    );
    let (_, reason) = precondition(store.delete_upstream(&id("baselinker")).await);
    assert!(
        reason.contains("upstream 'baselinker' is used by 1 token (tok1)"),
        "{reason}"
    );

    store
        .create_tenant(tenant("acme", "basic", Some("shared")))
        .await
        .unwrap();
    store
        .create_token(token("ded", dedicated_to("acme")))
        .await
        .unwrap();
    let (field, reason) = precondition(store.delete_tenant(&id("acme")).await);
    assert_eq!(field, "tenant.id");
    assert!(
        reason.contains("tenant 'acme' has 1 dedicated token (ded)"),
        "{reason}"
    );

    store.delete_token(&id("ded")).await.unwrap();
    store.delete_token(&id("tok1")).await.unwrap_err(); // acme's guarantee needs it
    let mut moved = store.get_tenant(&id("acme")).await.unwrap();
    moved.pool_id = None;
    store.update_tenant(moved).await.unwrap();
    store.delete_token(&id("tok1")).await.unwrap();
    let (_, reason) = precondition(store.delete_upstream(&id("baselinker")).await);
    assert!(reason.contains("is used by 1 pool (shared)"), "{reason}");
    store.delete_pool(&id("shared")).await.unwrap();
    store.delete_upstream(&id("baselinker")).await.unwrap();
}

/// Deleting a tenant removes it from API key scopes, but is refused while it is the
/// only tenant of a worker key.
pub(super) async fn delete_tenant_and_api_key_scopes(db: &TestDb) {
    let store = &db.store;
    seeded_pool(store, 2).await;
    for t in ["a", "b"] {
        store
            .create_tenant(tenant(t, "basic", Some("shared")))
            .await
            .unwrap();
    }
    store
        .create_api_key(api_key("both", ApiKeyRole::Worker, &["a", "b"]))
        .await
        .unwrap();
    store
        .create_api_key(api_key("only-b", ApiKeyRole::Worker, &["b"]))
        .await
        .unwrap();
    let (_, reason) = precondition(store.delete_tenant(&id("b")).await);
    assert!(
        reason.contains("tenant 'b' is the only tenant of 1 worker API key (only-b)"),
        "{reason}"
    );
    store.delete_tenant(&id("a")).await.unwrap();
    assert_eq!(
        store.get_api_key("both").await.unwrap().tenant_ids,
        vec![id("b")]
    );
    store
        .create_tenant(tenant("a", "basic", None))
        .await
        .unwrap();
    assert_eq!(
        store.get_api_key("both").await.unwrap().tenant_ids,
        vec![id("b")],
        "a re-created tenant id grants no old key"
    );
}

/// A tier update that pushes a pool's guarantees over 80 % of its capacity is refused
/// and changes nothing: the tier reads as before and the version stays.
pub(super) async fn tier_update_over_eighty_percent_changes_nothing(db: &TestDb) {
    let store = &db.store;
    seeded_pool(store, 3).await; // 285 usable, 228 may be guaranteed
    for t in ["a", "b", "c", "d"] {
        store
            .create_tenant(tenant(t, "basic", Some("shared")))
            .await
            .unwrap();
    }
    let before = store.get_tier(&id("basic")).await.unwrap();
    let version = store.version().await.unwrap();
    let mut raised = before.clone();
    raised.guaranteed_per_window = 58; // 4 × 58 = 232 > 228
    raised.display_name = "Raised".into();
    let (field, reason) = precondition(store.update_tier(raised.clone()).await);
    assert_eq!(field, "guaranteed_per_window");
    assert!(
        reason.contains("pool 'shared'") && reason.contains("232"),
        "{reason}"
    );
    assert_eq!(store.get_tier(&id("basic")).await.unwrap(), before);
    assert_eq!(store.version().await.unwrap(), version);

    raised.guaranteed_per_window = 57; // 228: exactly 80 %
    store.update_tier(raised).await.unwrap();
    assert_eq!(store.version().await.unwrap(), version + 1);
}

/// Deleting a token that the pool's guarantees need is refused; disabling it is not.
pub(super) async fn token_removal_breaking_eighty_percent_is_refused(db: &TestDb) {
    let store = &db.store;
    seeded_pool(store, 3).await;
    for t in ["a", "b", "c", "d", "e", "f", "g", "h"] {
        store
            .create_tenant(tenant(t, "basic", Some("shared")))
            .await
            .unwrap();
    } // 160 guaranteed: fits 228, not 152
    let version = store.version().await.unwrap();
    let (_, reason) = precondition(store.delete_token(&id("tok2")).await);
    assert!(reason.contains("160") && reason.contains("190"), "{reason}");
    assert_eq!(store.list_tokens(None, 10).await.unwrap().len(), 3);
    assert_eq!(store.version().await.unwrap(), version);
    // Disabling is the emergency switch: always allowed, even below the guarantees.
    let mut disabled = store.get_token(&id("tok2")).await.unwrap();
    disabled.disabled = true;
    store
        .update_token(disabled)
        .await
        .expect("disabling is allowed");
    assert!(store.get_token(&id("tok2")).await.unwrap().disabled);
}

/// A pool holds tokens of its own upstream only.
pub(super) async fn token_of_another_upstream_is_refused_in_a_pool(db: &TestDb) {
    let store = &db.store;
    seeded_pool(store, 0).await;
    store.create_upstream(upstream("allegro")).await.unwrap();
    let mut wrong = token("w", in_pool("shared"));
    wrong.upstream_id = id("allegro");
    let (field, _) = precondition(store.create_token(wrong).await);
    assert_eq!(field, "token.upstream_id");
    assert!(store.list_tokens(None, 10).await.unwrap().is_empty());
}

/// The schema itself refuses what the store's checks refuse (the backstop): a token
/// with two owners, a tenant on a missing tier, deleting a tier in use, a second
/// `config_meta` row.
pub(super) async fn schema_enforces_references_and_token_owner(db: &TestDb) {
    seeded_pool(&db.store, 0).await;
    db.store
        .create_tenant(tenant("acme", "basic", None))
        .await
        .unwrap();
    let mut raw = db.raw().await;
    let two_owners = sqlx::query(
        "INSERT INTO tokens (id, upstream_id, display_name, pool_id, dedicated_tenant_id, \
         disabled, key_id, sealed_secret, create_time_ms, update_time_ms) \
         VALUES ('x', 'baselinker', '', 'shared', 'acme', 0, 'k', $1, 0, 0)",
    )
    .bind(vec![1u8])
    .execute(&mut raw)
    .await;
    assert_eq!(db_error_kind(two_owners), ErrorKind::CheckViolation);
    let missing_tier = sqlx::query(
        "INSERT INTO tenants (id, display_name, tier_id, create_time_ms, update_time_ms) \
         VALUES ('t', '', 'ghost', 0, 0)",
    )
    .execute(&mut raw)
    .await;
    assert_eq!(db_error_kind(missing_tier), ErrorKind::ForeignKeyViolation);
    let tier_in_use = sqlx::query("DELETE FROM tiers WHERE id = 'basic'")
        .execute(&mut raw)
        .await;
    assert_eq!(db_error_kind(tier_in_use), ErrorKind::ForeignKeyViolation);
    let second_meta =
        sqlx::query("INSERT INTO config_meta (singleton, version, seeded) VALUES (2, 0, 0)")
            .execute(&mut raw)
            .await;
    assert_eq!(db_error_kind(second_meta), ErrorKind::CheckViolation);
}
