use proptest::prelude::*;

use super::*;

const MINUTE: i64 = 60_000;
/// 2026-04-01T00:00:00Z and 2026-05-01T00:00:00Z: April, 30 days.
const APRIL: Range<i64> = 1_775_001_600_000..1_777_593_600_000;

fn pool_token(id: &str, pool: &str, monthly: i64) -> TokenCost {
    TokenCost {
        token_id: id.into(),
        owner: CostOwner::Pool(pool.into()),
        monthly_cost_minor: monthly,
        usable_per_window: 95,
        window_ms: MINUTE,
    }
}

fn granted(tenant: &str, pool: &str, granted: u64) -> Granted {
    Granted {
        tenant_id: tenant.into(),
        pool_id: pool.into(),
        granted,
    }
}

/// April's capacity of one BaseLinker token: 95 a minute for 30 days.
const APRIL_CAPACITY: u64 = 95 * 60 * 24 * 30;

/// One month, cost 1000; tenant a used 1/3 of the capacity, b 1/6: a pays 333.33,
/// b 166.67, half is unused. Largest remainder: 333 + 167 + 500 = 1000.
#[test]
fn a_pool_token_is_shared_by_grants_and_the_rest_is_unused() {
    let tokens = [pool_token("t1", "shared", 1000)];
    let grants = [
        granted("a", "shared", APRIL_CAPACITY / 3),
        granted("b", "shared", APRIL_CAPACITY / 6),
    ];
    let allocation = allocate(APRIL, &tokens, &grants);
    assert_eq!(allocation.total, 1000);
    assert_eq!(allocation.per_tenant["a"], 333);
    assert_eq!(allocation.per_tenant["b"], 167);
    assert_eq!(allocation.unused_per_pool["shared"], 500);
    assert_eq!(allocation.cost_per_pool["shared"], 1000);
    assert_eq!(allocation.granted_per_tenant["a"], APRIL_CAPACITY / 3);
    assert_eq!(allocation.per_token[0].capacity, APRIL_CAPACITY);
}

/// A pool of two tokens at 1000 and 3000: its cost, 4000, is shared against its
/// capacity (two tokens'): a tenant that used a quarter of it pays 1000, whichever
/// token its leases went to.
#[test]
fn a_pool_is_shared_as_one_whatever_the_token() {
    let tokens = [
        pool_token("cheap", "shared", 1000),
        pool_token("dear", "shared", 3000),
    ];
    let allocation = allocate(
        APRIL,
        &tokens,
        &[granted("a", "shared", APRIL_CAPACITY / 2)],
    );
    assert_eq!(allocation.cost_per_pool["shared"], 4000);
    assert_eq!(allocation.per_tenant["a"], 1000);
    assert_eq!(allocation.unused_per_pool["shared"], 3000);
    let costs: Vec<i64> = allocation.per_token.iter().map(|t| t.cost).collect();
    assert_eq!(costs, vec![1000, 3000]);
}

/// A dedicated token's whole cost goes to its owner, used or not; a tenant granted
/// leases on a free token is listed at cost 0.
#[test]
fn a_dedicated_token_costs_its_owner_everything() {
    let tokens = [
        TokenCost {
            owner: CostOwner::Dedicated("big".into()),
            ..pool_token("own", "", 4321)
        },
        pool_token("free", "shared", 0),
    ];
    let allocation = allocate(APRIL, &tokens, &[granted("small", "shared", 10)]);
    assert_eq!(allocation.per_tenant["big"], 4321);
    assert_eq!(allocation.granted_per_tenant["big"], 0);
    assert_eq!(allocation.per_tenant["small"], 0);
    assert_eq!(allocation.granted_per_tenant["small"], 10);
    assert_eq!(allocation.unused_per_pool["shared"], 0);
    assert_eq!(allocation.total, 4321);
}

/// Grants above the capacity (the limit was lowered during the range) share the whole
/// cost by grants and leave nothing unused; never more than the cost.
#[test]
fn grants_above_capacity_never_cost_more_than_the_token() {
    let tokens = [pool_token("t1", "shared", 900)];
    let grants = [
        granted("a", "shared", APRIL_CAPACITY),
        granted("b", "shared", APRIL_CAPACITY * 2),
    ];
    let allocation = allocate(APRIL, &tokens, &grants);
    assert_eq!(allocation.per_tenant["a"], 300);
    assert_eq!(allocation.per_tenant["b"], 600);
    assert_eq!(allocation.unused_per_pool["shared"], 0);
}

/// Half of April costs half the monthly cost; an unused token's cost is all unused;
/// grants on pools with no token listed (deleted, or filtered out) are ignored.
#[test]
fn a_range_costs_its_share_of_the_month() {
    let half = APRIL.start..APRIL.start + 15 * 24 * 60 * MINUTE;
    let tokens = [pool_token("t1", "shared", 1001)];
    let allocation = allocate(half, &tokens, &[granted("a", "gone", 5)]);
    assert!(!allocation.unused_per_pool.contains_key("gone"));
    assert_eq!(allocation.total, 501, "500.5 rounds half up");
    assert_eq!(allocation.unused_per_pool["shared"], 501);
    assert!(allocation.per_tenant.is_empty());
}

/// Two pools and a dedicated token: per pool and overall, tenants plus unused add up.
#[test]
fn pools_are_kept_apart() {
    let tokens = [
        pool_token("p1", "eu", 1000),
        pool_token("p2", "eu", 2000),
        pool_token("q1", "us", 700),
    ];
    // eu: 3000 over two tokens' capacity; a used a tenth of it, b a quarter.
    let grants = [
        granted("a", "eu", APRIL_CAPACITY / 5),
        granted("a", "us", APRIL_CAPACITY / 7),
        granted("b", "eu", APRIL_CAPACITY / 2),
    ];
    let allocation = allocate(APRIL, &tokens, &grants);
    assert_eq!(allocation.per_tenant["a"], 300 + 100);
    assert_eq!(allocation.per_tenant["b"], 750);
    assert_eq!(allocation.unused_per_pool["eu"], 1950);
    assert_eq!(allocation.unused_per_pool["us"], 600);
    assert_eq!(allocation.total, 3700);
}

fn any_token() -> impl Strategy<Value = TokenCost> {
    (
        0usize..6,
        prop_oneof![Just(0), 0..MAX_MONTHLY_COST_MINOR, 0i64..10_000],
        0u8..4,
        1u32..2_000,
        1i64..86_400_000,
    )
        .prop_map(|(id, monthly, owner, usable, window_ms)| TokenCost {
            token_id: format!("t{id}"),
            owner: match owner {
                0 => CostOwner::Dedicated(format!("tenant{}", id % 3)),
                n => CostOwner::Pool(format!("pool{n}")),
            },
            monthly_cost_minor: monthly,
            usable_per_window: usable,
            window_ms,
        })
}

fn any_grant() -> impl Strategy<Value = Granted> {
    (0usize..5, 0u8..5, prop_oneof![0u64..1_000, any::<u64>()]).prop_map(
        |(tenant, pool, granted)| Granted {
            tenant_id: format!("tenant{tenant}"),
            pool_id: format!("pool{pool}"),
            granted,
        },
    )
}

proptest! {
    /// For any tokens, grants and range: per pool the tenants' parts plus unused are
    /// the pool's cost (its tokens' costs) exactly, and overall the same; the total is
    /// the sum of the tokens' prorated monthly costs; no part is negative.
    #[test]
    fn allocations_add_up_exactly(
        start in -10_000_000_000_000i64..10_000_000_000_000,
        length in prop_oneof![0i64..100_000_000, 0i64..400 * 86_400_000],
        tokens in proptest::collection::vec(any_token(), 0..6),
        grants in proptest::collection::vec(any_grant(), 0..20),
    ) {
        let range = start..start + length;
        let allocation = allocate(range.clone(), &tokens, &grants);
        let mut total = 0i128;
        for (line, token) in allocation.per_token.iter().zip(&tokens) {
            prop_assert_eq!(line.cost, prorate(token.monthly_cost_minor, range.clone()));
            total += i128::from(line.cost);
        }
        prop_assert_eq!(i128::from(allocation.total), total);
        let tenants: i64 = allocation.per_tenant.values().sum();
        let unused: i64 = allocation.unused_per_pool.values().sum();
        prop_assert_eq!(tenants + unused, allocation.total);
        prop_assert!(allocation.per_tenant.values().all(|p| *p >= 0));
        prop_assert!(allocation.unused_per_pool.values().all(|p| *p >= 0));
        for (pool, cost) in &allocation.cost_per_pool {
            let lines: i64 = allocation.per_token.iter()
                .filter(|l| l.owner == CostOwner::Pool(pool.clone()))
                .map(|l| l.cost).sum();
            prop_assert_eq!(lines, *cost);
        }
    }

    /// A tenant's part of a pool is its exact share `cost × granted / max(capacity,
    /// Σ granted)` rounded down or up.
    #[test]
    fn parts_are_exact_shares_rounded(
        monthly in 0i64..10_000_000,
        usable in 1u32..200,
        grants in proptest::collection::vec(0u64..200_000, 1..6),
    ) {
        let token = TokenCost { usable_per_window: usable, ..pool_token("t", "p", monthly) };
        let list: Vec<Granted> = grants.iter().enumerate()
            .map(|(i, g)| granted(&format!("x{i}"), "p", *g)).collect();
        let allocation = allocate(APRIL, &[token], &list);
        let line = &allocation.per_token[0];
        let capacity = u64::from(usable) * 60 * 24 * 30;
        let whole = capacity.max(grants.iter().sum());
        for (i, g) in grants.iter().enumerate() {
            let exact = line.cost as f64 * *g as f64 / whole as f64;
            let part = allocation.per_tenant[&format!("x{i}")] as f64;
            prop_assert!(part >= exact.floor() - 1e-6 && part <= exact.ceil() + 1e-6,
                "part {} exact {}", part, exact);
        }
    }

    /// Splitting a range anywhere costs its union within one minor unit per cut; whole
    /// months in a row cost exactly the monthly cost each.
    #[test]
    fn prorating_is_additive_up_to_rounding(
        monthly in 0i64..MAX_MONTHLY_COST_MINOR,
        start in 0i64..4_000_000_000_000,
        a in 0i64..100 * 86_400_000,
        b in 0i64..100 * 86_400_000,
    ) {
        let whole = prorate(monthly, start..start + a + b);
        let parts = prorate(monthly, start..start + a) + prorate(monthly, start + a..start + a + b);
        prop_assert!((whole - parts).abs() <= 1);
    }
}
