//! The `tokenlease` binary: parse the command line, start logging, run a subcommand.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;
use tokenlease::admin::{issue_api_key, rotate_token_keys};
use tokenlease::config::Settings;
use tokenlease::crypto::KeyRing;
use tokenlease::domain::{ApiKeyRole, Id};
use tokenlease::lease::LiveConfig;
use tokenlease::startup::{App, open_store, shutdown_signal};
use tokenlease::telemetry::{self, init_logging};

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
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let settings = Settings::load(cli.config.as_deref())?;
    if let Command::Serve = cli.command {
        let telemetry = telemetry::init(&settings.log_format)?;
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
        Command::GenMasterKey => unreachable!("handled above"),
    }
}

async fn live_config(settings: &Settings) -> anyhow::Result<LiveConfig> {
    let ring = std::sync::Arc::new(settings.key_ring()?);
    let store = open_store(settings).await?;
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
