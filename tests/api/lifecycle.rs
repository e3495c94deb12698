//! A replica's start and stop as a process: it refuses to count leases alone beside
//! other replicas, and on SIGTERM it answers every waiting caller before it exits.

use std::net::SocketAddr;
use std::time::Duration;

use tokenlease::grpc::pb::{self, acquire_lease_response::Result as Answer};
use tokenlease::grpc::pb::{
    admin_service_client::AdminServiceClient, lease_service_client::LeaseServiceClient,
};
use tonic::Code;
use tonic_types::StatusExt;

use super::breaker::{configure, quarantine};
use super::faults::holds_announced;
use super::fixtures::{PoolSetup, create_tenant, tenant_usage_on};
use super::helpers::{
    Counters, Db, PG_ADMIN_URL, TestApp, TestEnv, authed, eventually, granted_at, lease_request,
    millis, ms, timed, ts_ms,
};
use super::observe::{
    clean_command, connect_when_ready, free_port, start_binary, two_addresses, wait_for,
};

/// `serve` with a Postgres DATABASE_URL and no REDIS_URL exits non-zero, saying why
/// (replicas counting alone grant a token's limit once each) and what to set.
#[tokio::test]
async fn serve_refuses_to_count_alone_beside_other_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let run = clean_command(env!("CARGO_BIN_EXE_tokenlease"))
        .arg("serve")
        .env("DATABASE_URL", PG_ADMIN_URL)
        .env("TOKENLEASE_DATA_DIR", dir.path())
        .env("TOKENLEASE_LISTEN", format!("127.0.0.1:{}", free_port()))
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("serve exits instead of serving")
        .expect("run tokenlease serve");
    assert!(!output.status.success(), "serve started: {output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    for part in ["REDIS_URL is not set", "TOKENLEASE_COUNTERS=memory"] {
        assert!(stderr.contains(part), "{part}: {stderr}");
    }
}

/// SIGTERM with 4 callers waiting for a slot: each is answered UNAVAILABLE with a
/// RetryInfo saying "now" (go to another replica), none is cut off by the transport,
/// and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_every_waiting_caller_then_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut server = start_binary(dir.path(), grpc, metrics);
    let (channel, key) = connect_when_ready(dir.path(), grpc).await;
    let mut admin = AdminServiceClient::new(channel.clone());
    let pool = PoolSetup {
        limit: 2, // one usable slot per 30 s
        window_ms: 30_000,
        ..Default::default()
    };
    pool.create(&mut admin, &key).await;
    create_tenant(&mut admin, &key, "acme", "flex").await;
    let lease = LeaseServiceClient::new(channel.clone());
    let request = |max_wait_ms| {
        authed(
            pb::AcquireLeaseRequest {
                tenant_id: "acme".into(),
                max_wait: Some(millis(max_wait_ms)),
                ..Default::default()
            },
            &key,
        )
    };
    let first = lease.clone().acquire_lease(request(0)).await.unwrap();
    assert!(matches!(first.into_inner().result, Some(Answer::Lease(_))));
    let waiters: Vec<_> = (0..4)
        .map(|_| {
            // The slot frees after TTL + W (35 s): within the wait, so they wait.
            let (mut client, request) = (lease.clone(), request(120_000));
            tokio::spawn(async move { client.acquire_lease(request).await })
        })
        .collect();
    eventually(Duration::from_secs(10), "4 callers waiting", || {
        let (mut admin, key) = (admin.clone(), key.clone());
        async move {
            let usage = tenant_usage_on(&mut admin, &key, "acme").await;
            (usage.tenants[0].waiting_callers == 4).then_some(())
        }
    })
    .await;

    let pid = server.id().expect("server pid").to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    assert!(kill.expect("run kill").success());
    for waiter in waiters {
        let status = tokio::time::timeout(Duration::from_secs(20), waiter)
            .await
            .expect("a waiting caller was answered")
            .unwrap()
            .expect_err("no slot frees for 35 s: no lease");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("shutting down"), "{status:?}");
        let retry = status.get_details_retry_info();
        assert_eq!(
            retry.and_then(|r| r.retry_delay),
            Some(Duration::ZERO),
            "RetryInfo says: another replica, now: {status:?}"
        );
    }
    let exit = tokio::time::timeout(Duration::from_secs(20), server.wait())
        .await
        .expect("the process exits after answering")
        .unwrap();
    assert!(exit.success(), "exit status {exit:?}");
}

/// The embedded replica restarted mid-window (stop, start at once, same data folder):
/// its new in-process counters know nothing of the leases granted before, so it holds
/// the upstream (COUNTERS_RECOVERING) and grants again only once every earlier lease
/// is out of every window: no window spanning the restart sees more than the limit.
#[tokio::test]
async fn an_embedded_restart_holds_until_earlier_leases_are_out() {
    let env = TestEnv::new(Db::Sqlite, Counters::Memory).await;
    let app = env.spawn().await;
    let pool = PoolSetup {
        limit: 20, // 19 usable per 2 s
        window_ms: 2_000,
        ..Default::default()
    };
    pool.create(&mut app.admin().await, &app.admin_key).await;
    create_tenant(&mut app.admin().await, &app.admin_key, "acme", "flex").await;
    let mut last_expiry = 0;
    for i in 0..19 {
        let Answer::Lease(lease) = acquire(&app).await else {
            panic!("lease {i} of 19 denied")
        };
        last_expiry = last_expiry.max(ts_ms(lease.expires_at.as_ref().unwrap()));
    }
    app.stop().await;

    let app = env.spawn().await;
    let Answer::Denial(denial) = acquire(&app).await else {
        panic!("granted right after the restart")
    };
    assert_eq!(
        denial.reason,
        pb::DenialReason::CountersRecovering as i32,
        "{}",
        denial.message
    );
    // Window 2 s + TTL 1 s (+ grace 0) from this, the first call after the restart.
    assert_eq!(
        denial.retry_after,
        Some(millis(3_000)),
        "{}",
        denial.message
    );
    let lease = eventually(
        Duration::from_secs(10),
        "a lease after the hold",
        || async {
            match acquire(&app).await {
                Answer::Lease(lease) => Some(lease),
                Answer::Denial(_) => None,
            }
        },
    )
    .await;
    let granted_at = granted_at(&lease);
    assert!(
        granted_at > last_expiry + 2_000,
        "granted at {granted_at}, in a window with the lease that expired at {last_expiry}"
    );
}

/// The same restart of the real binary (killed, started again at once on the same data
/// folder) is visible to operators: the first call after it is denied
/// COUNTERS_RECOVERING, one `CountersRecovering` event says until when, and /metrics
/// counts the denial under `reason="counters_recovering"` (what the LeaseCountersLost
/// alert watches).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_restart_is_announced_in_events_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (grpc, metrics) = two_addresses();
    let mut server = start_binary(dir.path(), grpc, metrics);
    let (channel, key) = connect_when_ready(dir.path(), grpc).await;
    let pool = PoolSetup {
        window_ms: 2_000,
        ..Default::default()
    };
    pool.create(&mut AdminServiceClient::new(channel.clone()), &key)
        .await;
    create_tenant(
        &mut AdminServiceClient::new(channel.clone()),
        &key,
        "acme",
        "flex",
    )
    .await;
    let request = || {
        let request = pb::AcquireLeaseRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        };
        authed(request, &key)
    };
    let mut lease = LeaseServiceClient::new(channel);
    let first = lease.acquire_lease(request()).await.unwrap().into_inner();
    assert!(matches!(first.result, Some(Answer::Lease(_))));
    server.kill().await.unwrap();

    let (grpc, metrics) = two_addresses();
    let _server = start_binary(dir.path(), grpc, metrics);
    let (channel, _) = connect_when_ready(dir.path(), grpc).await;
    let mut lease = LeaseServiceClient::new(channel);
    let watch = pb::WatchEventsRequest::default();
    let mut events = lease
        .watch_events(authed(watch, &key))
        .await
        .unwrap()
        .into_inner();
    let (answer, span) = timed(lease.acquire_lease(request())).await;
    let Some(Answer::Denial(denial)) = answer.unwrap().into_inner().result else {
        panic!("granted right after the restart")
    };
    assert_eq!(
        denial.reason,
        pb::DenialReason::CountersRecovering as i32,
        "{denial:?}"
    );
    let retry_ms = ms(&denial.retry_after.unwrap());
    let announced = holds_announced(&mut events).await;
    assert_eq!(announced.len(), 1, "{announced:?}");
    assert_eq!(announced[0].0, "up");
    span.assert_points_at(retry_ms, announced[0].1, "the announced end of the hold");
    let labels = [("tenant", "acme"), ("reason", "counters_recovering")];
    wait_for(metrics, tokenlease::metrics::names::DENIALS, &labels, 1.0).await;
}

async fn acquire(app: &TestApp) -> Answer {
    let request = lease_request("acme", &app.admin_key);
    let answer = app.lease().await.acquire_lease(request).await;
    answer.unwrap().into_inner().result.unwrap()
}

/// Shutdown also answers a caller waiting for a token to come back (its only token is
/// quarantined, and the quarantine ends within its wait): UNAVAILABLE with RetryInfo 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_a_caller_waiting_for_a_token_to_come_back() {
    let env = TestEnv::new(Db::Sqlite, Counters::Memory).await;
    let app = env.spawn().await;
    configure(&app, 1).await;
    quarantine(&app, "tok-0", 20_000).await;
    let request = authed(
        pb::AcquireLeaseRequest {
            tenant_id: "acme".into(),
            max_wait: Some(millis(30_000)),
            ..Default::default()
        },
        &app.admin_key,
    );
    let mut client = app.lease().await;
    let waiter = tokio::spawn(async move { client.acquire_lease(request).await });
    // A fixed pause, not a wait for a condition: a caller waiting for a token holds no
    // place in its tenant's line, so nothing shows it from outside. Had the call not
    // reached the server by the shutdown, it would fail with a transport error, not
    // pass: a slow machine can only make this test fail, never pass wrongly.
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.stop().await;
    let status = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiting caller was answered")
        .unwrap()
        .expect_err("the token is quarantined for 20 s: no lease");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
    let retry = status.get_details_retry_info();
    assert_eq!(retry.and_then(|r| r.retry_delay), Some(Duration::ZERO));
}

/// Issue 11, row 12: master keys rotate in a running server. Before, a server did not
/// know a key added after it started (tokens re-sealed with it gave NO_USABLE_TOKEN
/// until a restart), and a master.key with two keys made `serve` refuse to start. Now
/// the key file names its active key; `rotate-keys` refuses while a running replica
/// lacks the new key; SIGHUP reloads it: new tokens are sealed with the new key,
/// `rotate-keys` re-seals the others while the server runs, leasing goes on with the
/// right secrets, and a restart with both keys starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_keys_rotate_in_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let (grpc, metrics) = two_addresses();
    let mut server = start_binary(dir.path(), grpc, metrics);
    let (channel, key) = connect_when_ready(dir.path(), grpc).await;
    let mut admin = AdminServiceClient::new(channel.clone());
    PoolSetup::default().create(&mut admin, &key).await;
    create_tenant(&mut admin, &key, "acme", "flex").await;

    let binary = env!("CARGO_BIN_EXE_tokenlease");
    let new_key = std::process::Command::new(binary)
        .arg("gen-master-key")
        .output()
        .unwrap();
    let new_key = String::from_utf8(new_key.stdout).unwrap().trim().to_owned();
    let key_file = dir.path().join("master.key");
    let old = std::fs::read_to_string(&key_file).unwrap();
    assert!(old.contains("active=k1"), "{old}");
    let rotated = format!("{}k2={new_key}\n", old.replace("active=k1", "active=k2"));
    std::fs::write(&key_file, rotated).unwrap();
    let rotate_keys = || {
        tokio::process::Command::new(binary)
            .arg("rotate-keys")
            .env_remove("DATABASE_URL")
            .env("TOKENLEASE_DATA_DIR", dir.path())
            .output()
    };
    // The running server does not hold k2 yet: rotate-keys refuses, changing nothing.
    let refused = rotate_keys().await.unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{refused:?}");
    assert!(said.contains("do not hold master key 'k2'"), "{said}");
    let pid = server.id().unwrap().to_string();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status();
    assert!(hup.unwrap().success());

    // New tokens are sealed with k2 once the reload is through.
    let mut n = 0;
    eventually(Duration::from_secs(10), "a token sealed with k2", || {
        n += 1;
        let (mut admin, key) = (admin.clone(), key.clone());
        let id = format!("tok-new-{n}");
        async move {
            let token = pb::Token {
                id: id.clone(),
                upstream_id: "up".into(),
                secret: super::fixtures::token_secret(7),
                owner: Some(pb::token::Owner::DedicatedTenantId("acme".into())),
                ..Default::default()
            };
            let created = admin
                .create_token(authed(pb::CreateTokenRequest { token: Some(token) }, &key))
                .await
                .unwrap();
            (created.into_inner().token.unwrap().key_id == "k2").then_some(())
        }
    })
    .await;
    let rotate = rotate_keys().await.unwrap();
    let said = String::from_utf8_lossy(&rotate.stdout);
    assert!(
        rotate.status.success() && said.contains("under key 'k2'"),
        "{said} {rotate:?}"
    );
    let tokens = admin
        .list_tokens(authed(pb::ListTokensRequest::default(), &key))
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert!(tokens.iter().all(|t| t.key_id == "k2"), "{tokens:?}");
    // The running server opens the re-sealed pool token.
    let lease = LeaseServiceClient::new(channel);
    let leased = eventually(
        Duration::from_secs(10),
        "a lease on the re-sealed token",
        || {
            let (mut lease, key) = (lease.clone(), key.clone());
            async move {
                let request = pb::AcquireLeaseRequest {
                    tenant_id: "acme".into(),
                    ..Default::default()
                };
                match lease
                    .acquire_lease(authed(request, &key))
                    .await
                    .ok()?
                    .into_inner()
                    .result
                {
                    Some(Answer::Lease(l)) if l.token_id == "tok-0" => Some(l),
                    _ => None,
                }
            }
        },
    )
    .await;
    assert_eq!(leased.token, super::fixtures::token_secret(0));

    // A restart with both keys in the file starts.
    server.kill().await.unwrap();
    let (grpc, metrics) = two_addresses();
    let _server = start_binary(dir.path(), grpc, metrics);
    connect_when_ready(dir.path(), grpc).await;
}
