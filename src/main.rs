//! The `tokenlease` binary: parse the command line, start logging, run a subcommand.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use secrecy::ExposeSecret;
use tokenlease::admin::{issue_api_key, rotate_token_keys};
use tokenlease::baselinker::BlockZone;
use tokenlease::config::Settings;
use tokenlease::crypto::KeyRing;
use tokenlease::domain::{ApiKeyRole, Id};
use tokenlease::emulator::{Emulator, EmulatorConfig, WindowKind};
use tokenlease::lease::LiveConfig;
use tokenlease::startup::{App, open_store, shutdown_signal};
use tokenlease::store::counters::redis_functions;
use tokenlease::telemetry::{self, init_logging};

/// mimalloc, not the system allocator: a lease pair allocates and frees many small
/// buffers (HTTP/2 frames, protobuf messages, Redis replies) across two worker threads,
/// where glibc's malloc spent ~10 % of the server's CPU (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tokenlease",
    version,
    about = "Fair sharing of rate-limited upstream API tokens, over gRPC"
)]
struct Cli {
    /// A TOML settings file (also TOKENLEASE_CONFIG).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the gRPC server (embedded single-node mode unless DATABASE_URL / REDIS_URL are set).
    Serve,
    /// Applies database migrations and seeds the defaults, then exits.
    Migrate,
    /// Creates an API key and prints it once.
    CreateApiKey {
        /// A name for people.
        #[arg(long)]
        name: String,
        /// Create a worker key for these tenants (comma-separated) instead of an admin key.
        #[arg(long, value_delimiter = ',')]
        tenants: Vec<String>,
    },
    /// Re-encrypts every token under the active master key.
    RotateKeys,
    /// Prints a new random master key (base64 of 32 bytes).
    GenMasterKey,
    /// Prints this release's Redis Functions library, for a deployment whose Redis user
    /// may not run FUNCTION LOAD: `tokenlease redis-functions | redis-cli -x FUNCTION
    /// LOAD REPLACE`, as a user that may, after every upgrade.
    RedisFunctions,
    /// Runs a BaseLinker API emulator (strict per-token limit, blocks) until Ctrl-C.
    Emulator(EmulatorArgs),
    /// Runs a capacity-planning scenario through real leases against the emulator:
    /// prints a per-tenant table, writes a chart, and with --plan finds the fewest tokens.
    Simulate(SimulateArgs),
    /// Prints per-tenant usage (asked, granted, denied, trend, peak hours) and each
    /// pool's capacity forecast from the usage history, and writes a chart.
    Report(ReportArgs),
}

#[derive(clap::Args)]
struct ReportArgs {
    /// Start of the range: a UTC date (2026-11-01) or an RFC 3339 time (default: 7 days
    /// before --to).
    #[arg(long)]
    from: Option<String>,
    /// End of the range, excluded (default: now).
    #[arg(long)]
    to: Option<String>,
    /// Where to write the SVG chart.
    #[arg(long, default_value = "report.svg")]
    chart: PathBuf,
    /// Also run `simulate --plan` on each pool's busiest hour scaled to the forecast's
    /// demand, and print whether it agrees with the forecast's token count.
    #[arg(long)]
    cross_check: bool,
}

#[derive(clap::Args)]
struct SimulateArgs {
    /// The scenario file (TOML; see examples/).
    file: PathBuf,
    /// Where to write the SVG chart (default: the scenario's name with .svg).
    #[arg(long)]
    chart: Option<PathBuf>,
    /// Find the fewest tokens in the first pool that meet every guarantee and the
    /// scenario's target share of demand.
    #[arg(long)]
    plan: bool,
}

#[derive(clap::Args)]
struct EmulatorArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8089")]
    listen: SocketAddr,
    /// Accepted requests per window per token.
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// Window length, seconds.
    #[arg(long, default_value_t = 60.0)]
    window_secs: f64,
    /// Block length after a violation, seconds.
    #[arg(long, default_value_t = 600.0)]
    block_secs: f64,
    /// Fixed, clock-aligned windows instead of a sliding one.
    #[arg(long)]
    fixed_window: bool,
    /// Requests during a block push its end out.
    #[arg(long)]
    extend_block: bool,
    /// Accepted tokens, comma-separated; none given = accept any token.
    #[arg(long, value_delimiter = ',')]
    tokens: Vec<String>,
    /// Time zone of "blocked until" times: an IANA name (BaseLinker: probably
    /// Europe/Warsaw, +01:00 in winter and +02:00 in summer) or a fixed offset (+01:00).
    #[arg(
        long,
        alias = "utc-offset",
        default_value = BlockZone::DEFAULT_NAME,
        allow_hyphen_values = true
    )]
    time_zone: BlockZone,
    /// How many orders `getOrders` pages through.
    #[arg(long, default_value_t = 250)]
    orders: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    // `serve --help` lists every setting with its default and variable.
    let command = Cli::command().mut_subcommand("serve", |serve| {
        serve.after_long_help(Settings::defaults_help())
    });
    let cli = match Cli::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::GenMasterKey = cli.command {
        println!("{}", KeyRing::generate_key_base64().expose_secret());
        return Ok(());
    }
    if let Command::RedisFunctions = cli.command {
        print!("{}", redis_functions());
        return Ok(());
    }
    if let Command::Emulator(args) = cli.command {
        init_logging("text");
        return run_emulator(args).await;
    }
    if let Command::Simulate(args) = cli.command {
        warnings_only();
        return simulate(args).await;
    }
    let settings = Settings::load(cli.config.as_deref())?;
    if let Command::Report(args) = cli.command {
        // The cross-check runs services in process: their start-up lines are noise here.
        warnings_only();
        return report(&settings, args).await;
    }
    if let Command::Serve = cli.command {
        let telemetry = telemetry::init(&settings.log_format, &settings.traces_filter)?;
        let served = match App::build(settings).await {
            Ok(app) => app.run_until_stopped(shutdown_signal()).await,
            Err(error) => Err(error),
        };
        telemetry.shutdown().await;
        return served;
    }
    init_logging(&settings.log_format);
    match cli.command {
        Command::Serve => unreachable!("handled above"),
        Command::Migrate => {
            open_store(&settings).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::CreateApiKey { name, tenants } => create_api_key(&settings, &name, &tenants).await,
        Command::RotateKeys => rotate_keys(&settings).await,
        Command::GenMasterKey
        | Command::RedisFunctions
        | Command::Emulator(_)
        | Command::Simulate(_)
        | Command::Report(_) => {
            unreachable!("handled above")
        }
    }
}

/// Logs warnings only (unless RUST_LOG says otherwise), on stderr: for commands whose
/// stdout is their answer.
fn warnings_only() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run_emulator(args: EmulatorArgs) -> anyhow::Result<()> {
    let seconds = |name: &str, secs: f64| {
        Duration::try_from_secs_f64(secs).with_context(|| format!("invalid --{name} {secs}"))
    };
    let config = EmulatorConfig {
        listen: args.listen,
        limit: args.limit,
        window: seconds("window-secs", args.window_secs)?,
        window_kind: if args.fixed_window {
            WindowKind::Fixed
        } else {
            WindowKind::Sliding
        },
        block: seconds("block-secs", args.block_secs)?,
        extend_block: args.extend_block,
        zone: args.time_zone,
        tokens: (!args.tokens.is_empty()).then_some(args.tokens),
        order_count: args.orders,
        ..EmulatorConfig::default()
    };
    let emulator = Emulator::start(config)
        .await
        .context("cannot start the emulator")?;
    println!("{}/connector.php", emulator.url());
    shutdown_signal().await;
    emulator.stop().await;
    Ok(())
}

async fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    use tokenlease::simulate::{self, Scenario, svg};
    let scenario = Scenario::load(&args.file)?;
    let title = args
        .file
        .file_stem()
        .map_or("scenario".into(), |s| s.to_string_lossy().into_owned());
    let chart_path = args
        .chart
        .unwrap_or_else(|| PathBuf::from(format!("{title}.svg")));
    let result = if args.plan {
        let answer = simulate::plan(&scenario, true).await?;
        match answer.tokens {
            Some(k) => println!(
                "plan: {k} token(s) in pool {} meet every guarantee and {:.0} % of demand",
                scenario.pools[0].id,
                100.0 * scenario.target_share
            ),
            None => println!(
                "plan: no token count up to {} meets every guarantee and {:.0} % of demand",
                scenario.plan_max_tokens,
                100.0 * scenario.target_share
            ),
        }
        answer.last.context("the plan ran nothing")?
    } else {
        simulate::run(&scenario, None, true).await?
    };
    print!("{}", simulate::table(&result));
    let verdict = simulate::verdict(&result);
    if verdict.ok {
        println!(
            "goals met: every guarantee, {:.0} % of demand, no violation",
            100.0 * scenario.target_share
        );
    } else {
        for reason in &verdict.reasons {
            println!("not met: {reason}");
        }
    }
    if result.refused.is_none() {
        std::fs::write(&chart_path, svg::chart(&result, &title))
            .with_context(|| format!("cannot write the chart {}", chart_path.display()))?;
        eprintln!("chart written to {}", chart_path.display());
    }
    // Scripts (and CI jobs) can act on the answer: goals not met is a failure.
    anyhow::ensure!(verdict.ok, "the scenario's goals were not met (see above)");
    Ok(())
}

async fn report(settings: &Settings, args: ReportArgs) -> anyhow::Result<()> {
    use tokenlease::report::{self, DEFAULT_DAYS, chart, parse_time, table};
    let now = tokenlease::clock::system_now_ms();
    let to = args.to.map_or(Ok(now), |t| parse_time("--to", &t))?;
    let from = match args.from {
        Some(from) => parse_time("--from", &from)?,
        None => to - DEFAULT_DAYS * tokenlease::forecast::DAY_MS,
    };
    let (store, _) = open_store(settings).await?;
    let bucket_ms = settings.history().bucket_ms;
    let currency = &settings.cost.currency;
    let report = report::load(&store, (from, to), bucket_ms, now, currency).await?;
    print!("{}", table::table(&report));
    if args.cross_check {
        print!("{}", report::cross_checks(&report).await?);
    }
    std::fs::write(&args.chart, chart::chart(&report, "tokenlease report"))
        .with_context(|| format!("cannot write the chart {}", args.chart.display()))?;
    eprintln!("chart written to {}", args.chart.display());
    Ok(())
}

async fn live_config(settings: &Settings) -> anyhow::Result<LiveConfig> {
    let ring = std::sync::Arc::new(settings.key_ring()?);
    let (store, _) = open_store(settings).await?;
    LiveConfig::load(store, ring)
        .await
        .context("cannot load the configuration")
}

async fn create_api_key(settings: &Settings, name: &str, tenants: &[String]) -> anyhow::Result<()> {
    let tenant_ids = tenants
        .iter()
        .map(|t| Id::parse("--tenants", t))
        .collect::<Result<Vec<_>, _>>()?;
    let role = if tenant_ids.is_empty() {
        ApiKeyRole::Admin
    } else {
        ApiKeyRole::Worker
    };
    let config = live_config(settings).await?;
    let key = issue_api_key(&config, name, role, tenant_ids).await?;
    println!("{}", key.expose_secret());
    eprintln!("{} key created; it is shown only this once", role.as_str());
    Ok(())
}

async fn rotate_keys(settings: &Settings) -> anyhow::Result<()> {
    let config = live_config(settings).await?;
    let changed = rotate_token_keys(&config).await?;
    println!(
        "re-encrypted {changed} token(s) under key '{}'",
        config.ring().active_key_id()
    );
    Ok(())
}
