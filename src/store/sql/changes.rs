//! The change log: which objects each write changed, so that a replica reloads only
//! those (`ConfigStore::changes_since`) instead of the whole configuration.
//!
//! Every committed write adds, under its version, one `write` row and one row per
//! object it created, updated or deleted (`Write::changed`). A replica whose snapshot
//! is at version `v` reads the rows above `v` and the current rows of those objects; an
//! object named but gone was deleted. The log covers the versions `(v, V]` only if it
//! holds `V − v` `write` rows: a version without one (a writer that predates the log,
//! or rows pruned after [`KEEP_VERSIONS`]) makes the reader fall back to a full load,
//! so a gap can cost time but never a missed change.

use std::collections::{BTreeSet, HashSet};

use sqlx::{AnyConnection, AssertSqlSafe};

use crate::domain::{ApiKeyRecord, Pool, Tenant, Tier, TokenRecord, Upstream};
use crate::store::{Kind, StoreError};

use super::rows::{POOLS, TENANTS, TIERS, TOKENS, Table, UPSTREAMS};
use super::tx::map_error;
use super::{Backend, keys};

/// Versions the log keeps. A replica further behind loads everything.
pub(super) const KEEP_VERSIONS: i64 = 100_000;

/// The `kind` of the row every write adds once.
const WRITE: &str = "write";

/// What changed between two versions, for [`crate::lease::Snapshot::patched`].
#[derive(Debug, Clone, Default)]
pub struct ConfigDelta {
    /// The version the changes start from (the reader's).
    pub from_version: i64,
    /// The version they lead to.
    pub version: i64,
    pub upstreams: Changes<Upstream>,
    pub tokens: Changes<TokenRecord>,
    pub pools: Changes<Pool>,
    pub tiers: Changes<Tier>,
    pub tenants: Changes<Tenant>,
    pub api_keys: Changes<ApiKeyRecord>,
}

impl ConfigDelta {
    /// How many objects changed.
    pub fn len(&self) -> usize {
        self.upstreams.len()
            + self.tokens.len()
            + self.pools.len()
            + self.tiers.len()
            + self.tenants.len()
            + self.api_keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The objects of one kind that changed: as they are now, and the ids of those deleted.
#[derive(Debug, Clone)]
pub struct Changes<T> {
    pub upserted: Vec<T>,
    pub removed: Vec<String>,
}

impl<T> Default for Changes<T> {
    fn default() -> Self {
        Self {
            upserted: Vec::new(),
            removed: Vec::new(),
        }
    }
}

impl<T> Changes<T> {
    pub fn len(&self) -> usize {
        self.upserted.len() + self.removed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Adds the rows of the write `version` that changed `changes`, and prunes rows older
/// than [`KEEP_VERSIONS`].
pub(super) async fn record(
    conn: &mut AnyConnection,
    version: i64,
    changes: &BTreeSet<(Kind, String)>,
) -> Result<(), StoreError> {
    let insert = "INSERT INTO config_changes (version, kind, object_id) VALUES ($1, $2, $3)";
    let rows = std::iter::once((WRITE, "")).chain(
        changes
            .iter()
            .map(|(k, id)| (k.field_prefix(), id.as_str())),
    );
    for (kind, id) in rows {
        sqlx::query(insert)
            .bind(version)
            .bind(kind)
            .bind(id.to_owned())
            .execute(&mut *conn)
            .await
            .map_err(map_error)?;
    }
    sqlx::query("DELETE FROM config_changes WHERE version <= $1")
        .bind(version - KEEP_VERSIONS)
        .execute(&mut *conn)
        .await
        .map_err(map_error)?;
    Ok(())
}

/// The changes from `from` to `to` (the version `conn`'s transaction sees), or `None`
/// when the log does not cover them all.
pub(super) async fn read(
    conn: &mut AnyConnection,
    backend: Backend,
    from: i64,
    to: i64,
) -> Result<Option<ConfigDelta>, StoreError> {
    if to < from {
        return Ok(None);
    }
    let writes: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM config_changes WHERE kind = $1 AND version > $2 AND version <= $3",
    )
    .bind(WRITE)
    .bind(from)
    .bind(to)
    .fetch_one(&mut *conn)
    .await
    .map_err(map_error)?;
    if writes != to - from {
        return Ok(None);
    }
    Ok(Some(ConfigDelta {
        from_version: from,
        version: to,
        upstreams: changed(conn, &UPSTREAMS, from).await?,
        tokens: changed(conn, &TOKENS, from).await?,
        pools: changed(conn, &POOLS, from).await?,
        tiers: changed(conn, &TIERS, from).await?,
        tenants: changed(conn, &TENANTS, from).await?,
        api_keys: {
            let ids = changed_ids(conn, Kind::ApiKey, from).await?;
            let keys = keys::changed_since(conn, backend, from).await?;
            removed(ids, keys, |k| k.id.as_str())
        },
    }))
}

/// `SELECT … WHERE id IN (the ids of kind `kind` changed after $2)`, with `$1` the kind.
pub(super) fn changed_filter(kind: Kind) -> (&'static str, &'static str) {
    (
        "IN (SELECT object_id FROM config_changes WHERE kind = $1 AND version > $2)",
        kind.field_prefix(),
    )
}

async fn changed_ids(
    conn: &mut AnyConnection,
    kind: Kind,
    from: i64,
) -> Result<Vec<String>, StoreError> {
    sqlx::query_scalar(
        "SELECT DISTINCT object_id FROM config_changes WHERE kind = $1 AND version > $2",
    )
    .bind(kind.field_prefix())
    .bind(from)
    .fetch_all(conn)
    .await
    .map_err(map_error)
}

async fn changed<T: HasId>(
    conn: &mut AnyConnection,
    table: &Table<T>,
    from: i64,
) -> Result<Changes<T>, StoreError> {
    let ids = changed_ids(conn, table.kind, from).await?;
    if ids.is_empty() {
        return Ok(Changes::default());
    }
    let (filter, kind) = changed_filter(table.kind);
    let sql = format!(
        "SELECT {} FROM {} WHERE id {filter}",
        table.columns, table.name
    );
    let found = sqlx::query(AssertSqlSafe(sql))
        .bind(kind)
        .bind(from)
        .fetch_all(conn)
        .await
        .map_err(map_error)?;
    let objects = found
        .iter()
        .map(table.decode)
        .collect::<Result<Vec<T>, _>>()?;
    Ok(removed(ids, objects, HasId::id))
}

/// The changes: `objects` as found, and the `ids` not among them.
fn removed<T>(ids: Vec<String>, objects: Vec<T>, id: impl Fn(&T) -> &str) -> Changes<T> {
    let found: HashSet<&str> = objects.iter().map(&id).collect();
    let removed = ids
        .into_iter()
        .filter(|i| !found.contains(i.as_str()))
        .collect();
    Changes {
        upserted: objects,
        removed,
    }
}

/// The id of a stored object, as text.
trait HasId {
    fn id(&self) -> &str;
}

macro_rules! has_id {
    ($($t:ty),*) => {$(
        impl HasId for $t {
            fn id(&self) -> &str {
                self.id.as_str()
            }
        }
    )*};
}
has_id!(Upstream, TokenRecord, Pool, Tier, Tenant);
