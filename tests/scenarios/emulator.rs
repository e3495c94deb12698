//! Scenario tests against the BaseLinker emulator, at a compressed time scale (100
//! requests per 2 s per token), with 3 replicas on one Redis and one Postgres and
//! workers that use each lease at a random instant of its validity, including the last.
//! The upstream counts violations itself: the service's own counters are not trusted.

use std::time::Duration;

use tokenlease::emulator::{Emulator, EmulatorConfig, EmulatorHandle};
use tokenlease::grpc::pb::{self, lease_service_client::LeaseServiceClient};
use tonic::transport::Channel;

use super::fixtures::{PoolSetup, token_secret};
use super::helpers::{Counters, Db, TestApp, TestEnv, authed};
use super::workers::{self, Demand, Tally, now_ms};

pub const WINDOW: Duration = Duration::from_secs(2);

/// Three replicas, an emulator accepting `tokens` tokens, and the configuration:
/// upstream "up" (100 per 2 s, 5 % margin), pool "shared" with the tokens, tier "flex"
/// (`guaranteed` + 1000 burst), and `tenants` (id, weight) in the pool.
pub struct Scenario {
    _env: TestEnv,
    pub replicas: Vec<TestApp>,
    pub emulator: EmulatorHandle,
    pub key: String,
    pub tokens: Vec<String>,
}

impl Scenario {
    pub async fn start(tokens: usize, guaranteed: u32, tenants: &[(&str, f64)]) -> Scenario {
        Self::start_with(
            tokens,
            guaranteed,
            tenants,
            |_| {},
            Duration::from_secs(600),
        )
        .await
    }

    /// `tweak` adjusts the replicas' settings; `block` is how long the emulator blocks
    /// a token after a violation.
    pub async fn start_with(
        tokens: usize,
        guaranteed: u32,
        tenants: &[(&str, f64)],
        tweak: impl Fn(&mut tokenlease::config::Settings),
        block: Duration,
    ) -> Scenario {
        let env = TestEnv::new(Db::Postgres, Counters::Redis).await;
        let mut settings = env.settings();
        // 1 % of the window. A lease's slot counts from its grant until W after its
        // release, so the time a worker holds a lease before using it (here a random
        // instant of its validity) is capacity lost: about half the TTL per lease, as a
        // share of W. Sync workers call at once; the random instant tests safety.
        settings.lease.ttl_ms = 20;
        // Calls started at the last instant arrive a little later; released leases end
        // their slot at the release, so the grace costs nothing when workers release.
        settings.lease.use_grace_ms = 200;
        // The service's default pacing (the test helpers turn it off).
        settings.lease.pace_burst_percent = tokenlease::config::Settings::default()
            .lease
            .pace_burst_percent;
        tweak(&mut settings);
        let mut replicas = vec![];
        for _ in 0..3 {
            replicas.push(env.spawn_with(settings.clone()).await);
        }
        let token_secrets: Vec<String> = (0..tokens).map(token_secret).collect();
        let emulator = Emulator::start(
            EmulatorConfig {
                limit: 100,
                window: WINDOW,
                block,
                ..EmulatorConfig::default()
            }
            .with_tokens(token_secrets.clone()),
        )
        .await
        .expect("emulator");
        let key = replicas[0].admin_key.clone();
        configure(&replicas[0], &key, tokens, guaranteed, tenants).await;
        for r in &replicas {
            r.leaser.config.refresh().await.unwrap();
            r.leaser.allocator.refresh().await.unwrap();
        }
        Scenario {
            _env: env,
            replicas,
            emulator,
            key,
            tokens: token_secrets,
        }
    }

    pub async fn clients(&self) -> Vec<LeaseServiceClient<Channel>> {
        let mut clients = vec![];
        for r in &self.replicas {
            clients.push(r.lease().await);
        }
        clients
    }

    pub async fn run(
        &self,
        demands: &[Demand],
        duration: Duration,
    ) -> std::collections::HashMap<String, Tally> {
        let clients = self.clients().await;
        workers::run(
            &clients,
            &self.key,
            &self.emulator.client(),
            demands,
            duration,
        )
        .await
    }

    /// The upstream saw no violation and never more than 100 requests in any window.
    pub fn assert_no_violation(&self) {
        for token in &self.tokens {
            let stats = self.emulator.stats(token);
            assert_eq!(
                stats.violations, 0,
                "the upstream counted violations on a token: {stats:?}"
            );
            assert!(stats.max_accepted_in_any_window(WINDOW) <= 100);
        }
    }
}

/// The shared test fixture (upstream "up" at 100 per 2 s, pool "shared", tokens
/// "tok-<i>", tier "flex" with `guaranteed` + 1000 burst), and `tenants` with weights.
async fn configure(
    app: &TestApp,
    key: &str,
    tokens: usize,
    guaranteed: u32,
    tenants: &[(&str, f64)],
) {
    let mut admin = app.admin().await;
    let pool = PoolSetup {
        limit: 100,
        window_ms: WINDOW.as_millis() as u64,
        tokens,
        guaranteed,
        burst: 1000,
    };
    pool.create(&mut admin, key).await;
    for (id, weight) in tenants {
        let tenant = pb::Tenant {
            id: (*id).into(),
            tier_id: "flex".into(),
            pool_id: "shared".into(),
            weight_override: Some(*weight),
            ..Default::default()
        };
        admin
            .create_tenant(authed(
                pb::CreateTenantRequest {
                    tenant: Some(tenant),
                },
                key,
            ))
            .await
            .unwrap();
    }
}

pub fn id(value: &str) -> tokenlease::domain::Id {
    tokenlease::domain::Id::parse("id", value).unwrap()
}

pub fn demand(
    tenant: &str,
    priority: pb::Priority,
    workers: usize,
    max_wait_ms: u64,
    pace_ms: Option<u64>,
) -> Demand {
    Demand {
        tenant: tenant.into(),
        priority,
        workers,
        max_wait: Duration::from_millis(max_wait_ms),
        pace: pace_ms.map(Duration::from_millis),
        expect_unavailable: false,
    }
}

/// Seed strategy 2 (4 tenants, 3 tokens, 30 guaranteed each, weights 2/1/1/0.5): one
/// tenant floods at far more than its share, the others ask for 40 per window (above
/// their guarantee) → each of them receives at least its guarantee, or all it asked for
/// when it asked less; the emulator counts no violation. A guarantee is 30 slots, and a
/// used slot counts from its grant to W after its release: at a mean hold h it is 30
/// calls per W + h (a loaded machine's workers hold longer and ask less often).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noisy_neighbour_cannot_take_guarantees() {
    let s = Scenario::start(3, 30, &[("c", 2.0), ("d", 1.0), ("e", 1.0), ("f", 0.5)]).await;
    let normal = pb::Priority::Normal;
    // 40 per 2 s = one call per 50 ms: 2 workers paced at 100 ms each.
    let mut demands: Vec<Demand> = ["c", "e", "f"]
        .iter()
        .map(|t| demand(t, normal, 2, 100, Some(100)))
        .collect();
    demands.push(demand("d", normal, 24, 2_000, None)); // the flood
    let started = now_ms();
    let tallies = s.run(&demands, Duration::from_secs(10)).await;
    // Skip the first window (quotas settle as demand is measured).
    let (from, to) = (started + 2_000, started + 10_000);
    for tenant in ["c", "e", "f"] {
        let tally = &tallies[tenant];
        let (asked, granted) = tally.asked_and_granted_between(from, to);
        let hold = tally.mean_hold_between(from, to);
        let guaranteed = 30.0 * (to - from) as f64 / (2_000.0 + hold);
        // Less one call per window: a waiter reacts to its freed slot a little late,
        // later on a loaded machine (seen: granted 0–1 per window above this bound
        // under a busy loop per core, 3–5 above it on an idle machine).
        let owed = (asked as f64).min(guaranteed.floor()) - 4.0;
        println!(
            "tenant {tenant}: asked {asked}, granted {granted}, guarantee {guaranteed:.1} at a mean hold of {hold:.1} ms"
        );
        assert!(
            granted as f64 >= owed,
            "tenant {tenant} was granted {granted} of {asked} asked, below its guarantee \
             ({guaranteed:.1} in 4 windows at a mean hold of {hold:.1} ms)"
        );
    }
    let flood = tallies["d"].used_between(from, to) as f64 / 4.0;
    let quotas = s.replicas[0].leaser.allocator.current();
    println!(
        "flood {flood:.1} per window, denied {}, quotas {:?}",
        tallies["d"].denied,
        ["c", "d", "e", "f"].map(|t| quotas.by_tenant[&(id(t), id("up"))])
    );
    assert!(
        flood > 100.0,
        "the flooding tenant still uses the spare capacity ({flood:.1} per window)"
    );
    s.assert_no_violation();
}

/// All four tenants saturate → each receives its weighted max-min share (quotas
/// 103/67/67/48 of 285) within ±8 %, and the upstream's usable capacity is used ≥ 97 %.
/// Both are measured against what the accounting allows at the workers' hold times: a
/// used slot counts from its grant to W after its release, so a quota of q serves q
/// calls per W + hold, and a token its limit per W + hold. A loaded machine's workers
/// hold leases longer (their RPCs are slower); measured against W alone, the shares and
/// the utilisation would measure the machine, not the service. What is left is how
/// late waiters take freed slots, which a starved machine lengthens too: measured idle,
/// shares within ±1.5 % and 99.6–99.7 % used; beside a busy loop per core, shares off
/// by up to 5.3 % (the largest quota loses most: it needs the most prompt retries; a
/// finding for the fairness work, not hidden here) and 98.7–98.9 % used. A broken
/// weighting is far outside either bound (equal shares would put c at 25 % of the
/// total instead of 36 %, 31 % off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_tenants_get_weighted_shares() {
    let s = Scenario::start(3, 30, &[("c", 2.0), ("d", 1.0), ("e", 1.0), ("f", 0.5)]).await;
    let demands: Vec<Demand> = ["c", "d", "e", "f"]
        .iter()
        .map(|t| demand(t, pb::Priority::Normal, 10, 2_000, None))
        .collect();
    let started = now_ms();
    let tallies = s.run(&demands, Duration::from_secs(13)).await;
    // Quotas settle in the first 3.5–4.2 s (demand is read over one window of completed
    // buckets, and the tenants' demand follows what they get): measure after that.
    let (from, to) = (started + 5_000, started + 13_000);
    let used: Vec<f64> = ["c", "d", "e", "f"]
        .iter()
        .map(|t| tallies[*t].used_between(from, to) as f64)
        .collect();
    // What each tenant's quota serves at its own workers' mean hold (see above).
    let served: Vec<f64> = ["c", "d", "e", "f"]
        .iter()
        .zip([103.0, 67.0, 67.0, 48.0])
        .map(|(t, quota)| quota / (2_000.0 + tallies[*t].mean_hold_between(from, to)))
        .collect();
    let total: f64 = used.iter().sum();
    let mut all = super::workers::Tally::default();
    for t in ["c", "d", "e", "f"] {
        all.holds_ms.extend(tallies[t].holds_ms.iter().copied());
    }
    let hold = all.mean_hold_between(from, to);
    let capacity = 285.0 * (to - from) as f64 / (2_000.0 + hold);
    println!(
        "used per tenant {used:?}, total {total} of {capacity:.0} usable at a mean hold of \
         {hold:.1} ms ({:.0} with no hold)",
        285.0 * (to - from) as f64 / 2_000.0
    );
    // Every replica computed the same quotas: guarantee + weighted share of the spare.
    for r in &s.replicas {
        let quotas = r.leaser.allocator.current();
        let got: Vec<u32> = ["c", "d", "e", "f"]
            .iter()
            .map(|t| quotas.by_tenant[&(id(t), id("up"))])
            .collect();
        assert_eq!(got, vec![103, 67, 67, 48], "quotas on a replica");
    }
    assert!(
        total >= 0.97 * capacity,
        "utilisation {:.1} %",
        100.0 * total / capacity
    );
    let all_served: f64 = served.iter().sum();
    for (got, serves) in used.iter().zip(&served) {
        let expected = serves / all_served;
        let share = got / total;
        assert!(
            (share - expected).abs() <= 0.08 * expected,
            "share {share:.4}, expected {expected:.4} ± 8 %"
        );
    }
    s.assert_no_violation();
}

/// One tenant under saturation with a mix of priorities → median wait critical < high <
/// normal < low, and low requests still complete. This relies on pacing (the service's
/// default): a saturated token grants one slot per W / limit, so at every instant the
/// queue's order decides who gets the slot. Without pacing a saturated window frees its
/// slots in bursts that every waiter fits into, and waits would be bimodal (served in
/// the burst, or one window later) whatever the priority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_order_waits_without_starving_low() {
    let s = Scenario::start(1, 30, &[("solo", 1.0)]).await;
    let classes = [
        pb::Priority::Critical,
        pb::Priority::High,
        pb::Priority::Normal,
        pb::Priority::Low,
    ];
    let demands: Vec<Demand> = classes
        .iter()
        .map(|p| demand("solo", *p, 12, 4_000, None))
        .collect();
    let tallies = s.run(&demands, Duration::from_secs(10)).await;
    let tally = &tallies["solo"];
    let waits: Vec<(u64, u64)> = classes
        .iter()
        .map(|p| tally.waits(*p).unwrap_or((u64::MAX, u64::MAX)))
        .collect();
    let completed: Vec<usize> = classes
        .iter()
        .map(|p| tally.waits_ms.get(&(*p as i32)).map_or(0, Vec::len))
        .collect();
    println!(
        "(median, mean) waits ms {waits:?}, completed {completed:?}, denied {}",
        tally.denied
    );
    let medians: Vec<u64> = waits.iter().map(|w| w.0).collect();
    assert!(
        medians.windows(2).all(|w| w[0] < w[1]),
        "median waits must rise with lower priority: {medians:?}"
    );
    assert!(
        completed[3] > 0,
        "low-priority requests must still complete"
    );
    s.assert_no_violation();
}
