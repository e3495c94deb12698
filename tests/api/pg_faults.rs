//! Property 12 with PostgreSQL gone: a throwaway Postgres (this test's own, not the
//! shared one) is stopped under a running replica (`pg_ctl stop -m immediate`, as when
//! the database host dies) and started again.

use std::future::Future;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tokenlease::grpc::pb::{self, acquire_lease_response::Result as Answer};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use super::fixtures::{PoolSetup, create_tenant, token_secret};
use super::helpers::{Counters, Db, TestApp, TestEnv, authed, run_watching_panics};
use super::throwaway::free_port;

/// How long an admin call may take while the database is away: `database_timeout_ms`
/// (default 1 s) plus 300 ms for a loaded machine's scheduling.
const ADMIN_BOUND: Duration = Duration::from_millis(1_300);
/// How long admin writes may take to work again once Postgres is back.
const RECOVERY: Duration = Duration::from_secs(30);

/// The newest PostgreSQL server binaries (`/usr/lib/postgresql/<version>/bin`).
fn pg_bin() -> PathBuf {
    let root = PathBuf::from("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries (initdb, pg_ctl) must be installed under \
             /usr/lib/postgresql/<version>/bin for this test"
        )
    })
}

fn check(what: &str, output: std::io::Result<Output>) {
    let output = output.unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A PostgreSQL server of this test's own: `initdb` into a temporary folder owned by the
/// `postgres` user, served on a free port on 127.0.0.1; stopped and removed on drop.
pub struct ThrowawayPostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    running: bool,
}

impl ThrowawayPostgres {
    pub fn start() -> Self {
        let bin = pg_bin();
        let dir = tempfile::tempdir().expect("temporary folder");
        check(
            "chown the Postgres folder to postgres",
            Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path())
                .output(),
        );
        let mut pg = Self {
            bin,
            dir,
            port: 0,
            running: false,
        };
        check(
            "initdb",
            pg.as_postgres("initdb")
                .arg("-D")
                .arg(pg.data())
                .args(["-U", "postgres", "--auth=trust", "--no-sync"])
                .args(["-E", "UTF8", "--locale=C"])
                .output(),
        );
        // A port taken between choosing and binding fails the start: choose again.
        for attempt in 1..=3 {
            pg.port = free_port();
            match pg.pg_ctl_start() {
                Ok(()) => break,
                Err(why) if attempt < 3 => eprintln!("Postgres did not start, retrying: {why}"),
                Err(why) => panic!("Postgres did not start: {why}"),
            }
        }
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn as_postgres(&self, program: &str) -> Command {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"])
            .arg(self.bin.join(program));
        cmd
    }

    fn pg_ctl_start(&mut self) -> Result<(), String> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let output = self
            .as_postgres("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("postgres.log"))
            .args(["-w", "-t", "30", "-o", &options, "start"])
            .output()
            .map_err(|e| format!("cannot run pg_ctl: {e}"))?;
        if output.status.success() {
            self.running = true;
            return Ok(());
        }
        let log = std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default();
        Err(format!(
            "{}{}{log}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl stop -m immediate`: the server quits at once, connections are cut.
    pub fn stop_immediately(&mut self) {
        check(
            "pg_ctl stop -m immediate",
            self.as_postgres("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-m", "immediate", "-w", "stop"])
                .output(),
        );
        self.running = false;
    }

    /// Starts the stopped server again on the same port (crash recovery included).
    pub fn restart(&mut self) {
        self.pg_ctl_start()
            .unwrap_or_else(|why| panic!("Postgres did not restart: {why}"));
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        if self.running {
            let _ = self
                .as_postgres("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-m", "immediate", "-w", "stop"])
                .output();
        }
        // The folder (owned by postgres; we run as root) goes when `dir` drops.
    }
}

async fn acquire(app: &TestApp, key: &str, tenant: &str) -> Result<Answer, Status> {
    let req = pb::AcquireLeaseRequest {
        tenant_id: tenant.into(),
        ..Default::default()
    };
    let answer = app.lease().await.acquire_lease(authed(req, key)).await?;
    Ok(answer.into_inner().result.expect("a lease or a denial"))
}

async fn lease(app: &TestApp, key: &str, tenant: &str) -> pb::Lease {
    match acquire(app, key, tenant).await {
        Ok(Answer::Lease(lease)) => lease,
        other => panic!("expected a lease for {tenant}, got {other:?}"),
    }
}

async fn release(app: &TestApp, key: &str, lease_id: &str, outcome: pb::ReleaseOutcome) {
    let req = pb::ReleaseLeaseRequest {
        lease_id: lease_id.into(),
        outcome: outcome as i32,
        ..Default::default()
    };
    let answer = app.lease().await.release_lease(authed(req, key)).await;
    let answer = answer.unwrap_or_else(|s| panic!("release {lease_id}: {s:?}"));
    assert!(!answer.into_inner().already_released);
}

/// Runs one admin write; it must fail UNAVAILABLE, within `ADMIN_BOUND`, with a
/// retry-after and a message naming the configuration database and what still works.
async fn expect_unavailable<T: std::fmt::Debug>(
    what: &str,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) {
    let started = Instant::now();
    let answer = tokio::time::timeout(ADMIN_BOUND * 2, call).await;
    let took = started.elapsed();
    let answer = answer.unwrap_or_else(|_| panic!("{what}: no answer after {took:?}"));
    let status = match answer {
        Ok(ok) => panic!("{what} succeeded with Postgres down: {ok:?}"),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::Unavailable, "{what}: {status:?}");
    let message = status.message().to_lowercase();
    assert!(
        message.contains("the configuration database")
            && message.contains("leasing goes on")
            && message.contains("admin reads are answered from it"),
        "{what}: {message:?}"
    );
    assert!(
        status.get_details_retry_info().is_some(),
        "{what}: UNAVAILABLE carries a retry-after"
    );
    assert!(took <= ADMIN_BOUND, "{what}: answered after {took:?}");
}

/// Runs one admin read; it must succeed within `ADMIN_BOUND`, answered from the
/// loaded configuration `version` and saying so in its metadata.
async fn expect_loaded<T>(
    what: &str,
    version: i64,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> T {
    let started = Instant::now();
    let answer = tokio::time::timeout(ADMIN_BOUND * 4, call).await;
    let took = started.elapsed();
    let answer = answer.unwrap_or_else(|_| panic!("{what}: no answer after {took:?}"));
    let answer = answer.unwrap_or_else(|s| panic!("{what} with Postgres down: {s:?}"));
    let metadata = answer.metadata();
    let header = |name: &str| {
        metadata
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(
        header("tokenlease-served-from").as_deref(),
        Some("loaded-configuration"),
        "{what}: {metadata:?}"
    );
    assert_eq!(
        header("tokenlease-config-version"),
        Some(version.to_string()),
        "{what}"
    );
    assert!(took <= ADMIN_BOUND, "{what}: answered after {took:?}");
    answer.into_inner()
}

/// Polls the gRPC health service at `addr` until it answers NOT_SERVING for the
/// server as a whole and for both services.
async fn health_says_not_serving(addr: std::net::SocketAddr) {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await;
        if let Ok(channel) = channel {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let mut statuses = Vec::new();
            for service in [
                "",
                "tokenlease.v1.LeaseService",
                "tokenlease.v1.AdminService",
            ] {
                let request = HealthCheckRequest {
                    service: service.into(),
                };
                let answer = health.check(request).await;
                statuses.push(answer.map(|a| a.into_inner().status).ok());
            }
            if statuses == [Some(ServingStatus::NotServing as i32); 3] {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no NOT_SERVING health on {addr} while the database is away"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tenant(id: &str) -> pb::Tenant {
    pb::Tenant {
        id: id.into(),
        tier_id: "flex".into(),
        pool_id: "shared".into(),
        ..Default::default()
    }
}

/// Property 12, Postgres gone: with the configuration database stopped (immediate
/// shutdown) under a running replica, AcquireLease and ReleaseLease go on from the last
/// loaded configuration, with worker keys authenticated (and a bad key refused, a worker
/// key refused by the admin API) from it; admin writes (create, update, a token's
/// update) fail UNAVAILABLE within `database_timeout_ms` (1 s) with a retry-after and a
/// message saying what still works, and change nothing; admin reads (get, list) are
/// answered within the same bound from the loaded configuration, marked so in their
/// metadata; GetUsage (snapshot and Redis) still answers; nothing panics. A replica
/// started during the outage waits, with health NOT_SERVING, and serves once Postgres is
/// back. Postgres started again: admin writes work again without restarting the
/// replica, and a tenant created then and a tier's quota changed then take effect in
/// leasing at once.
#[test]
fn postgres_gone_leasing_goes_on_and_admin_fails_cleanly() {
    run_watching_panics("pg-gone", postgres_gone());
}

async fn postgres_gone() {
    let mut pg = ThrowawayPostgres::start();
    let env = TestEnv::new(Db::Sqlite, Counters::Redis).await;
    let mut settings = env.settings();
    settings.database_url = Some(pg.url());
    let app = env.spawn_with(settings.clone()).await;
    let admin_key = app.admin_key.clone();
    let mut admin = app.admin().await;
    // A 60 s window: every lease of the test stays counted until its end.
    let pool = PoolSetup {
        window_ms: 60_000,
        ..Default::default()
    };
    pool.create(&mut admin, &admin_key).await;
    create_tenant(&mut admin, &admin_key, "acme", "flex").await;
    let worker = app.worker_key(&["acme"]).await;
    let flex = admin
        .get_tier(authed(pb::GetTierRequest { id: "flex".into() }, &admin_key))
        .await
        .expect("get tier")
        .into_inner()
        .tier
        .expect("tier");
    lease(&app, &worker, "acme").await;
    let token = admin
        .list_tokens(authed(pb::ListTokensRequest::default(), &admin_key))
        .await
        .expect("list tokens")
        .into_inner()
        .tokens
        .remove(0);

    pg.stop_immediately();
    // A fixed pause, not a wait for a condition: the refresher (every 100 ms) should
    // find the database gone a few times before leasing is tried; what follows must
    // hold whether it has or not.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Leasing and authentication go on from the last loaded configuration.
    let mut leases = Vec::new();
    for _ in 0..10 {
        let granted = lease(&app, &worker, "acme").await;
        assert_eq!(granted.token, token_secret(0));
        leases.push(granted);
    }
    release(
        &app,
        &worker,
        &leases[0].lease_id,
        pb::ReleaseOutcome::NotUsed,
    )
    .await;
    release(
        &app,
        &worker,
        &leases[1].lease_id,
        pb::ReleaseOutcome::Success,
    )
    .await;
    let bad_key = format!("tl_{}_{}", "0".repeat(16), "0".repeat(64));
    let refused = acquire(&app, &bad_key, "acme").await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let wrong_role = admin
        .list_tenants(authed(pb::ListTenantsRequest::default(), &worker))
        .await
        .unwrap_err();
    assert_eq!(wrong_role.code(), Code::PermissionDenied, "{wrong_role:?}");

    // Admin writes fail cleanly within the bound, all at once (each timed on its own).
    let mut smaller = flex.clone();
    smaller.burst_per_window = 3;
    let (mut a1, mut a2, mut a3) = (admin.clone(), admin.clone(), admin.clone());
    let k = admin_key.as_str();
    let disable = pb::Token {
        id: token.id.clone(),
        disabled: true,
        ..token.clone()
    };
    tokio::join!(
        expect_unavailable(
            "CreateTenant",
            a1.create_tenant(authed(
                pb::CreateTenantRequest {
                    tenant: Some(tenant("later")),
                },
                k,
            )),
        ),
        expect_unavailable(
            "UpdateTier",
            a2.update_tier(authed(
                pb::UpdateTierRequest {
                    tier: Some(smaller.clone()),
                    update_mask: None,
                },
                k,
            )),
        ),
        expect_unavailable(
            "UpdateToken",
            a3.update_token(authed(
                pb::UpdateTokenRequest {
                    token: Some(disable),
                    update_mask: None,
                },
                k,
            )),
        ),
    );
    // Admin reads are answered from the loaded configuration, and say so.
    let version = app.leaser.config.current().version;
    let (mut a1, mut a2, mut a3, mut a4) =
        (admin.clone(), admin.clone(), admin.clone(), admin.clone());
    let (got_tenant, listed, got_tier, got_token) = tokio::join!(
        expect_loaded(
            "GetTenant",
            version,
            a1.get_tenant(authed(pb::GetTenantRequest { id: "acme".into() }, k)),
        ),
        expect_loaded(
            "ListTenants",
            version,
            a2.list_tenants(authed(pb::ListTenantsRequest::default(), k)),
        ),
        expect_loaded(
            "GetTier",
            version,
            a3.get_tier(authed(pb::GetTierRequest { id: "flex".into() }, k)),
        ),
        expect_loaded(
            "GetToken",
            version,
            a4.get_token(authed(
                pb::GetTokenRequest {
                    id: token.id.clone()
                },
                k
            )),
        ),
    );
    assert_eq!(got_tenant.tenant.expect("tenant").id, "acme");
    let ids: Vec<&str> = listed.tenants.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["acme"], "{listed:?}");
    assert_eq!(got_tier.tier, Some(flex.clone()));
    assert_eq!(got_token.token, Some(token.clone()));
    let missing = admin
        .get_tenant(authed(
            pb::GetTenantRequest {
                id: "nobody".into(),
            },
            k,
        ))
        .await
        .expect_err("an unknown tenant");
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    // Still leasing, and nothing of the refused writes took effect.
    lease(&app, &worker, "acme").await;
    let unknown = acquire(&app, &admin_key, "later").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    // Usage comes from the snapshot and Redis, so it stays readable: 1 + 10 + 1 leases,
    // one given back (NOT_USED).
    let usage = admin
        .get_usage(authed(pb::GetUsageRequest::default(), &admin_key))
        .await
        .expect("GetUsage needs no database")
        .into_inner();
    assert_eq!(usage.tokens[0].used_in_window, 11, "{usage:?}");

    // A replica started now waits for the database instead of exiting, and says
    // NOT_SERVING on its health service meanwhile.
    let mut later_settings = settings.clone();
    later_settings.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let later_addr = later_settings.listen;
    let later = {
        let later = env.spawn_with(later_settings);
        tokio::pin!(later);
        tokio::select! {
            _ = &mut later => panic!("a replica started while Postgres was down"),
            () = health_says_not_serving(later_addr) => {}
        }

        // Postgres is back: admin writes work again without a restart.
        pg.restart();
        tokio::time::timeout(RECOVERY, later)
            .await
            .expect("the replica started during the outage serves once Postgres is back")
    };
    let granted = lease(&later, &worker, "acme").await;
    assert_eq!(granted.token, token_secret(0));
    later.stop().await;
    let deadline = Instant::now() + RECOVERY;
    loop {
        let created = admin
            .create_tenant(authed(
                pb::CreateTenantRequest {
                    tenant: Some(tenant("later")),
                },
                &admin_key,
            ))
            .await;
        match created {
            Ok(_) => break,
            Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "admin writes did not work again within {RECOVERY:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The changes reach leasing at once: the new tenant leases, the smaller quota binds.
    assert_eq!(
        lease(&app, &admin_key, "later").await.token,
        token_secret(0)
    );
    admin
        .update_tier(authed(
            pb::UpdateTierRequest {
                tier: Some(smaller),
                update_mask: None,
            },
            &admin_key,
        ))
        .await
        .expect("UpdateTier after Postgres came back");
    match acquire(&app, &worker, "acme").await {
        Ok(Answer::Denial(d)) => {
            assert_eq!(d.reason, pb::DenialReason::TenantQuota as i32, "{d:?}")
        }
        other => panic!("acme is over its new quota of 3: {other:?}"),
    }
    let read = admin
        .get_tenant(authed(
            pb::GetTenantRequest { id: "later".into() },
            &admin_key,
        ))
        .await
        .expect("admin reads work again");
    assert_eq!(read.into_inner().tenant.expect("tenant").id, "later");

    app.stop().await;
    drop(env);
    drop(pg);
}
