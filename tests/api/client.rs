//! The Rust client (`tokenlease-client`) against real servers: the guard's release on
//! drop and on panic, failover between replicas and RetryInfo, the fallback on denial,
//! the BaseLinker adapter against the emulator, and a watch that survives a restart.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokenlease::clock::Clock;
use tokenlease::emulator::{Emulator, EmulatorConfig, EmulatorHandle};
use tokenlease::grpc::pb;
use tokenlease::grpc::pb::admin_service_client::AdminServiceClient;
use tokenlease::grpc::pb::lease_service_server::{LeaseService, LeaseServiceServer};
use tokenlease_client::baselinker::{BlockZone, Reply};
use tokenlease_client::{
    Client, Denial, DenialReason, Error, FailoverPolicy, FreshnessPolicy, LeaseGuard, Outcome,
    Priority, RequestKind, WatchFilter, WatchItem,
};
use tokio::sync::oneshot;
use tokio::sync::oneshot::error::TryRecvError;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::fixtures::{PoolSetup, create_tenant, tenant_usage, token_secret};
use super::helpers::{Counters, Db, TestApp, TestEnv, authed, eventually, ts_ms};
use super::observe::{connect_when_ready, exported, receiver, start_binary, two_addresses};

const WAIT: Duration = Duration::from_secs(10);
/// Lease validity in `Setup`'s replica.
const LEASE_TTL: Duration = Duration::from_secs(30);

/// One embedded replica with `pool` and tenant "acme" (one breaker failure opens a
/// token's breaker, leases valid for `LEASE_TTL`), and a client with a worker key for
/// "acme".
struct Setup {
    _env: TestEnv,
    app: TestApp,
    worker_key: String,
    client: Client,
}

impl Setup {
    /// A lease for tenant "acme" (an order sync), which the tests' pool always grants.
    async fn acme_lease(&self) -> LeaseGuard {
        self.client
            .lease("acme", RequestKind::OrderSync)
            .acquire()
            .await
            .expect("the pool grants acme a lease")
    }

    async fn new(pool: PoolSetup) -> Setup {
        let env = TestEnv::new(Db::Sqlite, Counters::Memory).await;
        let mut settings = env.settings();
        settings.breaker.failures_to_open = 1;
        // Long enough that a released lease is still known when a test releases it
        // again on a loaded machine (a release is answered until expiry + window).
        settings.lease.ttl_ms = LEASE_TTL.as_millis() as u64;
        let app = env.spawn_with(settings).await;
        pool.create(&mut app.admin().await, &app.admin_key).await;
        create_tenant(&mut app.admin().await, &app.admin_key, "acme", "flex").await;
        let worker_key = app.worker_key(&["acme"]).await;
        let client = client_for(&[&app], &worker_key);
        Setup {
            _env: env,
            app,
            worker_key,
            client,
        }
    }

    /// Slots the tenant holds in the current window.
    async fn tenant_used(&self) -> u32 {
        let usage = tenant_usage(&self.app, &self.app.admin_key, "acme").await;
        usage.expect("GetUsage answered").tenants[0].used_in_window
    }

    /// tok-0's state and when it ends (Unix ms), as GetUsage shows them.
    async fn token_state(&self) -> (pb::TokenState, Option<i64>) {
        let request = pb::GetUsageRequest {
            token_id: "tok-0".into(),
            ..Default::default()
        };
        let mut admin = self.app.admin().await;
        let usage = admin.get_usage(authed(request, &self.app.admin_key)).await;
        let token = usage.expect("GetUsage answered").into_inner().tokens[0].clone();
        (token.state(), token.state_until.as_ref().map(ts_ms))
    }

    /// ReleaseLease straight through the stub: `already_released`, or the status.
    async fn raw_release(&self, lease_id: &str, outcome: pb::ReleaseOutcome) -> Result<bool, Code> {
        let request = pb::ReleaseLeaseRequest {
            lease_id: lease_id.into(),
            outcome: outcome as i32,
            ..Default::default()
        };
        let answer = self
            .app
            .lease()
            .await
            .release_lease(authed(request, &self.worker_key))
            .await;
        answer
            .map(|a| a.into_inner().already_released)
            .map_err(|status| status.code())
    }
}

fn client_for(apps: &[&TestApp], key: &str) -> Client {
    Client::builder()
        .endpoints(apps.iter().map(|a| format!("http://{}", a.addr)))
        .api_key(key)
        .connect()
        .expect("a valid client configuration")
}

/// A guard dropped without its token taken releases NOT_USED by itself: the tenant's
/// slot comes back, and the lease shows released with NOT_USED (the same release again
/// is `already_released`, another outcome FAILED_PRECONDITION).
#[tokio::test]
async fn a_guard_dropped_untaken_releases_not_used() {
    let setup = Setup::new(PoolSetup::default()).await;
    let lease = setup.acme_lease().await;
    let lease_id = lease.lease_id().to_owned();
    assert_eq!(setup.tenant_used().await, 1);
    drop(lease);
    eventually(WAIT, "the dropped lease's slot given back", || async {
        (setup.tenant_used().await == 0).then_some(())
    })
    .await;
    assert_eq!(
        setup
            .raw_release(&lease_id, pb::ReleaseOutcome::NotUsed)
            .await,
        Ok(true)
    );
    let other = setup
        .raw_release(&lease_id, pb::ReleaseOutcome::Success)
        .await
        .unwrap_err();
    assert_eq!(other, Code::FailedPrecondition);
}

/// A guard whose token was taken releases, when dropped, with the outcome the caller
/// recorded: UPSTREAM_ERROR opens the token's breaker (one failure opens it here), and
/// the lease shows released with that outcome.
#[tokio::test]
async fn a_guard_dropped_after_use_releases_the_recorded_outcome() {
    let setup = Setup::new(PoolSetup::default()).await;
    let mut lease = setup.acme_lease().await;
    let lease_id = lease.lease_id().to_owned();
    {
        use secrecy::ExposeSecret;
        assert_eq!(
            lease.token().expose_secret(),
            token_secret(0),
            "the decrypted token"
        );
    }
    lease.record(Outcome::UpstreamError);
    drop(lease);
    eventually(
        WAIT,
        "the breaker opened by the dropped lease's release",
        || async { (setup.token_state().await.0 == pb::TokenState::BreakerOpen).then_some(()) },
    )
    .await;
    let again = setup
        .raw_release(&lease_id, pb::ReleaseOutcome::UpstreamError)
        .await;
    assert_eq!(again, Ok(true), "released before, with UPSTREAM_ERROR");
    assert_eq!(setup.tenant_used().await, 1, "a used slot stays counted");
}

/// A guard whose token was taken but no outcome recorded is left to expire: the call
/// may still be in flight, so nothing is released and the slot stays counted.
#[tokio::test]
async fn a_guard_dropped_after_use_without_an_outcome_is_left_to_expire() {
    let setup = Setup::new(PoolSetup::default()).await;
    let lease = setup.acme_lease().await;
    let lease_id = lease.lease_id().to_owned();
    let _ = lease.token();
    drop(lease);
    // Nothing to wait for (no release should come); a spawned release reaches the
    // embedded server in a few milliseconds, so 300 ms would have seen one. A slow
    // machine can only make this pass wrongly, never fail; the lease (30 s TTL) is
    // still valid after it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(setup.tenant_used().await, 1);
    let first = setup
        .raw_release(&lease_id, pb::ReleaseOutcome::Success)
        .await;
    assert_eq!(first, Ok(false), "this is the lease's first release");
}

/// A task that panics while holding a guard releases it as the stack unwinds: NOT_USED
/// when the token was not taken (its slot comes back), the recorded outcome when it
/// was (UPSTREAM_ERROR opens the breaker).
#[tokio::test]
async fn a_guard_is_released_when_its_task_panics() {
    let setup = Setup::new(PoolSetup::default()).await;
    let panicking_worker = |record: Option<Outcome>| {
        let client = setup.client.clone();
        let (lease_id, leased) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut lease = client
                .lease("acme", RequestKind::OrderSync)
                .acquire()
                .await
                .unwrap();
            if let Some(outcome) = record {
                lease.record(outcome);
            }
            lease_id.send(lease.lease_id().to_owned()).unwrap();
            panic!("a worker bug while holding a lease (expected by this test)");
        });
        async move {
            let joined = task.await;
            assert!(joined.unwrap_err().is_panic(), "the worker panicked");
            leased.await.unwrap()
        }
    };

    let untaken = panicking_worker(None).await;
    eventually(WAIT, "the panicked worker's slot given back", || async {
        (setup.tenant_used().await == 0).then_some(())
    })
    .await;
    assert_eq!(
        setup
            .raw_release(&untaken, pb::ReleaseOutcome::NotUsed)
            .await,
        Ok(true)
    );

    let used = panicking_worker(Some(Outcome::UpstreamError)).await;
    eventually(
        WAIT,
        "the breaker opened by the panicked worker's release",
        || async { (setup.token_state().await.0 == pb::TokenState::BreakerOpen).then_some(()) },
    )
    .await;
    assert_eq!(
        setup
            .raw_release(&used, pb::ReleaseOutcome::UpstreamError)
            .await,
        Ok(true)
    );
}

/// Two replicas on one Postgres and one Redis: calls go to the first; once it is
/// killed, they go to the second without the caller seeing an error, and releases too.
#[tokio::test]
async fn calls_fail_over_to_the_other_replica() {
    let env = TestEnv::new(Db::Postgres, Counters::Redis).await;
    let a = env.spawn().await;
    let b = env.spawn().await;
    PoolSetup::default()
        .create(&mut a.admin().await, &a.admin_key)
        .await;
    create_tenant(&mut a.admin().await, &a.admin_key, "acme", "flex").await;
    let key = a.worker_key(&["acme"]).await;
    // B learns of the tenant and the new key from the database.
    b.leaser.config.refresh().await.expect("refresh B");
    let client = client_for(&[&a, &b], &key);
    let (a_uri, b_uri) = (format!("http://{}", a.addr), format!("http://{}", b.addr));

    let lease = client
        .lease("acme", RequestKind::OrderSync)
        .acquire()
        .await
        .unwrap();
    assert_eq!(client.current_endpoint(), a_uri);
    lease.release(Outcome::NotUsed).await.unwrap();

    a.kill().await;
    let lease = client.lease("acme", RequestKind::OrderSync).acquire().await;
    let lease = lease.expect("granted by the other replica");
    assert_eq!(client.current_endpoint(), b_uri);
    let released = lease.release(Outcome::Success).await.unwrap();
    assert!(!released.already_released);
    b.stop().await;
}

/// A LeaseService that answers every AcquireLease UNAVAILABLE with a RetryInfo, and
/// notes when each call arrived.
#[derive(Clone)]
struct Unavailable {
    retry_after: Duration,
    calls: Arc<Mutex<Vec<Instant>>>,
}

#[tonic::async_trait]
impl LeaseService for Unavailable {
    async fn acquire_lease(
        &self,
        _: Request<pb::AcquireLeaseRequest>,
    ) -> Result<Response<pb::AcquireLeaseResponse>, Status> {
        self.calls.lock().unwrap().push(Instant::now());
        Err(Status::with_error_details(
            Code::Unavailable,
            "draining",
            ErrorDetails::with_retry_info(Some(self.retry_after)),
        ))
    }

    async fn release_lease(
        &self,
        _: Request<pb::ReleaseLeaseRequest>,
    ) -> Result<Response<pb::ReleaseLeaseResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    type WatchEventsStream = tokio_stream::Empty<Result<pb::WatchEventsResponse, Status>>;

    async fn watch_events(
        &self,
        _: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// Serves `service` on a free port; its URI.
async fn serve_fake(service: Unavailable) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(LeaseServiceServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

/// RetryInfo is honoured: a replica that said "retry after 1.5 s" is called again no
/// sooner (an unreachable one would be after 1 s); one that said 30 s (more than the
/// client waits) is not waited for — the caller gets UNAVAILABLE with that delay at
/// once, and a fallback runs with it — and a working replica beside it answers instead.
#[tokio::test]
async fn failover_honours_retry_info() {
    let short = Unavailable {
        retry_after: Duration::from_millis(1500),
        calls: Arc::default(),
    };
    let uri = serve_fake(short.clone()).await;
    let policy = FailoverPolicy {
        rounds: 2,
        ..FailoverPolicy::default()
    };
    let client = Client::builder()
        .endpoint(&uri)
        .api_key("k")
        .failover(policy)
        .connect()
        .unwrap();
    let answer = client.lease("acme", RequestKind::OrderSync).acquire().await;
    assert!(
        matches!(answer, Err(Error::Unavailable { .. })),
        "{answer:?}"
    );
    let calls = short.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "one call per round");
    let gap = calls[1] - calls[0];
    assert!(
        gap >= Duration::from_millis(1500),
        "called again after {gap:?}"
    );

    let long = Unavailable {
        retry_after: Duration::from_secs(30),
        calls: Arc::default(),
    };
    let uri = serve_fake(long.clone()).await;
    let client = Client::builder()
        .endpoint(&uri)
        .api_key("k")
        .failover(policy)
        .connect()
        .unwrap();
    let started = Instant::now();
    let answer = client.lease("acme", RequestKind::OrderSync).acquire().await;
    let Err(Error::Unavailable {
        retry_after: Some(retry_after),
        ..
    }) = answer
    else {
        panic!("expected UNAVAILABLE with a retry-after: {answer:?}");
    };
    assert!(retry_after > Duration::from_secs(25), "{retry_after:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "not waited for"
    );
    assert_eq!(long.calls.lock().unwrap().len(), 1);

    // `call`'s fallback runs then too, told that no replica answered and when to retry;
    // the replica is not even called, its retry-after not being over.
    let seen: Arc<Mutex<Option<Denial>>> = Arc::default();
    let seen_in = seen.clone();
    let answer = client
        .call("acme", RequestKind::OrderSync, |_token| async {
            Outcome::Success
        })
        .with_fallback(move |denial| async move {
            *seen_in.lock().unwrap() = Some(denial);
            Outcome::NotUsed
        })
        .await;
    assert_eq!(answer.unwrap(), Outcome::NotUsed, "the fallback's answer");
    let denial = seen.lock().unwrap().take().expect("the fallback ran");
    assert_eq!(denial.reason, DenialReason::Unavailable, "{denial:?}");
    assert!(
        denial.retry_after.unwrap() > Duration::from_secs(25),
        "{denial:?}"
    );
    let calls = long.calls.lock().unwrap().len();
    assert_eq!(calls, 1, "not called again before its retry-after");

    // Beside a working replica, the draining one is left for the other at once.
    let setup = Setup::new(PoolSetup::default()).await;
    let real = format!("http://{}", setup.app.addr);
    let client = Client::builder()
        .endpoints([uri, real.clone()])
        .api_key(&setup.worker_key)
        .connect()
        .unwrap();
    let lease = client
        .lease("acme", RequestKind::OrderSync)
        .acquire()
        .await
        .unwrap();
    assert_eq!(client.current_endpoint(), real);
    assert_eq!(long.calls.lock().unwrap().len(), 2);
    lease.release(Outcome::NotUsed).await.unwrap();
}

/// With the tenant at its quota (ceiling 2), `call` does not run the upstream call but
/// the fallback, with the denial's reason and retry-after, and the freshness bound of
/// the call's priority: critical 5 min, low 2 h by default, and what the caller set.
/// Without a fallback the denial is the error.
#[tokio::test]
async fn the_fallback_runs_on_denial_with_the_priority_s_freshness() {
    let pool = PoolSetup {
        guaranteed: 0,
        burst: 2,
        ..PoolSetup::default()
    };
    let setup = Setup::new(pool).await;
    let held = [setup.acme_lease().await, setup.acme_lease().await];

    let denial_for = |client: Client, kind: RequestKind| async move {
        let ran = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<Option<Denial>>> = Arc::default();
        let (ran_in, seen_in) = (ran.clone(), seen.clone());
        let answer: Result<&str, Outcome> = client
            .call("acme", kind, move |_token| async move {
                ran_in.store(true, Ordering::SeqCst);
                Ok("live")
            })
            .with_fallback(move |denial| async move {
                *seen_in.lock().unwrap() = Some(denial);
                Ok("cached")
            })
            .await
            .expect("the fallback answers");
        assert_eq!(answer, Ok("cached"));
        assert!(
            !ran.load(Ordering::SeqCst),
            "no upstream call without a lease"
        );
        let denial = seen.lock().unwrap().take();
        denial.expect("the fallback saw the denial")
    };

    let critical = denial_for(setup.client.clone(), RequestKind::Payment).await;
    assert_eq!(critical.reason, DenialReason::TenantQuota, "{critical:?}");
    let retry_after = critical.retry_after.expect("a retry-after");
    assert!(
        retry_after <= LEASE_TTL + Duration::from_secs(10),
        "within the held slots' expiry + window (10 s): {retry_after:?}"
    );
    assert_eq!(critical.priority, Priority::Critical);
    assert_eq!(critical.max_staleness, Duration::from_secs(5 * 60));
    assert!(critical.accepts_age(Duration::from_secs(299)));
    assert!(!critical.accepts_age(Duration::from_secs(301)));

    let background = denial_for(setup.client.clone(), RequestKind::Background).await;
    assert_eq!(background.priority, Priority::Low);
    assert_eq!(background.max_staleness, Duration::from_secs(2 * 3600));

    let fussy = Client::builder()
        .endpoint(format!("http://{}", setup.app.addr))
        .api_key(&setup.worker_key)
        .freshness(FreshnessPolicy::default().with(Priority::Normal, Duration::from_secs(10)))
        .connect()
        .unwrap();
    let normal = denial_for(fussy, RequestKind::OrderSync).await;
    assert_eq!(normal.max_staleness, Duration::from_secs(10));

    let no_fallback = setup
        .client
        .call("acme", RequestKind::OrderSync, |_token| async {
            Outcome::Success
        })
        .await;
    let Err(Error::Denied(denial)) = no_fallback else {
        panic!("expected the denial: {no_fallback:?}");
    };
    assert_eq!(denial.reason, DenialReason::TenantQuota);
    drop(held);
}

/// An emulator accepting tok-0's secret, `limit` per minute, blocking for `block`.
async fn emulator(limit: u32, block: Duration, clock: Clock) -> EmulatorHandle {
    let config = EmulatorConfig {
        limit,
        block,
        clock,
        ..EmulatorConfig::default()
    }
    .with_tokens([token_secret(0)]);
    Emulator::start(config).await.expect("emulator")
}

/// `client.call` with the BaseLinker adapter: posts `getJournalList` to the emulator
/// with the leased token and sorts the answer, reading times in Europe/Warsaw.
async fn call_baselinker(client: &Client, upstream: &EmulatorHandle) -> Reply {
    let http = upstream.client();
    let answer = client
        .call("acme", RequestKind::OrderSync, |token| async move {
            use secrecy::ExposeSecret;
            let params = serde_json::json!({});
            let post = http.post(token.expose_secret(), "getJournalList", &params);
            let (status, body) = post.await.expect("the emulator answers");
            Reply::from_http(status, &body, &BlockZone::default())
        })
        .await;
    answer.expect("leased")
}

fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// The BaseLinker adapter on a blocked token: the emulator (1 request a minute, 2 min
/// blocks) answers the second call ERROR_BLOCKED_TOKEN; `call` reads the block's end
/// exactly as the emulator set it and releases UPSTREAM_RATE_LIMITED with it, so the
/// service quarantines the token until that instant and denies NO_USABLE_TOKEN.
#[tokio::test]
async fn the_baselinker_adapter_quarantines_a_blocked_token_until_its_end() {
    let setup = Setup::new(PoolSetup::default()).await;
    let upstream = emulator(1, Duration::from_secs(120), Clock::System).await;
    assert!(matches!(
        call_baselinker(&setup.client, &upstream).await,
        Reply::Success(_)
    ));
    let blocked = call_baselinker(&setup.client, &upstream).await;
    let Reply::Blocked {
        until: Some(until),
        message,
    } = blocked
    else {
        panic!("expected a blocked token with a time: {blocked:?}");
    };
    let block_end = upstream.stats(&token_secret(0)).blocked_until_ms;
    assert_eq!(Some(unix_ms(until)), block_end, "{message}");

    let (state, state_until) = eventually(WAIT, "tok-0 quarantined", || async {
        let (state, until) = setup.token_state().await;
        (state == pb::TokenState::Quarantined).then_some((state, until))
    })
    .await;
    assert_eq!(state, pb::TokenState::Quarantined);
    assert_eq!(state_until, block_end, "quarantined until the block's end");
    let denied = setup
        .client
        .lease("acme", RequestKind::OrderSync)
        .acquire()
        .await;
    let Err(Error::Denied(denial)) = denied else {
        panic!("expected a denial: {denied:?}");
    };
    assert_eq!(denial.reason, DenialReason::NoUsableToken, "{denial:?}");
}

/// In summer the emulator writes Warsaw summer time (+02:00), and the adapter reads it
/// back to the emulator's own instant: read at a fixed +01:00 it would be an hour early.
#[tokio::test]
async fn the_baselinker_adapter_reads_warsaw_summer_time() {
    let setup = Setup::new(PoolSetup::default()).await;
    let summer_noon_utc = 1_782_900_000_000; // 2026-07-01 10:00:00 UTC, 12:00 in Warsaw
    let upstream = emulator(1, Duration::from_secs(600), Clock::manual(summer_noon_utc)).await;
    call_baselinker(&setup.client, &upstream).await;
    let blocked = call_baselinker(&setup.client, &upstream).await;
    let Reply::Blocked {
        until: Some(until),
        message,
    } = blocked
    else {
        panic!("expected a blocked token with a time: {blocked:?}");
    };
    assert!(message.ends_with("2026-07-01 12:10:00"), "{message}");
    assert_eq!(unix_ms(until), summer_noon_utc + 600_000);
}

/// Creates tenants `<prefix>-0`, `<prefix>-1`, … every 200 ms through the server at
/// `addr` until the returned sender is dropped.
fn keep_creating(addr: SocketAddr, key: &str, prefix: &'static str) -> oneshot::Sender<()> {
    let (stop, mut stopped) = oneshot::channel::<()>();
    let key = key.to_owned();
    tokio::spawn(async move {
        let channel = Channel::from_shared(format!("http://{addr}")).unwrap();
        let mut admin = AdminServiceClient::new(channel.connect_lazy());
        for i in 0.. {
            if !matches!(stopped.try_recv(), Err(TryRecvError::Empty)) {
                return;
            }
            create_tenant(&mut admin, &key, &format!("{prefix}-{i}"), "flex").await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    stop
}

/// Reads the watch until a ConfigChanged about a tenant named `<prefix>-…`; whether a
/// Resync came before it.
async fn until_change_of(watch: &mut tokenlease_client::Watch, prefix: &str) -> bool {
    use tokenlease_client::pb::event::Kind;
    let mut resynced = false;
    loop {
        let item = tokio::time::timeout(WAIT, watch.next()).await;
        let item = item.expect("an item in time").expect("the watch goes on");
        match item.expect("no error") {
            WatchItem::Resync { .. } => resynced = true,
            WatchItem::Event(event) => {
                if let Some(Kind::ConfigChanged(change)) = event.kind
                    && change.resource_id.starts_with(prefix)
                {
                    return resynced;
                }
            }
        }
    }
}

/// A watch outlives its server: `tokenlease serve` is killed and started again (same
/// port, same data folder); the client subscribes again by itself, says `Resync`
/// (events may have been missed) before anything else, and goes on with the events of
/// the new process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resubscribes_after_a_restart_and_says_resync() {
    let dir = tempfile::tempdir().unwrap();
    let (grpc, metrics) = two_addresses();
    let mut server = start_binary(dir.path(), grpc, metrics);
    let (channel, admin_key) = connect_when_ready(dir.path(), grpc).await;
    PoolSetup::default()
        .create(&mut AdminServiceClient::new(channel), &admin_key)
        .await;
    let client = Client::connect([format!("http://{grpc}")], &admin_key).unwrap();
    let mut watch = client.watch(WatchFilter::default());
    let creating = keep_creating(grpc, &admin_key, "before");
    let resynced = until_change_of(&mut watch, "before").await;
    assert!(!resynced, "no Resync before any break");
    drop(creating);

    server.kill().await.unwrap();
    let (_, metrics) = two_addresses();
    let _server = start_binary(dir.path(), grpc, metrics);
    connect_when_ready(dir.path(), grpc).await;
    // Changes made before the watch is back are missed: the first one it shows after
    // the restart must come after a Resync.
    let creating = keep_creating(grpc, &admin_key, "after");
    let resynced = until_change_of(&mut watch, "after").await;
    assert!(
        resynced,
        "a Resync came before the restarted server's events"
    );
    drop(creating);
}

/// Over TLS: a client given the server's CA gets leases from an `https://` endpoint; a
/// plaintext client gets none (and says no replica was available).
#[tokio::test]
async fn the_client_speaks_tls() {
    use super::tls::spawn_with_tls;

    let env = TestEnv::new(Db::Sqlite, Counters::Memory).await;
    let (app, tls) = spawn_with_tls(&env).await;
    let https = format!("https://localhost:{}", app.addr.port());
    let client = Client::builder()
        .endpoint(&https)
        .api_key(&app.admin_key)
        .tls(tls.clone())
        .connect()
        .unwrap();
    let channel = Channel::from_shared(https).unwrap();
    let mut admin = AdminServiceClient::new(channel.tls_config(tls).unwrap().connect_lazy());
    PoolSetup::default()
        .create(&mut admin, &app.admin_key)
        .await;
    create_tenant(&mut admin, &app.admin_key, "acme", "flex").await;
    let lease = client.lease("acme", RequestKind::OrderSync).acquire().await;
    let lease = lease.expect("a lease over TLS");
    lease.release(Outcome::NotUsed).await.unwrap();

    let plain = Client::builder()
        .endpoint(format!("http://{}", app.addr))
        .api_key(&app.admin_key)
        .failover(FailoverPolicy {
            rounds: 1,
            ..FailoverPolicy::default()
        })
        .connect()
        .unwrap();
    let refused = plain.lease("acme", RequestKind::OrderSync).acquire().await;
    assert!(
        matches!(refused, Err(Error::Unavailable { .. })),
        "{refused:?}"
    );
}

/// `traceparent` propagation: a call made inside the caller's span (tracing with the
/// OpenTelemetry layer) is exported by the service as a server span in the caller's
/// trace, the caller's span its parent.
#[tokio::test(flavor = "current_thread")]
async fn the_client_continues_the_callers_trace() {
    use tracing::Instrument;
    use tracing_subscriber::layer::SubscriberExt;

    let (collector, provider) = receiver().await;
    // This thread runs every task of the test (current_thread), so a thread-local
    // subscriber sees the caller's and the server's spans without the global one.
    let subscriber =
        tracing_subscriber::registry().with(tokenlease::telemetry::otel_layer(&provider));
    let _default = tracing::subscriber::set_default(subscriber);
    let setup = Setup::new(PoolSetup::default()).await;

    let caller = tracing::info_span!("caller");
    let lease = setup
        .client
        .lease("acme", RequestKind::OrderSync)
        .acquire()
        .instrument(caller)
        .await
        .unwrap();
    lease.release(Outcome::NotUsed).await.unwrap();

    let spans = exported(&collector, &provider, "counters.acquire").await;
    setup.app.stop().await;
    drop(_default);
    tokenlease::telemetry::shutdown(provider).await.unwrap();
    // Asserted after the shutdown: a panic with the provider alive would hang in its
    // drop (its exporter task runs on this thread's runtime).
    let caller = spans.iter().find(|s| s.name == "caller");
    let caller = caller.unwrap_or_else(|| panic!("no caller span: {spans:#?}"));
    let server = spans
        .iter()
        .find(|s| s.name == "tokenlease.v1.LeaseService/AcquireLease")
        .expect("the server's span");
    assert_eq!(server.trace_id, caller.trace_id, "one trace");
    assert_eq!(
        server.parent_span_id, caller.span_id,
        "the caller's span is its parent"
    );
}
