//! Each kind of object: seeding, round trips, paging, taken ids and missing references.

use std::time::Duration;

use crate::domain::{ApiKeyRole, SharedAccess};
use crate::store::StoreError;

use super::harness::*;

/// Migrating twice is harmless, and seeding twice creates the three default tiers and
/// the BaseLinker profile exactly once, bumping the version once.
pub(super) async fn migrate_and_seed_create_the_defaults_once(db: &TestDb) {
    let store = &db.store;
    store.migrate().await.expect("a second migrate is a no-op");
    assert_eq!(store.version().await.unwrap(), 0);
    store.seed_defaults().await.unwrap();
    store.seed_defaults().await.unwrap();
    assert_eq!(
        store.version().await.unwrap(),
        1,
        "only the first seed writes"
    );

    let tiers = store.list_tiers(None, 100).await.unwrap();
    let summary: Vec<_> = tiers
        .iter()
        .map(|t| {
            (
                t.id.as_str(),
                t.guaranteed_per_window,
                t.burst_per_window,
                t.shared_access,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("basic", 20, 10, SharedAccess::Limited),
            ("premium", 150, 50, SharedAccess::Priority),
            ("standard", 50, 30, SharedAccess::Normal),
        ]
    );
    let upstreams = store.list_upstreams(None, 100).await.unwrap();
    assert_eq!(upstreams.len(), 1);
    let baselinker = &upstreams[0];
    assert_eq!(baselinker.id.as_str(), "baselinker");
    assert_eq!(baselinker.limit_per_window, 100);
    assert_eq!(baselinker.window, Duration::from_secs(60));
    assert_eq!(baselinker.safety_margin, 0.05);
    assert_eq!(baselinker.usable_per_window(), 95);
    assert_eq!(baselinker.rate_limit_error_codes.len(), 2);
}

/// Seeding leaves alone an object an admin created with a default id first.
pub(super) async fn seeding_keeps_existing_objects(db: &TestDb) {
    let store = &db.store;
    store.create_tier(tier("premium", 7, 3)).await.unwrap();
    store.seed_defaults().await.unwrap();
    assert_eq!(
        store
            .get_tier(&id("premium"))
            .await
            .unwrap()
            .guaranteed_per_window,
        7
    );
    assert_eq!(store.list_tiers(None, 10).await.unwrap().len(), 3);
}

/// An upstream profile round-trips every field; update keeps the create time.
pub(super) async fn upstream_round_trip(db: &TestDb) {
    let store = &db.store;
    let (created, _) = store.create_upstream(upstream("allegro")).await.unwrap();
    assert!(created.create_time_ms > 0);
    assert_eq!(created.create_time_ms, created.update_time_ms);
    let expected = upstream("allegro");
    assert_eq!(
        (
            created.limit_per_window,
            created.window,
            created.safety_margin
        ),
        (
            expected.limit_per_window,
            expected.window,
            expected.safety_margin
        )
    );
    assert_eq!(created.block_duration, Duration::from_millis(1500));
    assert_eq!(created.max_block, None, "absent unless set");
    assert_eq!(
        created.rate_limit_error_codes,
        expected.rate_limit_error_codes
    );
    assert_eq!(store.get_upstream(&id("allegro")).await.unwrap(), created);

    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut changed = created.clone();
    changed.limit_per_window = 90;
    changed.rate_limit_error_codes = vec![];
    changed.max_block = Some(Duration::from_secs(90));
    changed.create_time_ms = 1; // ignored: the store keeps the original
    let (updated, _) = store.update_upstream(changed).await.unwrap();
    assert_eq!(updated.limit_per_window, 90);
    assert_eq!(updated.max_block, Some(Duration::from_secs(90)));
    assert!(updated.rate_limit_error_codes.is_empty());
    assert_eq!(updated.create_time_ms, created.create_time_ms);
    assert!(updated.update_time_ms > created.update_time_ms);
    assert_eq!(store.get_upstream(&id("allegro")).await.unwrap(), updated);

    store.delete_upstream(&id("allegro")).await.unwrap();
    let (missing, field) = not_found(store.get_upstream(&id("allegro")).await);
    assert_eq!(
        (missing.as_str(), field.as_str()),
        ("allegro", "upstream.id")
    );
}

/// A pool, a tier and a tenant round-trip every field, optional ones included.
pub(super) async fn pool_tier_tenant_round_trip(db: &TestDb) {
    let store = &db.store;
    store.seed_defaults().await.unwrap();
    let (p, _) = store.create_pool(pool("eu")).await.unwrap();
    assert_eq!(store.get_pool(&id("eu")).await.unwrap(), p);
    let (t, _) = store.create_tier(tier("gold", 40, 5)).await.unwrap();
    assert_eq!(store.get_tier(&id("gold")).await.unwrap(), t);
    assert_eq!((t.weight, t.shared_access), (1.5, SharedAccess::Normal));

    let mut acme = tenant("acme", "gold", Some("eu"));
    acme.weight_override = Some(2.25);
    acme.guaranteed_override = Some(0);
    acme.burst_override = Some(12);
    let (created, _) = store.create_tenant(acme.clone()).await.unwrap();
    assert_eq!(
        (
            created.weight_override,
            created.guaranteed_override,
            created.burst_override
        ),
        (Some(2.25), Some(0), Some(12))
    );
    assert_eq!(store.get_tenant(&id("acme")).await.unwrap(), created);

    let mut moved = created.clone();
    (moved.pool_id, moved.tier_id, moved.weight_override) = (None, id("basic"), None);
    let (updated, _) = store.update_tenant(moved).await.unwrap();
    assert_eq!((updated.pool_id, updated.weight_override), (None, None));
    assert_eq!(updated.tier_id, id("basic"));
    assert_eq!(updated.create_time_ms, created.create_time_ms);

    let mut renamed = p.clone();
    renamed.display_name = "Europe".into();
    assert_eq!(
        store.update_pool(renamed).await.unwrap().0.display_name,
        "Europe"
    );
    let mut raised = t.clone();
    raised.weight = 4.0;
    raised.shared_access = SharedAccess::Priority;
    let (raised, _) = store.update_tier(raised).await.unwrap();
    assert_eq!(
        (raised.weight, raised.shared_access),
        (4.0, SharedAccess::Priority)
    );

    store.delete_tenant(&id("acme")).await.unwrap();
    store.delete_tier(&id("gold")).await.unwrap();
    store.delete_pool(&id("eu")).await.unwrap();
    assert_eq!(
        not_found(store.get_tenant(&id("acme")).await).1,
        "tenant.id"
    );
    assert_eq!(not_found(store.get_tier(&id("gold")).await).1, "tier.id");
    assert_eq!(not_found(store.get_pool(&id("eu")).await).1, "pool.id");
}

/// Optional overrides left out, then given, on one connection: a statement prepared
/// for a null must still take a number. (Postgres answered the second CreateTenant
/// "incorrect binary data format in bind parameter 5", INTERNAL, once the pool's
/// connection had prepared the insert with a null weight.)
pub(super) async fn overrides_given_after_nulls_are_stored(db: &TestDb) {
    let store = &db.store;
    store.seed_defaults().await.unwrap();
    // Without a pool, so that no guarantee rule is involved.
    // Enough writes that every connection of the pool has prepared both statements
    // with nulls first.
    for i in 0..12 {
        store
            .create_tenant(tenant(&format!("plain-{i:02}"), "basic", None))
            .await
            .unwrap();
        let mut plain = store
            .get_tenant(&id(&format!("plain-{i:02}")))
            .await
            .unwrap();
        plain.display_name = format!("Plain {i}");
        store.update_tenant(plain).await.unwrap();
    }
    for i in 0..12 {
        let mut weighted = tenant(&format!("weighted-{i:02}"), "basic", None);
        weighted.weight_override = Some(0.5 + f64::from(i));
        weighted.guaranteed_override = Some(1);
        weighted.burst_override = Some(u32::try_from(i).unwrap());
        let (created, _) = store.create_tenant(weighted.clone()).await.unwrap();
        assert_eq!(created.weight_override, weighted.weight_override);
        let mut updated = created.clone();
        updated.weight_override = Some(2.0 + f64::from(i));
        let (updated, _) = store.update_tenant(updated).await.unwrap();
        assert_eq!(updated.weight_override, Some(2.0 + f64::from(i)));
        assert_eq!(
            (updated.guaranteed_override, updated.burst_override),
            (Some(1), Some(u32::try_from(i).unwrap()))
        );
    }
}

/// A token round-trips both kinds of owner and the disabled flag.
pub(super) async fn token_round_trip(db: &TestDb) {
    let store = &db.store;
    seeded_pool(store, 0).await;
    store
        .create_tenant(tenant("acme", "basic", None))
        .await
        .unwrap();
    let (pooled, _) = store
        .create_token(token("p1", in_pool("shared")))
        .await
        .unwrap();
    let (dedicated, _) = store
        .create_token(token("d1", dedicated_to("acme")))
        .await
        .unwrap();
    assert_eq!(store.get_token(&id("p1")).await.unwrap(), pooled);
    assert_eq!(store.get_token(&id("d1")).await.unwrap(), dedicated);
    assert_eq!(dedicated.owner, dedicated_to("acme"));
    assert_eq!(dedicated.sealed_secret, sealed_for("d1"));

    let mut changed = dedicated.clone();
    changed.owner = in_pool("shared");
    changed.disabled = true;
    let (updated, _) = store.update_token(changed).await.unwrap();
    assert_eq!(
        (updated.owner.clone(), updated.disabled),
        (in_pool("shared"), true)
    );
    assert_eq!(updated.create_time_ms, dedicated.create_time_ms);

    store.delete_token(&id("d1")).await.unwrap();
    assert_eq!(not_found(store.get_token(&id("d1")).await).1, "token.id");
    assert_eq!(store.list_tokens(None, 10).await.unwrap(), vec![pooled]);
}

/// An API key keeps its role and hash, stores its scope sorted and deduplicated, and
/// update replaces only the name and the scope.
pub(super) async fn api_key_round_trip(db: &TestDb) {
    let store = &db.store;
    store.seed_defaults().await.unwrap();
    for t in ["a", "b", "c"] {
        store.create_tenant(tenant(t, "basic", None)).await.unwrap();
    }
    let (worker, _) = store
        .create_api_key(api_key("k-w", ApiKeyRole::Worker, &["b", "a", "b"]))
        .await
        .unwrap();
    assert_eq!(worker.tenant_ids, vec![id("a"), id("b")]);
    assert!(worker.create_time_ms > 0);
    assert_eq!(store.get_api_key("k-w").await.unwrap(), worker);
    store
        .create_api_key(api_key("k-admin", ApiKeyRole::Admin, &[]))
        .await
        .unwrap();
    assert_eq!(store.count_admin_keys().await.unwrap(), 1);

    // A key keeps its role: an update that says otherwise is refused, changing nothing.
    let refused = store
        .update_api_key(api_key("k-w", ApiKeyRole::Admin, &[]))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, StoreError::FailedPrecondition(f) if f.field == "api_key.role"),
        "{refused:?}"
    );
    assert_eq!(store.get_api_key("k-w").await.unwrap(), worker);
    let mut change = api_key("k-w", ApiKeyRole::Worker, &["c"]);
    change.display_name = "renamed".into();
    change.secret_hash = vec![1, 2, 3];
    let (updated, _) = store.update_api_key(change).await.unwrap();
    assert_eq!(updated.display_name, "renamed");
    assert_eq!(updated.tenant_ids, vec![id("c")]);
    assert_eq!(
        (updated.role, &updated.secret_hash),
        (ApiKeyRole::Worker, &worker.secret_hash)
    );
    assert_eq!(updated.create_time_ms, worker.create_time_ms);
    assert_eq!(store.count_admin_keys().await.unwrap(), 1);

    let all = store.list_api_keys(None, 10).await.unwrap();
    assert_eq!(
        all.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(),
        ["k-admin", "k-w"]
    );
    assert_eq!(all[1], updated);
    store.delete_api_key("k-w").await.unwrap();
    assert_eq!(not_found(store.get_api_key("k-w").await).1, "api_key.id");
    assert_eq!(not_found(store.delete_api_key("k-w").await).1, "api_key.id");
}

/// Lists are in id byte order on both backends, and paging with `after` visits every
/// object once.
pub(super) async fn lists_page_in_id_byte_order(db: &TestDb) {
    let store = &db.store;
    store.seed_defaults().await.unwrap();
    let ids = ["b", "a-b", "ab", "a_b", "a", "a0", "z9", "m-", "m_"];
    for t in ids {
        store.create_tenant(tenant(t, "basic", None)).await.unwrap();
        store
            .create_api_key(api_key(&format!("key-{t}"), ApiKeyRole::Worker, &[t]))
            .await
            .unwrap();
    }
    let mut expected: Vec<&str> = ids.to_vec();
    expected.sort(); // byte order, as Rust sorts strings
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.list_tenants(after.as_deref(), 2).await.unwrap();
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        after = Some(last.id.to_string());
        seen.extend(page.iter().map(|t| t.id.to_string()));
    }
    assert_eq!(seen, expected);

    let keys = store.list_api_keys(Some("key-a0"), 3).await.unwrap();
    let key_ids: Vec<_> = keys.iter().map(|k| k.id.as_str()).collect();
    assert_eq!(key_ids, ["key-a_b", "key-ab", "key-b"]);
    assert_eq!(
        keys[0].tenant_ids,
        vec![id("a_b")],
        "each key gets its own scope"
    );
    assert_eq!(
        store.list_tiers(Some("basic"), 1).await.unwrap()[0].id,
        id("premium")
    );
    assert!(store.list_pools(None, 10).await.unwrap().is_empty());
    assert!(store.list_tenants(None, 0).await.unwrap().is_empty());
}

/// Creating an id that exists is ALREADY_EXISTS for every kind, and changes nothing.
pub(super) async fn duplicate_ids_are_already_exists(db: &TestDb) {
    let store = &db.store;
    seeded_pool(store, 1).await;
    store
        .create_tenant(tenant("acme", "basic", None))
        .await
        .unwrap();
    store
        .create_api_key(api_key("k", ApiKeyRole::Admin, &[]))
        .await
        .unwrap();
    let version = store.version().await.unwrap();
    already_exists(
        store.create_upstream(upstream("baselinker")).await,
        "baselinker",
    );
    already_exists(store.create_pool(pool("shared")).await, "shared");
    already_exists(store.create_tier(tier("basic", 1, 1)).await, "basic");
    already_exists(
        store.create_tenant(tenant("acme", "basic", None)).await,
        "acme",
    );
    already_exists(
        store.create_token(token("tok1", in_pool("shared"))).await,
        "tok1",
    );
    already_exists(
        store
            .create_api_key(api_key("k", ApiKeyRole::Admin, &[]))
            .await,
        "k",
    );
    assert_eq!(store.version().await.unwrap(), version);
    assert_eq!(
        store
            .get_tier(&id("basic"))
            .await
            .unwrap()
            .guaranteed_per_window,
        20
    );
}

/// A reference to a missing object is NOT_FOUND naming the request field, and so is
/// updating or deleting a missing id.
pub(super) async fn unknown_references_are_not_found_with_the_field(db: &TestDb) {
    let store = &db.store;
    seeded_pool(store, 0).await;
    let cases = [
        not_found(store.create_tenant(tenant("t", "gold", None)).await),
        not_found(
            store
                .create_tenant(tenant("t", "basic", Some("nope")))
                .await,
        ),
        not_found(
            store
                .create_pool({
                    let mut p = pool("p");
                    p.upstream_id = id("x");
                    p
                })
                .await,
        ),
        not_found(
            store
                .create_token({
                    let mut t = token("t", in_pool("shared"));
                    t.upstream_id = id("x");
                    t
                })
                .await,
        ),
        not_found(store.create_token(token("t", in_pool("nope"))).await),
        not_found(store.create_token(token("t", dedicated_to("ghost"))).await),
        not_found(
            store
                .create_api_key(api_key("k", ApiKeyRole::Worker, &["ghost"]))
                .await,
        ),
        not_found(store.update_tenant(tenant("ghost", "basic", None)).await),
        not_found(store.update_tier(tier("ghost", 1, 1)).await),
        not_found(store.delete_token(&id("ghost")).await),
        not_found(store.delete_upstream(&id("ghost")).await),
    ];
    let fields: Vec<_> = cases.iter().map(|(i, f)| format!("{f}={i}")).collect();
    assert_eq!(
        fields,
        [
            "tenant.tier_id=gold",
            "tenant.pool_id=nope",
            "pool.upstream_id=x",
            "token.upstream_id=x",
            "token.pool_id=nope",
            "token.dedicated_tenant_id=ghost",
            "api_key.tenant_ids=ghost",
            "tenant.id=ghost",
            "tier.id=ghost",
            "token.id=ghost",
            "upstream.id=ghost",
        ]
    );
    assert!(store.list_tenants(None, 10).await.unwrap().is_empty());
    assert!(store.list_api_keys(None, 10).await.unwrap().is_empty());
}
