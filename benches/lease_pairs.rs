//! AcquireLease + ReleaseLease over real gRPC against `tokenlease serve` in its own
//! process, with what each pair costs. Not a test: it prints tables.
//!
//! ```sh
//! cargo bench --bench lease_pairs                       # redis and embedded, 100 tokens, 1,000 tenants
//! cargo bench --bench lease_pairs -- --mode redis --tokens 100 --tenants 1000 --secs 15 --runs 3
//! cargo bench --bench lease_pairs -- --sweep            # 2 modes × 10/100/1,000 tokens × 1,000/10,000 tenants
//! cargo bench --bench lease_pairs -- --latency-check    # 1, 4, 16 calls in flight
//! cargo bench --bench lease_pairs -- --rate 2000        # open loop
//! cargo bench --bench lease_pairs -- --steady 120       # embedded, one row per 15 s
//! cargo bench --bench lease_pairs -- --all              # all of the above
//! cargo bench --bench lease_pairs -- --mode cluster,redis --pools 1,3   # pools over masters
//! cargo bench --bench lease_pairs -- --server ../old/target/release/tokenlease   # another build
//! ```
//!
//! **What runs.** `cargo bench` builds the release binary; each configuration starts
//! `target/release/tokenlease serve` in a fresh data folder (configuration in SQLite),
//! with lease counters in Redis (`REDIS_URL`, default the local one, under a key prefix
//! unique to the run, deleted afterwards), on a Redis Cluster (`cluster`) or in the
//! server's memory (embedded), creates one upstream, `--pools` P pools (default 1)
//! sharing its N tokens evenly, and M tenants spread round-robin over the pools through
//! the admin API (bounded concurrency; the time it takes is printed), warms up once, and
//! measures its runs back to back on the same server. Each pair is
//! AcquireLease for a random tenant then, when granted, ReleaseLease(SUCCESS). The
//! limits are so high that nothing is denied (the decision path), unless
//! `--limits saturated`.
//!
//! **Cluster mode.** Each configuration starts its own three-master Redis Cluster
//! (`redis-server --cluster-enabled yes` × 3 on free ports in a temporary folder,
//! `redis-cli --cluster create … --cluster-replicas 0`, until `cluster_state:ok`: the
//! tests' `throwaway_cluster.rs`, included by path) and kills it and removes its folder
//! after the server stops; `REDIS_URL` is the masters' URLs, comma-separated. A pool's
//! counters live under the hash tag `{bench.<pool>}`, so the bench chooses pool ids
//! (`p0`, `p1`, … tried in order, `CLUSTER KEYSLOT` and the slot map) that put each
//! pool on the master holding the fewest so far, 3 pools on 3 masters, and prints which
//! master serves which pool. The Redis columns sum every master's CPU (its
//! /proc/PID/stat) and commands (its `INFO commandstats`), and a line below each row
//! gives each master's µs and commands per pair and its share of the CPU.
//!
//! **Why its own process.** So that the server's CPU time can be read from /proc and
//! divided by the pairs done: throughput on a shared 2-core machine says little alone
//! (the server, Redis and this load generator compete for the cores), but CPU µs per
//! pair, Redis CPU µs and commands per pair say where the work goes and what a
//! change saved, whatever else the machine was doing.
//!
//! **Closed and open loop.** The closed loop (64 callers over 4 HTTP/2 connections by
//! default) finds the throughput; with 1, 4 and 16 callers it shows the latency of an
//! unloaded service (a 40 ms tail there is Nagle's algorithm meeting delayed ACKs). The
//! open loop starts pairs on a fixed schedule (kept by a thread of its own, not Tokio's
//! millisecond timer) and counts latency from each scheduled start, so queueing behind
//! a slow answer is measured, not hidden. The steady check
//! runs one configuration long and compares the first and last 15 s.
//!
//! Columns (medians of `--runs`, range below): pairs/s; AcquireLease p50/p99 and the
//! pair's p99, ms; the server's CPU (utime + stime, all threads) µs per pair; Redis's
//! CPU µs per pair and commands per pair (`INFO commandstats`, the bench's own INFO
//! calls taken out, the commands Lua scripts run counted in; whole-server, so anything
//! else using that Redis counts too; on a cluster, summed over the masters) and
//! scripts per pair (EVAL/EVALSHA/FCALL: the server's round trips to Redis); the
//! server's VmRSS at the end of the run; the share of AcquireLease denied; the three
//! Redis commands run most per pair. With `--limits saturated` a "pair" is a denied
//! AcquireLease alone. `TOKENLEASE_*` variables reach the server.

mod support;

use std::time::{Duration, Instant};

use clap::Parser;
use support::backend::Backend;
use support::cli::{Args, Config, Limits, Section, Workload};
use support::load::Load;
use support::probe::Probe;
use support::report::{self, Measured};
use support::server::Server;
use support::setup;

/// A saturated warm-up ends when this share of a second's calls is denied…
const SATURATED_DENIED_SHARE: f64 = 0.99;
/// …or after this long.
const SATURATED_WARM_UP_MAX: Duration = Duration::from_secs(180);

fn main() {
    let args = Args::parse();
    // `cargo bench` passes --bench; anything else (e.g. a build of every target) only
    // learns how to run it.
    if !args.bench {
        println!("lease_pairs: run with `cargo bench --bench lease_pairs -- --help`");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    println!(
        "lease_pairs: {} core(s) shared by the server, Redis and this load generator",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for section in args.sections() {
        runtime.block_on(run_section(&args, &section));
    }
}

async fn run_section(args: &Args, section: &Section) {
    println!(
        "\n== {}: {} run(s) of {} s per row, {} limits ==",
        section.title, section.runs, section.secs, args.limits
    );
    report::print_header();
    // Setup time grows with the tenants (not with the mode or the tokens): once one
    // ran out of its budget, as many tenants or more would too.
    let mut too_many_tenants = usize::MAX;
    for config in &section.configs {
        if config.tenants >= too_many_tenants {
            println!(
                "# {config}: skipped: the setup of {too_many_tenants} tenants ran out of time above"
            );
            continue;
        }
        match start(args, config).await {
            Some(running) => run_config(args, section, config, running).await,
            None => too_many_tenants = config.tenants,
        }
    }
}

/// A configuration's server, its probe and where its counters live. Fields drop in
/// this order: the server stops (and deletes its keys in a shared Redis) before a
/// throwaway cluster is killed.
struct Running {
    server: Server,
    probe: Probe,
    _backend: Backend,
}

/// Warms the server up, then measures each of the section's workloads and prints it.
async fn run_config(args: &Args, section: &Section, config: &Config, running: Running) {
    let Running {
        mut server,
        mut probe,
        _backend,
    } = running;
    warm_up(&server, config, args).await;
    for &workload in &section.workloads {
        let runs = measure(&mut server, &mut probe, config, workload, section).await;
        if section.row_per_run {
            print_steady_ratio(&runs);
        } else {
            report::print_row(&format!("{config} {workload}"), &runs);
        }
    }
}

/// Starts the counters' backend (a cluster, for `cluster`) and the server and creates
/// the configuration; `None` (server stopped) when the setup ran out of its budget.
async fn start(args: &Args, config: &Config) -> Option<Running> {
    let (backend, pools) = Backend::start(config.mode, setup::UPSTREAM, config.pools).await;
    for line in backend.describe(setup::UPSTREAM, &pools) {
        println!("# {config}: {line}");
    }
    let server = Server::start(&backend, config.limits, args.server.as_deref()).await;
    let budget = args.setup_budget_secs().map(Duration::from_secs);
    let pool_ids: Vec<String> = pools.iter().map(|p| p.id.clone()).collect();
    let setup = setup::create(&server, config, &pool_ids, args.admin_in_flight, budget).await;
    println!(
        "# {config}: setup {:.1} s for {} tokens, {:.1} s for {} tenants ({:.0} tenants/s, {} admin calls in flight, {} retried)",
        setup.tokens_took.as_secs_f64(),
        config.tokens,
        setup.tenants_took.as_secs_f64(),
        setup.tenants_created,
        setup.tenants_per_sec(),
        args.admin_in_flight,
        setup.retries,
    );
    if setup.tenants_created < config.tenants {
        let estimate = config.tenants as f64 / setup.tenants_per_sec();
        println!(
            "# {config}: skipped: setup gave up after {} s (all {} tenants would take ≥ {estimate:.0} s); `--tenants {}` runs it to the end",
            args.max_setup_secs, config.tenants, config.tenants
        );
        return None;
    }
    let probe = Probe::new(server.pid, &backend.nodes(&pools)).await;
    Some(Running {
        server,
        probe,
        _backend: backend,
    })
}

/// Load before measuring: `--warmup` seconds, or for saturated limits until nearly
/// every call is denied (the slots of every token taken).
async fn warm_up(server: &Server, config: &Config, args: &Args) {
    let workload = Workload::Closed {
        in_flight: args.in_flight,
        connections: args.connections,
    };
    let load = Load::connect(server, args.connections, config.tenants).await;
    if config.limits == Limits::Decision {
        load.run(workload, Duration::from_secs(args.warmup), 0)
            .await;
        return;
    }
    let started = Instant::now();
    while started.elapsed() < SATURATED_WARM_UP_MAX {
        let second = load.run(workload, Duration::from_secs(1), 0).await;
        if second.denials as f64 >= SATURATED_DENIED_SHARE * second.pairs as f64 {
            break;
        }
    }
    println!(
        "# {config}: saturated after {:.0} s of warm-up",
        started.elapsed().as_secs_f64()
    );
}

/// The section's runs of `workload`, each between two probe snapshots; with
/// `row_per_run`, each run is printed as it ends.
async fn measure(
    server: &mut Server,
    probe: &mut Probe,
    config: &Config,
    workload: Workload,
    section: &Section,
) -> Vec<Measured> {
    let load = Load::connect(server, workload.connections(), config.tenants).await;
    let secs = Duration::from_secs(section.secs);
    let mut runs = vec![];
    for run in 0..section.runs {
        let before = probe.snapshot().await;
        let tally = load.run(workload, secs, run as u64 + 1).await;
        let after = probe.snapshot().await;
        server.check_alive();
        runs.push(Measured::new(tally, probe.cost(&before, &after)));
        if section.row_per_run {
            let (from, to) = (run as u64 * section.secs, (run as u64 + 1) * section.secs);
            let label = format!("{config} {from:>4}–{to} s");
            report::print_row(&label, &runs[run..]);
        }
    }
    runs
}

fn print_steady_ratio(runs: &[Measured]) {
    if let (Some(first), Some(last)) = (runs.first(), runs.last()) {
        println!(
            "# steady state: pairs/s of the last slice / the first: {:.2}",
            last.pairs_per_sec() / first.pairs_per_sec()
        );
    }
}
