//! Which counters space (`counters::Space`) holds a token's lease counters, as the
//! stored configuration says: its pool's, or, for a dedicated token, its tenant's pool's
//! when that pool serves the token's upstream, else the upstream's own. The same rule
//! as `lease::Snapshot::token_space_pool`, read inside a write's transaction so the
//! write can name the tokens it moves between spaces before it commits
//! (`Write::watch_token`, `ConfigStore::set_token_mover`).

use std::sync::Arc;

use futures::future::BoxFuture;
use sqlx::AnyConnection;

use crate::domain::{Id, TokenMove};
use crate::store::StoreError;

use super::tx::map_error;

/// Hands moved tokens' counters over before the write that moves them commits (with
/// its version); an error aborts the write.
pub type TokenMover =
    Arc<dyn Fn(i64, Vec<TokenMove>) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// A token's space: its upstream and the pool whose space it is (`None`: the
/// upstream's own). `None` when the token does not exist.
pub(super) type Place = Option<(String, Option<String>)>;

/// A token's upstream, its pool, its tenant's pool and that pool's upstream.
type PlaceRow = (String, Option<String>, Option<String>, Option<String>);

pub(super) async fn place_of(conn: &mut AnyConnection, token: &str) -> Result<Place, StoreError> {
    let row: Option<PlaceRow> = sqlx::query_as(
        "SELECT t.upstream_id, t.pool_id, te.pool_id, p.upstream_id FROM tokens t \
         LEFT JOIN tenants te ON te.id = t.dedicated_tenant_id \
         LEFT JOIN pools p ON p.id = te.pool_id WHERE t.id = $1",
    )
    .bind(token)
    .fetch_optional(conn)
    .await
    .map_err(map_error)?;
    Ok(
        row.map(|(upstream, pool, tenant_pool, tenant_pool_upstream)| {
            let space = match pool {
                Some(pool) => Some(pool),
                None => tenant_pool.filter(|_| tenant_pool_upstream.as_ref() == Some(&upstream)),
            };
            (upstream, space)
        }),
    )
}

/// The tokens dedicated to `tenant`.
pub(super) async fn dedicated_to(
    conn: &mut AnyConnection,
    tenant: &str,
) -> Result<Vec<String>, StoreError> {
    sqlx::query_scalar("SELECT id FROM tokens WHERE dedicated_tenant_id = $1 ORDER BY id")
        .bind(tenant)
        .fetch_all(conn)
        .await
        .map_err(map_error)
}

/// The move of a token from `before` to `after`, if its space changed (a token created
/// or deleted moves nowhere).
pub(super) fn moved(token: &str, before: &Place, after: &Place) -> Option<TokenMove> {
    let (Some((upstream, from)), Some((upstream_after, to))) = (before, after) else {
        return None;
    };
    (upstream == upstream_after && from != to).then(|| TokenMove {
        token_id: Id::from_trusted(token.to_owned()),
        upstream_id: Id::from_trusted(upstream.clone()),
        from_pool: from.clone().map(Id::from_trusted),
        to_pool: to.clone().map(Id::from_trusted),
    })
}
