use super::*;
use proptest::prelude::*;

fn pool(id: &str, capacity: u32) -> PoolLoad {
    PoolLoad {
        id: id.into(),
        capacity,
    }
}

fn tenant(id: &str, pool: &str, guaranteed: u32, used: f64) -> TenantLoad {
    TenantLoad {
        id: id.into(),
        pool: pool.into(),
        guaranteed,
        used,
        moved_at_ms: None,
    }
}

/// Utilisation of each pool after the moves.
fn shares(pools: &[PoolLoad], tenants: &[TenantLoad], moves: &[Move]) -> BTreeMap<String, f64> {
    let mut used: BTreeMap<String, f64> = pools.iter().map(|p| (p.id.clone(), 0.0)).collect();
    for t in tenants {
        let pool = moves
            .iter()
            .find(|m| m.tenant == t.id)
            .map_or(&t.pool, |m| &m.to);
        *used.get_mut(pool).unwrap() += t.used;
    }
    pools
        .iter()
        .map(|p| (p.id.clone(), used[&p.id] / f64::from(p.capacity)))
        .collect()
}

/// A hot pool (95 of 100) and a cold one (10 of 100): moving the tenant that brings the
/// hot pool nearest below 85 % puts both inside the band, and says why.
#[test]
fn a_hot_pool_gives_a_tenant_to_a_cold_one() {
    let pools = [pool("hot", 100), pool("cold", 100)];
    let tenants = [
        tenant("big", "hot", 10, 60.0),
        tenant("mid", "hot", 10, 25.0),
        tenant("small", "hot", 10, 10.0),
        tenant("quiet", "cold", 10, 10.0),
    ];
    let moves = plan(&pools, &tenants, Band::default(), 0);
    assert_eq!(moves.len(), 1, "{moves:?}");
    assert_eq!(
        (moves[0].tenant.as_str(), moves[0].to.as_str()),
        ("small", "cold")
    );
    let after = shares(&pools, &tenants, &moves);
    assert_eq!((after["hot"], after["cold"]), (0.85, 0.20));
    assert!(moves[0].reason.contains("95%"), "{}", moves[0].reason);
}

/// The receiving pool's 80 % rule binds: a tenant whose guarantee would not fit is not
/// moved, another is.
#[test]
fn a_move_never_breaks_the_receivers_guarantee_rule() {
    let pools = [pool("hot", 100), pool("cold", 50)];
    // cold may guarantee 40, holds 30: a tenant guaranteed 20 does not fit, 5 does.
    let tenants = [
        tenant("wide", "hot", 20, 12.0),
        tenant("narrow", "hot", 5, 12.0),
        tenant("rest", "hot", 0, 70.0),
        tenant("resident", "cold", 30, 5.0),
    ];
    let moves = plan(&pools, &tenants, Band::default(), 0);
    assert_eq!(
        moves.iter().map(|m| m.tenant.as_str()).collect::<Vec<_>>(),
        ["narrow"]
    );
}

/// Nothing moves without a cold pool, or when every move would make the receiver hot.
#[test]
fn no_move_without_room() {
    let pools = [pool("hot", 100), pool("warm", 100)];
    let tenants = [tenant("a", "hot", 0, 95.0), tenant("b", "warm", 0, 50.0)];
    assert!(plan(&pools, &tenants, Band::default(), 0).is_empty());
    let pools = [pool("hot", 100), pool("cold", 20)];
    let tenants = [tenant("a", "hot", 0, 95.0), tenant("b", "cold", 0, 2.0)];
    assert!(
        plan(&pools, &tenants, Band::default(), 0).is_empty(),
        "would overheat cold"
    );
}

/// Load flipping back and forth faster than the cooldown moves a tenant once: the plan
/// after the flip finds it cooling and leaves it.
#[test]
fn flapping_load_moves_a_tenant_once_per_cooldown() {
    let pools = [pool("a", 100), pool("b", 100)];
    let band = Band::default();
    let first = [
        tenant("t", "a", 0, 20.0),
        tenant("u", "a", 0, 75.0),
        tenant("v", "b", 0, 5.0),
    ];
    let moves = plan(&pools, &first, band, 1_000);
    assert_eq!(moves.len(), 1);
    assert_eq!(moves[0].tenant, "t");
    // Now "t" lives in b, and b runs hot while a idles; "v" cannot move (a could not
    // guarantee its 81).
    let flipped = [
        TenantLoad {
            pool: "b".into(),
            used: 60.0,
            moved_at_ms: Some(1_000),
            ..first[0].clone()
        },
        tenant("u", "a", 0, 10.0),
        tenant("v", "b", 81, 30.0),
    ];
    let names = |moves: Vec<Move>| moves.into_iter().map(|m| m.tenant).collect::<Vec<_>>();
    let cooling = names(plan(&pools, &flipped, band, 1_000 + band.cooldown_ms - 1));
    assert!(
        cooling.is_empty(),
        "t moved back while cooling: {cooling:?}"
    );
    let later = names(plan(&pools, &flipped, band, 1_000 + band.cooldown_ms));
    assert_eq!(later, ["t"], "after the cooldown t may move again");
}

fn loads() -> impl Strategy<Value = (Vec<PoolLoad>, Vec<TenantLoad>)> {
    let pools = prop::collection::vec(0u32..400, 2..5);
    let tenants = prop::collection::vec((0usize..5, 0u32..40, 0u32..150, any::<bool>()), 0..20);
    (pools, tenants).prop_map(|(caps, ts)| {
        let pools: Vec<PoolLoad> = caps
            .iter()
            .enumerate()
            .map(|(i, &c)| pool(&format!("p{i}"), c))
            .collect();
        let tenants = ts
            .into_iter()
            .enumerate()
            .map(|(i, (p, g, u, recent))| TenantLoad {
                moved_at_ms: recent.then_some(0),
                ..tenant(
                    &format!("t{i}"),
                    &format!("p{}", p % caps.len()),
                    g,
                    f64::from(u),
                )
            })
            .collect();
        (pools, tenants)
    })
}

proptest! {
    /// Whatever the loads: a tenant moves at most once and never while cooling; no pool
    /// that receives ends above `high`; a receiver's guarantees stay within 80 % of its
    /// capacity; the hottest pool is never hotter after the plan.
    #[test]
    fn plans_keep_their_promises((pools, tenants) in loads()) {
        let band = Band::default();
        let moves = plan(&pools, &tenants, band, 1);
        let mut seen = std::collections::BTreeSet::new();
        for m in &moves {
            prop_assert!(seen.insert(m.tenant.clone()), "{} moved twice", m.tenant);
            let t = tenants.iter().find(|t| t.id == m.tenant).unwrap();
            prop_assert!(t.moved_at_ms.is_none(), "{} moved while cooling", t.id);
        }
        let before = shares(&pools, &tenants, &[]);
        let after = shares(&pools, &tenants, &moves);
        for m in &moves {
            prop_assert!(after[&m.to] <= band.high + 1e-9, "{} overheated: {}", m.to, after[&m.to]);
            let capacity = f64::from(pools.iter().find(|p| p.id == m.to).unwrap().capacity);
            let guaranteed: u32 = tenants
                .iter()
                .filter(|t| moves.iter().find(|x| x.tenant == t.id).map_or(&t.pool, |x| &x.to) == &m.to)
                .map(|t| t.guaranteed)
                .sum();
            let existing: u32 = tenants.iter().filter(|t| t.pool == m.to).map(|t| t.guaranteed).sum();
            let allowed = (capacity * MAX_GUARANTEED_SHARE).floor() as u32;
            prop_assert!(guaranteed <= allowed.max(existing), "{} over its 80 % rule", m.to);
        }
        let hottest = |s: &BTreeMap<String, f64>| s.values().copied().filter(|v| v.is_finite()).fold(0.0, f64::max);
        prop_assert!(hottest(&after) <= hottest(&before) + 1e-9);
        prop_assert_eq!(plan(&pools, &tenants, band, 1), moves, "deterministic");
    }
}
