//! The lease counters on Redis Cluster. The whole behaviour suite already runs unchanged
//! on a throwaway cluster (`<test>::cluster`); these tests add what only a cluster has:
//! different upstreams served by different masters at once, scripts missing on a master
//! (NOSCRIPT), and an upstream's slot moving to another master mid-test (MOVED).
//!
//! Each test starts its own three-master cluster (`ThrowawayCluster`) and kills it at
//! the end, so no key needs deleting.

use std::collections::BTreeMap;

use super::*;

const TENANTS: usize = 10;
/// Concurrent acquires per upstream, from `INSTANCES` counters ("replicas").
const ACQUIRES: usize = 300;
const INSTANCES: usize = 3;

/// The key layout of `RedisCounters` (`<prefix>:{<upstream>}:<kind>:<id>`). The tests
/// below find every key on the node they expect, so a different layout fails them.
fn key_of(prefix: &str, upstream: &str, kind: &str, id: &str) -> String {
    format!("{prefix}:{{{upstream}}}:{kind}:{id}")
}

/// The upstream named in a key's hash tag.
fn upstream_of(key: &str) -> &str {
    let start = key.find('{').expect("hash tag") + 1;
    let end = start + key[start..].find('}').expect("hash tag end");
    &key[start..end]
}

/// A cost-1 request of tenant `t-<tenant>` on token `k-1` of `upstream`, limit 95, a
/// 60 s window and 10 s TTL (nothing leaves the window during a test), quota not binding.
fn flood_request(upstream: &str, tenant: usize) -> AcquireRequest {
    AcquireRequest {
        upstream_id: id(upstream),
        pool_id: None,
        config_version: 0,
        nonce: LeaseKey::new_nonce(),
        tenant_id: id(&format!("t-{tenant}")),
        tenant_limit: 10_000,
        token_limit: USABLE,
        window: Duration::from_secs(60),
        lease_ttl: Duration::from_secs(10),
        cost: 1,
        dedicated: vec![],
        pooled: ids(&["k-1"]).into(),
        pooled_digest: None,
        count_demand: false,
        queue: None,
        pace_burst: 0,
    }
}

async fn instances(cluster: &ThrowawayCluster, prefix: &str) -> Vec<Counters> {
    let mut out = Vec::new();
    for _ in 0..INSTANCES {
        let counters = redis_counters(&cluster.url_list(), prefix, Duration::from_secs(5)).await;
        out.push(Counters::Redis(counters));
    }
    out
}

/// `ACQUIRES` concurrent acquires on each upstream (interleaved, round-robin over the
/// instances); returns each upstream's grants. Every denial must be NoTokenCapacity.
async fn flood(
    instances: &[Counters],
    upstreams: &[String],
    tenant_of: impl Fn(usize) -> usize,
) -> BTreeMap<String, Vec<Leased>> {
    for upstream in upstreams {
        instances[0]
            .mark_fresh(Space::upstream(&id(upstream)))
            .await
            .expect("mark the upstream fresh");
    }
    let mut tasks = Vec::new();
    for i in 0..ACQUIRES {
        for upstream in upstreams {
            let counters = instances[i % instances.len()].clone();
            let req = flood_request(upstream, tenant_of(i));
            let upstream = upstream.clone();
            tasks.push(tokio::spawn(async move {
                (upstream, try_acquire_on(&counters, &req).await)
            }));
        }
    }
    let mut grants: BTreeMap<String, Vec<Leased>> =
        upstreams.iter().map(|u| (u.clone(), Vec::new())).collect();
    for task in tasks {
        let (upstream, answer) = task.await.expect("acquire task");
        match answer {
            Ok(lease) => grants.get_mut(&upstream).expect("upstream").push(lease),
            Err(d) => assert_eq!(d.reason, DenyReason::NoTokenCapacity, "{upstream}: {d:?}"),
        }
    }
    grants
}

/// The sorted `token_used` of `grants`: 1..=n when every grant saw a distinct count.
fn token_counts(grants: &[Leased]) -> Vec<u32> {
    let mut counts: Vec<u32> = grants.iter().map(|l| l.grant.token_used).collect();
    counts.sort_unstable();
    counts
}

async fn usage_of(counters: &Counters, upstream: &str) -> UsageCounts {
    let tenants: Vec<Id> = (0..TENANTS).map(|t| id(&format!("t-{t}"))).collect();
    counters
        .usage(
            Space::upstream(&id(upstream)),
            Duration::from_secs(60),
            &tenants,
            &ids(&["k-1"]),
        )
        .await
        .expect("usage answered")
}

/// Slots held per tenant `t-0..t-9`, counted from the grants.
fn per_tenant(grants: &[Leased]) -> Vec<u32> {
    let mut counts = vec![0; TENANTS];
    for lease in grants {
        let n: usize = lease.key.tenant_id.as_str()[2..].parse().expect("t-<n>");
        counts[n] += 1;
    }
    counts
}

async fn release_on(counters: &Counters, key: &LeaseKey, outcome: ReleaseOutcome) -> ReleaseResult {
    counters
        .release(key, outcome)
        .await
        .expect("release answered")
}

/// Drops every script from every master's cache, and the lease path's library (what a
/// new master has): the next calls load them again (NOSCRIPT, "Function not found").
fn flush_scripts(cluster: &ThrowawayCluster) {
    for port in cluster.ports() {
        redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query::<()>(&mut cluster.node(port))
            .expect("SCRIPT FLUSH");
        redis::cmd("FUNCTION")
            .arg("FLUSH")
            .query::<()>(&mut cluster.node(port))
            .expect("FUNCTION FLUSH");
    }
}

/// Releases on a full token of `upstream`: NOT_USED gives the slot back (the next
/// acquire is granted as the 95th), SUCCESS keeps it (the next is denied), a second
/// release is AlreadyReleased or Conflict, an unknown lease NotFound; usage follows.
async fn check_releases(instances: &[Counters], upstream: &str, grants: &mut [Leased]) {
    let (first, second) = (grants[0].clone(), grants[1].clone());
    let (a, b) = (&instances[0], &instances[1]);
    let released = release_on(a, &first.key, ReleaseOutcome::NotUsed).await;
    assert_eq!(released, ReleaseResult::Released, "{upstream}");
    assert_eq!(
        usage_of(b, upstream).await.tokens,
        vec![USABLE - 1],
        "{upstream}: freed"
    );
    let mut again = flood_request(upstream, 0);
    again.tenant_id = first.key.tenant_id.clone();
    let regrant = try_acquire_on(b, &again)
        .await
        .unwrap_or_else(|d| panic!("{upstream}: NOT_USED slot not given back: {d:?}"));
    assert_eq!(regrant.grant.token_used, USABLE, "{upstream}");
    let full = try_acquire_on(&instances[2], &again).await;
    assert!(full.is_err(), "{upstream}: over the limit: {full:?}");
    grants[0] = regrant;

    let released = release_on(b, &second.key, ReleaseOutcome::Success).await;
    assert_eq!(released, ReleaseResult::Released, "{upstream}");
    let kept = try_acquire_on(a, &again).await;
    assert!(
        kept.is_err(),
        "{upstream}: a SUCCESS release freed its slot: {kept:?}"
    );
    let twice = release_on(&instances[2], &second.key, ReleaseOutcome::Success).await;
    assert_eq!(twice, ReleaseResult::AlreadyReleased, "{upstream}");
    let other = release_on(a, &second.key, ReleaseOutcome::NotUsed).await;
    let previous = ReleaseOutcome::Success;
    assert_eq!(other, ReleaseResult::Conflict { previous }, "{upstream}");
    let unknown = LeaseKey {
        nonce: LeaseKey::new_nonce(),
        ..second.key.clone()
    };
    let missing = release_on(b, &unknown, ReleaseOutcome::NotUsed).await;
    assert_eq!(missing, ReleaseResult::NotFound, "{upstream}");

    let usage = usage_of(&instances[2], upstream).await;
    assert_eq!(usage.tokens, vec![USABLE], "{upstream}");
    assert_eq!(usage.tenants, per_tenant(grants), "{upstream}");
}

/// Property 1 on Redis Cluster, with keys really spread: three upstreams whose hash tags
/// land on three different masters (CLUSTER KEYSLOT against the masters' slot ranges),
/// 300 concurrent acquires on each from 3 `RedisCounters` instances → exactly 95
/// granted per upstream, each with a distinct count; usage per tenant and token matches;
/// after every master's script cache is flushed (NOSCRIPT), NOT_USED frees a slot,
/// SUCCESS keeps it, double and unknown releases get their statuses; and every key of an
/// upstream sits on the master serving its slot, and only there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstreams_on_different_masters_each_grant_exactly_the_limit() {
    let cluster = ThrowawayCluster::start();
    let prefix = format!("tltest-{}", uuid::Uuid::new_v4().simple());
    let ranges = cluster.slot_ranges();
    assert_eq!(
        ranges
            .iter()
            .map(|r| usize::from(r.end - r.start) + 1)
            .sum::<usize>(),
        16_384,
        "every slot served: {ranges:?}"
    );

    // One upstream per master, found by where its hash tag lands.
    let mut owner: BTreeMap<u16, String> = BTreeMap::new();
    for i in 0..1_000 {
        let upstream = format!("up-{i}");
        let slot = cluster.keyslot(&key_of(&prefix, &upstream, "kw", "k-1"));
        for (kind, id) in [("tw", "t-0"), ("lease", "0123abcd"), ("kw", "k-2")] {
            let other = cluster.keyslot(&key_of(&prefix, &upstream, kind, id));
            assert_eq!(other, slot, "one upstream's keys share a slot");
        }
        let port = ranges
            .iter()
            .find(|r| (r.start..=r.end).contains(&slot))
            .expect("slot served")
            .port;
        owner.entry(port).or_insert(upstream);
        if owner.len() == cluster.ports().len() {
            break;
        }
    }
    assert_eq!(owner.len(), 3, "one upstream on each master: {owner:?}");
    let upstreams: Vec<String> = owner.values().cloned().collect();

    let instances = instances(&cluster, &prefix).await;
    let mut grants = flood(&instances, &upstreams, |i| i % TENANTS).await;
    for (upstream, leases) in &grants {
        let expected: Vec<u32> = (1..=USABLE).collect();
        assert_eq!(
            token_counts(leases),
            expected,
            "{upstream}: exactly the usable limit"
        );
        let usage = usage_of(&instances[0], upstream).await;
        assert_eq!(usage.tokens, vec![USABLE], "{upstream}");
        assert_eq!(usage.tenants, per_tenant(leases), "{upstream}");
    }

    flush_scripts(&cluster);
    for (upstream, leases) in grants.iter_mut() {
        check_releases(&instances, upstream, leases).await;
    }

    // Where the keys are: a window per tenant granted, 1 token window, 96 lease records
    // (95 grants and the one after NOT_USED), the fence, the pool's index (5 keys) and
    // the token's health record (which names the index the full token is out of) per
    // upstream, all on its slot's master and on no other.
    for (port, upstream) in &owner {
        let tenants = per_tenant(&grants[upstream])
            .iter()
            .filter(|&&n| n > 0)
            .count();
        for node in cluster.ports() {
            let keys = cluster.keys_on(node, &format!("{prefix}:*"));
            let here = keys.iter().filter(|k| upstream_of(k) == upstream).count();
            let expected = if node == *port {
                tenants + 1 + 96 + 1 + 5 + 1
            } else {
                0
            };
            assert_eq!(
                here, expected,
                "keys of {upstream} on node {node}: {keys:?}"
            );
        }
    }
}

/// Property 1 through a live reshard: an upstream's slot (with its windows and leases)
/// moves to another master while 3 instances hold the old topology; their next calls get
/// MOVED (and NOSCRIPT on the new master) and follow it: 40 grants before the move plus
/// 300 concurrent acquires after it → exactly 95 in all, the counts continuing from 41;
/// a lease granted before the move is released (NOT_USED) after it and its slot comes
/// back; every key is on the new master and none is left on the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_moved_slot_is_followed_without_overgranting() {
    let cluster = ThrowawayCluster::start();
    let prefix = format!("tltest-{}", uuid::Uuid::new_v4().simple());
    let upstream = UPSTREAM.to_owned();
    let token_key = key_of(&prefix, &upstream, "kw", "k-1");
    let (slot, from) = (cluster.keyslot(&token_key), cluster.owner_of(&token_key));
    let to = *cluster
        .ports()
        .iter()
        .find(|&&p| p != from)
        .expect("another master");
    let instances = instances(&cluster, &prefix).await;
    instances[0]
        .mark_fresh(Space::upstream(&id(&upstream)))
        .await
        .expect("mark the upstream fresh");

    let mut before = Vec::new();
    for i in 0..40 {
        let req = flood_request(&upstream, i % TENANTS);
        let lease = try_acquire_on(&instances[i % INSTANCES], &req)
            .await
            .unwrap_or_else(|d| panic!("grant {i} before the move: {d:?}"));
        assert_eq!(lease.grant.token_used, i as u32 + 1);
        before.push(lease);
    }
    let pattern = format!("{prefix}:*");
    assert!(
        !cluster.keys_on(from, &pattern).is_empty(),
        "keys start on {from}"
    );

    cluster.move_slot(slot, to);
    assert_eq!(cluster.owner_of_slot(slot), to);
    flush_scripts(&cluster);

    let after = flood(&instances, std::slice::from_ref(&upstream), |i| i % TENANTS).await;
    let after = &after[&upstream];
    let expected: Vec<u32> = (41..=USABLE).collect();
    assert_eq!(
        token_counts(after),
        expected,
        "exactly 95 in all across the move"
    );

    let released = release_on(&instances[1], &before[0].key, ReleaseOutcome::NotUsed).await;
    assert_eq!(released, ReleaseResult::Released);
    let regrant = try_acquire_on(&instances[2], &flood_request(&upstream, 0))
        .await
        .expect("the NOT_USED slot came back after the move");
    assert_eq!(regrant.grant.token_used, USABLE);
    let usage = usage_of(&instances[0], &upstream).await;
    assert_eq!(usage.tokens, vec![USABLE]);

    assert!(
        cluster.keys_on(from, &pattern).is_empty(),
        "nothing left on {from}"
    );
    let moved = cluster.keys_on(to, &pattern);
    assert_eq!(
        moved.len(),
        TENANTS + 1 + 96 + 1 + 5 + 1,
        "every key (tenant windows, token window, leases, fence, pool index, the token's health record) on {to}: {moved:?}"
    );
}

/// Property 1 on Redis Cluster under a realistic load: the Redis simulation (16 workers
/// on 3 instances for 10 s, uses at random instants, the last included, checked by a
/// strict upstream) run unchanged against a throwaway cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_uses_never_exceed_the_limit() {
    Harness::run(Backend::Cluster, super::sim::redis_simulation).await;
}
