//! A new snapshot from the one before and what changed since (`ConfigDelta`, read from
//! the store's change log), instead of a full load and build per version.
//!
//! - Only tokens whose sealed secret changed are opened again.
//! - When a token, pool, upstream or tier changed, the derived structures (token index,
//!   routes, pool reports) are rebuilt: O(tokens + tenants), no database read, no
//!   decryption.
//! - When only tenants and API keys changed — the common case, creating tenants and
//!   their keys — only those tenants' routes are computed, and each pool report is
//!   moved by the guarantees the changed tenants drew before and draw now.
//!
//! `tests` checks that after any sequence of writes the patched snapshot equals
//! [`Snapshot::build`] of a full load.

use std::sync::Arc;

use crate::crypto::KeyRing;
use crate::domain::Id;
use crate::store::ConfigDelta;

use super::snapshot::{LiveToken, Snapshot};

impl Snapshot {
    /// This snapshot with `delta` applied; tokens whose secret changed are opened with
    /// `ring`.
    pub fn patched(&self, delta: ConfigDelta, ring: &KeyRing) -> Arc<Snapshot> {
        let mut next = self.clone();
        next.version = delta.version;
        if delta.len() > delta.api_keys.len() {
            next.quota_version = delta.version;
        }
        let structural = !(delta.upstreams.is_empty()
            && delta.tokens.is_empty()
            && delta.pools.is_empty()
            && delta.tiers.is_empty());
        apply(&mut next.upstreams, delta.upstreams, |u| u.id.clone());
        apply(&mut next.pools, delta.pools, |p| p.id.clone());
        apply(&mut next.tiers, delta.tiers, |t| t.id.clone());
        for id in &delta.tokens.removed {
            next.tokens.remove(&Id::from_trusted(id.clone()));
        }
        for record in delta.tokens.upserted {
            let same_secret = self.tokens.get(&record.id).is_some_and(|old| {
                old.record.key_id == record.key_id
                    && old.record.sealed_secret == record.sealed_secret
            });
            let token = match self.tokens.get(&record.id) {
                Some(old) if same_secret => LiveToken {
                    record,
                    secret: old.secret.clone(),
                },
                _ => LiveToken::open(record, ring),
            };
            next.tokens.insert(token.record.id.clone(), token);
        }
        for id in &delta.api_keys.removed {
            next.api_keys.remove(id);
            next.key_scopes.remove(id);
        }
        for key in delta.api_keys.upserted {
            next.key_scopes
                .insert(key.id.clone(), crate::auth::scope_of(&key));
            next.api_keys.insert(key.id.clone(), Arc::new(key));
        }
        let changed_tenants: Vec<Id> = delta
            .tenants
            .removed
            .iter()
            .map(|id| Id::from_trusted(id.clone()))
            .chain(delta.tenants.upserted.iter().map(|t| t.id.clone()))
            .collect();
        for id in &delta.tenants.removed {
            next.tenants.remove(&Id::from_trusted(id.clone()));
        }
        for tenant in delta.tenants.upserted {
            next.tenants.insert(tenant.id.clone(), Arc::new(tenant));
        }
        if structural {
            next.rebuild_derived();
        } else {
            next.patch_tenants(self, &changed_tenants);
        }
        Arc::new(next)
    }

    /// Routes and pool reports after `changed` tenants were created, updated or deleted
    /// since `before`, with tokens, pools, upstreams and tiers as they were.
    fn patch_tenants(&mut self, before: &Snapshot, changed: &[Id]) {
        let mut touched = Vec::new();
        for id in changed {
            if let Some((pool, drawn)) = before.tenants.get(id).and_then(|t| before.drawn_by(t)) {
                let sum = self.drawn.entry(pool.clone()).or_default();
                *sum = sum.saturating_sub(drawn);
                touched.push(pool.clone());
            }
            match self.tenants.get(id) {
                Some(tenant) => {
                    if let Some((pool, drawn)) = self.drawn_by(tenant) {
                        *self.drawn.entry(pool.clone()).or_default() += drawn;
                        touched.push(pool.clone());
                    }
                    let routes = self.routes_of(tenant);
                    self.routes.insert(id.clone(), routes);
                }
                None => {
                    self.routes.remove(id);
                }
            }
        }
        touched.sort();
        touched.dedup();
        for pool in touched {
            self.update_report(&pool);
        }
    }
}

/// Removes the deleted objects of `changes` from `map` and puts in the others.
fn apply<T>(
    map: &mut std::collections::HashMap<Id, T>,
    changes: crate::store::Changes<T>,
    id: impl Fn(&T) -> Id,
) {
    for removed in changes.removed {
        map.remove(&Id::from_trusted(removed));
    }
    for object in changes.upserted {
        map.insert(id(&object), object);
    }
}
