//! `spawn_app()` and friends: real servers on port 0, each test with its own database
//! (a SQLite file, or a fresh Postgres database) and its own Redis key prefix, so tests
//! run in parallel and leave nothing behind. Missing Postgres or Redis fails the test.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Mutex, Once};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokenlease::admin::issue_api_key;
use tokenlease::config::{CountersMode, Settings};
use tokenlease::crypto::KeyRing;
use tokenlease::domain::{ApiKeyRole, Id};
use tokenlease::grpc::pb::admin_service_client::AdminServiceClient;
use tokenlease::grpc::pb::lease_service_client::LeaseServiceClient;
use tokenlease::lease::Leaser;
use tokenlease::startup::App;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Request;
use tonic::transport::Channel;

pub const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// Where the configuration lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// Where the lease counters live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counters {
    Memory,
    Redis,
}

/// A test's private backends: one database and one Redis prefix, shared by every
/// replica the test spawns. Dropping it removes them.
pub struct TestEnv {
    pub db: Db,
    pub dir: tempfile::TempDir,
    pub database_url: Option<String>,
    pub pg_database: Option<String>,
    pub redis_url: Option<String>,
    pub key_prefix: String,
    pub master_key: SecretString,
}

/// A running replica.
pub struct TestApp {
    pub addr: SocketAddr,
    /// Where its /metrics is served (the recorder is one per process: every app of a
    /// test binary shows the same counters). Read by the scenario suite.
    #[allow(dead_code)]
    pub metrics_addr: Option<SocketAddr>,
    pub leaser: Leaser,
    pub admin_key: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestEnv {
    pub async fn new(db: Db, counters: Counters) -> TestEnv {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let (database_url, pg_database) = match db {
            Db::Sqlite => (None, None),
            Db::Postgres => {
                let name = format!("tl_test_{suffix}");
                let mut conn = pg_admin().await;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .expect("create test database");
                (
                    Some(format!("postgres://postgres@127.0.0.1:5432/{name}")),
                    Some(name),
                )
            }
        };
        let redis_url = (counters == Counters::Redis).then(|| {
            let client = redis::Client::open(REDIS_URL).unwrap();
            client
                .get_connection()
                .expect("Redis at 127.0.0.1:6379 must be running for this test");
            REDIS_URL.to_owned()
        });
        TestEnv {
            db,
            dir: tempfile::tempdir().unwrap(),
            database_url,
            pg_database,
            redis_url,
            key_prefix: format!("tltest-{suffix}"),
            master_key: KeyRing::generate_key_base64(),
        }
    }

    /// Settings for a replica of this environment.
    pub fn settings(&self) -> Settings {
        let mut settings = Settings {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: self.dir.path().to_path_buf(),
            database_url: self.database_url.clone(),
            redis_url: self.redis_url.clone(),
            config_refresh_ms: 100,
            shutdown_grace_ms: 1_000,
            ..Settings::default()
        };
        settings.redis.key_prefix = self.key_prefix.clone();
        if self.redis_url.is_none() {
            // In-process counters, also beside a Postgres configuration: each test's
            // replica is alone (tests of several replicas use Redis).
            settings.counters = CountersMode::Memory;
        }
        // Generous: a loaded machine with hundreds of calls in flight queues Redis
        // calls for longer than the default 250 ms, and these tests are not about
        // failing closed (the fault tests set their own, short timeout).
        settings.redis.timeout_ms = 3_000;
        settings.lease.ttl_ms = 1_000;
        settings.lease.use_grace_ms = 0;
        // Most tests fill a window on purpose; pacing has tests of its own.
        settings.lease.pace_burst_percent = 100;
        settings.metrics.listen = "127.0.0.1:0".into();
        settings.encryption.keys = BTreeMap::from([("k1".to_string(), self.master_key.clone())]);
        settings
    }

    pub async fn spawn(&self) -> TestApp {
        self.spawn_with(self.settings()).await
    }

    pub async fn spawn_with(&self, settings: Settings) -> TestApp {
        let app = App::build(settings).await.expect("build app");
        let addr = app.local_addr();
        let metrics_addr = app.metrics_addr();
        let leaser = app.leaser.clone();
        let admin_key = issue_api_key(&leaser.config, "test admin", ApiKeyRole::Admin, vec![])
            .await
            .expect("admin key");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        TestApp {
            addr,
            metrics_addr,
            leaser,
            admin_key: admin_key.expose_secret().to_owned(),
            stop: Some(stop),
            handle: Some(handle),
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let pg = self.pg_database.take();
        let prefix = self.key_prefix.clone();
        let uses_redis = self.redis_url.is_some();
        // Cleanup needs async clients; run it on a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Some(name) = pg {
                    let mut conn = pg_admin().await;
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await;
                }
                if uses_redis {
                    delete_redis_prefix(REDIS_URL, &prefix);
                }
            });
        })
        .join();
    }
}

/// Deletes every key under `prefix`.
pub fn delete_redis_prefix(url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut conn) = client.get_connection() else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query(&mut conn)
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<(), _> = redis::cmd("DEL").arg(keys).query(&mut conn);
    }
}

async fn pg_admin() -> sqlx::PgConnection {
    use sqlx::Connection;
    sqlx::PgConnection::connect(PG_ADMIN_URL)
        .await
        .expect("PostgreSQL at 127.0.0.1:5432 must be running for this test")
}

impl TestApp {
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connect")
    }

    pub async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel().await)
    }

    pub async fn lease(&self) -> LeaseServiceClient<Channel> {
        LeaseServiceClient::new(self.channel().await)
    }

    /// A worker key for `tenants`.
    pub async fn worker_key(&self, tenants: &[&str]) -> String {
        let ids = tenants.iter().map(|t| Id::parse("t", t).unwrap()).collect();
        let key = issue_api_key(&self.leaser.config, "test worker", ApiKeyRole::Worker, ids)
            .await
            .unwrap();
        key.expose_secret().to_owned()
    }

    /// Kills the replica as a dying process would: the server task is aborted (no
    /// draining, no release of anything it granted) and its listener closed.
    pub async fn kill(mut self) {
        self.stop.take();
        if let Some(handle) = self.handle.take() {
            handle.abort();
            let _ = handle.await;
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), handle).await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A request with `authorization: Bearer <key>`.
pub fn authed<T>(message: T, key: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

pub fn secs(s: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: s as i64,
        nanos: 0,
    }
}

pub fn millis(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// Names of the threads that panicked, recorded by the hook `run_watching_panics` installs.
static PANICKED_THREADS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Runs `test` on its own multi-thread runtime whose threads are named `<name>-…`, and
/// fails if any of them panicked: a panic in a server task (a request handler, the
/// configuration refresher) is caught by tokio and would otherwise go unnoticed.
pub fn run_watching_panics(name: &str, test: impl Future<Output = ()>) {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let (Some(thread), Ok(mut seen)) =
                (std::thread::current().name(), PANICKED_THREADS.lock())
            {
                seen.push(thread.to_owned());
            }
            previous(info);
        }));
    });
    let prefix = format!("{name}-");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(format!("{prefix}rt"))
        .enable_all()
        .build()
        .expect("test runtime");
    runtime.block_on(test);
    runtime.shutdown_timeout(Duration::from_secs(5));
    let panicked: Vec<String> = PANICKED_THREADS
        .lock()
        .unwrap()
        .iter()
        .filter(|t| t.starts_with(&prefix))
        .cloned()
        .collect();
    assert!(
        panicked.is_empty(),
        "server threads panicked (see the output above): {panicked:?}"
    );
}

/// Now, in Unix milliseconds (the clock the server and Redis read too: one machine).
pub fn now_ms() -> i64 {
    tokenlease::clock::system_now_ms()
}

/// A protobuf duration in milliseconds.
pub fn ms(d: &prost_types::Duration) -> i64 {
    d.seconds * 1000 + d.nanos as i64 / 1_000_000
}

/// A protobuf timestamp in Unix milliseconds.
pub fn ts_ms(t: &prost_types::Timestamp) -> i64 {
    t.seconds * 1000 + t.nanos as i64 / 1_000_000
}

/// When `lease` was granted, on the service's clock: its expiry less its validity.
pub fn granted_at(lease: &tokenlease::grpc::pb::Lease) -> i64 {
    let expires = lease.expires_at.as_ref().expect("expires_at");
    ts_ms(expires) - ms(lease.valid_for.as_ref().expect("valid_for"))
}

/// The wall-clock instants (Unix ms) just before a call was sent and just after its
/// answer arrived: the server decided at some instant between them, however long the
/// machine made the call take.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub before: i64,
    pub after: i64,
}

/// Runs `call`, returning its output and the span it took.
pub async fn timed<T>(call: impl Future<Output = T>) -> (T, Span) {
    let before = now_ms();
    let output = call.await;
    (
        output,
        Span {
            before,
            after: now_ms(),
        },
    )
}

impl Span {
    /// Asserts that a retry-after of `retry_after_ms`, counted from the server's answer,
    /// points at the instant `expected`: the answer was made at some instant in the
    /// span, so `expected` lies within the span shifted by the retry-after (±1 ms for
    /// rounding to milliseconds). Exact on a loaded machine: a slow call widens the span,
    /// it never moves the instant.
    pub fn assert_points_at(&self, retry_after_ms: i64, expected: i64, what: &str) {
        let (earliest, latest) = (self.before + retry_after_ms, self.after + retry_after_ms);
        assert!(
            earliest - 1 <= expected && expected <= latest + 1,
            "{what}: the retry-after points into [{earliest}, {latest}] (answered within \
             [{}, {}]), not at {expected}",
            self.before,
            self.after
        );
    }
}

impl Span {
    /// Like `assert_points_at`, for an instant the service learnt during the call
    /// `learnt` and keeps on its own monotonic clock (a quarantine's end, a breaker's
    /// open time): it may hold it late by up to that call's length, never early.
    pub fn assert_points_near(&self, retry_after_ms: i64, instant: i64, learnt: Span, what: &str) {
        let (earliest, latest) = (self.before + retry_after_ms, self.after + retry_after_ms);
        let held_late = learnt.after - learnt.before;
        assert!(
            earliest - 1 <= instant + held_late && instant <= latest + 1,
            "{what}: the retry-after points into [{earliest}, {latest}] (answered within \
             [{}, {}]), not at {instant} (+ up to {held_late} ms)",
            self.before,
            self.after
        );
    }
}

/// Polls `probe` every 20 ms until it gives `Some`, and returns that; fails with `what`
/// once `deadline` has passed. For conditions that become true by themselves (a replica
/// loading the configuration, a slot freeing, a watcher registering): the test states
/// the condition instead of sleeping a fixed time and hoping.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "{what}: not within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GET /metrics, the body.
pub async fn scrape(addr: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_lowercase().contains("content-type: text/plain"),
        "{head}"
    );
    body.to_owned()
}

/// The value of the series `name{labels}` (exactly these labels), if present.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<&str, &str> = labels.iter().copied().collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, found) = match series.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest.strip_suffix('}')?)),
                None => (series, BTreeMap::new()),
            };
            (series_name == name && found == wanted).then(|| value.parse().unwrap())
        })
}

fn parse_labels(body: &str) -> BTreeMap<&str, &str> {
    body.split(',')
        .filter(|p| !p.is_empty())
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((k, v.trim_matches('"')))
        })
        .collect()
}

/// An AcquireLease for `tenant` with `key`, nothing else set.
pub fn lease_request(
    tenant: &str,
    key: &str,
) -> Request<tokenlease::grpc::pb::AcquireLeaseRequest> {
    let request = tokenlease::grpc::pb::AcquireLeaseRequest {
        tenant_id: tenant.into(),
        ..Default::default()
    };
    authed(request, key)
}

/// Every event that arrives on a WatchEvents stream until none has for `quiet`, and
/// the status that ended the stream, if it ended.
pub async fn drain_events(
    stream: &mut tonic::Streaming<tokenlease::grpc::pb::WatchEventsResponse>,
    quiet: Duration,
) -> (Vec<tokenlease::grpc::pb::Event>, Option<tonic::Status>) {
    let mut events = Vec::new();
    loop {
        match tokio::time::timeout(quiet, stream.message()).await {
            Err(_) | Ok(Ok(None)) => return (events, None),
            Ok(Err(status)) => return (events, Some(status)),
            Ok(Ok(Some(message))) => events.extend(message.event),
        }
    }
}
