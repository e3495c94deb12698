//! What a run costs, read just before and just after it: the CPU time of the server's
//! and of Redis's processes (utime + stime in /proc/PID/stat, all threads), the server's
//! resident memory (VmRSS in /proc/PID/status) and the commands Redis ran
//! (`INFO commandstats`). Redis is whole-server: anything else using the same Redis
//! during a run is counted too.

use std::collections::BTreeMap;

use redis::aio::MultiplexedConnection;

/// Clock ticks per second of /proc/PID/stat (`sysconf(_SC_CLK_TCK)`, USER_HZ): 100 on
/// every Linux architecture the bench runs on; a constant saves a libc dependency.
const CLOCK_TICKS_PER_SEC: u64 = 100;

/// Redis commands by name (`evalsha`, `info`, …) → calls.
pub type Commands = BTreeMap<String, u64>;

/// Reads the server's process, and Redis when the server uses it.
pub struct Probe {
    server_pid: u32,
    redis: Option<RedisProbe>,
}

struct RedisProbe {
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
    redis_cpu_us: Option<u64>,
    commands: Option<Commands>,
    /// INFO calls sent before this snapshot's: Redis counts a command after running it,
    /// so each snapshot's counts include every earlier INFO but not its own.
    info_calls_before: u64,
}

/// What happened between two snapshots.
pub struct Cost {
    pub server_cpu_us: u64,
    pub redis_cpu_us: Option<u64>,
    /// Calls per command, the probe's own INFO calls taken out; `None` without Redis.
    pub redis_commands: Option<Commands>,
    /// The server's resident memory at the end.
    pub server_rss_kib: Option<u64>,
}

impl Probe {
    /// A probe of the server `server_pid`, and of the Redis at `redis_url` if given.
    pub async fn new(server_pid: u32, redis_url: Option<&str>) -> Probe {
        let redis = match redis_url {
            Some(url) => Some(RedisProbe::connect(url).await),
            None => None,
        };
        Probe { server_pid, redis }
    }

    pub async fn snapshot(&mut self) -> Snapshot {
        let server_cpu_us = cpu_us(self.server_pid).expect("the server's /proc/PID/stat");
        let Some(redis) = &mut self.redis else {
            return Snapshot {
                server_cpu_us,
                redis_cpu_us: None,
                commands: None,
                info_calls_before: 0,
            };
        };
        let info_calls_before = redis.info_calls;
        let commands = redis.commandstats().await;
        Snapshot {
            server_cpu_us,
            redis_cpu_us: cpu_us(redis.pid),
            commands: Some(commands),
            info_calls_before,
        }
    }

    /// The cost from `before` to `after`, and the server's memory now.
    pub fn cost(&self, before: &Snapshot, after: &Snapshot) -> Cost {
        let own_info_calls = after.info_calls_before - before.info_calls_before;
        let redis_commands = match (&before.commands, &after.commands) {
            (Some(before), Some(after)) => Some(command_delta(before, after, own_info_calls)),
            _ => None,
        };
        Cost {
            server_cpu_us: after.server_cpu_us - before.server_cpu_us,
            redis_cpu_us: after
                .redis_cpu_us
                .zip(before.redis_cpu_us)
                .map(|(a, b)| a - b),
            redis_commands,
            server_rss_kib: rss_kib(self.server_pid),
        }
    }
}

impl RedisProbe {
    async fn connect(url: &str) -> RedisProbe {
        let client = redis::Client::open(url).expect("a valid REDIS_URL");
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
