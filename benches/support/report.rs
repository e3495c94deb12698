//! Runs as table rows: each column is one number per run, shown as the median of the
//! runs with their range (min–max) on the line below.

use super::load::Tally;
use super::probe::{Commands, Cost};

/// One measured run: what the load saw and what it cost.
pub struct Measured {
    pub tally: Tally,
    pub cost: Cost,
}

impl Measured {
    /// Sorts the latencies, for the percentiles.
    pub fn new(mut tally: Tally, cost: Cost) -> Measured {
        tally.acquire_us.sort_unstable();
        tally.pair_us.sort_unstable();
        Measured { tally, cost }
    }

    pub fn pairs_per_sec(&self) -> f64 {
        self.tally.pairs as f64 / self.tally.elapsed.as_secs_f64()
    }

    fn per_pair(&self, total: Option<u64>) -> Option<f64> {
        let pairs = self.tally.pairs;
        total.filter(|_| pairs > 0).map(|t| t as f64 / pairs as f64)
    }
}

struct Column {
    header: &'static str,
    decimals: usize,
    value: fn(&Measured) -> Option<f64>,
}

/// The table's columns, in order. Latencies in ms; CPU in µs of CPU time per pair.
const COLUMNS: &[Column] = &[
    Column {
        header: "pairs/s",
        decimals: 0,
        value: |m| Some(m.pairs_per_sec()),
    },
    Column {
        header: "acq p50 ms",
        decimals: 2,
        value: |m| percentile_ms(&m.tally.acquire_us, 0.50),
    },
    Column {
        header: "acq p99 ms",
        decimals: 2,
        value: |m| percentile_ms(&m.tally.acquire_us, 0.99),
    },
    Column {
        header: "pair p99 ms",
        decimals: 2,
        value: |m| percentile_ms(&m.tally.pair_us, 0.99),
    },
    Column {
        header: "srv µs/pair",
        decimals: 0,
        value: |m| m.per_pair(Some(m.cost.server_cpu_us)),
    },
    Column {
        header: "redis µs/pair",
        decimals: 0,
        value: |m| m.per_pair(m.cost.redis_cpu_us),
    },
    Column {
        header: "redis cmd/pair",
        decimals: 2,
        value: |m| m.per_pair(total_calls(&m.cost)),
    },
    Column {
        header: "scripts/pair",
        decimals: 2,
        value: |m| m.per_pair(script_calls(&m.cost)),
    },
    Column {
        header: "srv RSS MB",
        decimals: 1,
        value: |m| m.cost.server_rss_kib.map(|k| k as f64 / 1024.0),
    },
    Column {
        header: "denied %",
        decimals: 1,
        value: |m| m.per_pair(Some(m.tally.denials)).map(|d| d * 100.0),
    },
];

const LABEL_WIDTH: usize = 48;
const MIN_CELL_WIDTH: usize = 12;

fn width(column: &Column) -> usize {
    column.header.chars().count().max(MIN_CELL_WIDTH)
}

pub fn print_header() {
    let mut line = format!("{:<LABEL_WIDTH$}", "configuration");
    for column in COLUMNS {
        line += &format!(" {:>w$}", column.header, w = width(column));
    }
    println!("{line}  top Redis commands per pair");
}

/// The median row of `runs`, then (for several runs) their range, then any errors.
pub fn print_row(label: &str, runs: &[Measured]) {
    let mut median = format!("{label:<LABEL_WIDTH$}");
    let mut range = format!(
        "{:<LABEL_WIDTH$}",
        format!("  min–max of {} runs", runs.len())
    );
    for column in COLUMNS {
        let mut values: Vec<f64> = runs.iter().filter_map(column.value).collect();
        values.sort_by(f64::total_cmp);
        let (w, d) = (width(column), column.decimals);
        median += &match median_of(&values) {
            Some(m) => format!(" {m:>w$.d$}"),
            None => format!(" {:>w$}", "-"),
        };
        range += &match (values.first(), values.last()) {
            (Some(lo), Some(hi)) => format!(" {:>w$}", format!("{lo:.d$}–{hi:.d$}")),
            _ => format!(" {:>w$}", "-"),
        };
    }
    println!("{median}  {}", top_commands(runs, 3));
    if runs.len() > 1 {
        println!("{range}");
    }
    print_masters(runs);
    print_errors(runs);
}

/// On a cluster, each master's Redis CPU and commands per pair (medians of the runs),
/// its share of the masters' CPU (how the load spread) and how busy it was, in % of one
/// core (a Redis server runs commands on one thread: near 100 % it is the limit).
fn print_masters(runs: &[Measured]) {
    let Some(first) = runs.first() else { return };
    if first.cost.redis_nodes.len() < 2 {
        return;
    }
    let median = |value: &dyn Fn(&Measured) -> Option<f64>| {
        let mut values: Vec<f64> = runs.iter().filter_map(value).collect();
        values.sort_by(f64::total_cmp);
        median_of(&values)
    };
    let total_cpu = median(&|m| m.per_pair(m.cost.redis_cpu_us)).unwrap_or(0.0);
    let mut masters = vec![];
    for (i, node) in first.cost.redis_nodes.iter().enumerate() {
        let cpu_us = |m: &Measured| m.cost.redis_nodes.get(i)?.cpu_us;
        let per_pair = median(&|m| m.per_pair(cpu_us(m)));
        let commands = median(&|m| m.per_pair(m.cost.redis_nodes.get(i).map(|n| n.commands)));
        let busy = median(&|m| {
            let elapsed_us = m.tally.elapsed.as_secs_f64() * 1e6;
            cpu_us(m).map(|us| 100.0 * us as f64 / elapsed_us)
        });
        let show = |value: Option<f64>, unit: &str| {
            value.map_or("-".to_owned(), |v| format!("{v:.0}{unit}"))
        };
        let share = per_pair
            .filter(|_| total_cpu > 0.0)
            .map(|us| 100.0 * us / total_cpu);
        masters.push(format!(
            "{} {} ({}), {} cmd, busy {}",
            node.label,
            show(per_pair, " µs"),
            show(share, " %"),
            commands.map_or("-".to_owned(), |c| format!("{c:.1}")),
            show(busy, " % of a core"),
        ));
    }
    println!("  per master, per pair: {}", masters.join(" | "));
}

fn print_errors(runs: &[Measured]) {
    let errors: u64 = runs.iter().map(|m| m.tally.errors).sum();
    if let Some(first) = runs.iter().find_map(|m| m.tally.first_error.as_ref()) {
        println!("  ! {errors} calls failed; the first: {first}");
    }
}

/// The `n` commands Redis ran most, per pair, over all the runs.
fn top_commands(runs: &[Measured], n: usize) -> String {
    let mut total = Commands::new();
    for commands in runs.iter().filter_map(|m| m.cost.redis_commands.as_ref()) {
        for (name, calls) in commands {
            *total.entry(name.clone()).or_default() += calls;
        }
    }
    let pairs: u64 = runs.iter().map(|m| m.tally.pairs).sum::<u64>().max(1);
    let mut top: Vec<(String, u64)> = total.into_iter().collect();
    top.sort_by_key(|(_, calls)| std::cmp::Reverse(*calls));
    let shown: Vec<String> = top
        .iter()
        .take(n)
        .map(|(name, calls)| format!("{name} {:.2}", *calls as f64 / pairs as f64))
        .collect();
    if shown.is_empty() {
        "-".into()
    } else {
        shown.join(", ")
    }
}

/// Every command Redis ran, those run by Lua scripts (`redis.call`) included.
fn total_calls(cost: &Cost) -> Option<u64> {
    cost.redis_commands.as_ref().map(|c| c.values().sum())
}

/// Scripts run (EVAL, EVALSHA, FCALL and their _RO forms): the server's round trips
/// that do the lease work.
fn script_calls(cost: &Cost) -> Option<u64> {
    const SCRIPTS: [&str; 6] = [
        "eval",
        "evalsha",
        "eval_ro",
        "evalsha_ro",
        "fcall",
        "fcall_ro",
    ];
    let commands = cost.redis_commands.as_ref()?;
    Some(SCRIPTS.iter().filter_map(|name| commands.get(*name)).sum())
}

/// The `p` quantile of sorted µs values, in ms (nearest rank).
fn percentile_ms(sorted_us: &[u32], p: f64) -> Option<f64> {
    let rank = (sorted_us.len() as f64 * p).ceil() as usize;
    let value = sorted_us.get(rank.clamp(1, sorted_us.len().max(1)) - 1)?;
    Some(f64::from(*value) / 1000.0)
}

fn median_of(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}
