//! Partial updates (`update_mask`, AIP-134) on every Update RPC, on the embedded store
//! and on Postgres: a one-field update leaves every other field as it was; bad masks
//! are INVALID_ARGUMENT naming the path; the merged object is checked like a full
//! update; no mask keeps the full replacement.

use prost_types::FieldMask;
use tokenlease::grpc::pb::{self, admin_service_client::AdminServiceClient};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use super::fixtures::{PoolSetup, token_secret};
use super::helpers::{Counters, Db, TestEnv, authed, lease_request, secs};

macro_rules! for_each_db {
    ($($name:ident),* $(,)?) => {
        mod sqlite { $( #[tokio::test] async fn $name() { super::$name(super::Db::Sqlite).await } )* }
        mod postgres { $( #[tokio::test] async fn $name() { super::$name(super::Db::Postgres).await } )* }
    };
}

for_each_db!(
    update_upstream_one_field,
    update_token_one_field_keeps_the_secret,
    update_pool_one_field,
    update_tier_one_field,
    update_tenant_one_field_and_clearing,
    update_api_key_one_field,
    bad_masks_are_refused_naming_the_path,
    merged_object_is_checked_like_a_full_update,
);

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}

/// Clears what an update changes by itself, so two answers compare field by field.
macro_rules! without_update_time {
    ($value:expr) => {{
        let mut v = $value;
        v.update_time = None;
        v
    }};
}

/// The field violation of an INVALID_ARGUMENT: (field, description).
fn violation(status: &tonic::Status) -> (String, String) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let bad = status
        .get_details_bad_request()
        .expect("a BadRequest detail");
    let v = bad.field_violations.first().expect("a field violation");
    (v.field.clone(), v.description.clone())
}

async fn setup(
    db: Db,
) -> (
    TestEnv,
    super::helpers::TestApp,
    AdminServiceClient<Channel>,
) {
    let env = TestEnv::new(db, Counters::Memory).await;
    let app = env.spawn().await;
    let mut admin = app.admin().await;
    PoolSetup::default()
        .create(&mut admin, &app.admin_key)
        .await;
    (env, app, admin)
}

/// UpdateUpstream with mask ["limit_per_window"] changes the limit (and the usable
/// slots computed from it) and leaves name, window, margin, block times and codes.
async fn update_upstream_one_field(db: Db) {
    let (_env, app, mut admin) = setup(db).await;
    let key = &app.admin_key;
    let created = pb::Upstream {
        id: "full".into(),
        display_name: "Full profile".into(),
        limit_per_window: 100,
        window: Some(secs(60)),
        safety_margin: Some(0.1),
        block_duration: Some(secs(120)),
        rate_limit_error_codes: vec!["ERROR_BLOCKED_TOKEN".into()],
        max_block: Some(secs(600)),
        ..Default::default()
    };
    let request = pb::CreateUpstreamRequest {
        upstream: Some(created),
    };
    let before = admin.create_upstream(authed(request, key)).await.unwrap();
    let before = before.into_inner().upstream.unwrap();
    let request = pb::UpdateUpstreamRequest {
        upstream: Some(pb::Upstream {
            id: "full".into(),
            limit_per_window: 200,
            ..Default::default()
        }),
        update_mask: mask(&["limit_per_window"]),
    };
    let after = admin.update_upstream(authed(request, key)).await;
    let after = after
        .expect("a one-field update")
        .into_inner()
        .upstream
        .unwrap();
    assert_eq!(
        (after.limit_per_window, after.usable_per_window),
        (200, 180)
    );
    let expected = pb::Upstream {
        limit_per_window: 200,
        usable_per_window: 180,
        ..before
    };
    assert_eq!(without_update_time!(after), without_update_time!(expected));
}

/// UpdateToken with mask ["display_name"] keeps owner, upstream, state, key id and the
/// secret (a lease still carries the original); mask ["secret"] replaces the secret,
/// never echoed, and an empty one named in the mask is refused.
async fn update_token_one_field_keeps_the_secret(db: Db) {
    let (_env, app, mut admin) = setup(db).await;
    let key = &app.admin_key;
    super::fixtures::create_tenant(&mut admin, key, "acme", "flex").await;
    let get = pb::GetTokenRequest { id: "tok-0".into() };
    let before = admin.get_token(authed(get.clone(), key)).await.unwrap();
    let before = before.into_inner().token.unwrap();
    let update = |token: pb::Token, paths: &[&str]| pb::UpdateTokenRequest {
        token: Some(pb::Token {
            id: "tok-0".into(),
            ..token
        }),
        update_mask: mask(paths),
    };
    let renamed = pb::Token {
        display_name: "renamed".into(),
        ..Default::default()
    };
    let answer = admin.update_token(authed(update(renamed, &["display_name"]), key));
    let after = answer.await.expect("a one-field update").into_inner();
    let after = after.token.unwrap();
    let expected = pb::Token {
        display_name: "renamed".into(),
        ..before.clone()
    };
    assert_eq!(without_update_time!(after), without_update_time!(expected));
    assert_eq!(leased_secret(&app, key).await, token_secret(0));

    let new_secret = "1-23-NEW-SECRET-VALUE";
    let rekeyed = pb::Token {
        secret: new_secret.into(),
        ..Default::default()
    };
    let answer = admin.update_token(authed(update(rekeyed, &["secret"]), key));
    let after = answer.await.expect("a secret update").into_inner();
    let after = after.token.unwrap();
    assert_eq!(after.secret, "", "a secret is never returned");
    assert!(!format!("{after:?}").contains(new_secret));
    assert_eq!(
        (after.display_name.as_str(), after.owner),
        ("renamed", before.owner)
    );
    assert_eq!(leased_secret(&app, key).await, new_secret);

    let empty = update(Default::default(), &["secret"]);
    let refused = admin.update_token(authed(empty, key)).await.unwrap_err();
    assert_eq!(violation(&refused).0, "token.secret");
    assert_eq!(leased_secret(&app, key).await, new_secret);
}

async fn leased_secret(app: &super::helpers::TestApp, key: &str) -> String {
    let answer = app
        .lease()
        .await
        .acquire_lease(lease_request("acme", key))
        .await;
    match answer.expect("AcquireLease answered").into_inner().result {
        Some(pb::acquire_lease_response::Result::Lease(lease)) => lease.token,
        other => panic!("expected a lease, got {other:?}"),
    }
}

/// UpdatePool with mask ["display_name"] keeps the upstream (a full update without it
/// is refused: `pool.upstream_id` is required).
async fn update_pool_one_field(db: Db) {
    let (_env, app, mut admin) = setup(db).await;
    let key = &app.admin_key;
    let get = pb::GetPoolRequest {
        id: "shared".into(),
    };
    let before = admin.get_pool(authed(get, key)).await.unwrap();
    let before = before.into_inner().pool.unwrap();
    let request = pb::UpdatePoolRequest {
        pool: Some(pb::Pool {
            id: "shared".into(),
            display_name: "Shared EU".into(),
            ..Default::default()
        }),
        update_mask: mask(&["display_name"]),
    };
    let after = admin.update_pool(authed(request, key)).await;
    let after = after
        .expect("a one-field update")
        .into_inner()
        .pool
        .unwrap();
    let expected = pb::Pool {
        display_name: "Shared EU".into(),
        ..before
    };
    assert_eq!(without_update_time!(after), without_update_time!(expected));
}

/// UpdateTier with mask ["weight"] keeps name, guarantee, burst and access class.
async fn update_tier_one_field(db: Db) {
    let (_env, app, mut admin) = setup(db).await;
    let key = &app.admin_key;
    let get = pb::GetTierRequest {
        id: "standard".into(),
    };
    let before = admin.get_tier(authed(get, key)).await.unwrap();
    let before = before.into_inner().tier.unwrap();
    assert_ne!(before.weight, 7.5);
    let request = pb::UpdateTierRequest {
        tier: Some(pb::Tier {
            id: "standard".into(),
            weight: 7.5,
            ..Default::default()
        }),
        update_mask: mask(&["weight"]),
    };
    let after = admin.update_tier(authed(request, key)).await;
    let after = after
        .expect("a one-field update")
        .into_inner()
        .tier
        .unwrap();
    let expected = pb::Tier {
        weight: 7.5,
        ..before
    };
    assert_eq!(without_update_time!(after), without_update_time!(expected));
}

/// UpdateTenant with mask ["tier_id"] keeps name, pool and overrides; a named override
/// left unset in the request is cleared (AIP-134), the others stay.
async fn update_tenant_one_field_and_clearing(db: Db) {
    let (_env, app, mut admin) = setup(db).await;
    let key = &app.admin_key;
    let tenant = pb::Tenant {
        id: "acme".into(),
        display_name: "Acme Ltd".into(),
        tier_id: "flex".into(),
        pool_id: "shared".into(),
        weight_override: Some(3.0),
        burst_override: Some(7),
        ..Default::default()
    };
    let request = pb::CreateTenantRequest {
        tenant: Some(tenant),
    };
    let before = admin.create_tenant(authed(request, key)).await.unwrap();
    let before = before.into_inner().tenant.unwrap();
    let update = |tenant: pb::Tenant, paths: &[&str]| pb::UpdateTenantRequest {
        tenant: Some(pb::Tenant {
            id: "acme".into(),
            ..tenant
        }),
        update_mask: mask(paths),
    };
    let basic = pb::Tenant {
        tier_id: "basic".into(),
        ..Default::default()
    };
    let answer = admin.update_tenant(authed(update(basic, &["tier_id"]), key));
    let after = answer.await.expect("a one-field update").into_inner();
    let after = after.tenant.unwrap();
    let expected = pb::Tenant {
        tier_id: "basic".into(),
        ..before.clone()
    };
    assert_eq!(without_update_time!(after), without_update_time!(expected));

    let answer = admin.update_tenant(authed(
        update(Default::default(), &["weight_override"]),
        key,
    ));
    let after = answer.await.expect("clearing an override").into_inner();
    let after = after.tenant.unwrap();
    let expected = pb::Tenant {
        tier_id: "basic".into(),
        weight_override: None,
        ..before
    };
    assert_eq!(without_update_time!(after), without_update_time!(expected));
}

/// UpdateApiKey with mask ["display_name"] keeps the role and the tenant scope (a full
/// update without them is refused: the role is required).
async fn update_api_key_one_field(db: Db) {
    let (_env, app, mut admin) = setup(db).await;
    let key = &app.admin_key;
    super::fixtures::create_tenant(&mut admin, key, "acme", "flex").await;
    let created = pb::ApiKey {
        display_name: "acme sync".into(),
        role: pb::ApiKeyRole::Worker as i32,
        tenant_ids: vec!["acme".into()],
        ..Default::default()
    };
    let request = pb::CreateApiKeyRequest {
        api_key: Some(created),
    };
    let before = admin.create_api_key(authed(request, key)).await.unwrap();
    let before = before.into_inner().api_key.unwrap();
    let request = pb::UpdateApiKeyRequest {
        api_key: Some(pb::ApiKey {
            id: before.id.clone(),
            display_name: "acme sync (prod)".into(),
            ..Default::default()
        }),
        update_mask: mask(&["display_name"]),
    };
    let after = admin.update_api_key(authed(request, key)).await;
    let after = after.expect("a one-field update").into_inner();
    let after = after.api_key.unwrap();
    let expected = pb::ApiKey {
        display_name: "acme sync (prod)".into(),
        ..before
    };
    assert_eq!(after, expected);
}

/// Unknown, nested, immutable and output-only paths are INVALID_ARGUMENT with a
/// BadRequest violation on `update_mask.paths[i]` naming the path, and change nothing;
/// `*` alone replaces the whole object as no mask does.
async fn bad_masks_are_refused_naming_the_path(db: Db) {
    let (_env, app, mut admin) = setup(db).await;
    let key = &app.admin_key;
    let get = pb::GetTierRequest { id: "flex".into() };
    let before = admin.get_tier(authed(get.clone(), key)).await.unwrap();
    let before = before.into_inner().tier.unwrap();
    let tier = |paths: &[&str]| pb::UpdateTierRequest {
        tier: Some(pb::Tier {
            id: "flex".into(),
            weight: 2.0,
            ..Default::default()
        }),
        update_mask: mask(paths),
    };
    let cases: [(&[&str], &str, &str); 4] = [
        (
            &["weight", "wieght"],
            "update_mask.paths[1]",
            "'wieght' is not a field of tier",
        ),
        (&["id"], "update_mask.paths[0]", "'id' cannot be changed"),
        (
            &["create_time"],
            "update_mask.paths[0]",
            "'create_time' is output only",
        ),
        (
            &["weight.value"],
            "update_mask.paths[0]",
            "only top-level fields",
        ),
    ];
    for (paths, field, says) in cases {
        let refused = admin
            .update_tier(authed(tier(paths), key))
            .await
            .unwrap_err();
        let (at, why) = violation(&refused);
        assert_eq!(at, field, "{paths:?}");
        assert!(why.contains(says), "{paths:?}: {why}");
        assert!(refused.message().contains(says), "{:?}", refused.message());
    }
    let key_role = pb::UpdateApiKeyRequest {
        api_key: Some(pb::ApiKey {
            id: "0123456789abcdef".into(),
            role: pb::ApiKeyRole::Admin as i32,
            ..Default::default()
        }),
        update_mask: mask(&["role"]),
    };
    let refused = admin
        .update_api_key(authed(key_role, key))
        .await
        .unwrap_err();
    assert!(violation(&refused).1.contains("'role' cannot be changed"));
    let after = admin.get_tier(authed(get, key)).await.unwrap();
    assert_eq!(after.into_inner().tier.unwrap(), before, "nothing changed");

    // "*" is a full replacement: the tier above has no access class, so it is refused
    // as a full update without one is.
    let refused = admin
        .update_tier(authed(tier(&["*"]), key))
        .await
        .unwrap_err();
    assert_eq!(violation(&refused).0, "tier.shared_access");
    let no_mask = admin.update_tier(authed(tier(&[]), key)).await.unwrap_err();
    assert_eq!(violation(&no_mask).0, "tier.shared_access");
}

/// The merged object meets every rule of a full update: a bad value is
/// INVALID_ARGUMENT on its field, the 80 % guarantee rule is FAILED_PRECONDITION, an
/// unknown id is NOT_FOUND, and a token's owner cleared by the mask is refused.
async fn merged_object_is_checked_like_a_full_update(db: Db) {
    let (_env, app, mut admin) = setup(db).await;
    let key = &app.admin_key;
    super::fixtures::create_tenant(&mut admin, key, "acme", "flex").await;
    let tier = |id: &str, t: pb::Tier, paths: &[&str]| pb::UpdateTierRequest {
        tier: Some(pb::Tier { id: id.into(), ..t }),
        update_mask: mask(paths),
    };
    let zero_weight = tier("flex", Default::default(), &["weight"]);
    let refused = admin
        .update_tier(authed(zero_weight, key))
        .await
        .unwrap_err();
    assert_eq!(violation(&refused).0, "tier.weight");
    // One token of 95 usable: a guarantee of 90 for "acme" is over 80 %.
    let greedy = pb::Tier {
        guaranteed_per_window: 90,
        ..Default::default()
    };
    let refused = admin
        .update_tier(authed(
            tier("flex", greedy, &["guaranteed_per_window"]),
            key,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let ghost = tier("ghost", Default::default(), &["display_name"]);
    let refused = admin.update_tier(authed(ghost, key)).await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");

    let orphan = pb::UpdateTokenRequest {
        token: Some(pb::Token {
            id: "tok-0".into(),
            owner: Some(pb::token::Owner::DedicatedTenantId("acme".into())),
            ..Default::default()
        }),
        update_mask: mask(&["pool_id"]),
    };
    let refused = admin.update_token(authed(orphan, key)).await.unwrap_err();
    assert_eq!(violation(&refused).0, "token.owner");
    let moved = pb::UpdateTokenRequest {
        token: Some(pb::Token {
            id: "tok-0".into(),
            owner: Some(pb::token::Owner::DedicatedTenantId("acme".into())),
            ..Default::default()
        }),
        update_mask: mask(&["dedicated_tenant_id"]),
    };
    let after = admin.update_token(authed(moved, key)).await;
    let after = after
        .expect("a move to a tenant")
        .into_inner()
        .token
        .unwrap();
    assert_eq!(
        after.owner,
        Some(pb::token::Owner::DedicatedTenantId("acme".into()))
    );
    assert_eq!(after.upstream_id, "up");
}
