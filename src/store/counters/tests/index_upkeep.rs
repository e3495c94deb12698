//! A pool index's upkeep in Redis (`index_scripts.rs`):
//! - the fence's fields about pool indexes (`a:`, `n:`, `r:` per index digest) do not
//!   pile up with configuration changes: when an index is built, the fields of the
//!   space's indexes that are gone are dropped, and those of the live ones are kept;
//!   so are the wait queues' fields (`q:<queue>`) that no live waiter needs, and the
//!   gone indexes' names (`x:<digest>`) in the health records of the new one's tokens;
//! - the renewal of a large pool's token windows is spread over calls, a page each
//!   (`pi_sweep`), and done at once when a grant could otherwise outlive a window.

use std::collections::BTreeSet;

use super::*;

/// The digests of the pool indexes under `prefix` (from their `im:` keys).
async fn index_digests(conn: &mut MultiplexedConnection, prefix: &str) -> BTreeSet<String> {
    keys_under(conn, prefix)
        .await
        .iter()
        .filter_map(|k| k.rsplit_once(":im:").map(|(_, digest)| digest.to_owned()))
        .collect()
}

/// The upstream's fence.
fn fence_key(prefix: &str) -> String {
    format!("{prefix}:{{{UPSTREAM}}}:fence:epoch")
}

/// The fields of the upstream's fence.
async fn fence_fields(conn: &mut MultiplexedConnection, prefix: &str) -> Vec<String> {
    redis::cmd("HKEYS")
        .arg(fence_key(prefix))
        .query_async(conn)
        .await
        .expect("HKEYS")
}

/// The digests the fence has index fields for.
async fn fence_digests(conn: &mut MultiplexedConnection, prefix: &str) -> BTreeSet<String> {
    fence_fields(conn, prefix)
        .await
        .iter()
        .filter_map(|f| {
            let (kind, digest) = f.split_once(':')?;
            ["a", "n", "r"].contains(&kind).then(|| digest.to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn building_an_index_drops_the_fence_fields_of_gone_ones() {
    Harness::run(Backend::Redis, |h| async move {
        let mut conn = connection(&h);
        // Three configurations of the pool, one after the other: three indexes.
        let pools: [&[&str]; 3] = [&["k-1"], &["k-1", "k-2"], &["k-2"]];
        let mut digests = Vec::new();
        for pool in &pools[..2] {
            let before = index_digests(&mut conn, &h.prefix).await;
            h.grant(&h.request("t-a", 100, &[], pool)).await;
            let after = index_digests(&mut conn, &h.prefix).await;
            let new: Vec<_> = after.difference(&before).cloned().collect();
            assert_eq!(new.len(), 1, "one new index: {before:?} -> {after:?}");
            digests.push(new[0].clone());
        }
        let (gone, live) = (&digests[0], &digests[1]);
        let fields = fence_digests(&mut conn, &h.prefix).await;
        assert!(fields.contains(gone) && fields.contains(live), "{fields:?}");

        // The first index expires (its keys go, as their TTL would have them go).
        drop_index(&mut conn, &h.prefix, gone).await;

        h.grant(&h.request("t-a", 100, &[], pools[2])).await;
        let fields = fence_digests(&mut conn, &h.prefix).await;
        assert!(
            !fields.contains(gone),
            "gone index's fields kept: {fields:?}"
        );
        assert!(
            fields.contains(live),
            "live index's fields dropped: {fields:?}"
        );
        assert_eq!(
            fields.len(),
            2,
            "the live index and the new one: {fields:?}"
        );
    })
    .await;
}

/// The fields of a token's health record, sorted.
async fn health_fields(conn: &mut MultiplexedConnection, prefix: &str, token: &str) -> Vec<String> {
    let mut fields: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("{prefix}:{{{UPSTREAM}}}:health:{token}"))
        .query_async(conn)
        .await
        .expect("HKEYS");
    fields.sort();
    fields
}

/// Deletes the keys of the index `digest` (as their TTL would have them go).
async fn drop_index(conn: &mut MultiplexedConnection, prefix: &str, digest: &str) {
    let index: Vec<String> = keys_under(conn, prefix)
        .await
        .into_iter()
        .filter(|k| k.ends_with(&format!(":{digest}")))
        .collect();
    assert_eq!(index.len(), 5, "{index:?}");
    let _: () = redis::cmd("DEL")
        .arg(&index)
        .query_async(conn)
        .await
        .expect("DEL");
}

/// A connection to the Redis that holds the test upstream's keys: on a cluster, the
/// master serving their hash tag's slot (every key the test reads carries it).
async fn upstream_connection(h: &Harness) -> MultiplexedConnection {
    match h.cluster {
        Some(cluster) => {
            let port = cluster.owner_of(&fence_key(&h.prefix));
            admin_connection(&format!("redis://127.0.0.1:{port}")).await
        }
        None => connection(h),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn building_an_index_drops_the_names_of_gone_ones_from_its_tokens() {
    Harness::run(Backend::Redis, gone_names_are_dropped).await;
}

/// The same on a Redis Cluster: the build's `HDEL` names keys it was not given
/// (`KEYS`), which a cluster accepts only in the slot of the keys it was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn building_an_index_drops_the_names_of_gone_ones_from_its_tokens_on_a_cluster() {
    Harness::run(Backend::Cluster, gone_names_are_dropped).await;
}

async fn gone_names_are_dropped(h: Harness) {
    let mut conn = upstream_connection(&h).await;
    // k-1 fills under the first index, which names it in k-1's health record.
    let first = h.request("t-a", 100, &[], &["k-1"]);
    for _ in 0..USABLE {
        h.grant(&first).await;
    }
    let gone = index_digests(&mut conn, &h.prefix)
        .await
        .into_iter()
        .next()
        .expect("the first index");
    assert_eq!(
        health_fields(&mut conn, &h.prefix, "k-1").await,
        [format!("x:{gone}")]
    );

    // The first index goes; another configuration of the pool builds a new one,
    // which names k-1 (still full) under its own digest.
    drop_index(&mut conn, &h.prefix, &gone).await;
    h.grant(&h.request("t-b", 100, &[], &["k-1", "k-2"])).await;
    let live = index_digests(&mut conn, &h.prefix)
        .await
        .into_iter()
        .next()
        .expect("the new index");
    assert_ne!(live, gone);
    assert_eq!(
        health_fields(&mut conn, &h.prefix, "k-1").await,
        [format!("x:{live}")],
        "the gone index's name is kept"
    );
}

/// The fence's wait-queue fields (`q:<queue>`), sorted.
async fn queue_fields(conn: &mut MultiplexedConnection, prefix: &str) -> Vec<String> {
    let mut queues = fence_fields(conn, prefix).await;
    queues.retain(|f| f.starts_with("q:"));
    queues.sort();
    queues
}

/// A queued denial on `queue`, waiting `wait_ms`, by `tenant` at its quota (1).
async fn queue_on(h: &Harness, tenant: &str, queue: &str, wait_ms: i64) {
    let ask = |h: &Harness| AcquireRequest {
        queue: Some(QueueTicket {
            queue_id: queue.into(),
            priority_offset_ms: 0,
            score: None,
            wait_ms,
            guaranteed: 0,
        }),
        ..h.request(tenant, 1, &[], &["k-1"])
    };
    h.grant(&ask(h)).await;
    let denied = h.deny(&ask(h)).await;
    assert_eq!(denied.reason, DenyReason::TenantQuota);
}

/// A wait queue's fence field past its instant (no live waiter: a removed pool's
/// queue, say) is dropped when an index is built; a queue with a live waiter keeps
/// its field, and the queue whose field went writes it again at its next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn building_an_index_drops_the_fields_of_queues_without_waiters() {
    Harness::run(Backend::Redis, |h| async move {
        let mut conn = connection(&h);
        queue_on(&h, "t-1", "gone", 50).await;
        queue_on(&h, "t-2", "live", 600_000).await;
        assert_eq!(
            queue_fields(&mut conn, &h.prefix).await,
            ["q:gone", "q:live"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Another configuration of the pool: a new index is built.
        h.grant(&h.request("t-other", 100, &[], &["k-1", "k-2"]))
            .await;
        assert_eq!(queue_fields(&mut conn, &h.prefix).await, ["q:live"]);
        queue_on(&h, "t-3", "gone", 50).await;
        assert_eq!(
            queue_fields(&mut conn, &h.prefix).await,
            ["q:gone", "q:live"]
        );
    })
    .await;
}

const POOL: usize = 600;

/// The Redis harness's own connection.
fn connection(h: &Harness) -> MultiplexedConnection {
    let TimeSource::Server(conn) = &h.time else {
        unreachable!("Redis harness")
    };
    conn.clone()
}

/// The window of the renewal tests: long enough that no entry leaves it while they
/// run on a slow machine (600 grants and their checks).
const WINDOW: Duration = Duration::from_secs(60);

/// A pool index's life (`PI.keep`) with `window`.
pub(super) fn index_life(window: Duration) -> i64 {
    10 * ms(window) + 600_000
}

/// Grants until the renewal under way has ended; the calls it took.
async fn renew_to_the_end(
    h: &Harness,
    conn: &mut MultiplexedConnection,
    req: &AcquireRequest,
    meta: &str,
) -> usize {
    let mut calls = 0;
    while sweep_state(conn, meta).await.is_some() {
        h.grant(req).await;
        calls += 1;
        assert!(calls <= 40, "the renewal never ended");
    }
    calls
}

/// The PTTL of each key.
pub(super) async fn pttls(conn: &mut MultiplexedConnection, keys: &[String]) -> Vec<i64> {
    let mut pipe = redis::pipe();
    for key in keys {
        pipe.cmd("PTTL").arg(key);
    }
    pipe.query_async(conn).await.expect("PTTL")
}

async fn pexpire(conn: &mut MultiplexedConnection, keys: &[String], ms: i64) {
    let mut pipe = redis::pipe();
    for key in keys {
        pipe.cmd("PEXPIRE").arg(key).arg(ms).ignore();
    }
    let _: () = pipe.query_async(conn).await.expect("PEXPIRE");
}

/// A pool of `POOL` tokens, each granted once (so each has a window), then the index's
/// life cut to `index_ms` (below half: its renewal is due) and every window's to
/// `window_ms`. Returns the request, the window keys and the index's meta key.
async fn due_for_renewal(
    h: &Harness,
    conn: &mut MultiplexedConnection,
    index_ms: i64,
    window_ms: i64,
) -> (AcquireRequest, Vec<String>, String) {
    let names: Vec<String> = (1..=POOL).map(|i| format!("k-{i}")).collect();
    let pool: Vec<&str> = names.iter().map(String::as_str).collect();
    let req = AcquireRequest {
        window: WINDOW,
        ..h.request("t-a", 100_000, &[], &pool)
    };
    for _ in 0..POOL {
        h.grant(&req).await;
    }
    let keys = keys_under(conn, &h.prefix).await;
    let windows: Vec<String> = keys
        .iter()
        .filter(|k| k.contains(":kw:"))
        .cloned()
        .collect();
    assert_eq!(windows.len(), POOL, "every token granted once");
    let meta = keys
        .iter()
        .find(|k| k.contains(":im:"))
        .expect("index")
        .clone();
    let digest = meta.rsplit(":im:").next().expect("digest").to_owned();
    pexpire(conn, &windows, window_ms).await;
    pexpire(conn, std::slice::from_ref(&meta), index_ms).await;
    let _: () = redis::cmd("HSET")
        .arg(format!("{}:{{{UPSTREAM}}}:fence:epoch", h.prefix))
        .arg(format!("r:{digest}"))
        .arg(0)
        .query_async(conn)
        .await
        .expect("HSET");
    (req, windows, meta)
}

/// A renewal begun on time (the index at half its life): the pool set up as
/// `due_for_renewal` does, then the grant that finds the renewal due. The index's
/// life, the request, the windows and the index's meta key.
async fn renewal_begun(
    h: &Harness,
    conn: &mut MultiplexedConnection,
) -> (i64, AcquireRequest, Vec<String>, String) {
    let keep = index_life(WINDOW);
    let (req, windows, meta) = due_for_renewal(h, conn, keep / 2 - 10_000, keep / 2).await;
    h.grant(&req).await;
    (keep, req, windows, meta)
}

/// How many of `keys` live at least `ms` more.
async fn living(conn: &mut MultiplexedConnection, keys: &[String], ms: i64) -> usize {
    pttls(conn, keys).await.iter().filter(|&&t| t >= ms).count()
}

async fn sweep_state(conn: &mut MultiplexedConnection, meta: &str) -> Option<String> {
    redis::cmd("HGET")
        .arg(meta)
        .arg("s")
        .query_async(conn)
        .await
        .expect("HGET")
}

/// A renewal's place: its cursor, its floor and the Redis process it names.
async fn place(conn: &mut MultiplexedConnection, meta: &str) -> (String, i64, String) {
    let state = sweep_state(conn, meta).await.expect("renewal under way");
    let mut parts = state.split(':');
    let (cursor, floor, server) = (parts.next(), parts.next(), parts.next());
    match (cursor, floor.and_then(|f| f.parse().ok()), server) {
        (Some(cursor), Some(floor), Some(server)) => (cursor.to_owned(), floor, server.to_owned()),
        _ => panic!("not <cursor>:<floor>:<server>: {state}"),
    }
}

async fn set_place(conn: &mut MultiplexedConnection, meta: &str, place: String) {
    let _: () = redis::cmd("HSET")
        .arg(meta)
        .arg("s")
        .arg(place)
        .query_async(conn)
        .await
        .expect("HSET");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_pool_renews_its_windows_a_page_per_call() {
    Harness::run(Backend::Redis, |h| async move {
        let mut conn = connection(&h);
        let (keep, req, windows, meta) = renewal_begun(&h, &mut conn).await;
        assert!(living(&mut conn, std::slice::from_ref(&meta), keep - 60_000).await == 1);
        let renewed = living(&mut conn, &windows, keep - 60_000).await;
        assert!(
            renewed > 0 && renewed < POOL / 2,
            "one page renewed by the first call, not the pool: {renewed} of {POOL}"
        );
        assert!(sweep_state(&mut conn, &meta).await.is_some());

        let calls = 1 + renew_to_the_end(&h, &mut conn, &req, &meta).await;
        assert_eq!(living(&mut conn, &windows, keep - 60_000).await, POOL);
        assert!(calls >= 3, "spread over {calls} calls");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_begun_late_renews_every_window_at_once() {
    Harness::run(Backend::Redis, |h| async move {
        let mut conn = connection(&h);
        let keep = index_life(WINDOW);
        // A window not renewed by this call would end before a lease granted now stops
        // being counted (TTL + W + 1 s): every window is renewed at once.
        let late = ms(h.ttl) + ms(WINDOW) + 500;
        let (req, windows, meta) = due_for_renewal(&h, &mut conn, late, late + 1_000).await;
        h.grant(&req).await;
        assert_eq!(living(&mut conn, &windows, keep - 60_000).await, POOL);
        assert_eq!(sweep_state(&mut conn, &meta).await, None);
    })
    .await;
}

/// A renewal's place (an HSCAN cursor) is only good on the Redis process that gave it:
/// when the index moved with its slot to another node mid-renewal, the renewal starts
/// over there. Here the first page is renewed, then undone, and the place left as if
/// another process had written it: every window must still be renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_that_moved_to_another_redis_starts_over() {
    Harness::run(Backend::Redis, |h| async move {
        let mut conn = connection(&h);
        let (keep, req, windows, meta) = renewal_begun(&h, &mut conn).await;
        let (cursor, floor, server) = place(&mut conn, &meta).await;
        assert_eq!(server.len(), 40, "a run id: {server}");
        pexpire(&mut conn, &windows, keep / 2).await;
        let other = "0".repeat(40);
        set_place(&mut conn, &meta, format!("{cursor}:{floor}:{other}")).await;

        renew_to_the_end(&h, &mut conn, &req, &meta).await;
        assert_eq!(living(&mut conn, &windows, keep - 60_000).await, POOL);
    })
    .await;
}

/// A lease whose TTL + W is over half the index's life renews its own window; on an
/// empty pool window it sets the window's life, never below the index's: a later grant
/// with a shorter TTL (another replica's setting) counts on the index's life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lease_leaves_a_pool_window_at_least_the_index_life() {
    Harness::run(Backend::Redis, |h| async move {
        let mut conn = connection(&h);
        let keep = index_life(h.window);
        let req = AcquireRequest {
            lease_ttl: Duration::from_millis(keep as u64 / 2 + 60_000),
            ..h.request("t-a", 100, &[], &["k-1"])
        };
        h.grant(&req).await;
        let window = keys_under(&mut conn, &h.prefix)
            .await
            .into_iter()
            .find(|k| k.ends_with(":kw:k-1"))
            .expect("k-1's window");
        let life = pttls(&mut conn, std::slice::from_ref(&window)).await[0];
        assert!(
            life > keep - 60_000,
            "window life {life} ms, the index's {keep} ms"
        );
    })
    .await;
}

/// Partway through a renewal, a call that finds the windows not yet renewed too close
/// to their end for a lease granted now (its floor) renews every one left at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_under_way_ends_at_once_when_its_floor_comes_near() {
    Harness::run(Backend::Redis, |h| async move {
        let mut conn = connection(&h);
        let (keep, req, windows, meta) = renewal_begun(&h, &mut conn).await;
        let (cursor, _, server) = place(&mut conn, &meta).await;
        // The windows not renewed yet end, say, TTL + W from now.
        let near = h.now_ms().await + ms(h.ttl) + ms(WINDOW);
        set_place(&mut conn, &meta, format!("{cursor}:{near}:{server}")).await;
        h.grant(&req).await;
        assert_eq!(sweep_state(&mut conn, &meta).await, None);
        assert_eq!(living(&mut conn, &windows, keep - 60_000).await, POOL);
    })
    .await;
}

/// A renewal that falls due again before the last one ended starts over, and keeps the
/// earlier floor: the windows it has not reached yet still end by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_due_again_midway_keeps_the_earlier_floor() {
    Harness::run(Backend::Redis, |h| async move {
        let mut conn = connection(&h);
        let keep = index_life(WINDOW);
        // Windows known to live 100 s: time enough to page (a grant needs TTL + W).
        let (req, windows, meta) = due_for_renewal(&h, &mut conn, 100_000, 100_000).await;
        h.grant(&req).await;
        let (_, floor, _) = place(&mut conn, &meta).await;
        pexpire(&mut conn, std::slice::from_ref(&meta), keep / 2 - 10_000).await;
        h.grant(&req).await;
        let (_, again, _) = place(&mut conn, &meta).await;
        assert_eq!(again, floor, "the floor of the renewal that began first");
        renew_to_the_end(&h, &mut conn, &req, &meta).await;
        assert_eq!(living(&mut conn, &windows, keep - 60_000).await, POOL);
    })
    .await;
}
