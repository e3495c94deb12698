//! `tokenlease serve` as its own process, so that its CPU time and memory can be read
//! from /proc, and everything it leaves behind removed when it stops.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};

use super::backend::Backend;
use super::cli::Limits;

/// The binary `cargo bench` builds with the bench (release) profile:
/// `target/release/tokenlease`.
const BINARY: &str = env!("CARGO_BIN_EXE_tokenlease");

/// The keys a server leaves in a shared Redis, deleted when it stops.
struct SharedKeys {
    url: String,
    prefix: String,
}

/// A running server; killed, and its Redis keys deleted, when dropped.
pub struct Server {
    child: Child,
    /// The server's process id, for /proc.
    pub pid: u32,
    pub grpc: SocketAddr,
    /// Its bootstrap admin API key.
    pub admin_key: String,
    /// Its keys in a shared Redis (Redis mode; a throwaway cluster goes whole).
    shared_keys: Option<SharedKeys>,
    data_dir: tempfile::TempDir,
}

impl Server {
    /// Starts `tokenlease serve` in a fresh data folder and waits until it answers.
    /// `TOKENLEASE_*` variables of this process reach the server and win over the
    /// bench's own settings (e.g. `TOKENLEASE_LEASE__PACE_BURST_PERCENT=100`).
    /// Its counters are where `backend` says, under a key prefix unique to the run.
    /// `binary` replaces the one built with the bench (`--server`).
    pub async fn start(backend: &Backend, limits: Limits, binary: Option<&Path>) -> Server {
        let data_dir = tempfile::tempdir().expect("a temporary data folder");
        let grpc = free_address();
        let redis = backend.server_url().map(|url| {
            let prefix = format!("tlbench-{}", uuid::Uuid::new_v4().simple());
            (url, prefix)
        });
        let shared_keys = backend
            .shared_url()
            .zip(redis.as_ref())
            .map(|(url, (_, prefix))| SharedKeys {
                url: url.to_owned(),
                prefix: prefix.clone(),
            });
        let binary = binary.unwrap_or(Path::new(BINARY));
        let child = command(binary, data_dir.path(), grpc, redis.as_ref(), limits)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e} (run `cargo bench`, which builds it)",
                    binary.display()
                )
            });
        let mut server = Server {
            pid: child.id(),
            child,
            grpc,
            admin_key: String::new(),
            shared_keys,
            data_dir,
        };
        server.admin_key = server.wait_until_ready().await;
        server
    }

    /// Waits for the bootstrap admin key and a gRPC connection; panics with the
    /// server's log if it exits or takes more than 30 s.
    async fn wait_until_ready(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        let key_file = self.data_dir.path().join("admin.key");
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("tokenlease serve exited ({status}):\n{}", self.log());
            }
            let key = std::fs::read_to_string(&key_file).unwrap_or_default();
            if !key.trim().is_empty() && self.channel().await.is_ok() {
                return key.trim().to_owned();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("tokenlease serve did not come up:\n{}", self.log());
    }

    /// A new HTTP/2 connection to the server, with Nagle off on the client side.
    pub async fn channel(&self) -> Result<Channel, tonic::transport::Error> {
        Endpoint::from_shared(format!("http://{}", self.grpc))
            .expect("a valid URI")
            .tcp_nodelay(true)
            .connect()
            .await
    }

    /// Panics with the server's log if it is no longer running.
    pub fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("tokenlease serve exited ({status}):\n{}", self.log());
        }
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.path().join("server.log")
    }

    /// The last lines the server wrote (warnings and errors only: RUST_LOG=warn).
    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(SharedKeys { url, prefix }) = &self.shared_keys
            && let Err(e) = delete_keys(url, prefix)
        {
            eprintln!("could not delete the Redis keys {prefix}:*: {e}");
        }
    }
}

/// The server's command: embedded counters, or in the Redis (or cluster) `redis` =
/// (`REDIS_URL`, key prefix); configuration in SQLite, logs (warnings only) to a file in
/// the data folder, no tracing export.
fn command(
    binary: &Path,
    data_dir: &Path,
    grpc: SocketAddr,
    redis: Option<&(String, String)>,
    limits: Limits,
) -> Command {
    let log = std::fs::File::create(data_dir.join("server.log")).expect("a log file");
    let mut command = Command::new(binary);
    command
        .arg("serve")
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env("TOKENLEASE_LISTEN", grpc.to_string())
        .env("TOKENLEASE_DATA_DIR", data_dir)
        .env("TOKENLEASE_METRICS__LISTEN", free_address().to_string())
        .env("RUST_LOG", "warn")
        .env("OTEL_SDK_DISABLED", "true")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("a log file"))
        .stderr(log);
    if let Some((url, prefix)) = redis {
        command
            .env("REDIS_URL", url)
            .env("TOKENLEASE_REDIS__KEY_PREFIX", prefix);
    }
    // Saturated: the warm-up must take every slot at once, so no pacing.
    let pace = "TOKENLEASE_LEASE__PACE_BURST_PERCENT";
    if limits == Limits::Saturated && std::env::var_os(pace).is_none() {
        command.env(pace, "100");
    }
    command
}

fn free_address() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free local port")
}

/// Deletes every key under `prefix:` (SCAN by pattern, then DEL).
fn delete_keys(url: &str, prefix: &str) -> redis::RedisResult<()> {
    let mut conn = redis::Client::open(url)?.get_connection()?;
    let keys: Vec<String> = redis::cmd("SCAN")
        .cursor_arg(0)
        .arg("MATCH")
        .arg(format!("{prefix}:*"))
        .arg("COUNT")
        .arg(1000)
        .clone()
        .iter(&mut conn)?
        .collect::<Result<_, _>>()?;
    for batch in keys.chunks(1000) {
        redis::cmd("DEL").arg(batch).exec(&mut conn)?;
    }
    Ok(())
}
