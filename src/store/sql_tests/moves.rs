//! Rebalancing's writes: a move is checked like any write, refuses stale plans, and
//! leaves an audit row.

use crate::domain::{MoveMode, TenantMove};
use crate::store::{MoveOrder, StoreError};

use super::harness::*;

fn order(tenant: &str, from: &str, to: &str) -> MoveOrder {
    MoveOrder {
        tenant_id: id(tenant),
        from_pool_id: id(from),
        to_pool_id: id(to),
        reason: format!("test: {tenant} from {from} to {to}"),
        mode: MoveMode::Manual,
        actor: "admin-key".into(),
        unless_moved_after: None,
    }
}

/// Pool `shared` (2 tokens: 190 usable, 152 may be guaranteed) with basic tenants a–d
/// (20 guaranteed each), pool `cold` (1 token: 95 usable, 76) with e, f, g (60).
async fn two_pools(db: &TestDb) {
    let store = &db.store;
    seeded_pool(store, 2).await;
    store.create_pool(pool("cold")).await.unwrap();
    store
        .create_token(token("c1", in_pool("cold")))
        .await
        .unwrap();
    for (t, p) in [
        ("a", "shared"),
        ("b", "shared"),
        ("c", "shared"),
        ("d", "shared"),
    ]
    .into_iter()
    .chain([("e", "cold"), ("f", "cold"), ("g", "cold")])
    {
        store
            .create_tenant(tenant(t, "basic", Some(p)))
            .await
            .unwrap();
    }
}

fn pool_of(tenant: &crate::domain::Tenant) -> &str {
    tenant.pool_id.as_ref().map_or("", |p| p.as_str())
}

/// A move changes the tenant's pool and records who, why and when; one that would
/// pass the receiving pool's 80 % changes nothing; a stale plan is refused.
pub(super) async fn a_move_is_checked_and_recorded(db: &TestDb) {
    let store = &db.store;
    two_pools(db).await;
    let version = store.version().await.unwrap();
    // cold would guarantee 80 of its 76.
    let (_, reason) = precondition(store.move_tenant(&order("a", "shared", "cold")).await);
    assert!(reason.contains("pool 'cold'"), "{reason}");
    assert_eq!(store.version().await.unwrap(), version);
    assert_eq!(
        pool_of(&store.get_tenant(&id("a")).await.unwrap()),
        "shared"
    );
    assert!(
        store
            .list_tenant_moves(None, None, None, 10)
            .await
            .unwrap()
            .is_empty()
    );

    let (first, moved, v1) = store
        .move_tenant(&order("e", "cold", "shared"))
        .await
        .unwrap();
    assert_eq!(pool_of(&moved), "shared");
    assert_eq!((first.version, first.mode), (v1, MoveMode::Manual));
    assert_eq!(first.upstream_id.as_str(), "baselinker");
    let (second, _, v2) = store
        .move_tenant(&order("a", "shared", "cold"))
        .await
        .unwrap();
    assert_eq!(pool_of(&store.get_tenant(&id("a")).await.unwrap()), "cold");

    // Stale: a is in cold now.
    let (field, reason) = precondition(store.move_tenant(&order("a", "shared", "cold")).await);
    assert_eq!(field, "move.from_pool_id");
    assert!(reason.contains("is in pool 'cold' now") && reason.contains("plan again"));
    // Planned before a's move.
    let mut late = order("b", "shared", "cold");
    late.unless_moved_after = Some(v1);
    let (field, reason) = precondition(store.move_tenant(&late).await);
    assert_eq!(field, "move");
    assert!(reason.contains(&format!("move {v2}")), "{reason}");
    assert_eq!(
        pool_of(&store.get_tenant(&id("b")).await.unwrap()),
        "shared"
    );
    // Bad pools.
    let (field, _) = precondition(store.move_tenant(&order("b", "shared", "shared")).await);
    assert_eq!(field, "move.to_pool_id");
    let missing = not_found(store.move_tenant(&order("b", "shared", "nowhere")).await);
    assert_eq!(missing, ("nowhere".into(), "move.to_pool_id".into()));

    let all = store.list_tenant_moves(None, None, None, 10).await.unwrap();
    assert_eq!(all, vec![second.clone(), first.clone()], "newest first");
    let page = store
        .list_tenant_moves(None, None, Some(v2), 10)
        .await
        .unwrap();
    assert_eq!(page, vec![first.clone()]);
    let of_a = store
        .list_tenant_moves(None, Some(&id("a")), None, 10)
        .await
        .unwrap();
    assert_eq!(of_a, vec![second.clone()]);
    let other = store
        .list_tenant_moves(Some(&id("other")), None, None, 10)
        .await
        .unwrap();
    assert!(other.is_empty());
    let history = store.move_history(&id("baselinker")).await.unwrap();
    assert_eq!(history.last_version, v2);
    assert_eq!(history.moved_at_ms[&id("a")], second.move_time_ms);
    assert_eq!(history.moved_at_ms[&id("e")], first.move_time_ms);
    assert_eq!(history.moved_at_ms.len(), 2);
}

/// Two replicas applying plans made from the same state: the first move wins, the
/// other is refused as stale, so two halves of two plans never add up.
pub(super) async fn concurrent_plans_move_once(db: &TestDb) {
    let store = &db.store;
    two_pools(db).await;
    // Room in cold for all three (152 may be guaranteed): only the plan check refuses.
    store
        .create_token(token("c2", in_pool("cold")))
        .await
        .unwrap();
    store
        .move_tenant(&order("e", "cold", "shared"))
        .await
        .unwrap();
    let seen = store
        .move_history(&id("baselinker"))
        .await
        .unwrap()
        .last_version;
    let tasks: Vec<_> = ["b", "c", "d"]
        .into_iter()
        .map(|t| {
            let store = store.clone();
            let mut o = order(t, "shared", "cold");
            o.mode = MoveMode::Automatic;
            o.unless_moved_after = Some(seen);
            tokio::spawn(async move { store.move_tenant(&o).await })
        })
        .collect();
    let mut done: Vec<TenantMove> = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok((m, _, _)) => done.push(m),
            Err(StoreError::FailedPrecondition(e)) => {
                assert!(e.to_string().contains("plan again"), "{e}")
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(done.len(), 1, "exactly one of the racing moves: {done:?}");
    assert_eq!(done[0].mode, MoveMode::Automatic);
    let mut in_cold = 0;
    for t in ["b", "c", "d"] {
        in_cold += usize::from(pool_of(&store.get_tenant(&id(t)).await.unwrap()) == "cold");
    }
    assert_eq!(in_cold, 1);
}
