//! Simulated sync workers for scenario tests: each loops AcquireLease → call the
//! BaseLinker emulator with the leased token at a random instant of the lease's validity
//! (a quarter of the time exactly at its last instant) → ReleaseLease with the outcome.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng, rngs::StdRng};
use tokenlease::baselinker::{BaseLinkerClient, Outcome};
use tokenlease::grpc::pb::{
    self, acquire_lease_response::Result as Answer, lease_service_client::LeaseServiceClient,
};
use tonic::transport::Channel;
use tonic_types::StatusExt;

use super::helpers::{authed, millis};

/// What one tenant asks for.
#[derive(Clone, Debug)]
pub struct Demand {
    pub tenant: String,
    pub priority: pb::Priority,
    /// Workers running in parallel for this tenant and priority.
    pub workers: usize,
    /// How long each AcquireLease may wait in the service.
    pub max_wait: Duration,
    /// Each worker starts a call at most this often (None: as fast as it can).
    pub pace: Option<Duration>,
    /// Whether AcquireLease may fail UNAVAILABLE (a fault test breaks Redis): the worker
    /// then waits the RetryInfo and asks again. Otherwise such a failure fails the test.
    pub expect_unavailable: bool,
}

/// What one worker saw.
#[derive(Default, Debug)]
pub struct Tally {
    /// Unix ms of every upstream call that succeeded.
    pub used_at_ms: Vec<i64>,
    /// Unix ms at which every AcquireLease was sent, and those of the granted ones.
    pub asked_at_ms: Vec<i64>,
    pub granted_at_ms: Vec<i64>,
    /// AcquireLease latency of granted calls, ms, by priority.
    pub waits_ms: BTreeMap<i32, Vec<u64>>,
    pub denied: u64,
    /// Unix ms at which a call was denied COUNTERS_RECOVERING (the hold of lost counters).
    pub held_at_ms: Vec<i64>,
    /// AcquireLease calls that failed UNAVAILABLE (only with `expect_unavailable`).
    pub unavailable: u64,
    pub upstream_errors: u64,
    pub rate_limited: u64,
    /// Every lease as the accounting sees it: (granted at on the service's clock, ms
    /// from then until its release was answered). A used slot counts from its grant to
    /// one window after its release, so how long workers hold leases bounds what a
    /// token can serve: `limit` slots per `W + hold`.
    pub holds_ms: Vec<(i64, i64)>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.used_at_ms.extend(other.used_at_ms);
        self.asked_at_ms.extend(other.asked_at_ms);
        self.granted_at_ms.extend(other.granted_at_ms);
        for (p, w) in other.waits_ms {
            self.waits_ms.entry(p).or_default().extend(w);
        }
        self.denied += other.denied;
        self.held_at_ms.extend(other.held_at_ms);
        self.unavailable += other.unavailable;
        self.upstream_errors += other.upstream_errors;
        self.rate_limited += other.rate_limited;
        self.holds_ms.extend(other.holds_ms);
    }

    /// Mean hold (ms, grant to answered release) of the leases granted in `[from, to)`.
    pub fn mean_hold_between(&self, from: i64, to: i64) -> f64 {
        let holds: Vec<i64> = self
            .holds_ms
            .iter()
            .filter(|(granted, _)| (from..to).contains(granted))
            .map(|(_, held)| *held)
            .collect();
        holds.iter().sum::<i64>() as f64 / holds.len().max(1) as f64
    }

    /// Upstream calls made in `[from, to)` (Unix ms).
    pub fn used_between(&self, from: i64, to: i64) -> usize {
        between(&self.used_at_ms, from, to)
    }

    /// AcquireLease calls sent in `[from, to)`, and how many of them were granted.
    pub fn asked_and_granted_between(&self, from: i64, to: i64) -> (usize, usize) {
        (
            between(&self.asked_at_ms, from, to),
            between(&self.granted_at_ms, from, to),
        )
    }

    /// The 99th percentile of the waits of the granted calls of one priority, ms (the
    /// wait at rank ceil(0.99 n)).
    pub fn p99_wait(&self, priority: pb::Priority) -> Option<u64> {
        let mut waits = self.waits_ms.get(&(priority as i32))?.clone();
        waits.sort_unstable();
        let rank = (waits.len() * 99).div_ceil(100);
        waits.get(rank.checked_sub(1)?).copied()
    }

    /// Median and mean wait of the granted calls of one priority, ms.
    pub fn waits(&self, priority: pb::Priority) -> Option<(u64, u64)> {
        let mut waits = self.waits_ms.get(&(priority as i32))?.clone();
        waits.sort_unstable();
        let mean = waits.iter().sum::<u64>() / waits.len().max(1) as u64;
        Some((*waits.get(waits.len() / 2)?, mean))
    }
}

fn between(instants: &[i64], from: i64, to: i64) -> usize {
    instants.iter().filter(|t| (from..to).contains(*t)).count()
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Runs every demand's workers for `duration` against `clients` (round robin over the
/// replicas) and returns a tally per tenant.
pub async fn run(
    clients: &[LeaseServiceClient<Channel>],
    key: &str,
    upstream: &BaseLinkerClient,
    demands: &[Demand],
    duration: Duration,
) -> HashMap<String, Tally> {
    let until = Instant::now() + duration;
    let mut tasks = vec![];
    for demand in demands {
        for i in 0..demand.workers {
            let client = clients[(tasks.len() + i) % clients.len()].clone();
            let worker = Worker {
                client,
                key: key.to_owned(),
                upstream: upstream.clone(),
                demand: demand.clone(),
                rng: StdRng::seed_from_u64(tasks.len() as u64 * 7919 + i as u64),
            };
            tasks.push(tokio::spawn(worker.run(until)));
        }
    }
    let mut tallies: HashMap<String, Tally> = HashMap::new();
    for (task, demand) in tasks.into_iter().zip(
        demands
            .iter()
            .flat_map(|d| std::iter::repeat_n(d, d.workers)),
    ) {
        tallies
            .entry(demand.tenant.clone())
            .or_default()
            .merge(task.await.unwrap());
    }
    tallies
}

struct Worker {
    client: LeaseServiceClient<Channel>,
    key: String,
    upstream: BaseLinkerClient,
    demand: Demand,
    rng: StdRng,
}

impl Worker {
    async fn run(mut self, until: Instant) -> Tally {
        let mut tally = Tally::default();
        while Instant::now() < until {
            let started = Instant::now();
            let sent_at = now_ms();
            tally.asked_at_ms.push(sent_at);
            let request = pb::AcquireLeaseRequest {
                tenant_id: self.demand.tenant.clone(),
                priority: self.demand.priority as i32,
                max_wait: Some(millis(self.demand.max_wait.as_millis() as u64)),
                ..Default::default()
            };
            let answer = match self.client.acquire_lease(authed(request, &self.key)).await {
                Ok(answer) => answer.into_inner().result.unwrap(),
                Err(status)
                    if self.demand.expect_unavailable
                        && status.code() == tonic::Code::Unavailable =>
                {
                    tally.unavailable += 1;
                    let retry = status.get_details_retry_info().and_then(|r| r.retry_delay);
                    let retry = retry
                        .unwrap_or(Duration::from_millis(50))
                        .max(Duration::from_millis(10));
                    tokio::time::sleep(retry.min(until.saturating_duration_since(Instant::now())))
                        .await;
                    continue;
                }
                Err(status) => panic!("AcquireLease: {status:?}"),
            };
            match answer {
                Answer::Lease(lease) => {
                    tally.granted_at_ms.push(sent_at);
                    tally
                        .waits_ms
                        .entry(self.demand.priority as i32)
                        .or_default()
                        .push(started.elapsed().as_millis() as u64);
                    self.use_lease(lease, &mut tally).await;
                }
                Answer::Denial(denial) => {
                    tally.denied += 1;
                    if denial.reason == pb::DenialReason::CountersRecovering as i32 {
                        tally.held_at_ms.push(now_ms());
                    }
                    let retry = denial.retry_after.map_or(50, |d| {
                        (d.seconds * 1000 + d.nanos as i64 / 1_000_000) as u64
                    });
                    tokio::time::sleep(
                        Duration::from_millis(retry.max(1))
                            .min(until.saturating_duration_since(Instant::now())),
                    )
                    .await;
                }
            }
            if let Some(pace) = self.demand.pace {
                tokio::time::sleep(pace.saturating_sub(started.elapsed())).await;
            }
        }
        tally
    }

    /// Uses the lease at a random instant of its validity, then releases it.
    async fn use_lease(&mut self, lease: pb::Lease, tally: &mut Tally) {
        let expires = lease
            .expires_at
            .map_or(now_ms(), |t| t.seconds * 1000 + t.nanos as i64 / 1_000_000);
        let granted_at = expires
            - lease
                .valid_for
                .map_or(0, |d| d.seconds * 1000 + d.nanos as i64 / 1_000_000);
        let left = (expires - now_ms()).max(0);
        let at = if self.rng.random_bool(0.25) {
            left
        } else {
            self.rng.random_range(0..=left)
        };
        tokio::time::sleep(Duration::from_millis(at as u64)).await;
        let outcome = self
            .upstream
            .call(&lease.token, "getOrderStatusList", &serde_json::json!({}))
            .await;
        let (release, blocked_until) = match outcome {
            Ok(Outcome::Success(_)) => {
                tally.used_at_ms.push(now_ms());
                (pb::ReleaseOutcome::Success, None)
            }
            Ok(Outcome::Blocked { until_unix_ms, .. }) => {
                tally.rate_limited += 1;
                (
                    pb::ReleaseOutcome::UpstreamRateLimited,
                    until_unix_ms.map(|ms| prost_types::Timestamp {
                        seconds: ms / 1000,
                        nanos: (ms % 1000) as i32 * 1_000_000,
                    }),
                )
            }
            Ok(Outcome::Error { .. }) | Ok(Outcome::UpstreamFailure(_)) | Err(_) => {
                tally.upstream_errors += 1;
                (pb::ReleaseOutcome::UpstreamError, None)
            }
        };
        let request = pb::ReleaseLeaseRequest {
            lease_id: lease.lease_id,
            outcome: release as i32,
            blocked_until,
            ..Default::default()
        };
        // A release after expiry is NOT_FOUND: the slot stays counted, which is fine.
        let _ = self.client.release_lease(authed(request, &self.key)).await;
        tally.holds_ms.push((granted_at, now_ms() - granted_at));
    }
}
