//! The write transaction every admin write goes through, the checks it makes, and how
//! database errors become [`StoreError`]s.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::error::ErrorKind;
use sqlx::{Any, AnyConnection, AssertSqlSafe, Transaction};

use crate::domain::{InvalidField, TokenOwner};
use crate::store::{Kind, StoreError};

use super::guarantees::{self, Sign};
use super::rows::{self, Table};
use super::{Backend, ConfigStore, changes, spaces};

/// How many ids an "is used by" message lists before it stops with "…".
const MAX_LISTED_IDS: usize = 5;

/// One admin write, from the version bump to the commit. Dropping it without
/// [`Write::finish`] rolls everything back, version bump included.
pub(super) struct Write {
    tx: Transaction<'static, Any>,
    version: i64,
    backend: Backend,
    /// The pools whose guarantee rules this write may change (`affects_*`): the ones
    /// [`Write::finish`] checks.
    affected: BTreeSet<String>,
    /// The objects this write changed (`changed`), recorded in the change log at commit.
    changes: BTreeSet<(Kind, String)>,
    /// Tokens whose counters space this write may change (`watch_token`), with their
    /// space before it.
    watched: BTreeMap<String, spaces::Place>,
    /// Hands moved tokens over before the commit (`ConfigStore::set_token_mover`).
    mover: Option<spaces::TokenMover>,
}

impl Write {
    /// Begins the transaction and bumps the version first: that takes the
    /// `config_meta` row lock (Postgres) or the database write lock (SQLite), so admin
    /// writes run one at a time across every replica and each sees the one before.
    /// That is also what keeps the pools' guarantee totals exact: each write moves them
    /// from the totals the write before left (`guarantees::count_tenant`), and recounts
    /// them when that write did not keep them.
    pub(super) async fn begin(store: &ConfigStore) -> Result<Self, StoreError> {
        let mut tx = store.pool.begin().await.map_err(map_error)?;
        if store.backend == Backend::Postgres {
            // Wait for another replica's write as long as SQLite waits for a writer
            // (busy timeout), then give up with UNAVAILABLE rather than hang.
            sqlx::query("SET LOCAL lock_timeout = '15s'")
                .execute(&mut *tx)
                .await
                .map_err(map_error)?;
        }
        // The guarantee totals stay current if the write before kept them (their
        // version is the version before this one); otherwise -1: recount below.
        sqlx::query(
            "UPDATE config_meta SET version = version + 1, guarantees_version = CASE \
             WHEN guarantees_version = version THEN version + 1 ELSE -1 END \
             WHERE singleton = 1",
        )
        .execute(&mut *tx)
        .await
        .map_err(map_error)?;
        let (version, guarantees_version): (i64, i64) = sqlx::query_as(
            "SELECT version, guarantees_version FROM config_meta WHERE singleton = 1",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(map_error)?;
        if guarantees_version != version {
            guarantees::recount_all(&mut tx, version).await?;
        }
        Ok(Self {
            tx,
            version,
            backend: store.backend,
            affected: BTreeSet::new(),
            changes: BTreeSet::new(),
            watched: BTreeMap::new(),
            mover: store.mover.get().cloned(),
        })
    }

    /// Token `id`'s counters space may change in this write: noted now, compared at
    /// the end.
    pub(super) async fn watch_token(&mut self, id: &str) -> Result<(), StoreError> {
        if !self.watched.contains_key(id) {
            let place = spaces::place_of(&mut self.tx, id).await?;
            self.watched.insert(id.to_owned(), place);
        }
        Ok(())
    }

    /// The tokens dedicated to tenant `id` may change counters space (its pool may).
    pub(super) async fn watch_tenant_tokens(&mut self, id: &str) -> Result<(), StoreError> {
        for token in spaces::dedicated_to(&mut self.tx, id).await? {
            self.watch_token(&token).await?;
        }
        Ok(())
    }

    /// The watched tokens whose space changed are handed over (`TokenMover`) before
    /// the commit; a failed handover aborts the write.
    async fn hand_over_moved_tokens(&mut self) -> Result<(), StoreError> {
        let mut moves = Vec::new();
        for (token, before) in &self.watched {
            let after = spaces::place_of(&mut self.tx, token).await?;
            moves.extend(spaces::moved(token, before, &after));
        }
        match (&self.mover, moves.is_empty()) {
            (Some(mover), false) => mover(self.version, moves)
                .await
                .map_err(StoreError::Handover),
            _ => Ok(()),
        }
    }

    /// Records that this write changes (creates, updates or deletes) object `id` of
    /// `kind`: replicas reload it (`changes.rs`).
    pub(super) fn changed(&mut self, kind: Kind, id: &str) {
        self.changes.insert((kind, id.to_owned()));
    }

    /// The configuration version this write commits as.
    pub(super) fn version(&self) -> i64 {
        self.version
    }

    /// The guarantee rules of pool `id` must be checked at the end.
    pub(super) fn affects_pool(&mut self, id: &str) {
        self.affected.insert(id.to_owned());
    }

    /// The pool of tenant `id` as stored now, if it has one, is affected.
    pub(super) async fn affects_pool_of_tenant(&mut self, id: &str) -> Result<(), StoreError> {
        let pool: Option<Option<String>> =
            sqlx::query_scalar("SELECT pool_id FROM tenants WHERE id = $1")
                .bind(id.to_owned())
                .fetch_optional(&mut *self.tx)
                .await
                .map_err(map_error)?;
        if let Some(Some(pool)) = pool {
            self.affected.insert(pool);
        }
        Ok(())
    }

    /// The pool a token of `owner` counts for is affected: its own pool, or the pool of
    /// the tenant it is dedicated to.
    pub(super) async fn affects_owner(&mut self, owner: &TokenOwner) -> Result<(), StoreError> {
        match owner {
            TokenOwner::Pool(pool) => {
                self.affects_pool(pool.as_str());
                Ok(())
            }
            TokenOwner::Dedicated(tenant) => self.affects_pool_of_tenant(tenant.as_str()).await,
        }
    }

    /// The pool token `id` counts for as stored now (before this write changes it).
    pub(super) async fn affects_stored_token(&mut self, id: &str) -> Result<(), StoreError> {
        if let Some(token) = rows::find(&mut self.tx, &rows::TOKENS, id).await? {
            self.affects_owner(&token.owner).await?;
        }
        Ok(())
    }

    /// Every pool of upstream `id` (its capacity per token may change).
    pub(super) async fn affects_pools_of_upstream(&mut self, id: &str) -> Result<(), StoreError> {
        let pools = self
            .ids("SELECT id FROM pools WHERE upstream_id = $1".into(), id)
            .await?;
        self.affected.extend(pools);
        Ok(())
    }

    /// Every pool with a tenant on tier `id` (their guarantees may change): checked at
    /// the end, their totals recounted now. Call it after the tier's new guarantee is
    /// written.
    pub(super) async fn affects_pools_of_tier(&mut self, id: &str) -> Result<(), StoreError> {
        let sql = "SELECT DISTINCT pool_id FROM tenants WHERE tier_id = $1 AND pool_id IS NOT NULL";
        let pools = self.ids(sql.into(), id).await?;
        guarantees::recount(&mut self.tx, &pools).await?;
        self.affected.extend(pools);
        Ok(())
    }

    /// Tenant `id` as stored now joins (`Sign::Add`) or leaves (`Sign::Remove`) its
    /// pool's guarantee total: `Remove` before a tenant is updated or deleted, `Add`
    /// after it is created or updated.
    pub(super) async fn count_tenant(&mut self, id: &str, sign: Sign) -> Result<(), StoreError> {
        guarantees::count_tenant(&mut self.tx, id, sign).await
    }

    pub(super) fn conn(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }

    pub(super) fn backend(&self) -> Backend {
        self.backend
    }

    /// Checks the cross-object rules on the pools this write affects, as it leaves
    /// them, then commits. A broken rule rolls the write back: FAILED_PRECONDITION.
    pub(super) async fn finish(mut self) -> Result<i64, StoreError> {
        let scoped = guarantees::check_pools(&mut self.tx, self.backend, &self.affected).await;
        #[cfg(test)]
        self.compare_with_full_check(&scoped).await;
        scoped?;
        self.hand_over_moved_tokens().await?;
        self.commit_unchecked().await
    }

    /// Tests only: the scoped check must refuse exactly what the full check on the
    /// whole configuration refuses, with the same message, and every pool's guarantee
    /// total must equal a fresh sum.
    #[cfg(test)]
    async fn compare_with_full_check(&mut self, scoped: &Result<(), StoreError>) {
        let scoped = match scoped {
            Ok(()) => Ok(()),
            Err(StoreError::FailedPrecondition(e)) => Err(e.to_string()),
            Err(_) => return, // a database error: nothing to compare
        };
        let view = rows::read_view(&mut self.tx, self.backend)
            .await
            .expect("reading the whole configuration");
        let full = crate::domain::check_guarantees(&view).map_err(|e| e.to_string());
        assert_eq!(
            scoped, full,
            "the check of the pools {:?} disagrees with the full check",
            self.affected
        );
        let (stored, summed) = guarantees::totals_and_sums(&mut self.tx).await;
        assert_eq!(
            stored, summed,
            "the pools' guarantee totals differ from a fresh sum of their tenants'"
        );
    }

    /// Like [`Write::finish`], returning the object `id` of `table` as stored.
    pub(super) async fn finish_returning<T>(
        mut self,
        table: &Table<T>,
        id: &str,
    ) -> Result<(T, i64), StoreError> {
        let stored = rows::get(&mut self.tx, table, id).await?;
        let version = self.finish().await?;
        Ok((stored, version))
    }

    /// Commits without the cross-object check, for writes that cannot affect it
    /// (seeding missing rows, re-sealing secrets).
    pub(super) async fn commit_unchecked(mut self) -> Result<i64, StoreError> {
        changes::record(&mut self.tx, self.version, &self.changes).await?;
        self.tx.commit().await.map_err(map_error)?;
        Ok(self.version)
    }

    /// Whether the defaults were seeded already.
    pub(super) async fn seeded(&mut self) -> Result<bool, StoreError> {
        let seeded: i64 = sqlx::query_scalar("SELECT seeded FROM config_meta WHERE singleton = 1")
            .fetch_one(&mut *self.tx)
            .await
            .map_err(map_error)?;
        Ok(seeded != 0)
    }

    pub(super) async fn mark_seeded(&mut self) -> Result<(), StoreError> {
        sqlx::query("UPDATE config_meta SET seeded = 1 WHERE singleton = 1")
            .execute(&mut *self.tx)
            .await
            .map_err(map_error)
            .map(|_| ())
    }

    /// NOT_FOUND naming `field` unless the object `id` of `table` exists.
    pub(super) async fn require<T>(
        &mut self,
        table: &Table<T>,
        id: &str,
        field: &str,
    ) -> Result<(), StoreError> {
        let sql = format!("SELECT id FROM {} WHERE id = $1", table.name);
        let found = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&mut *self.tx)
            .await
            .map_err(map_error)?;
        match found {
            Some(_) => Ok(()),
            None => Err(StoreError::NotFound {
                kind: table.kind,
                id: id.to_owned(),
                field: field.to_owned(),
            }),
        }
    }

    /// The ids of the rows of `table` whose `column` is `id`, in byte order.
    pub(super) async fn ids_where(
        &mut self,
        table: &str,
        column: &str,
        id: &str,
    ) -> Result<Vec<String>, StoreError> {
        let order = rows::in_byte_order(self.backend, "id");
        let sql = format!("SELECT id FROM {table} WHERE {column} = $1 ORDER BY {order}");
        self.ids(sql, id).await
    }

    /// The ids `sql` selects with `$1 = id`, in the order the query gives.
    pub(super) async fn ids(&mut self, sql: String, id: &str) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(id)
            .fetch_all(&mut *self.tx)
            .await
            .map_err(map_error)
    }

    /// Deletes the row `id` of `table`; NOT_FOUND naming `<kind>.id` if there is none.
    pub(super) async fn delete_row<T>(
        &mut self,
        table: &Table<T>,
        id: &str,
    ) -> Result<(), StoreError> {
        let sql = format!("DELETE FROM {} WHERE id = $1", table.name);
        let done = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .execute(&mut *self.tx)
            .await
            .map_err(write_error(table.kind, id))?;
        ensure_found(done.rows_affected(), table.kind, id)
    }
}

/// NOT_FOUND naming `<kind>.id` when an update or delete touched no row.
pub(super) fn ensure_found(rows_affected: u64, kind: Kind, id: &str) -> Result<(), StoreError> {
    if rows_affected == 0 {
        return Err(StoreError::NotFound {
            kind,
            id: id.to_owned(),
            field: format!("{}.id", kind.field_prefix()),
        });
    }
    Ok(())
}

/// FAILED_PRECONDITION for a delete refused because others still use the object, e.g.
/// `tier 'premium' is used by 3 tenants (acme, beta, gamma); move them …`.
/// `users` names what uses it, singular and plural (`("tenant", "tenants")`).
pub(super) fn in_use(
    kind: Kind,
    id: &str,
    verb: &str,
    users: (&str, &str),
    ids: &[String],
    advice: &str,
) -> StoreError {
    let noun = if ids.len() == 1 { users.0 } else { users.1 };
    let mut listed = ids
        .iter()
        .take(MAX_LISTED_IDS)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if ids.len() > MAX_LISTED_IDS {
        listed.push_str(", …");
    }
    StoreError::FailedPrecondition(InvalidField::new(
        format!("{}.id", kind.field_prefix()),
        format!(
            "{} '{id}' {verb} {} {noun} ({listed}); {advice}",
            kind.as_str(),
            ids.len()
        ),
    ))
}

/// Maps an error of a statement that writes object `id` of `kind`: a taken id is
/// ALREADY_EXISTS, and a foreign key or check the explicit checks missed (they run
/// first, so this is a bug or a manual edit) is FAILED_PRECONDITION.
pub(super) fn write_error(kind: Kind, id: &str) -> impl Fn(sqlx::Error) -> StoreError + '_ {
    move |err| {
        let field = || format!("{}.id", kind.field_prefix());
        match err.as_database_error().map(portable_kind) {
            Some(ErrorKind::UniqueViolation) => StoreError::AlreadyExists {
                kind,
                id: id.to_owned(),
            },
            Some(ErrorKind::ForeignKeyViolation) => {
                StoreError::FailedPrecondition(InvalidField::new(
                    field(),
                    format!(
                        "{} '{id}' refers to an object that does not exist, or is still used \
                         by another object",
                        kind.as_str()
                    ),
                ))
            }
            Some(ErrorKind::CheckViolation | ErrorKind::NotNullViolation) => {
                StoreError::FailedPrecondition(InvalidField::new(
                    field(),
                    format!("{} '{id}' has a value the database refuses", kind.as_str()),
                ))
            }
            _ => map_error(err),
        }
    }
}

/// The kind of a database error. SQLite reports an ON DELETE RESTRICT violation as a
/// trigger constraint (extended code 1811), which sqlx files under `Other`.
fn portable_kind(db: &dyn sqlx::error::DatabaseError) -> ErrorKind {
    match db.kind() {
        ErrorKind::Other if db.message() == "FOREIGN KEY constraint failed" => {
            ErrorKind::ForeignKeyViolation
        }
        kind => kind,
    }
}

/// Maps any other database error: lock waits that ran out, serialisation failures and
/// a server going away are UNAVAILABLE (retrying may work); the rest is INTERNAL.
pub(super) fn map_error(err: sqlx::Error) -> StoreError {
    if is_transient(&err) {
        return StoreError::Unavailable(err);
    }
    StoreError::from_sqlx(err)
}

fn is_transient(err: &sqlx::Error) -> bool {
    let Some(db) = err.as_database_error() else {
        return false;
    };
    let Some(code) = db.code() else {
        return false;
    };
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended codes.
        return code
            .parse::<i32>()
            .is_ok_and(|code| matches!(code & 0xff, 5 | 6));
    }
    // Postgres: serialization failure, deadlock, lock wait timed out, too many
    // connections, shutting down, and the connection exception class.
    matches!(
        &*code,
        "40001" | "40P01" | "55P03" | "53300" | "57P01" | "57P02" | "57P03"
    ) || code.starts_with("08")
}
