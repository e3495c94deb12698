//! Where one configuration's lease counters live while it runs, and the ids of its
//! pools: the server's memory (embedded), the Redis of `REDIS_URL`, or a throwaway
//! three-master Redis Cluster started for the configuration and removed after it.
//!
//! On the cluster the pool ids are chosen, not given: a pool's counters live under the
//! hash tag `{<upstream>.<pool>}`, so its id decides its slot and so its master. Ids
//! `p0`, `p1`, … are tried in order and each pool takes the first one whose slot is
//! served by the master holding the fewest pools so far (ties: the lowest port), so
//! 3 pools land on 3 masters (what the cluster run is meant to show).

use std::fmt::Write as _;

use super::cli::Mode;
use super::throwaway_cluster::ThrowawayCluster;

/// How many candidate ids to try for one pool before giving up on an empty master (the
/// 16,384 slots are split in thirds, so about one id in three fits).
const MAX_CANDIDATES: usize = 10_000;

/// A Redis server the probes read: a single Redis, or one master of the cluster.
#[derive(Debug, Clone)]
pub struct RedisNode {
    pub url: String,
    /// How the per-master line names it: its port and the pools it serves.
    pub label: String,
}

/// One pool of the upstream.
#[derive(Debug, Clone)]
pub struct Pool {
    pub id: String,
    /// The port of the cluster master serving its counters space; `None` off a cluster.
    pub master: Option<u16>,
}

/// The counters' home for one configuration; a cluster is killed and its folder
/// removed when this drops (after the server, which the caller drops first).
pub enum Backend {
    Embedded,
    /// `REDIS_URL`, shared with anything else using it: the server's keys are deleted
    /// after the run.
    Redis {
        url: String,
    },
    Cluster(ThrowawayCluster),
}

impl Backend {
    /// Starts what `mode` needs (a cluster: ~1 s) and chooses the ids of `pools` pools
    /// of `upstream`.
    pub async fn start(mode: Mode, upstream: &str, pools: usize) -> (Backend, Vec<Pool>) {
        let plain = |count: usize| -> Vec<Pool> {
            (0..count)
                .map(|i| Pool {
                    id: format!("p{i}"),
                    master: None,
                })
                .collect()
        };
        match mode {
            Mode::Embedded => (Backend::Embedded, plain(pools)),
            Mode::Redis => (Backend::Redis { url: redis_url() }, plain(pools)),
            Mode::Cluster => {
                let upstream = upstream.to_owned();
                // Starting and asking the cluster are blocking calls (std processes and
                // a synchronous Redis connection): off the runtime's threads.
                tokio::task::spawn_blocking(move || {
                    let cluster = ThrowawayCluster::start();
                    let pools = spread_over_masters(&cluster, &upstream, pools);
                    (Backend::Cluster(cluster), pools)
                })
                .await
                .expect("the cluster start task")
            }
        }
    }

    /// The server's `REDIS_URL`: one URL, or the masters' comma-separated.
    pub fn server_url(&self) -> Option<String> {
        match self {
            Backend::Embedded => None,
            Backend::Redis { url } => Some(url.clone()),
            Backend::Cluster(cluster) => Some(cluster.url_list()),
        }
    }

    /// The Redis whose keys the server must delete after its run: only a shared one.
    pub fn shared_url(&self) -> Option<&str> {
        match self {
            Backend::Redis { url } => Some(url),
            _ => None,
        }
    }

    /// The Redis servers to probe, each labelled with the pools it serves.
    pub fn nodes(&self, pools: &[Pool]) -> Vec<RedisNode> {
        match self {
            Backend::Embedded => vec![],
            Backend::Redis { url } => vec![RedisNode {
                url: url.clone(),
                label: "redis".into(),
            }],
            Backend::Cluster(cluster) => cluster
                .ports()
                .into_iter()
                .map(|port| {
                    let served: Vec<&str> = pools
                        .iter()
                        .filter(|p| p.master == Some(port))
                        .map(|p| p.id.as_str())
                        .collect();
                    let mut label = format!(":{port}");
                    if !served.is_empty() {
                        let _ = write!(label, " ({})", served.join(","));
                    }
                    RedisNode {
                        url: format!("redis://127.0.0.1:{port}"),
                        label,
                    }
                })
                .collect(),
        }
    }

    /// One line per master: its slots and the pools it serves (cluster only).
    pub fn describe(&self, upstream: &str, pools: &[Pool]) -> Vec<String> {
        let Backend::Cluster(cluster) = self else {
            return vec![];
        };
        let ranges = cluster.slot_ranges();
        cluster
            .ports()
            .into_iter()
            .map(|port| {
                let slots: Vec<String> = ranges
                    .iter()
                    .filter(|r| r.port == port)
                    .map(|r| format!("{}–{}", r.start, r.end))
                    .collect();
                let served: Vec<String> = pools
                    .iter()
                    .filter(|p| p.master == Some(port))
                    .map(|p| format!("{{{upstream}.{}}}", p.id))
                    .collect();
                let served = if served.is_empty() {
                    "no pool".to_owned()
                } else {
                    served.join(", ")
                };
                format!(
                    "master 127.0.0.1:{port} (slots {}): {served}",
                    slots.join(",")
                )
            })
            .collect()
    }
}

/// The Redis of Redis mode: `REDIS_URL` or the local one.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// `count` pool ids of `upstream`, each on the master that holds the fewest so far
/// (ties: the lowest port), with the master it landed on.
fn spread_over_masters(cluster: &ThrowawayCluster, upstream: &str, count: usize) -> Vec<Pool> {
    let mut masters = cluster.ports();
    masters.sort_unstable();
    let master_of = |id: &str| cluster.owner_of(&format!("{{{upstream}.{id}}}"));
    let mut pools: Vec<Pool> = Vec::with_capacity(count);
    let mut candidates = (0..MAX_CANDIDATES).map(|i| format!("p{i}"));
    for _ in 0..count {
        let held = |port: &u16| pools.iter().filter(|p| p.master == Some(*port)).count();
        let emptiest = *masters
            .iter()
            .min_by_key(|port| held(port))
            .expect("masters");
        let id = candidates
            .by_ref()
            .find(|id| master_of(id) == emptiest)
            .unwrap_or_else(|| panic!("no pool id of {MAX_CANDIDATES} hashes to :{emptiest}"));
        pools.push(Pool {
            id,
            master: Some(emptiest),
        });
    }
    pools
}
