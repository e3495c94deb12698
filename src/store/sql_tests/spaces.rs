//! Writes that move a token's lease counters to another space (its pool changed, or the
//! pool of the tenant it is dedicated to) name the moves to the token mover before they
//! commit, with their version; a failed handover writes nothing.

use std::sync::{Arc, Mutex};

use crate::domain::TokenMove;
use crate::store::{MoveOrder, StoreError};

use super::harness::*;

type Seen = Arc<Mutex<Vec<(i64, Vec<TokenMove>)>>>;

/// Records every handover; fails them while `fail` is set.
fn recording(store: &crate::store::ConfigStore, fail: Arc<Mutex<bool>>) -> Seen {
    let seen: Seen = Arc::default();
    let log = seen.clone();
    store.set_token_mover(Arc::new(move |version, moves| {
        let (log, fail) = (log.clone(), fail.clone());
        Box::pin(async move {
            if *fail.lock().unwrap() {
                return Err("Redis is away".into());
            }
            log.lock().unwrap().push((version, moves));
            Ok(())
        })
    }));
    seen
}

fn moved(token: &str, from: Option<&str>, to: Option<&str>) -> TokenMove {
    TokenMove {
        token_id: id(token),
        upstream_id: id("baselinker"),
        from_pool: from.map(id),
        to_pool: to.map(id),
    }
}

pub(super) async fn moves_are_handed_over_before_the_commit(db: &TestDb) {
    let store = &db.store;
    seeded_pool(store, 2).await;
    store.create_pool(pool("other")).await.unwrap();
    store
        .create_tenant(tenant("acme", "basic", Some("shared")))
        .await
        .unwrap();
    store
        .create_token(token("own", dedicated_to("acme")))
        .await
        .unwrap();
    let fail = Arc::new(Mutex::new(false));
    let seen = recording(store, fail.clone());

    // A pool token joins another pool.
    let mut tok2 = store.get_token(&id("tok2")).await.unwrap();
    tok2.owner = in_pool("other");
    tok2.sealed_secret.clear();
    let (_, v1) = store.update_token(tok2.clone()).await.unwrap();
    // A tenant changes pool: its dedicated token follows.
    let mut acme = store.get_tenant(&id("acme")).await.unwrap();
    acme.pool_id = Some(id("other"));
    let (_, v2) = store.update_tenant(acme.clone()).await.unwrap();
    // Rebalancing moves it back.
    let order = MoveOrder {
        tenant_id: id("acme"),
        from_pool_id: id("other"),
        to_pool_id: id("shared"),
        reason: "test".into(),
        mode: crate::domain::MoveMode::Manual,
        actor: "test".into(),
        unless_moved_after: None,
    };
    let (_, _, v3) = store.move_tenant(&order).await.unwrap();
    // Writes that move nothing hand nothing over.
    acme = store.get_tenant(&id("acme")).await.unwrap();
    acme.display_name = "Acme".into();
    store.update_tenant(acme.clone()).await.unwrap();
    store
        .create_token(token("tok3", in_pool("other")))
        .await
        .unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            (v1, vec![moved("tok2", Some("shared"), Some("other"))]),
            (v2, vec![moved("own", Some("shared"), Some("other"))]),
            (v3, vec![moved("own", Some("other"), Some("shared"))]),
        ]
    );

    // A handover that fails leaves the write undone.
    *fail.lock().unwrap() = true;
    let version = store.version().await.unwrap();
    tok2.owner = in_pool("shared");
    let refused = store.update_token(tok2).await;
    assert!(
        matches!(refused, Err(StoreError::Handover(_))),
        "{refused:?}"
    );
    assert_eq!(store.version().await.unwrap(), version);
    let stored = store.get_token(&id("tok2")).await.unwrap();
    assert_eq!(stored.owner, in_pool("other"));
}
