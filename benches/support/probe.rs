//! What a run costs, read just before and just after it: the CPU time of the server's
//! and of Redis's processes (utime + stime in /proc/PID/stat, all threads), the server's
//! resident memory (VmRSS in /proc/PID/status) and the commands Redis ran
//! (`INFO commandstats`). On a cluster every master is read and the totals are their
//! sums, with each master's share kept for the per-master line. Redis is whole-server:
//! anything else using the same Redis during a run is counted too.

use std::collections::BTreeMap;

use redis::aio::MultiplexedConnection;

use super::backend::RedisNode;

/// Clock ticks per second of /proc/PID/stat (`sysconf(_SC_CLK_TCK)`, USER_HZ): 100 on
/// every Linux architecture the bench runs on; a constant saves a libc dependency.
const CLOCK_TICKS_PER_SEC: u64 = 100;

/// Redis commands by name (`evalsha`, `info`, …) → calls.
pub type Commands = BTreeMap<String, u64>;

/// Reads the server's process, and each Redis server (one, or a cluster's masters)
/// when the server uses Redis.
pub struct Probe {
    server_pid: u32,
    redis: Vec<RedisProbe>,
}

struct RedisProbe {
    label: String,
    /// A plain connection to this one server (on a cluster: node-local INFO).
    conn: MultiplexedConnection,
    /// The redis-server process (`INFO server` process_id); its /proc is readable
    /// only when it runs on this machine.
    pid: u32,
    /// INFO calls this probe has sent, to take out of the command counts.
    info_calls: u64,
}

/// The counters at one instant.
pub struct Snapshot {
    server_cpu_us: u64,
    /// One per Redis server, in the probe's order.
    redis: Vec<RedisSnapshot>,
}

struct RedisSnapshot {
    cpu_us: Option<u64>,
    commands: Commands,
    /// INFO calls sent before this snapshot's: Redis counts a command after running it,
    /// so each snapshot's counts include every earlier INFO but not its own.
    info_calls_before: u64,
}

/// What happened between two snapshots.
pub struct Cost {
    pub server_cpu_us: u64,
    /// Summed over the Redis servers; `None` without Redis or when a server's /proc
    /// could not be read.
    pub redis_cpu_us: Option<u64>,
    /// Calls per command summed over the Redis servers, the probe's own INFO calls
    /// taken out; `None` without Redis.
    pub redis_commands: Option<Commands>,
    /// Each Redis server's share, in the probe's order (one entry for a single Redis).
    pub redis_nodes: Vec<NodeCost>,
    /// The server's resident memory at the end.
    pub server_rss_kib: Option<u64>,
}

/// One Redis server's share of a run.
pub struct NodeCost {
    pub label: String,
    pub cpu_us: Option<u64>,
    /// Every command it ran (scripts' own commands included), without the probe's INFO.
    pub commands: u64,
}

impl Probe {
    /// A probe of the server `server_pid`, and of the Redis servers `nodes`.
    pub async fn new(server_pid: u32, nodes: &[RedisNode]) -> Probe {
        let mut redis = vec![];
        for node in nodes {
            redis.push(RedisProbe::connect(node).await);
        }
        Probe { server_pid, redis }
    }

    pub async fn snapshot(&mut self) -> Snapshot {
        let server_cpu_us = cpu_us(self.server_pid).expect("the server's /proc/PID/stat");
        let mut redis = vec![];
        for node in &mut self.redis {
            let info_calls_before = node.info_calls;
            let commands = node.commandstats().await;
            redis.push(RedisSnapshot {
                cpu_us: cpu_us(node.pid),
                commands,
                info_calls_before,
            });
        }
        Snapshot {
            server_cpu_us,
            redis,
        }
    }

    /// The cost from `before` to `after`, and the server's memory now.
    pub fn cost(&self, before: &Snapshot, after: &Snapshot) -> Cost {
        let mut redis_nodes = vec![];
        let mut total_commands = Commands::new();
        let mut total_cpu_us = Some(0);
        for ((node, before), after) in self.redis.iter().zip(&before.redis).zip(&after.redis) {
            let own_info_calls = after.info_calls_before - before.info_calls_before;
            let commands = command_delta(&before.commands, &after.commands, own_info_calls);
            let cpu_us = after.cpu_us.zip(before.cpu_us).map(|(a, b)| a - b);
            total_cpu_us = total_cpu_us.zip(cpu_us).map(|(sum, us)| sum + us);
            for (name, calls) in &commands {
                *total_commands.entry(name.clone()).or_default() += calls;
            }
            redis_nodes.push(NodeCost {
                label: node.label.clone(),
                cpu_us,
                commands: commands.values().sum(),
            });
        }
        let with_redis = !self.redis.is_empty();
        Cost {
            server_cpu_us: after.server_cpu_us - before.server_cpu_us,
            redis_cpu_us: total_cpu_us.filter(|_| with_redis),
            redis_commands: with_redis.then_some(total_commands),
            redis_nodes,
            server_rss_kib: rss_kib(self.server_pid),
        }
    }
}

impl RedisProbe {
    async fn connect(node: &RedisNode) -> RedisProbe {
        let client = redis::Client::open(node.url.as_str()).expect("a valid Redis URL");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("a Redis connection for the probes");
        let server: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .expect("INFO server");
        let pid = info_field(&server, "process_id")
            .and_then(|pid| pid.parse().ok())
            .expect("process_id in INFO server");
        RedisProbe {
            label: node.label.clone(),
            conn,
            pid,
            info_calls: 1,
        }
    }

    async fn commandstats(&mut self) -> Commands {
        self.info_calls += 1;
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.conn)
            .await
            .expect("INFO commandstats");
        parse_commandstats(&stats)
    }
}

/// `after − before` per command, without the probe's own INFO calls and without the
/// commands that did not run.
fn command_delta(before: &Commands, after: &Commands, own_info_calls: u64) -> Commands {
    let mut delta: Commands = after
        .iter()
        .map(|(name, calls)| (name.clone(), calls - before.get(name).copied().unwrap_or(0)))
        .collect();
    if let Some(info) = delta.get_mut("info") {
        *info = info.saturating_sub(own_info_calls);
    }
    delta.retain(|_, calls| *calls > 0);
    delta
}

/// `cmdstat_evalsha:calls=12,usec=…` lines → {"evalsha": 12}.
fn parse_commandstats(stats: &str) -> Commands {
    stats
        .lines()
        .filter_map(|line| line.strip_prefix("cmdstat_"))
        .filter_map(|line| {
            let (name, fields) = line.split_once(':')?;
            let calls = fields.split(',').find_map(|f| f.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.trim().parse().ok()?))
        })
        .collect()
}

fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// User + system CPU time of process `pid`, all its threads, in µs.
fn cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its ')'. Field 3
    // (state) is then the first; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some((utime + stime) * 1_000_000 / CLOCK_TICKS_PER_SEC)
}

/// VmRSS of process `pid`, KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    line.trim().trim_end_matches("kB").trim().parse().ok()
}
