//! The fence's fields about pool indexes (`a:`, `n:`, `r:` per index digest,
//! `index_scripts.rs`) do not pile up with configuration changes: when an index is
//! built, the fields of the space's indexes that are gone are dropped, and those of the
//! indexes that live are kept.

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

/// The digests the fence has index fields for.
async fn fence_digests(conn: &mut MultiplexedConnection, prefix: &str) -> BTreeSet<String> {
    let fence = format!("{prefix}:{{{UPSTREAM}}}:fence:epoch");
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(&fence)
        .query_async(conn)
        .await
        .expect("HKEYS");
    fields
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
        let TimeSource::Server(conn) = &h.time else {
            unreachable!("Redis harness")
        };
        let mut conn = conn.clone();
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
        let index: Vec<String> = keys_under(&mut conn, &h.prefix)
            .await
            .into_iter()
            .filter(|k| k.ends_with(&format!(":{gone}")))
            .collect();
        assert_eq!(index.len(), 5, "{index:?}");
        let _: () = redis::cmd("DEL")
            .arg(&index)
            .query_async(&mut conn)
            .await
            .expect("DEL");

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
