//! Issue 11: careless and hostile callers. Each test reproduces one defect found by
//! testing the service from outside, as an attacker would.

use std::time::Duration;

use bytes::{Buf, BufMut};
use tokenlease::grpc::pb;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use super::fixtures::{PoolSetup, app_with};
use super::helpers::{Counters, Db, TestApp, authed, drain_events, eventually, lease_request};
use super::observe::{clean_command, connect_when_ready, start_binary, two_addresses, wait_for};
use super::throwaway::free_port;

/// Sends bytes as they are and reads the answer's bytes: a client that does not speak
/// protobuf (or speaks it wrong).
#[derive(Default)]
struct RawCodec;

struct Raw;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

/// Calls `path` with `body` as the request's encoded message.
pub(super) async fn raw_call(
    app: &TestApp,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(app.channel().await);
    grpc.ready().await.unwrap();
    let answer = grpc
        .unary(
            authed(body, &app.admin_key),
            http::uri::PathAndQuery::from_static(path),
            RawCodec,
        )
        .await;
    answer.map(tonic::Response::into_inner)
}

/// Row 8: a message that is not valid protobuf (a truncated varint, a field number 0, a
/// length past the end) is INVALID_ARGUMENT with a message naming the expected type,
/// not INTERNAL, on both services.
#[tokio::test]
async fn malformed_protobuf_is_invalid_argument() {
    let (_env, app) = app_with(
        Db::Sqlite,
        Counters::Memory,
        PoolSetup::default(),
        &["acme"],
    )
    .await;
    let bodies: [Vec<u8>; 3] = [vec![0x0a, 0xff], vec![0x00, 0x01], vec![0x0a, 0x20, b'a']];
    for body in bodies {
        for (path, message) in [
            (
                "/tokenlease.v1.LeaseService/AcquireLease",
                "AcquireLeaseRequest",
            ),
            ("/tokenlease.v1.AdminService/GetTenant", "GetTenantRequest"),
        ] {
            let status = raw_call(&app, path, body.clone())
                .await
                .expect_err("refused");
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{path} {body:?}: {status:?}"
            );
            assert!(status.message().contains(message), "{status:?}");
        }
    }
}

/// A worker key for "acme" created through the admin API: (id, whole key).
async fn worker_key(app: &TestApp) -> (String, String) {
    let key = pb::ApiKey {
        display_name: "worker".into(),
        role: pb::ApiKeyRole::Worker as i32,
        tenant_ids: vec!["acme".into()],
        ..Default::default()
    };
    let created = app
        .admin()
        .await
        .create_api_key(authed(
            pb::CreateApiKeyRequest { api_key: Some(key) },
            &app.admin_key,
        ))
        .await
        .unwrap()
        .into_inner();
    (created.api_key.unwrap().id, created.secret)
}

/// Rows 6 and 7: API key ids are checked before they reach a store, and never echoed.
/// A NUL (INTERNAL from Postgres before), 20,000 characters (a 20 KB grpc-message
/// before) and a whole key passed as an id (its secret echoed before) are
/// INVALID_ARGUMENT with a short message that contains none of the value, on Get,
/// Update and Delete, on both backends; ReleaseLease with a whole key as `lease_id`
/// (60 of its 64 secret hex digits echoed before) likewise.
#[tokio::test]
async fn api_key_ids_are_checked_and_never_echoed() {
    for db in [Db::Sqlite, Db::Postgres] {
        let (_env, app) = app_with(db, Counters::Memory, PoolSetup::default(), &["acme"]).await;
        let (id, whole) = worker_key(&app).await;
        let secret = whole.rsplit('_').next().unwrap().to_owned();
        let mut admin = app.admin().await;
        let k = app.admin_key.as_str();
        for bad in [
            "ab\0cd".to_owned(),
            "x".repeat(20_000),
            whole.clone(),
            String::new(),
        ] {
            let update = pb::ApiKey {
                id: bad.clone(),
                display_name: "w".into(),
                role: pb::ApiKeyRole::Worker as i32,
                tenant_ids: vec!["acme".into()],
                ..Default::default()
            };
            let answers = [
                admin
                    .get_api_key(authed(pb::GetApiKeyRequest { id: bad.clone() }, k))
                    .await
                    .map(|_| ()),
                admin
                    .delete_api_key(authed(pb::DeleteApiKeyRequest { id: bad.clone() }, k))
                    .await
                    .map(|_| ()),
                admin
                    .update_api_key(authed(
                        pb::UpdateApiKeyRequest {
                            api_key: Some(update),
                            update_mask: None,
                        },
                        k,
                    ))
                    .await
                    .map(|_| ()),
            ];
            for answer in answers {
                let status = answer.expect_err("a bad id is refused");
                assert_eq!(status.code(), Code::InvalidArgument, "{db:?}: {status:?}");
                assert!(
                    status.message().len() < 200,
                    "{db:?}: {} bytes",
                    status.message().len()
                );
                assert!(
                    !status.message().contains(&secret),
                    "{db:?}: the secret is echoed"
                );
                if bad.starts_with("tl_") {
                    assert!(status.message().contains("whole API key"), "{status:?}");
                }
            }
        }
        let release = pb::ReleaseLeaseRequest {
            lease_id: whole.clone(),
            outcome: pb::ReleaseOutcome::NotUsed as i32,
            ..Default::default()
        };
        let status = app
            .lease()
            .await
            .release_lease(authed(release, k))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(!status.message().contains(&secret[..16]), "{status:?}");
        // The key itself is untouched and still works by its id.
        let kept = admin
            .get_api_key(authed(pb::GetApiKeyRequest { id: id.clone() }, k))
            .await;
        assert_eq!(
            kept.unwrap().into_inner().api_key.unwrap().tenant_ids,
            ["acme"]
        );
    }
}

/// Row 9: UpdateApiKey checks the scope against the key's stored role. Before, a
/// request saying ADMIN stored a worker key with no tenant (and a request saying
/// WORKER gave an admin key a tenant list). Now a role change is FAILED_PRECONDITION
/// naming `api_key.role`, and the key is unchanged.
#[tokio::test]
async fn update_api_key_keeps_the_stored_role() {
    for db in [Db::Sqlite, Db::Postgres] {
        let (_env, app) = app_with(db, Counters::Memory, PoolSetup::default(), &["acme"]).await;
        let (id, _) = worker_key(&app).await;
        let mut admin = app.admin().await;
        let k = app.admin_key.as_str();
        let as_admin = pb::ApiKey {
            id: id.clone(),
            display_name: "now an admin?".into(),
            role: pb::ApiKeyRole::Admin as i32,
            tenant_ids: vec![],
            ..Default::default()
        };
        let status = admin
            .update_api_key(authed(
                pb::UpdateApiKeyRequest {
                    api_key: Some(as_admin),
                    update_mask: None,
                },
                k,
            ))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{db:?}: {status:?}"
        );
        assert!(status.message().starts_with("api_key.role"), "{status:?}");
        let kept = admin
            .get_api_key(authed(pb::GetApiKeyRequest { id }, k))
            .await
            .unwrap();
        let kept = kept.into_inner().api_key.unwrap();
        assert_eq!(
            (kept.role, kept.tenant_ids),
            (pb::ApiKeyRole::Worker as i32, vec!["acme".to_owned()])
        );
        assert_eq!(kept.display_name, "worker");
    }
}

/// Opens WatchEvents for `key`, filtered by `tenants` and `tokens`.
async fn watch(
    app: &TestApp,
    key: &str,
    tenants: &[&str],
    tokens: &[&str],
) -> Result<tonic::Streaming<pb::WatchEventsResponse>, tonic::Status> {
    let request = pb::WatchEventsRequest {
        tenant_ids: tenants.iter().map(|t| t.to_string()).collect(),
        token_ids: tokens.iter().map(|t| t.to_string()).collect(),
    };
    let answer = app.lease().await.watch_events(authed(request, key)).await;
    answer.map(tonic::Response::into_inner)
}

/// The ids of the `ConfigChanged` events that arrive until none has for 300 ms, and
/// the status that ended the stream, if it ended.
async fn config_changes(
    stream: &mut tonic::Streaming<pb::WatchEventsResponse>,
) -> (Vec<String>, Option<tonic::Status>) {
    let (events, ended) = drain_events(stream, Duration::from_millis(300)).await;
    let ids = events
        .into_iter()
        .filter_map(|event| match event.kind {
            Some(pb::event::Kind::ConfigChanged(c)) => Some(c.resource_id),
            _ => None,
        })
        .collect();
    (ids, ended)
}

/// A change to token `id` (its display name), through the admin API.
async fn touch_token(app: &TestApp, id: &str, owner: pb::token::Owner) {
    let token = pb::Token {
        id: id.into(),
        upstream_id: "up".into(),
        display_name: format!("touched {}", uuid_like()),
        owner: Some(owner),
        ..Default::default()
    };
    app.admin()
        .await
        .update_token(authed(
            pb::UpdateTokenRequest {
                token: Some(token),
                update_mask: None,
            },
            &app.admin_key,
        ))
        .await
        .unwrap();
}

fn uuid_like() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Row 4: a worker sees only its tenants' objects and shared ones. Before, an acme
/// worker received `ConfigChanged` for `beta-private` (a token dedicated to beta), both
/// unfiltered and with `token_ids` naming it. Now: the pool token acme uses, yes; beta's
/// token, no; an admin sees both.
#[tokio::test]
async fn a_worker_sees_only_its_tenants_objects() {
    let (_env, app) = app_with(
        Db::Sqlite,
        Counters::Memory,
        PoolSetup::default(),
        &["acme", "beta"],
    )
    .await;
    let private = pb::Token {
        id: "beta-private".into(),
        upstream_id: "up".into(),
        secret: "s3cret-beta".into(),
        owner: Some(pb::token::Owner::DedicatedTenantId("beta".into())),
        ..Default::default()
    };
    app.admin()
        .await
        .create_token(authed(
            pb::CreateTokenRequest {
                token: Some(private),
            },
            &app.admin_key,
        ))
        .await
        .unwrap();
    let worker = app.worker_key(&["acme"]).await;
    let mut unfiltered = watch(&app, &worker, &[], &[]).await.unwrap();
    let mut aimed = watch(&app, &worker, &[], &["beta-private"]).await.unwrap();
    let mut admin = watch(&app, &app.admin_key, &[], &[]).await.unwrap();
    touch_token(
        &app,
        "beta-private",
        pb::token::Owner::DedicatedTenantId("beta".into()),
    )
    .await;
    touch_token(&app, "tok-0", pb::token::Owner::PoolId("shared".into())).await;
    assert_eq!(config_changes(&mut unfiltered).await.0, ["tok-0"]);
    assert_eq!(config_changes(&mut aimed).await.0, Vec::<String>::new());
    assert_eq!(
        config_changes(&mut admin).await.0,
        ["beta-private", "tok-0"]
    );
}

/// Row 5: an open stream follows its key. Before, it kept delivering after the key was
/// deleted or its tenants shrank. Now a stream filtered by a tenant the key lost ends
/// PERMISSION_DENIED, and every stream of a deleted key ends UNAUTHENTICATED.
#[tokio::test]
async fn a_stream_ends_when_its_key_is_narrowed_or_revoked() {
    let (_env, app) = app_with(
        Db::Sqlite,
        Counters::Memory,
        PoolSetup::default(),
        &["acme", "beta"],
    )
    .await;
    let mut admin = app.admin().await;
    let k = app.admin_key.as_str();
    let scoped = |tenants: &[&str]| pb::ApiKey {
        display_name: "worker".into(),
        role: pb::ApiKeyRole::Worker as i32,
        tenant_ids: tenants.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    };
    let created = admin
        .create_api_key(authed(
            pb::CreateApiKeyRequest {
                api_key: Some(scoped(&["acme", "beta"])),
            },
            k,
        ))
        .await
        .unwrap()
        .into_inner();
    let (id, key) = (created.api_key.unwrap().id, created.secret);
    let mut on_beta = watch(&app, &key, &["beta"], &[]).await.unwrap();
    let mut on_all = watch(&app, &key, &[], &[]).await.unwrap();
    let narrowed = pb::ApiKey {
        id: id.clone(),
        ..scoped(&["acme"])
    };
    admin
        .update_api_key(authed(
            pb::UpdateApiKeyRequest {
                api_key: Some(narrowed),
                update_mask: None,
            },
            k,
        ))
        .await
        .unwrap();
    let (_, ended) = config_changes(&mut on_beta).await;
    assert_eq!(ended.map(|s| s.code()), Some(Code::PermissionDenied));
    let (_, ended) = config_changes(&mut on_all).await;
    assert!(ended.is_none(), "the stream without a lost tenant goes on");
    admin
        .delete_api_key(authed(pb::DeleteApiKeyRequest { id }, k))
        .await
        .unwrap();
    let (_, ended) = config_changes(&mut on_all).await;
    assert_eq!(ended.map(|s| s.code()), Some(Code::Unauthenticated));
}

/// Row 2: WatchEvents is bounded. Before, a 4 MB tenant list cost ~80 MB and 20,000
/// streams from one key were accepted, and a cancelled stream lived until its next
/// event. Now a filter of more than 1,000 ids is INVALID_ARGUMENT, the 17th stream of a
/// key on one replica is RESOURCE_EXHAUSTED, and a cancelled stream frees its place at
/// once (no event is published meanwhile).
#[tokio::test]
async fn watch_streams_and_filters_are_bounded() {
    let (_env, app) = app_with(
        Db::Sqlite,
        Counters::Memory,
        PoolSetup::default(),
        &["acme"],
    )
    .await;
    let worker = app.worker_key(&["acme"]).await;
    let many: Vec<String> = (0..1001).map(|i| format!("t{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    for (tenants, tokens) in [(&many[..], &[][..]), (&[][..], &many[..])] {
        let status = watch(&app, &worker, tenants, tokens).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("at most 1000"), "{status:?}");
    }
    let mut open = Vec::new();
    for _ in 0..16 {
        open.push(watch(&app, &worker, &[], &[]).await.unwrap());
    }
    let status = watch(&app, &worker, &[], &[]).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("16 WatchEvents streams"),
        "{status:?}"
    );
    drop(open.pop());
    let reopened = eventually(
        Duration::from_secs(5),
        "a place freed by the cancelled stream",
        || async { watch(&app, &worker, &[], &[]).await.ok() },
    )
    .await;
    open.push(reopened);
    // Another key is not affected.
    assert!(watch(&app, &app.admin_key, &[], &[]).await.is_ok());
}

/// Row 3: connections that never send a byte are closed after `handshake_timeout_ms`.
/// Before, 300 silent TCP connections exhausted a 256-file limit and locked every
/// caller out (health checks timed out) with nothing logged. Here the real binary runs
/// with 64 files and a 1 s handshake timeout; 80 silent connections (held open by this
/// test) cannot keep a health check out for long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let grpc: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut server = clean_command("sh")
        .args([
            "-c",
            "ulimit -n 64 && exec \"$0\" serve",
            env!("CARGO_BIN_EXE_tokenlease"),
        ])
        .env("TOKENLEASE_LISTEN", grpc.to_string())
        .env("TOKENLEASE_DATA_DIR", dir.path())
        .env("TOKENLEASE_METRICS__LISTEN", "")
        .env("TOKENLEASE_HANDSHAKE_TIMEOUT_MS", "1000")
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("start tokenlease serve");
    let _ready = connect_when_ready(dir.path(), grpc).await;
    let mut silent = Vec::new();
    for _ in 0..80 {
        silent.push(
            tokio::net::TcpStream::connect(grpc)
                .await
                .expect("the kernel accepts"),
        );
    }
    eventually(
        Duration::from_secs(20),
        "a health check past 80 silent connections",
        || async {
            let check = async {
                let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
                    .unwrap()
                    .connect()
                    .await
                    .ok()?;
                let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
                let request = tonic_health::pb::HealthCheckRequest::default();
                health.check(request).await.ok()
            };
            tokio::time::timeout(Duration::from_secs(2), check)
                .await
                .ok()
                .flatten()
        },
    )
    .await;
    assert!(
        server.try_wait().unwrap().is_none(),
        "the server is still running"
    );
    drop(silent);
}

/// Runs `tokenlease serve` with `vars` in a fresh data folder until it exits or
/// `for_long` passes (then kills it); returns whether it exited, its stderr, and the
/// data folder.
async fn serve_briefly(
    vars: &[(&str, String)],
    for_long: Duration,
) -> (Option<std::process::ExitStatus>, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut command = clean_command(env!("CARGO_BIN_EXE_tokenlease"));
    command
        .arg("serve")
        .env("TOKENLEASE_DATA_DIR", dir.path())
        .env("TOKENLEASE_METRICS__LISTEN", "")
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped());
    for (name, value) in vars {
        command.env(name, value);
    }
    let mut child = command.spawn().expect("start tokenlease serve");
    let exited = tokio::time::timeout(for_long, child.wait())
        .await
        .ok()
        .map(Result::unwrap);
    if exited.is_none() {
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr)
        .await
        .unwrap();
    (exited, stderr, dir)
}

/// Rows 10 and 13: a missing TLS file stops `serve` before it writes anything (before,
/// the data folder, a master key and the database were created first); a server
/// listening beyond loopback without TLS says so loudly at start (before, nothing).
#[tokio::test]
async fn tls_is_checked_first_and_plaintext_beyond_loopback_is_named() {
    let missing = [
        ("TOKENLEASE_LISTEN", format!("127.0.0.1:{}", free_port())),
        (
            "TOKENLEASE_TLS__CERT_PATH",
            "/nonexistent/cert.pem".to_owned(),
        ),
        (
            "TOKENLEASE_TLS__KEY_PATH",
            "/nonexistent/key.pem".to_owned(),
        ),
    ];
    let (exited, stderr, dir) = serve_briefly(&missing, Duration::from_secs(20)).await;
    assert!(exited.is_some_and(|s| !s.success()), "{exited:?}: {stderr}");
    assert!(stderr.contains("tls.cert_path"), "{stderr}");
    let written: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(written.is_empty(), "nothing is written first: {written:?}");

    let open = [("TOKENLEASE_LISTEN", format!("0.0.0.0:{}", free_port()))];
    let (exited, stderr, _dir) = serve_briefly(&open, Duration::from_secs(3)).await;
    assert!(exited.is_none(), "it serves: {stderr}");
    assert!(
        stderr.contains("listening beyond this host without TLS"),
        "{stderr}"
    );
    let local = [("TOKENLEASE_LISTEN", format!("127.0.0.1:{}", free_port()))];
    let (_, stderr, _dir) = serve_briefly(&local, Duration::from_secs(3)).await;
    assert!(!stderr.contains("without TLS"), "{stderr}");
}

/// Row 11: an emergency off-switch. Before, disabling the only token of a pool with
/// guarantees was refused by the 80 % rule (naming the wrong field, "…usable capacity
/// of 0 (0)"). Now disabling is always allowed: leasing stops on the token at once, the
/// response (`capacity_warning`) and the event say the pool now falls short of its
/// guarantees, and enabling it again restores leasing. Deleting it is still refused
/// (the pool would be provisioned below its guarantees), with a message that points at
/// disabling.
#[tokio::test]
async fn a_token_can_always_be_disabled() {
    let pool = PoolSetup {
        guaranteed: 40,
        ..PoolSetup::default()
    };
    let (_env, app) = app_with(Db::Sqlite, Counters::Memory, pool, &["acme"]).await;
    let k = app.admin_key.as_str();
    let mut events = watch(&app, k, &[], &["tok-0"]).await.unwrap();
    let mut admin = app.admin().await;
    let token = |disabled| pb::Token {
        id: "tok-0".into(),
        upstream_id: "up".into(),
        owner: Some(pb::token::Owner::PoolId("shared".into())),
        disabled,
        ..Default::default()
    };
    let update = |disabled| {
        authed(
            pb::UpdateTokenRequest {
                token: Some(token(disabled)),
                update_mask: None,
            },
            k,
        )
    };
    let disabled = admin
        .update_token(update(true))
        .await
        .expect("disabling is always allowed")
        .into_inner();
    assert!(
        disabled
            .capacity_warning
            .contains("pool 'shared' now serves 0 requests per window"),
        "{disabled:?}"
    );
    let acquire = || async {
        let mut lease = app.lease().await;
        let answer = lease.acquire_lease(lease_request("acme", k)).await;
        answer.unwrap().into_inner().result.unwrap()
    };
    use pb::acquire_lease_response::Result as Answer;
    assert!(
        matches!(acquire().await, Answer::Denial(d) if d.reason == pb::DenialReason::NoUsableToken as i32),
        "no lease on a disabled token"
    );
    let deleted = admin
        .delete_token(authed(pb::DeleteTokenRequest { id: "tok-0".into() }, k))
        .await
        .unwrap_err();
    assert_eq!(deleted.code(), Code::FailedPrecondition, "{deleted:?}");
    assert!(deleted.message().contains("disable it"), "{deleted:?}");
    let enabled = admin
        .update_token(update(false))
        .await
        .expect("enabled again");
    assert_eq!(
        enabled.into_inner().capacity_warning,
        "",
        "the pool is whole again"
    );
    assert!(
        matches!(acquire().await, Answer::Lease(_)),
        "leasing is back"
    );

    let (received, ended) = drain_events(&mut events, Duration::from_millis(300)).await;
    assert!(ended.is_none(), "the stream ended: {ended:?}");
    let causes: Vec<(i32, String)> = received
        .into_iter()
        .filter_map(|event| match event.kind {
            Some(pb::event::Kind::TokenStateChanged(c)) => Some((c.new_state, c.cause)),
            _ => None,
        })
        .collect();
    assert_eq!(causes.len(), 2, "{causes:?}");
    assert_eq!(causes[0].0, pb::TokenState::Disabled as i32);
    assert!(
        causes[0]
            .1
            .contains("pool 'shared' now serves 0 requests per window")
            && causes[0].1.contains("guarantees 40"),
        "{causes:?}"
    );
    assert_eq!(
        causes[1],
        (
            pb::TokenState::Active as i32,
            "enabled by an admin".to_owned()
        )
    );
}

/// Row 1, the profile's part: an upstream's `max_block` bounds what one report may do
/// (here 5 s, so a report of 2036 quarantines the token for 5 s); a `max_block` below
/// the block duration is INVALID_ARGUMENT.
#[tokio::test]
async fn an_upstreams_max_block_bounds_a_report() {
    let (_env, app) = app_with(
        Db::Sqlite,
        Counters::Memory,
        PoolSetup::default(),
        &["acme"],
    )
    .await;
    let mut admin = app.admin().await;
    let k = app.admin_key.as_str();
    let mut upstream = admin
        .get_upstream(authed(pb::GetUpstreamRequest { id: "up".into() }, k))
        .await
        .unwrap()
        .into_inner()
        .upstream
        .unwrap();
    assert_eq!(upstream.max_block, None);
    upstream.block_duration = Some(super::helpers::millis(2_000));
    upstream.max_block = Some(super::helpers::millis(1_000));
    let refused = admin
        .update_upstream(authed(
            pb::UpdateUpstreamRequest {
                upstream: Some(upstream.clone()),
                update_mask: None,
            },
            k,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().starts_with("upstream.max_block"),
        "{refused:?}"
    );
    upstream.max_block = Some(super::helpers::millis(5_000));
    let stored = admin
        .update_upstream(authed(
            pb::UpdateUpstreamRequest {
                upstream: Some(upstream),
                update_mask: None,
            },
            k,
        ))
        .await
        .unwrap()
        .into_inner()
        .upstream
        .unwrap();
    assert_eq!(stored.max_block, Some(super::helpers::millis(5_000)));

    let mut lease = app.lease().await;
    let request = || lease_request("acme", k);
    let Some(pb::acquire_lease_response::Result::Lease(granted)) = lease
        .acquire_lease(request())
        .await
        .unwrap()
        .into_inner()
        .result
    else {
        panic!("granted")
    };
    let release = pb::ReleaseLeaseRequest {
        lease_id: granted.lease_id,
        outcome: pb::ReleaseOutcome::UpstreamRateLimited as i32,
        blocked_until: Some(prost_types::Timestamp {
            seconds: 2_082_758_400,
            nanos: 0,
        }),
        ..Default::default()
    };
    let (_, reported) = super::helpers::timed(lease.release_lease(authed(release, k))).await;
    let (answer, span) = super::helpers::timed(lease.acquire_lease(request())).await;
    let Some(pb::acquire_lease_response::Result::Denial(denial)) =
        answer.unwrap().into_inner().result
    else {
        panic!("the token is quarantined")
    };
    let retry = super::helpers::ms(&denial.retry_after.unwrap());
    span.assert_points_near(
        retry,
        reported.before + 5_000,
        reported,
        "the cut block's end",
    );
}

/// "A report that the service's own counts make implausible is logged and counted": a
/// worker reports the upstream rate-limited a token the service counts at 1 of its 95
/// usable slots. The report still quarantines the token (the upstream may know better),
/// and /metrics counts it as implausible (the real binary: its own process's metrics).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_implausible_rate_limit_report_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (grpc, metrics) = two_addresses();
    let _server = start_binary(dir.path(), grpc, metrics);
    let (channel, key) = connect_when_ready(dir.path(), grpc).await;
    let mut admin = pb::admin_service_client::AdminServiceClient::new(channel.clone());
    PoolSetup::default().create(&mut admin, &key).await;
    super::fixtures::create_tenant(&mut admin, &key, "acme", "flex").await;
    let mut lease = pb::lease_service_client::LeaseServiceClient::new(channel);
    let answer = lease
        .acquire_lease(lease_request("acme", &key))
        .await
        .unwrap();
    let Some(pb::acquire_lease_response::Result::Lease(granted)) = answer.into_inner().result
    else {
        panic!("granted")
    };
    let release = pb::ReleaseLeaseRequest {
        lease_id: granted.lease_id,
        outcome: pb::ReleaseOutcome::UpstreamRateLimited as i32,
        ..Default::default()
    };
    lease.release_lease(authed(release, &key)).await.unwrap();
    let token = [("token", "tok-0"), ("upstream", "up")];
    let name = tokenlease::metrics::names::IMPLAUSIBLE_REPORTS;
    wait_for(metrics, name, &token, 1.0).await;
}
