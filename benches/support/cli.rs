//! The command line: which sections to run, on which configurations, for how long.

use std::fmt;

use clap::{Parser, ValueEnum};

/// Where the server under test keeps its lease counters. All keep the configuration in
/// a SQLite file in a fresh data folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// `REDIS_URL` set, with a key prefix unique to the run.
    Redis,
    /// No `REDIS_URL`: counters in the server's memory.
    Embedded,
    /// A throwaway three-master Redis Cluster started for the configuration (and removed
    /// after it); `REDIS_URL` lists its masters.
    Cluster,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Mode::Redis => "redis",
            Mode::Embedded => "embedded",
            Mode::Cluster => "cluster",
        })
    }
}

/// What the limits let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Limits {
    /// 1,000,000 per window per token: nothing is denied, the decision path is measured.
    Decision,
    /// 100 per window per token (95 usable), pacing off: after a warm-up that takes every
    /// slot, every AcquireLease is denied with an exact retry-after.
    Saturated,
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Limits::Decision => "decision",
            Limits::Saturated => "saturated",
        })
    }
}

/// AcquireLease + ReleaseLease load against `tokenlease serve` in its own process.
#[derive(Debug, Parser)]
#[command(name = "lease_pairs")]
pub struct Args {
    /// Counter backends, comma-separated [default per section: table redis,embedded;
    /// latency check and open loop redis; steady embedded]. `cluster` starts a
    /// throwaway three-master Redis Cluster (redis-server and redis-cli on the PATH) per
    /// configuration and prints which master serves which pool.
    #[arg(long, value_delimiter = ',')]
    pub mode: Vec<Mode>,
    /// Tokens of the upstream, comma-separated [default 100], split evenly over its
    /// pools.
    #[arg(long, value_delimiter = ',')]
    pub tokens: Vec<usize>,
    /// Pools of the upstream, comma-separated [default 1]: the tokens split evenly, the
    /// tenants spread round-robin. On a cluster the pool ids are chosen so that their
    /// counters spaces fall on the masters as evenly as possible (3 pools: one each).
    #[arg(long, value_delimiter = ',')]
    pub pools: Vec<usize>,
    /// Tenants, comma-separated [default 1000; 200 for the latency check].
    #[arg(long, value_delimiter = ',')]
    pub tenants: Vec<usize>,
    /// Seconds per measured run.
    #[arg(long, default_value_t = 15)]
    pub secs: u64,
    /// Measured runs per configuration: the table shows their median and range.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Seconds of load before the first measured run of each server.
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
    /// Limits of the upstream.
    #[arg(long, value_enum, default_value_t = Limits::Decision)]
    pub limits: Limits,
    /// The full table: redis and embedded × 10/100/1000 tokens × 1000/10000 tenants.
    #[arg(long)]
    pub sweep: bool,
    /// Closed loop with 1, 4 and 16 calls in flight (AcquireLease latency, e.g. Nagle).
    #[arg(long)]
    pub latency_check: bool,
    /// Open loop: pairs started on a fixed schedule of `--rate` per second.
    #[arg(long)]
    pub open_loop: bool,
    /// Open loop rate, pairs per second (implies --open-loop).
    #[arg(long)]
    pub rate: Option<u32>,
    /// Steady-state check: run this many seconds, one row per 15 s slice.
    #[arg(long)]
    pub steady: Option<u64>,
    /// Every section: --sweep, --latency-check, --open-loop and --steady 120.
    #[arg(long)]
    pub all: bool,
    /// Calls in flight in the table's closed loop.
    #[arg(long, default_value_t = 64)]
    pub in_flight: usize,
    /// HTTP/2 connections the calls are spread over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Admin calls in flight while creating tokens and tenants.
    #[arg(long, default_value_t = 64)]
    pub admin_in_flight: usize,
    /// In --sweep/--all, give up a configuration whose setup takes longer than this
    /// (an explicit --tenants always runs to the end).
    #[arg(long, default_value_t = 300)]
    pub max_setup_secs: u64,
    /// The server binary to measure instead of the one `cargo bench` built with this
    /// bench (e.g. another commit's `target/release/tokenlease`, to compare two builds
    /// in one sitting with one load generator). It must take the same `serve`
    /// environment and admin API.
    #[arg(long)]
    pub server: Option<std::path::PathBuf>,
    /// Passed by `cargo bench`; without it the binary only prints how to run it.
    #[arg(long, hide = true)]
    pub bench: bool,
}

/// One server to start and set up: the counters, the pools, the tenants, the limits.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub mode: Mode,
    /// Tokens in all, split evenly over the pools.
    pub tokens: usize,
    pub tenants: usize,
    /// Pools of the one upstream (at least 1).
    pub pools: usize,
    pub limits: Limits,
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<8} {:>4} tok {:>5} ten {:>2} pl",
            self.mode, self.tokens, self.tenants, self.pools
        )
    }
}

/// A way of sending load to a server.
#[derive(Debug, Clone, Copy)]
pub enum Workload {
    /// `in_flight` callers, each starting its next pair when the last one ends.
    Closed {
        in_flight: usize,
        connections: usize,
    },
    /// Pairs started every 1/rate s whatever the answers, over `connections`.
    Open { rate: u32, connections: usize },
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Workload::Closed {
                in_flight,
                connections,
            } => write!(f, "closed {in_flight}/{connections}c"),
            Workload::Open { rate, connections } => write!(f, "open {rate}/s/{connections}c"),
        }
    }
}

impl Workload {
    pub fn connections(&self) -> usize {
        match *self {
            Workload::Closed { connections, .. } | Workload::Open { connections, .. } => {
                connections
            }
        }
    }
}

/// What one section measures on each of its configurations.
pub struct Section {
    pub title: String,
    pub configs: Vec<Config>,
    pub workloads: Vec<Workload>,
    /// Measured runs per workload, each `secs` long.
    pub runs: usize,
    pub secs: u64,
    /// One row per run (steady state) instead of the median of the runs.
    pub row_per_run: bool,
}

const STEADY_SLICE_SECS: u64 = 15;

impl Args {
    /// The sections asked for, in the order they run. The table runs when asked
    /// (--sweep, --all) or when no other section is.
    pub fn sections(&self) -> Vec<Section> {
        let open_loop = self.all || self.open_loop || self.rate.is_some();
        let steady = self.steady.or(self.all.then_some(120));
        let others = self.latency_check || open_loop || steady.is_some();
        let mut sections = vec![];
        if self.sweep || self.all || !others {
            sections.push(self.table());
        }
        if self.all || self.latency_check {
            sections.push(self.latency_section());
        }
        if open_loop {
            sections.push(self.open_loop_section());
        }
        if let Some(secs) = steady {
            sections.push(self.steady_section(secs));
        }
        sections
    }

    fn table(&self) -> Section {
        let full = self.sweep || self.all;
        let configs = if full {
            self.configs(
                &[Mode::Redis, Mode::Embedded],
                &[10, 100, 1000],
                &[1000, 10_000],
            )
        } else {
            self.configs(&[Mode::Redis, Mode::Embedded], &[100], &[1000])
        };
        self.section("closed loop", configs, vec![self.closed(self.in_flight)])
    }

    fn latency_section(&self) -> Section {
        let configs = self.configs(&[Mode::Redis], &[100], &[200]);
        let workloads = [1, 4, 16].map(|n| self.closed(n)).to_vec();
        self.section(
            "AcquireLease latency by calls in flight",
            configs,
            workloads,
        )
    }

    fn open_loop_section(&self) -> Section {
        let rate = self.rate.unwrap_or(2_000);
        let configs = self.configs(&[Mode::Redis], &[100], &[1000]);
        let workload = Workload::Open {
            rate,
            connections: self.connections,
        };
        let title = "open loop (latency from each pair's scheduled start)";
        self.section(title, configs, vec![workload])
    }

    fn steady_section(&self, secs: u64) -> Section {
        let configs = self.configs(&[Mode::Embedded], &[100], &[1000]);
        let mut section = self.section("steady state", configs, vec![self.closed(self.in_flight)]);
        section.secs = STEADY_SLICE_SECS.min(secs);
        section.runs = (secs / section.secs).max(1) as usize;
        section.row_per_run = true;
        section
    }

    fn section(&self, title: &str, configs: Vec<Config>, workloads: Vec<Workload>) -> Section {
        Section {
            title: title.into(),
            configs,
            workloads,
            runs: self.runs.max(1),
            secs: self.secs.max(1),
            row_per_run: false,
        }
    }

    fn closed(&self, in_flight: usize) -> Workload {
        Workload::Closed {
            in_flight,
            connections: self.connections.clamp(1, in_flight),
        }
    }

    /// Every combination of the given modes, tokens and tenants (and of the command
    /// line's pools, default 1), each replaced by the command line's list when it gives
    /// one; fewest tenants first, so the cheap setups (and the setup rate they measure)
    /// come before the long ones.
    fn configs(&self, modes: &[Mode], tokens: &[usize], tenants: &[usize]) -> Vec<Config> {
        let pick = |given: &[usize], default: &[usize]| {
            if given.is_empty() {
                default.to_vec()
            } else {
                given.to_vec()
            }
        };
        let modes = if self.mode.is_empty() {
            modes
        } else {
            &self.mode
        };
        let mut configs = vec![];
        for tenants in pick(&self.tenants, tenants) {
            for &mode in modes {
                for &tokens in &pick(&self.tokens, tokens) {
                    for pools in pick(&self.pools, &[1]) {
                        configs.push(Config {
                            mode,
                            tokens,
                            tenants,
                            pools: pools.max(1),
                            limits: self.limits,
                        });
                    }
                }
            }
        }
        configs
    }

    /// How long a configuration's setup may take before it is given up: only in the
    /// full sweep, and only when the tenant count was not asked for by name.
    pub fn setup_budget_secs(&self) -> Option<u64> {
        ((self.sweep || self.all) && self.tenants.is_empty()).then_some(self.max_setup_secs)
    }
}
