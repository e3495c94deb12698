//! Weighted max-min fair sharing of a pool's capacity (PRODUCT.md property 3).
//!
//! Every tenant first gets its *base*: its guarantee, or the capacity of its own
//! dedicated tokens when that is larger (never above guarantee + burst). The pool's
//! *spare* capacity — what is left after the guarantees tenants draw from the pool — is
//! then divided among tenants with unmet demand, class by class (`Claim::class`: the
//! tier's shared access, priority first, then normal, then limited; a class gets only
//! what the classes before it left), and within a class by weighted water-filling: raise
//! a level λ until the capacity runs out, each tenant taking `min(cap_i, w_i · λ)`, where
//! `cap_i` is how much more it wants (demand − base), bounded by its burst. Capacity
//! nobody asked for is then shared the same way among every tenant up to its burst, so a
//! tenant that wakes up finds idle capacity at once instead of waiting for its demand
//! to be measured; the quotas never sum to more than the pool, so guarantees stay safe.
//! Shares are made whole numbers by largest remainder, ties broken by tenant order, so
//! the result is deterministic: every replica computing from the same inputs gets the
//! same quotas.

/// One tenant's claim on a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    /// Requests per window always granted when asked for.
    pub guaranteed: u32,
    /// Requests per window it may borrow above the guarantee.
    pub burst: u32,
    /// Share of spare capacity relative to others (> 0).
    pub weight: f64,
    /// Requests per window it asked for recently.
    pub demand: u32,
    /// Usable capacity per window of tokens dedicated to it.
    pub dedicated: u32,
    /// Its claim on spare capacity: lower classes are served first, a class sharing
    /// only what the ones before it left (0 priority, 1 normal, 2 limited). Guarantees
    /// do not depend on it.
    pub class: u8,
}

impl Claim {
    fn ceiling(&self) -> u32 {
        self.guaranteed.saturating_add(self.burst)
    }

    /// What the tenant gets before any sharing.
    fn base(&self) -> u32 {
        self.guaranteed.max(self.dedicated).min(self.ceiling())
    }

    /// The part of its guarantee the pool must cover.
    fn drawn(&self) -> u32 {
        self.guaranteed.saturating_sub(self.dedicated)
    }

    /// How much more it could use from spare capacity.
    fn cap(&self) -> u32 {
        self.demand.min(self.ceiling()).saturating_sub(self.base())
    }
}

/// Quotas per window for `claims`, in the same order, sharing `pool_capacity`.
pub fn allocate(pool_capacity: u32, claims: &[Claim]) -> Vec<u32> {
    let drawn: u64 = claims.iter().map(|c| c.drawn() as u64).sum();
    let spare = (pool_capacity as u64).saturating_sub(drawn);
    let caps: Vec<u64> = claims.iter().map(|c| c.cap() as u64).collect();
    let weights: Vec<f64> = claims
        .iter()
        .map(|c| c.weight.max(f64::MIN_POSITIVE))
        .collect();
    let classes: Vec<u8> = claims.iter().map(|c| c.class).collect();
    let shares = fill_by_class(spare, &caps, &weights, &classes);
    let idle = spare - shares.iter().sum::<u64>();
    let headroom: Vec<u64> = claims
        .iter()
        .zip(&shares)
        .map(|(c, s)| (c.ceiling().saturating_sub(c.base()) as u64).saturating_sub(*s))
        .collect();
    let idle_shares = fill_by_class(idle, &headroom, &weights, &classes);
    claims
        .iter()
        .zip(shares)
        .zip(idle_shares)
        .map(|((c, s), i)| c.base() + (s + i) as u32)
        .collect()
}

/// Divides `spare` class by class, lowest class first: each class water-fills what the
/// classes before it left.
fn fill_by_class(spare: u64, caps: &[u64], weights: &[f64], classes: &[u8]) -> Vec<u64> {
    let mut shares = vec![0; caps.len()];
    let mut left = spare;
    let mut order: Vec<u8> = classes.to_vec();
    order.sort_unstable();
    order.dedup();
    for class in order {
        let members: Vec<usize> = (0..caps.len()).filter(|&i| classes[i] == class).collect();
        let class_caps: Vec<u64> = members.iter().map(|&i| caps[i]).collect();
        let class_weights: Vec<f64> = members.iter().map(|&i| weights[i]).collect();
        let filled = water_fill(left, &class_caps, &class_weights);
        for (&i, share) in members.iter().zip(filled) {
            shares[i] = share;
            left -= share;
        }
    }
    shares
}

/// Divides `spare` whole units: `min(cap_i, w_i·λ)` with the largest λ that fits, then
/// the units lost to rounding go to the largest remainders (earlier index on ties).
fn water_fill(spare: u64, caps: &[u64], weights: &[f64]) -> Vec<u64> {
    let total_cap: u64 = caps.iter().sum();
    if total_cap <= spare {
        return caps.to_vec();
    }
    let level = find_level(spare as f64, caps, weights);
    let exact: Vec<f64> = caps
        .iter()
        .zip(weights)
        .map(|(&c, &w)| (w * level).min(c as f64))
        .collect();
    let mut shares: Vec<u64> = exact.iter().map(|e| e.floor() as u64).collect();
    let mut left = spare - shares.iter().sum::<u64>().min(spare);
    let mut order: Vec<usize> = (0..caps.len()).collect();
    order.sort_by(|&a, &b| {
        (exact[b] - exact[b].floor())
            .total_cmp(&(exact[a] - exact[a].floor()))
            .then(a.cmp(&b))
    });
    for i in order {
        if left == 0 {
            break;
        }
        if shares[i] < caps[i] {
            shares[i] += 1;
            left -= 1;
        }
    }
    shares
}

/// The water level λ at which `Σ min(cap_i, w_i·λ) = spare` (caps sum above spare).
fn find_level(spare: f64, caps: &[u64], weights: &[f64]) -> f64 {
    // Tenants saturate in order of cap_i / w_i; walk the breakpoints.
    let mut order: Vec<usize> = (0..caps.len()).filter(|&i| caps[i] > 0).collect();
    order.sort_by(|&a, &b| (caps[a] as f64 / weights[a]).total_cmp(&(caps[b] as f64 / weights[b])));
    let mut remaining = spare;
    let mut active_weight: f64 = order.iter().map(|&i| weights[i]).sum();
    for &i in &order {
        let saturation_level = caps[i] as f64 / weights[i];
        if saturation_level * active_weight >= remaining {
            return remaining / active_weight;
        }
        remaining -= caps[i] as f64;
        active_weight -= weights[i];
    }
    f64::INFINITY
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn claim(guaranteed: u32, burst: u32, weight: f64, demand: u32) -> Claim {
        Claim {
            guaranteed,
            burst,
            weight,
            demand,
            dedicated: 0,
            class: 1,
        }
    }

    /// Spare capacity goes class by class: priority tenants take theirs first (up to
    /// burst), normal ones share what is left by weight, limited ones get the rest —
    /// here nothing; guarantees stay whole. Idle capacity follows the same order.
    #[test]
    fn shared_access_classes_claim_spare_in_order() {
        let of = |class, weight| Claim {
            class,
            ..claim(30, 60, weight, 1_000)
        };
        // 285 usable, 4 × 30 drawn: 165 spare. Priority takes its 60, the normal pair
        // shares the 105 left 2:1 (60 is its burst: 60 and 45), limited gets 0.
        let claims = [of(2, 1.0), of(1, 1.0), of(0, 1.0), of(1, 2.0)];
        assert_eq!(allocate(285, &claims), vec![30, 75, 90, 90]);
        // Everyone saturating at equal weights and one class: 165 / 4 each.
        let same: Vec<Claim> = (0..4).map(|_| of(1, 1.0)).collect();
        assert_eq!(allocate(285, &same), vec![72, 71, 71, 71]);
        // Nobody asks: the idle capacity too goes priority first.
        let idle: Vec<Claim> = [2, 0]
            .iter()
            .map(|&c| Claim {
                demand: 0,
                ..of(c, 1.0)
            })
            .collect();
        assert_eq!(allocate(150, &idle), vec![60, 90]);
    }

    /// Seed strategy 2 with everyone saturating: 285 usable, 30 guaranteed each, weights
    /// 2/1/1/0.5 → 165 spare split 73.3/36.7/36.7/18.3, summing exactly to capacity.
    #[test]
    fn seed_shared_pool_weights() {
        let claims: Vec<Claim> = [2.0, 1.0, 1.0, 0.5]
            .iter()
            .map(|&w| claim(30, 1000, w, 10_000))
            .collect();
        let quotas = allocate(285, &claims);
        assert_eq!(quotas, vec![103, 67, 67, 48]);
        assert_eq!(quotas.iter().sum::<u32>(), 285);
    }

    /// A flooding tenant cannot take others' guarantees; idle tenants keep their guarantee.
    #[test]
    fn flood_keeps_guarantees() {
        let claims = vec![
            claim(30, 1000, 1.0, 100_000),
            claim(30, 1000, 1.0, 0),
            claim(30, 1000, 1.0, 30),
        ];
        let quotas = allocate(285, &claims);
        assert_eq!(quotas, vec![225, 30, 30]);
        assert_eq!(quotas.iter().sum::<u32>(), 285);
    }

    /// Burst caps a share; what a capped tenant cannot take goes to the others.
    #[test]
    fn burst_caps_and_redistributes() {
        let claims = vec![claim(20, 10, 10.0, 1000), claim(20, 1000, 1.0, 1000)];
        assert_eq!(allocate(100, &claims), vec![30, 70]);
    }

    /// Demand caps a share: a tenant asking for little gets what it asks for.
    #[test]
    fn demand_caps() {
        let claims = vec![claim(10, 100, 1.0, 15), claim(10, 100, 1.0, 1000)];
        assert_eq!(allocate(100, &claims), vec![15, 85]);
    }

    /// Capacity nobody asked for is shared by weight up to each burst, so an idle
    /// tenant that wakes up finds room; the sum never exceeds the pool.
    #[test]
    fn idle_capacity_is_shared() {
        let claims = vec![claim(10, 100, 1.0, 20), claim(10, 100, 3.0, 0)];
        // Spare 80: the first wants 10 more; the idle 70 splits 1:3 → 17.5 / 52.5.
        let quotas = allocate(100, &claims);
        assert_eq!(quotas.iter().sum::<u32>(), 100);
        assert_eq!(quotas, vec![38, 62]);
    }

    /// Zero demand everywhere: the whole spare is shared as idle capacity; zero
    /// capacity: guarantees still listed (the 80 % rule keeps configurations from it).
    #[test]
    fn zero_demand_and_zero_capacity() {
        let claims = vec![claim(10, 100, 1.0, 0), claim(0, 100, 1.0, 0)];
        assert_eq!(allocate(100, &claims), vec![55, 45]);
        assert_eq!(allocate(0, &claims), vec![10, 0]);
    }

    /// Ties are broken deterministically by order: the earlier tenant gets the odd unit.
    #[test]
    fn ties_are_deterministic() {
        let claims = vec![claim(0, 100, 1.0, 100); 3];
        assert_eq!(allocate(10, &claims), vec![4, 3, 3]);
        let idle = vec![claim(0, 100, 1.0, 0); 3];
        assert_eq!(allocate(10, &idle), vec![4, 3, 3]);
        assert_eq!(allocate(10, &claims), allocate(10, &claims));
    }

    /// Dedicated capacity above the guarantee belongs to its tenant (up to its burst)
    /// and draws nothing from the pool.
    #[test]
    fn dedicated_tokens() {
        let premium = Claim {
            guaranteed: 150,
            burst: 50,
            weight: 3.0,
            demand: 1000,
            dedicated: 190,
            class: 1,
        };
        let basic = claim(20, 10, 1.0, 1000);
        // Pool 95: premium draws 0, basic draws 20; spare 75: premium may add 10, basic 10.
        assert_eq!(allocate(95, &[premium, basic]), vec![200, 30]);
    }

    fn claims_strategy() -> impl Strategy<Value = (u32, Vec<Claim>)> {
        let claim =
            (0u32..60, 0u32..200, 1u32..40, 0u32..400, 0u32..120).prop_map(|(g, b, w, d, ded)| {
                Claim {
                    guaranteed: g,
                    burst: b,
                    weight: w as f64 / 4.0,
                    demand: d,
                    dedicated: ded,
                    class: (w % 3) as u8,
                }
            });
        (0u32..1000, prop::collection::vec(claim, 1..12))
    }

    proptest! {
        /// Invariants: every quota ≥ base (guarantees hold) and ≤ guarantee + burst; the
        /// pool is never over-allocated beyond what guarantees force; capacity is never
        /// idle while a tenant could take it (work-conserving); weighted max-min: a
        /// tenant with unmet demand never has a smaller weighted share than another
        /// (± 1 unit).
        #[test]
        fn fair_share_properties((capacity, claims) in claims_strategy()) {
            let quotas = allocate(capacity, &claims);
            let drawn: u64 = claims.iter().map(|c| c.drawn() as u64).sum();
            let spare = (capacity as u64).saturating_sub(drawn);
            let shares: Vec<u64> = claims.iter().zip(&quotas).map(|(c, q)| (*q - c.base()) as u64).collect();
            for (c, q) in claims.iter().zip(&quotas) {
                prop_assert!(*q >= c.base());
                prop_assert!(*q <= c.ceiling().max(c.base()));
            }
            let used: u64 = shares.iter().sum();
            prop_assert!(used <= spare);
            let room = claims.iter().zip(&shares).any(|(c, s)| *s < (c.ceiling().saturating_sub(c.base())) as u64);
            if room { prop_assert_eq!(used, spare, "capacity left idle while a tenant could take it"); }
            for (i, a) in claims.iter().enumerate() {
                // Max-min among tenants of one class whose demand is unmet; a tenant of
                // a later class gets no spare while one of an earlier class wants more.
                if shares[i] >= a.cap() as u64 { continue; }
                for (j, b) in claims.iter().enumerate() {
                    if b.class > a.class {
                        prop_assert_eq!(shares[j], 0, "class {} served before class {} is met", b.class, a.class);
                    }
                    if b.class != a.class { continue; }
                    let (sa, sb) = (shares[i] as f64 / a.weight, (shares[j] as f64 - 1.0) / b.weight);
                    prop_assert!(sa + 1.0 / a.weight >= sb, "tenant {i} below cap has less weighted share than {j}");
                }
            }
            prop_assert_eq!(allocate(capacity, &claims), quotas, "deterministic");
        }
    }
}
