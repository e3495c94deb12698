//! The configuration store's behaviour, proved once per backend: every test body in
//! `objects`, `rules` and `writes` runs as `sqlite::<name>` and as `postgres::<name>`
//! (see `harness::store_tests!`), each on a fresh database of its own.

mod harness;
mod history;
mod incremental;
mod moves;
mod objects;
mod rules;
mod spaces;
mod writes;

use std::time::Duration;

use crate::store::{Backend, ConfigStore, StoreError};

use harness::{TestDb, store_tests};

/// A SQLite store's file is in WAL mode, so lease replicas can read beside a writer.
#[tokio::test]
async fn sqlite_store_uses_wal() {
    let db = TestDb::sqlite().await;
    assert_eq!(db.store.backend(), Backend::Sqlite);
    let mut raw = db.raw().await;
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut raw)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
}

store_tests!(
    objects::migrate_and_seed_create_the_defaults_once,
    objects::seeding_keeps_existing_objects,
    objects::upstream_round_trip,
    objects::pool_tier_tenant_round_trip,
    objects::overrides_given_after_nulls_are_stored,
    objects::token_round_trip,
    objects::api_key_round_trip,
    objects::lists_page_in_id_byte_order,
    objects::duplicate_ids_are_already_exists,
    objects::unknown_references_are_not_found_with_the_field,
    rules::delete_tier_in_use_names_its_tenants,
    rules::delete_in_use_is_refused,
    rules::delete_tenant_and_api_key_scopes,
    rules::tier_update_over_eighty_percent_changes_nothing,
    rules::token_removal_breaking_eighty_percent_is_refused,
    rules::token_of_another_upstream_is_refused_in_a_pool,
    rules::schema_enforces_references_and_token_owner,
    writes::update_token_with_empty_secret_keeps_it,
    writes::reseal_rewrites_or_rolls_back_everything,
    writes::version_grows_on_writes_only,
    writes::load_is_one_consistent_snapshot,
    writes::concurrent_writes_lose_nothing,
    writes::concurrent_writes_cannot_overcommit_a_pool,
    writes::concurrent_moves_keep_the_guarantee_totals_exact,
    writes::a_write_that_kept_no_totals_makes_the_next_recount,
    writes::secrets_are_stored_as_given,
    incremental::scoped_check_refuses_what_the_full_check_refuses,
    incremental::patched_snapshot_equals_full_build,
    incremental::a_gap_in_the_change_log_means_a_full_load,
    incremental::a_key_may_name_thousands_of_tenants,
    moves::a_move_is_checked_and_recorded,
    moves::concurrent_plans_move_once,
    spaces::moves_are_handed_over_before_the_commit,
    history::three_replicas_count_every_grant_once,
    history::buckets_roll_up_and_filters_select,
    history::retention_deletes_old_buckets_only,
    history::pages_cover_every_row_once,
    history::a_restart_loses_only_what_was_not_flushed,
    history::grants_per_pool_sum_replicas_within_the_range,
);

/// A database that cannot be reached is UNAVAILABLE (retry later), not INTERNAL, and
/// the store says so within its 5 s acquire timeout instead of hanging.
#[tokio::test]
async fn unreachable_database_is_unavailable() {
    let started = std::time::Instant::now();
    let result = ConfigStore::connect("postgres://postgres@127.0.0.1:1/none").await;
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "gives up after the acquire timeout"
    );
}

/// An in-memory SQLite store keeps its data across calls (one connection, never closed).
#[tokio::test]
async fn in_memory_sqlite_keeps_its_data() {
    let store = ConfigStore::connect("sqlite::memory:").await.unwrap();
    store.migrate().await.unwrap();
    store.seed_defaults().await.unwrap();
    assert_eq!(store.list_tiers(None, 10).await.unwrap().len(), 3);
    assert_eq!(store.load().await.unwrap().version, 1);
}
