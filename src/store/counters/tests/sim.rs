//! Property 1, tested the way the upstream sees it: simulated workers acquire leases at
//! random instants, use each granted lease at random instants of its validity (the last
//! instant, `expires_at`, in a large share of cases; for released leases no later than
//! the release), release it or not, and a strict upstream checks that no closed window
//! `[s, s + W]` of any token (or tenant) ever holds more uses than its limit.
//!
//! The memory runs are discrete-event simulations on a manual clock (proptest over the
//! shape, plus one long run at BaseLinker scale); the Redis run uses real time, several
//! replicas and short windows.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

// ---------------------------------------------------------------- the strict upstream

/// The most instants in any closed window `[s, s + window]`, and its `s`.
pub(super) fn busiest_window(instants: &[i64], window_ms: i64) -> (usize, i64) {
    let mut sorted = instants.to_vec();
    sorted.sort_unstable();
    let (mut best, mut end) = ((0, 0), 0);
    for (start, &s) in sorted.iter().enumerate() {
        while end < sorted.len() && sorted[end] <= s + window_ms {
            end += 1;
        }
        if end - start > best.0 {
            best = (end - start, s);
        }
    }
    best
}

/// Uses seen by the upstream, per token and per tenant.
#[derive(Default)]
struct UseLog {
    by_token: BTreeMap<String, Vec<i64>>,
    by_tenant: BTreeMap<String, Vec<i64>>,
}

impl UseLog {
    fn record(&mut self, token: &Id, tenant: &Id, at: i64) {
        self.by_token.entry(token.to_string()).or_default().push(at);
        self.by_tenant
            .entry(tenant.to_string())
            .or_default()
            .push(at);
    }

    /// Checks every window against its limit; returns each token's busiest count, or
    /// the first violation.
    fn check(&self, world: &World) -> Result<Vec<usize>, String> {
        let w = world.window_ms;
        for (tenant, uses) in &self.by_tenant {
            let limit = world.tenant(tenant).limit as usize;
            let (n, s) = busiest_window(uses, w);
            if n > limit {
                return Err(format!(
                    "tenant {tenant}: {n} uses in [{s}, {s}+{w}] > {limit}"
                ));
            }
        }
        let limit = world.token_limit as usize;
        let mut busiest = Vec::new();
        for (token, uses) in &self.by_token {
            let (n, s) = busiest_window(uses, w);
            if n > limit {
                return Err(format!(
                    "token {token}: {n} uses in [{s}, {s}+{w}] > {limit}"
                ));
            }
            busiest.push(n);
        }
        Ok(busiest)
    }

    /// How many windows the uses span, summed over tokens.
    fn windows_spanned(&self, window_ms: i64) -> i64 {
        let span = |v: &Vec<i64>| v.iter().max().unwrap_or(&0) - v.iter().min().unwrap_or(&0);
        self.by_token
            .values()
            .map(|v| span(v) / window_ms + 1)
            .sum()
    }

    fn uses(&self) -> usize {
        self.by_token.values().map(Vec::len).sum()
    }
}

// ---------------------------------------------------------------- the world

struct TenantCfg {
    id: Id,
    limit: u32,
    dedicated: Vec<Id>,
    pooled: Vec<Id>,
}

/// Tokens, tenants and their limits. Token 0 is always in the pool; each other token
/// is dedicated to a random tenant one time in three.
struct World {
    tenants: Vec<TenantCfg>,
    tokens: usize,
    token_limit: u32,
    window_ms: i64,
    /// Pacing (back-to-back slots; 0 off): random, since pacing must never let a
    /// window hold more than its limit either.
    pace_burst: u32,
}

impl World {
    fn random(
        rng: &mut StdRng,
        tokens: usize,
        tenants: usize,
        token_limit: u32,
        window_ms: i64,
    ) -> Self {
        let owner: Vec<Option<usize>> = (0..tokens)
            .map(|k| (k > 0 && rng.random_bool(1.0 / 3.0)).then(|| rng.random_range(0..tenants)))
            .collect();
        let token = |k: usize| id(&format!("k-{k}"));
        let pool: Vec<Id> = (0..tokens)
            .filter(|&k| owner[k].is_none())
            .map(token)
            .collect();
        let tenant_cfgs = (0..tenants)
            .map(|t| TenantCfg {
                id: id(&format!("t-{t}")),
                limit: rng.random_range(token_limit / 2 + 1..=token_limit * 3),
                dedicated: (0..tokens)
                    .filter(|&k| owner[k] == Some(t))
                    .map(token)
                    .collect(),
                pooled: pool.clone(),
            })
            .collect();
        let pace_burst = if rng.random_bool(0.5) {
            0
        } else {
            rng.random_range(1..=token_limit)
        };
        Self {
            tenants: tenant_cfgs,
            tokens,
            token_limit,
            window_ms,
            pace_burst,
        }
    }

    fn tenant(&self, id: &str) -> &TenantCfg {
        self.tenants
            .iter()
            .find(|t| t.id.as_str() == id)
            .expect("known tenant")
    }

    fn request(&self, ask: &Ask) -> AcquireRequest {
        let t = &self.tenants[ask.tenant];
        AcquireRequest {
            upstream_id: id(UPSTREAM),
            pool_id: None,
            config_version: 0,
            nonce: LeaseKey::new_nonce(),
            tenant_id: t.id.clone(),
            tenant_limit: t.limit,
            token_limit: self.token_limit,
            window: Duration::from_millis(self.window_ms as u64),
            lease_ttl: Duration::from_millis(ask.ttl_ms as u64),
            cost: ask.cost,
            dedicated: t.dedicated.clone(),
            pooled: t.pooled.clone().into(),
            pooled_digest: None,
            count_demand: false,
            queue: None,
            pace_burst: self.pace_burst,
        }
    }

    /// Checks a grant against the request's own limits and candidates.
    fn check_grant(&self, req: &AcquireRequest, grant: &Grant) {
        assert!(grant.token_used <= req.token_limit, "{grant:?}");
        assert!(grant.tenant_used <= req.tenant_limit, "{grant:?}");
        let candidate = req
            .dedicated
            .iter()
            .chain(req.pooled.iter())
            .any(|k| *k == grant.token_id);
        assert!(
            candidate,
            "granted a token the tenant may not use: {grant:?}"
        );
    }
}

// ---------------------------------------------------------------- phases

/// How workers behave for a while. Phases change every ¼ to 2 windows, so that bursts,
/// TTL regimes and early or late use meet: the shapes that break accounting which
/// forgets the TTL or frees used slots (uniformly random workers rarely do).
#[derive(Clone, Copy, Debug)]
struct Phase {
    until: i64,
    ttl_ms: (i64, i64),
    /// Share of uses (and releases) at the last instant of validity, and at the first.
    late: f64,
    early: f64,
    /// Arrival rate, as a multiple of the base rate.
    load: f64,
}

/// The phases of one run, drawn as time reaches them.
struct Phases {
    rng: StdRng,
    window_ms: i64,
    max_ttl_ms: i64,
    list: Vec<Phase>,
    start: i64,
}

impl Phases {
    fn new(seed: u64, start: i64, window_ms: i64, max_ttl_ms: i64) -> Self {
        let rng = StdRng::seed_from_u64(seed ^ 0x9ba5e);
        Self {
            rng,
            window_ms,
            max_ttl_ms,
            list: Vec::new(),
            start,
        }
    }

    fn next(&mut self, from: i64) -> Phase {
        let (rng, max) = (&mut self.rng, self.max_ttl_ms);
        let ttl_ms = match rng.random_range(0..3) {
            0 => (1, (max / 10).max(1)),
            1 => ((max / 2).max(1), max),
            _ => (1, max),
        };
        let (late, early) = [(0.8, 0.1), (0.1, 0.8), (0.4, 0.1)][rng.random_range(0..3)];
        let load = [0.25, 1.0, 4.0, 16.0][rng.random_range(0..4)];
        let until = from + rng.random_range(self.window_ms / 4..=2 * self.window_ms);
        Phase {
            until,
            ttl_ms,
            late,
            early,
            load,
        }
    }

    /// The phase at `t`, drawing phases up to it.
    fn at(&mut self, t: i64) -> Phase {
        while self.list.last().is_none_or(|p| p.until <= t) {
            let from = self.list.last().map_or(self.start, |p| p.until);
            let phase = self.next(from);
            self.list.push(phase);
        }
        self.list[self.list.partition_point(|p| p.until <= t)]
    }
}

// ---------------------------------------------------------------- what a worker does

/// One request a worker makes.
#[derive(Clone, Debug)]
struct Ask {
    tenant: usize,
    cost: u32,
    ttl_ms: i64,
    retries_left: u8,
}

impl Ask {
    fn random(rng: &mut StdRng, world: &World, phase: &Phase) -> Self {
        Self {
            tenant: rng.random_range(0..world.tenants.len()),
            cost: if rng.random_bool(0.8) {
                1
            } else {
                rng.random_range(2..=3)
            },
            ttl_ms: rng.random_range(phase.ttl_ms.0..=phase.ttl_ms.1),
            retries_left: 3,
        }
    }
}

/// A worker's plan for a lease valid over `[g, e]`: when it calls upstream (one
/// instant per unit of cost) and when and how it releases.
struct Plan {
    uses: Vec<i64>,
    release: Option<(i64, ReleaseOutcome)>,
}

/// An instant of `[lo, hi]`, the last or the first one as often as the phase says.
fn instant(rng: &mut StdRng, phase: &Phase, lo: i64, hi: i64) -> i64 {
    let p: f64 = rng.random();
    if p < phase.late {
        hi
    } else if p < phase.late + phase.early {
        lo
    } else {
        rng.random_range(lo..=hi)
    }
}

fn used_outcome(rng: &mut StdRng) -> ReleaseOutcome {
    let outcomes = [
        ReleaseOutcome::Success,
        ReleaseOutcome::UpstreamError,
        ReleaseOutcome::UpstreamRateLimited,
    ];
    outcomes[rng.random_range(0..outcomes.len())]
}

fn plan(rng: &mut StdRng, phase: &Phase, (g, e): (i64, i64), cost: u32, window_ms: i64) -> Plan {
    let uses =
        |rng: &mut StdRng, last: i64| (0..cost).map(|_| instant(rng, phase, g, last)).collect();
    match rng.random_range(0..10) {
        // Not used; the release may come after expiry (then it is NotFound).
        0 | 1 => Plan {
            uses: vec![],
            release: Some((
                instant(rng, phase, g, e + window_ms / 10),
                ReleaseOutcome::NotUsed,
            )),
        },
        // Used, then released at or after the last use, before expiry.
        2..=5 => {
            let r = instant(rng, phase, g, e);
            Plan {
                uses: uses(rng, r),
                release: Some((r, used_outcome(rng))),
            }
        }
        // Used, released too late (NotFound): the slot stays until expiry + W.
        6 => {
            let r = e + rng.random_range(1..=window_ms / 4);
            Plan {
                uses: uses(rng, e),
                release: Some((r, used_outcome(rng))),
            }
        }
        // Used and never released (a worker that died).
        _ => Plan {
            uses: uses(rng, e),
            release: None,
        },
    }
}

#[derive(Default, Debug)]
struct Stats {
    grants: usize,
    denials: usize,
    releases: usize,
    uses: usize,
    uses_at_expiry: usize,
    windows: i64,
    busiest: Vec<usize>,
}

// ---------------------------------------------------------------- memory simulation

/// Broken accounting, to prove the simulation catches what property 1 is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mutant {
    None,
    /// The store is told a 1 ms TTL while workers use leases over their real TTL: a
    /// plain sliding window of grants, blind to the W + T widening.
    IgnoreTtl,
    /// Releases of used leases free their slots, as "not used" does.
    FreeUsedSlots,
}

struct SimConfig {
    seed: u64,
    tokens: usize,
    tenants: usize,
    token_limit: u32,
    window_ms: i64,
    max_ttl_ms: i64,
    arrivals: usize,
    /// Base offered load as a multiple of the tokens' capacity (phases scale it).
    load: u32,
    mutant: Mutant,
}

enum Event {
    Release {
        key: LeaseKey,
        outcome: ReleaseOutcome,
        expect: ReleaseResult,
    },
    Retry(Ask),
}

struct MemorySim {
    clock: Clock,
    counters: MemoryCounters,
    rng: StdRng,
    world: World,
    phases: Phases,
    mutant: Mutant,
    queue: BinaryHeap<Reverse<(i64, u64)>>,
    events: HashMap<u64, Event>,
    seq: u64,
    log: UseLog,
    stats: Stats,
}

impl MemorySim {
    fn new(cfg: &SimConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let world = World::random(
            &mut rng,
            cfg.tokens,
            cfg.tenants,
            cfg.token_limit,
            cfg.window_ms,
        );
        let clock = Clock::manual(MANUAL_START_MS);
        let counters = MemoryCounters::new(clock.clone());
        counters.mark_fresh(&id(UPSTREAM));
        Self {
            counters,
            clock,
            rng,
            world,
            phases: Phases::new(cfg.seed, MANUAL_START_MS, cfg.window_ms, cfg.max_ttl_ms),
            mutant: cfg.mutant,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            seq: 0,
            log: UseLog::default(),
            stats: Stats::default(),
        }
    }

    fn set_clock(&self, at: i64) {
        let now = self.clock.now_ms();
        assert!(at >= now, "simulation time went back");
        self.clock.advance(Duration::from_millis((at - now) as u64));
    }

    fn schedule(&mut self, at: i64, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.events.insert(self.seq, event);
    }

    /// Runs the events due up to `until`, in time order.
    fn run_due(&mut self, until: i64) {
        while let Some(&Reverse((at, seq))) = self.queue.peek() {
            if at > until {
                return;
            }
            self.queue.pop();
            self.set_clock(at);
            match self.events.remove(&seq).expect("scheduled event") {
                Event::Release {
                    key,
                    outcome,
                    expect,
                } => {
                    assert_eq!(
                        self.counters.release(&key, outcome),
                        expect,
                        "{key:?} {outcome:?} at {at}"
                    );
                    self.stats.releases += 1;
                }
                Event::Retry(ask) => self.attempt(ask),
            }
        }
    }

    fn attempt(&mut self, ask: Ask) {
        let mut req = self.world.request(&ask);
        if self.mutant == Mutant::IgnoreTtl {
            req.lease_ttl = Duration::from_millis(1);
        }
        match self.counters.acquire(&req) {
            AcquireOutcome::Unhealthy(refused) => panic!("no token health here: {refused:?}"),
            AcquireOutcome::Granted(grant) => self.on_grant(&req, &ask, grant),
            AcquireOutcome::Denied(d) => {
                self.stats.denials += 1;
                assert!(d.retry_after >= Duration::from_millis(1), "{d:?}");
                if ask.retries_left > 0 && self.rng.random_bool(0.6) {
                    let retry = Ask {
                        retries_left: ask.retries_left - 1,
                        ..ask
                    };
                    self.schedule(free_at(&d), Event::Retry(retry));
                }
            }
        }
    }

    fn on_grant(&mut self, req: &AcquireRequest, ask: &Ask, grant: Grant) {
        self.world.check_grant(req, &grant);
        self.stats.grants += 1;
        // The worker's view: valid for its TTL (the store's view differs only in mutants).
        let (g, e) = (grant.now_ms, grant.now_ms + ask.ttl_ms);
        let phase = self.phases.at(g);
        let plan = plan(
            &mut self.rng,
            &phase,
            (g, e),
            req.cost,
            self.world.window_ms,
        );
        for &at in &plan.uses {
            self.log.record(&grant.token_id, &req.tenant_id, at);
            self.stats.uses_at_expiry += usize::from(at == e);
        }
        let Some((r, mut outcome)) = plan.release else {
            return;
        };
        if self.mutant == Mutant::FreeUsedSlots {
            outcome = ReleaseOutcome::NotUsed;
        }
        let key = LeaseKey {
            upstream_id: req.upstream_id.clone(),
            pool_id: None,
            tenant_id: req.tenant_id.clone(),
            token_id: grant.token_id,
            nonce: req.nonce.clone(),
        };
        let e = grant.expires_at_ms;
        // A release is accepted while the lease's slots are counted: until expiry + W.
        let counted_until = e + self.world.window_ms;
        let expect = if r <= counted_until {
            ReleaseResult::Released
        } else {
            ReleaseResult::NotFound
        };
        self.schedule(
            r,
            Event::Release {
                key: key.clone(),
                outcome,
                expect: expect.clone(),
            },
        );
        if self.rng.random_bool(0.1) {
            self.schedule_second_release(key, outcome, r, counted_until, expect);
        }
    }

    /// A duplicate release, with the same or another outcome, expecting its status;
    /// `e`: the last instant a release is accepted.
    fn schedule_second_release(
        &mut self,
        key: LeaseKey,
        first: ReleaseOutcome,
        r: i64,
        e: i64,
        first_result: ReleaseResult,
    ) {
        let at = self.rng.random_range(r..=r.max(e) + 1);
        let outcome = if self.rng.random_bool(0.5) {
            first
        } else {
            used_outcome(&mut self.rng)
        };
        let expect = match (first_result, at <= e) {
            (ReleaseResult::Released, true) if outcome == first => ReleaseResult::AlreadyReleased,
            (ReleaseResult::Released, true) => ReleaseResult::Conflict { previous: first },
            _ => ReleaseResult::NotFound,
        };
        self.schedule(
            at,
            Event::Release {
                key,
                outcome,
                expect,
            },
        );
    }

    fn gap(&mut self, mean_ms: f64) -> i64 {
        let mean = mean_ms.max(1.0) as i64;
        if self.rng.random_bool(0.15) {
            0
        } else {
            self.rng.random_range(1..=2 * mean)
        }
    }

    /// Runs the arrivals and every event they cause; then the upstream's verdict.
    fn run(mut self, cfg: &SimConfig) -> (Stats, Result<Vec<usize>, String>) {
        let capacity = f64::from(cfg.token_limit) * cfg.tokens as f64 * f64::from(cfg.load);
        let base_gap = cfg.window_ms as f64 / capacity;
        let mut now = self.clock.now_ms();
        for _ in 0..cfg.arrivals {
            let phase = self.phases.at(now);
            now += self.gap(base_gap / phase.load);
            self.run_due(now);
            self.set_clock(now);
            let phase = self.phases.at(now);
            let ask = Ask::random(&mut self.rng, &self.world, &phase);
            self.attempt(ask);
        }
        self.run_due(i64::MAX);
        let verdict = self.log.check(&self.world);
        self.stats.busiest = verdict.clone().unwrap_or_default();
        self.stats.uses = self.log.uses();
        self.stats.windows = self.log.windows_spanned(cfg.window_ms);
        (self.stats, verdict)
    }

    /// Runs and asserts the upstream saw no violation.
    fn run_clean(self, cfg: &SimConfig) -> Stats {
        let (stats, verdict) = self.run(cfg);
        if let Err(violation) = verdict {
            panic!("{violation} (seed {}; {stats:?})", cfg.seed);
        }
        stats
    }
}

/// The checker counts closed windows: uses exactly W apart share a window, W + 1 apart
/// do not.
#[test]
fn strict_upstream_counts_closed_windows() {
    assert_eq!(busiest_window(&[0, 1000, 1000], 1000), (3, 0));
    assert_eq!(busiest_window(&[0, 1001, 1001, 5, 2001], 1000), (3, 5));
    assert_eq!(busiest_window(&[0, 1001, 2002], 1000), (1, 0));
    assert_eq!(busiest_window(&[], 1000), (0, 0));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Property 1 (memory, random shapes): whatever the arrivals, costs, tenants, TTLs
    /// (shorter or longer than W) and release behaviour, and with uses at the last
    /// instant of validity, no window of any token or tenant exceeds its limit.
    #[test]
    fn memory_uses_never_exceed_the_limit(
        seed in any::<u64>(),
        tokens in 1usize..=4,
        tenants in 1usize..=6,
        token_limit in 1u32..=12,
        window_ms in prop::sample::select(vec![1_000i64, 60_000]),
        ttl_share in prop::sample::select(vec![10i64, 50, 200]),
        arrivals in 200usize..=1500,
        load in 1u32..=3,
    ) {
        let max_ttl_ms = (window_ms * ttl_share / 100).max(1);
        let cfg = SimConfig {
            seed, tokens, tenants, token_limit, window_ms, max_ttl_ms, arrivals, load,
            mutant: Mutant::None,
        };
        MemorySim::new(&cfg).run_clean(&cfg);
    }
}

fn baselinker_scale(seed: u64, mutant: Mutant) -> SimConfig {
    SimConfig {
        seed,
        tokens: 4,
        tenants: 8,
        token_limit: USABLE,
        window_ms: 60_000,
        max_ttl_ms: 15_000,
        arrivals: 40_000,
        load: 1,
        mutant,
    }
}

/// Property 1 (memory, BaseLinker scale): 8 runs of 4 tokens at 95 per 60 s, 8 tenants,
/// TTLs up to 15 s, 40,000 arrivals each in phases of bursts and lulls; no window of any
/// token or tenant exceeds its limit.
#[test]
fn memory_long_simulation_at_baselinker_scale() {
    let mut total = Stats::default();
    for seed in 0..8 {
        let cfg = baselinker_scale(seed, Mutant::None);
        let stats = MemorySim::new(&cfg).run_clean(&cfg);
        assert!(stats.grants > 1000, "the run barely granted: {stats:?}");
        total.grants += stats.grants;
        total.denials += stats.denials;
        total.releases += stats.releases;
        total.uses += stats.uses;
        total.uses_at_expiry += stats.uses_at_expiry;
        total.windows += stats.windows;
        total.busiest.extend(stats.busiest);
    }
    println!("memory simulation, 8 runs: {total:?}");
}

/// The simulation has teeth: the same runs against accounting that ignores the lease
/// TTL, or that frees used slots on release, are caught exceeding a limit.
#[test]
fn memory_simulation_catches_broken_accounting() {
    for mutant in [Mutant::IgnoreTtl, Mutant::FreeUsedSlots] {
        for seed in 0..4 {
            let cfg = baselinker_scale(seed, mutant);
            let (stats, verdict) = MemorySim::new(&cfg).run(&cfg);
            println!("{mutant:?}, seed {seed}: {verdict:?}");
            assert!(
                verdict.is_err(),
                "{mutant:?} went unnoticed (seed {seed}): {stats:?}"
            );
        }
    }
}

// ---------------------------------------------------------------- Redis simulation

const REDIS_SIM_WINDOW_MS: i64 = 1_000;
const REDIS_SIM_MAX_TTL_MS: i64 = 400;
const REDIS_SIM_SECONDS: i64 = 10;
const REDIS_SIM_WORKERS: u64 = 16;
/// Base offered load as a multiple of the tokens' capacity (phases scale it).
const REDIS_SIM_LOAD: f64 = 3.0;

/// What the Redis workers share.
struct RedisSim {
    h: Harness,
    world: World,
    phases: Mutex<Phases>,
    until: i64,
    log: Mutex<(UseLog, Stats)>,
}

impl RedisSim {
    /// A worker's pause before its next request: the phase's arrival rate, spread over
    /// the workers, at the tokens' capacity.
    fn pause(&self, rng: &mut StdRng, phase: &Phase) -> Duration {
        let capacity = f64::from(self.world.token_limit) * self.world.tokens as f64;
        let rate = capacity * REDIS_SIM_LOAD * phase.load;
        let mean = REDIS_SIM_WINDOW_MS as f64 * REDIS_SIM_WORKERS as f64 / rate;
        Duration::from_millis(rng.random_range(0..=(2.0 * mean) as u64))
    }

    fn record(&self, grant: &Grant, tenant: &Id, plan: &Plan) {
        let mut guard = self.log.lock().unwrap();
        guard.1.grants += 1;
        for &at in &plan.uses {
            guard.0.record(&grant.token_id, tenant, at);
            guard.1.uses_at_expiry += usize::from(at == grant.expires_at_ms);
        }
    }

    /// Releases after the store's clock has passed `r` (so after every planned use).
    async fn release(
        &self,
        counters: &Counters,
        req: AcquireRequest,
        grant: Grant,
        (r, outcome): (i64, ReleaseOutcome),
    ) {
        self.h.advance_to(r).await;
        let key = LeaseKey {
            upstream_id: req.upstream_id,
            pool_id: None,
            tenant_id: req.tenant_id,
            token_id: grant.token_id,
            nonce: req.nonce,
        };
        let result = counters
            .release(&key, outcome)
            .await
            .expect("Redis answers");
        // Released if the store ran it by expiry; NotFound if later (slot kept to e + W).
        assert!(
            matches!(result, ReleaseResult::Released | ReleaseResult::NotFound),
            "{result:?}"
        );
        self.log.lock().unwrap().1.releases += 1;
    }
}

/// One simulated worker on Redis: acquire, use at planned instants (store clock),
/// release after the last use.
async fn redis_worker(sim: Arc<RedisSim>, counters: Counters, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut now = sim.until - REDIS_SIM_SECONDS * 1000;
    while now <= sim.until {
        let phase = sim.phases.lock().unwrap().at(now);
        tokio::time::sleep(sim.pause(&mut rng, &phase)).await;
        let ask = Ask::random(&mut rng, &sim.world, &phase);
        let req = sim.world.request(&ask);
        let grant = match counters.acquire(&req).await.expect("Redis answers") {
            AcquireOutcome::Granted(grant) => grant,
            AcquireOutcome::Denied(d) => {
                sim.log.lock().unwrap().1.denials += 1;
                now = d.now_ms;
                if rng.random_bool(0.5) {
                    tokio::time::sleep(d.retry_after).await;
                }
                continue;
            }
            AcquireOutcome::Unhealthy(refused) => panic!("no token health here: {refused:?}"),
        };
        sim.world.check_grant(&req, &grant);
        now = grant.now_ms;
        let validity = (grant.now_ms, grant.expires_at_ms);
        let plan = plan(&mut rng, &phase, validity, req.cost, REDIS_SIM_WINDOW_MS);
        sim.record(&grant, &req.tenant_id, &plan);
        if let Some(release) = plan.release {
            sim.release(&counters, req, grant, release).await;
        }
    }
}

pub(super) async fn redis_simulation(h: Harness) {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let world = World::random(&mut rng, 3, 5, 6, REDIS_SIM_WINDOW_MS);
    let replicas = h.replicas(3).await;
    let start = h.now_ms().await;
    let sim = Arc::new(RedisSim {
        phases: Mutex::new(Phases::new(
            0x5eed,
            start,
            REDIS_SIM_WINDOW_MS,
            REDIS_SIM_MAX_TTL_MS,
        )),
        until: start + REDIS_SIM_SECONDS * 1000,
        log: Mutex::default(),
        world,
        h,
    });
    let mut tasks = Vec::new();
    for w in 0..REDIS_SIM_WORKERS {
        let counters = replicas[w as usize % replicas.len()].clone();
        tasks.push(tokio::spawn(redis_worker(sim.clone(), counters, w)));
    }
    for task in tasks {
        task.await.expect("worker");
    }
    let (uses, mut stats) = std::mem::take(&mut *sim.log.lock().unwrap());
    stats.busiest = uses
        .check(&sim.world)
        .unwrap_or_else(|v| panic!("Redis simulation: {v}"));
    stats.uses = uses.uses();
    stats.windows = uses.windows_spanned(REDIS_SIM_WINDOW_MS);
    println!("Redis simulation: {stats:?}");
    assert!(stats.grants > 0, "{stats:?}");
}

/// Property 1 (Redis, real time): 16 workers on 3 replicas for 10 s, 3 tokens at 6 per
/// 1 s window, TTLs up to 400 ms, phases of bursts and lulls, uses at random instants
/// (often the last), released or not; no token or tenant window exceeds its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_uses_never_exceed_the_limit() {
    Harness::run(Backend::Redis, redis_simulation).await;
}
