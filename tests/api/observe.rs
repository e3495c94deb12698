//! Observability end to end: the Prometheus metrics of a small run of the real binary
//! (its own process, so the process-wide counters hold that run alone), and OTLP traces
//! whose AcquireLease span is a child of the caller's span.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokenlease::grpc::pb::{self, acquire_lease_response::Result as Answer};
use tokenlease::metrics::names;
use tokenlease::telemetry::{self, OtlpConfig};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tracing_subscriber::layer::SubscriberExt;

use super::fixtures::{PoolSetup, app_with, create_tenant, token_secret};
use super::helpers::{Counters, Db, authed, millis, sample, scrape};

pub(super) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `program` (the binary, or a shell that runs it) with none of this process's
/// settings: no `TOKENLEASE_*`, `OTEL_*`, `DATABASE_URL` or `REDIS_URL`, so the server it
/// starts is embedded and configured only by what the test sets.
pub(super) fn clean_command(program: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(program);
    for (name, _) in std::env::vars() {
        if name.starts_with("TOKENLEASE_") || name.starts_with("OTEL_") {
            command.env_remove(name);
        }
    }
    command
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .kill_on_drop(true);
    command
}

/// Two free local addresses: for gRPC and for /metrics.
pub(super) fn two_addresses() -> (SocketAddr, SocketAddr) {
    let address = || format!("127.0.0.1:{}", free_port()).parse().unwrap();
    (address(), address())
}

/// `tokenlease serve` as its own process in `data_dir`, embedded mode.
pub(super) fn start_binary(
    data_dir: &Path,
    grpc: SocketAddr,
    metrics: SocketAddr,
) -> tokio::process::Child {
    clean_command(env!("CARGO_BIN_EXE_tokenlease"))
        .arg("serve")
        .env("TOKENLEASE_LISTEN", grpc.to_string())
        .env("TOKENLEASE_DATA_DIR", data_dir)
        .env("TOKENLEASE_METRICS__LISTEN", metrics.to_string())
        .env("TOKENLEASE_METRICS__REFRESH_MS", "100")
        // The capacity forecast gauge exists from a pool's creation on (NaN until the
        // pool has a whole day of history).
        .env("TOKENLEASE_HISTORY__FORECAST_INTERVAL_MS", "100")
        .env("TOKENLEASE_LEASE__MAX_WAIT_MS", "600000")
        // The run fills the token's window on purpose, so no pacing.
        .env("TOKENLEASE_LEASE__PACE_BURST_PERCENT", "100")
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("start tokenlease serve")
}

/// Waits for the bootstrap admin key and a gRPC connection.
pub(super) async fn connect_when_ready(data_dir: &Path, grpc: SocketAddr) -> (Channel, String) {
    for _ in 0..200 {
        let key = std::fs::read_to_string(data_dir.join("admin.key")).unwrap_or_default();
        if !key.trim().is_empty()
            && let Ok(channel) = Channel::from_shared(format!("http://{grpc}"))
                .unwrap()
                .connect()
                .await
        {
            return (channel, key.trim().to_owned());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("tokenlease serve did not come up on {grpc}");
}

/// Polls /metrics until `name{labels}` equals `value`.
pub(super) async fn wait_for(addr: SocketAddr, name: &str, labels: &[(&str, &str)], value: f64) {
    let mut last = None;
    for _ in 0..100 {
        last = sample(&scrape(addr).await, name, labels);
        if last == Some(value) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name}{labels:?} is {last:?}, expected {value}");
}

fn acquire_request(
    tenant: &str,
    max_wait: Option<prost_types::Duration>,
) -> pb::AcquireLeaseRequest {
    pb::AcquireLeaseRequest {
        tenant_id: tenant.into(),
        max_wait,
        ..Default::default()
    }
}

/// After 5 grants, a quota denial, a token-capacity denial, a caller that waits and goes
/// away, and NOT_USED / SUCCESS (250 ms) / UPSTREAM_RATE_LIMITED releases, /metrics shows
/// every metric with exactly the counts this run implies, and no secret.
#[tokio::test]
async fn metrics_count_exactly_what_a_small_run_did() {
    let dir = tempfile::tempdir().unwrap();
    let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _server = start_binary(dir.path(), grpc, metrics);
    let (channel, admin_key) = connect_when_ready(dir.path(), grpc).await;
    let mut admin = pb::admin_service_client::AdminServiceClient::new(channel.clone());
    // One token "tok-0": 6 per minute − 5 % = 5 usable; tier "flex" 1 guaranteed + 2
    // burst. Fair shares with no demand measured yet: acme 3 (1 + 2 of the idle 3 by
    // largest remainder), beta 2.
    let pool = PoolSetup {
        limit: 6,
        window_ms: 60_000,
        guaranteed: 1,
        burst: 2,
        ..PoolSetup::default()
    };
    pool.create(&mut admin, &admin_key).await;
    create_tenant(&mut admin, &admin_key, "acme", "flex").await;
    create_tenant(&mut admin, &admin_key, "beta", "flex").await;
    let lease = pb::lease_service_client::LeaseServiceClient::new(channel);
    let acquire = async |tenant: &str| {
        let request = authed(acquire_request(tenant, None), &admin_key);
        let answer = lease.clone().acquire_lease(request).await.unwrap();
        answer.into_inner().result.unwrap()
    };

    // acme: 3 grants (the 2nd and 3rd above its guarantee of 1), then its quota binds.
    let mut acme_leases = vec![];
    for _ in 0..3 {
        let Answer::Lease(l) = acquire("acme").await else {
            panic!("acme denied within its quota")
        };
        acme_leases.push(l.lease_id);
    }
    assert!(
        matches!(acquire("acme").await, Answer::Denial(d) if d.reason == pb::DenialReason::TenantQuota as i32)
    );
    // beta: the token's 4th and 5th slots (the 5th above its guarantee): the token is full.
    assert!(matches!(acquire("beta").await, Answer::Lease(_)));
    assert!(matches!(acquire("beta").await, Answer::Lease(_)));
    // gamma, added now, is within its quota but finds the token full.
    create_tenant(&mut admin, &admin_key, "gamma", "flex").await;
    assert!(
        matches!(acquire("gamma").await, Answer::Denial(d) if d.reason == pb::DenialReason::NoTokenCapacity as i32)
    );

    // A gamma caller waits for a slot (it frees in about a minute), then goes away.
    let mut waiter_client = lease.clone();
    let waiter_key = admin_key.clone();
    let waiter = tokio::spawn(async move {
        let request = acquire_request("gamma", Some(millis(300_000)));
        waiter_client
            .acquire_lease(authed(request, &waiter_key))
            .await
    });
    let waiting = [("tenant", "gamma")];
    wait_for(metrics, names::WAITING_CALLERS, &waiting, 1.0).await;
    waiter.abort();
    wait_for(metrics, names::WAITING_CALLERS, &waiting, 0.0).await;

    let outcomes = [
        (pb::ReleaseOutcome::NotUsed, None),
        (pb::ReleaseOutcome::Success, Some(millis(250))),
        (pb::ReleaseOutcome::UpstreamRateLimited, None),
    ];
    for (lease_id, (outcome, latency)) in acme_leases.iter().zip(outcomes) {
        let request = pb::ReleaseLeaseRequest {
            lease_id: lease_id.clone(),
            outcome: outcome as i32,
            upstream_latency: latency,
            ..Default::default()
        };
        lease
            .clone()
            .release_lease(authed(request, &admin_key))
            .await
            .unwrap();
    }
    // 5 granted − 1 not used = 4 of 5 slots held.
    let token = [("token", "tok-0"), ("upstream", "up")];
    let token_gauge = [("token", "tok-0"), ("upstream", "up"), ("pool", "shared")];
    wait_for(metrics, names::TOKEN_USED_SLOTS, &token_gauge, 4.0).await;
    // The gauge of token states shows it (before, a quarantined pool looked idle).
    let quarantined = [("upstream", "up"), ("state", "quarantined")];
    wait_for(metrics, names::TOKENS, &quarantined, 1.0).await;
    // The rate-limited release quarantined the pool's only token: beta finds none.
    assert!(
        matches!(acquire("beta").await, Answer::Denial(d) if d.reason == pb::DenialReason::NoUsableToken as i32)
    );

    let text = scrape(metrics).await;
    let expect = |name: &str, labels: &[(&str, &str)], value: f64| {
        assert_eq!(
            sample(&text, name, labels),
            Some(value),
            "{name}{labels:?}\n{text}"
        );
    };
    let acme = [("tenant", "acme"), ("upstream", "up")];
    let beta = [("tenant", "beta"), ("upstream", "up")];
    expect(names::GRANTED_REQUESTS, &acme, 3.0);
    expect(names::GRANTED_REQUESTS, &beta, 2.0);
    expect(names::BORROWED_GRANTS, &acme, 2.0);
    expect(names::BORROWED_GRANTS, &beta, 1.0);
    assert_eq!(
        sample(
            &text,
            names::GRANTED_REQUESTS,
            &[("tenant", "gamma"), ("upstream", "up")]
        ),
        None,
        "gamma got nothing"
    );
    expect(
        names::DENIALS,
        &[("tenant", "acme"), ("reason", "tenant_quota")],
        1.0,
    );
    expect(
        names::DENIALS,
        &[("tenant", "gamma"), ("reason", "no_token_capacity")],
        1.0,
    );
    expect(
        names::DENIALS,
        &[("tenant", "beta"), ("reason", "no_usable_token")],
        1.0,
    );
    expect(
        names::TOKEN_EXHAUSTION,
        &[("upstream", "up"), ("pool", "shared")],
        1.0,
    );
    // Pacing is off in this run: no denial is pacing (the series exists, at 0).
    expect(
        names::TOKEN_PACING,
        &[("upstream", "up"), ("pool", "shared")],
        0.0,
    );
    for outcome in ["not_used", "success", "upstream_rate_limited"] {
        expect(
            names::RELEASES,
            &[("upstream", "up"), ("outcome", outcome)],
            1.0,
        );
    }
    expect(names::UPSTREAM_RATE_LIMITED, &token, 1.0);
    // The token was full when it was reported: a plausible report.
    expect(names::IMPLAUSIBLE_REPORTS, &token, 0.0);
    expect(names::BREAKER_OPENS, &[("token", "tok-0")], 0.0);
    let up = [("upstream", "up")];
    expect(&format!("{}_count", names::UPSTREAM_LATENCY), &up, 1.0);
    expect(&format!("{}_sum", names::UPSTREAM_LATENCY), &up, 0.25);
    expect(
        &format!("{}_bucket", names::UPSTREAM_LATENCY),
        &[("upstream", "up"), ("le", "0.1")],
        0.0,
    );
    expect(
        &format!("{}_bucket", names::UPSTREAM_LATENCY),
        &[("upstream", "up"), ("le", "0.25")],
        1.0,
    );
    let acquire_count = format!("{}_count", names::ACQUIRE_DURATION);
    expect(&acquire_count, &[("result", "granted")], 5.0);
    expect(&acquire_count, &[("result", "denied")], 3.0);
    assert_eq!(sample(&text, &acquire_count, &[("result", "error")]), None);
    expect(names::WAITING_CALLERS, &waiting, 0.0);
    expect(names::TOKEN_USED_SLOTS, &token_gauge, 4.0);
    expect(names::TOKEN_USABLE_SLOTS, &token_gauge, 5.0);
    expect(names::TOKEN_UTILIZATION, &token_gauge, 0.8);
    // Quarantined: out of service.
    expect(names::TOKEN_IN_SERVICE, &token_gauge, 0.0);
    expect(
        names::TOKENS,
        &[("upstream", "up"), ("state", "active")],
        0.0,
    );
    expect(
        names::TOKENS,
        &[("upstream", "up"), ("state", "disabled")],
        0.0,
    );
    // Embedded mode: the counters are in the process, nothing can evict them.
    expect(names::REDIS_MAY_EVICT, &[], 0.0);
    let forecast = sample(
        &text,
        names::POOL_CAPACITY_FORECAST_DAYS,
        &[("pool", "shared")],
    );
    assert!(
        forecast.is_some_and(f64::is_nan),
        "no whole day of history: {forecast:?}"
    );
    for name in tokenlease::metrics::ALL {
        assert!(
            text.contains(&format!("# TYPE {name}")),
            "{name} missing\n{text}"
        );
    }
    assert!(!text.contains(&token_secret(0)) && !text.contains(&admin_key));
}

/// Collects exported spans.
#[derive(Clone, Default)]
pub(super) struct Collector {
    pub(super) spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            other => Some(format!("{other:?}")),
        }
    })
}

/// An AcquireLease carrying `traceparent` is exported over OTLP as a server span whose
/// trace id and parent span id are the caller's; the use case and counter spans sit
/// beneath it in the same trace with the tenant and token ids; no span carries a secret.
#[tokio::test(flavor = "current_thread")]
async fn acquire_lease_span_continues_the_callers_trace() {
    let (collector, provider) = receiver().await;
    // This thread runs every task of the test (current_thread), so a thread-local
    // subscriber sees the server's spans without touching the global one.
    let subscriber = tracing_subscriber::registry().with(telemetry::otel_layer(&provider));
    let _default = tracing::subscriber::set_default(subscriber);

    let pool = PoolSetup::default();
    let (_env, app) = app_with(Db::Sqlite, Counters::Memory, pool, &["acme"]).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut request = authed(acquire_request("acme", None), &app.admin_key);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    let answer = app.lease().await.acquire_lease(request).await.unwrap();
    assert!(matches!(answer.into_inner().result, Some(Answer::Lease(_))));

    let spans = exported(&collector, &provider, "counters.acquire").await;
    let find = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name && hex::encode(&s.trace_id) == trace_id)
            .unwrap_or_else(|| panic!("no {name} span in the caller's trace: {spans:#?}"))
    };
    let server = find("tokenlease.v1.LeaseService/AcquireLease");
    assert_eq!(hex::encode(&server.parent_span_id), caller_span);
    assert_eq!(server.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(
        attribute(server, "rpc.method").as_deref(),
        Some("AcquireLease")
    );
    let acquire = find("lease.acquire");
    assert_eq!(attribute(acquire, "tenant_id").as_deref(), Some("acme"));
    assert_eq!(attribute(acquire, "token_id").as_deref(), Some("tok-0"));
    let counters = find("counters.acquire");
    assert_eq!(counters.parent_span_id, acquire.span_id);
    // The chain from the use case up reaches the server span.
    let by_id = |id: &[u8]| spans.iter().find(|s| s.span_id == id);
    let mut up = acquire;
    while up.span_id != server.span_id {
        up = by_id(&up.parent_span_id).expect("a parent inside the trace");
    }
    let secret = token_secret(0);
    for span in &spans {
        let text = format!("{span:?}");
        assert!(
            !text.contains(&secret) && !text.contains(&app.admin_key),
            "{text}"
        );
    }
    app.stop().await;
    drop(_default);
    telemetry::shutdown(provider).await.unwrap();
}

/// An in-process OTLP receiver, and a tracer provider exporting to it.
pub(super) async fn receiver() -> (Collector, opentelemetry_sdk::trace::SdkTracerProvider) {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let provider = telemetry::tracer_provider(&OtlpConfig {
        endpoint: format!("http://{receiver}"),
        service_name: "tokenlease-test".into(),
    })
    .unwrap();
    (collector, provider)
}

/// The spans exported so far, flushing until one named `until` arrived (5 s at most).
pub(super) async fn exported(
    collector: &Collector,
    provider: &opentelemetry_sdk::trace::SdkTracerProvider,
    until: &str,
) -> Vec<Span> {
    let mut spans = vec![];
    for _ in 0..100 {
        // A flush with nothing to export may not return: give each one 200 ms.
        let flushed = tokio::time::timeout(Duration::from_millis(200), telemetry::flush(provider));
        let _ = flushed.await;
        spans = collector.spans.lock().unwrap().clone();
        if spans.iter().any(|s| s.name == until) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    spans
}

/// Issue 14 (signals): a denied AcquireLease's span names the denial's reason, and a
/// failed call's span (an unknown tenant, NOT_FOUND) has an error status and message.
#[tokio::test(flavor = "current_thread")]
async fn denied_and_failed_calls_mark_their_spans() {
    let (collector, provider) = receiver().await;
    let subscriber = tracing_subscriber::registry().with(telemetry::otel_layer(&provider));
    let _default = tracing::subscriber::set_default(subscriber);
    // One usable slot (2 × 95 %).
    let pool = PoolSetup {
        limit: 2,
        ..PoolSetup::default()
    };
    let (_env, app) = app_with(Db::Sqlite, Counters::Memory, pool, &["acme"]).await;
    let mut lease = app.lease().await;
    for _ in 0..2 {
        let no_wait = acquire_request("acme", Some(millis(0)));
        lease
            .acquire_lease(authed(no_wait, &app.admin_key))
            .await
            .unwrap();
    }
    let request = authed(acquire_request("nobody", None), &app.admin_key);
    let status = lease.acquire_lease(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);

    let spans = exported(&collector, &provider, "lease.acquire").await;
    // Stopped before asserting: a provider dropped while a failed assertion unwinds
    // waits for ever on this single-threaded runtime.
    app.stop().await;
    drop(_default);
    telemetry::shutdown(provider).await.unwrap();
    let acquires: Vec<&Span> = spans.iter().filter(|s| s.name == "lease.acquire").collect();
    let denied: Vec<_> = acquires
        .iter()
        .filter_map(|s| attribute(s, "denial_reason"))
        .collect();
    assert_eq!(
        denied,
        vec!["no_token_capacity".to_owned()],
        "{acquires:#?}"
    );
    let failed: Vec<_> = acquires
        .iter()
        .filter_map(|s| s.status.as_ref().filter(|st| st.code == 2))
        .collect();
    assert_eq!(
        failed.len(),
        1,
        "one span with an error status: {acquires:#?}"
    );
    assert!(failed[0].message.contains("does not exist"), "{failed:?}");
}

/// Issue 14 (first hour): `RUST_LOG=` (set, empty) is the default filter, not silence,
/// and text logs written to a file (not a terminal) carry no ANSI colour codes.
#[tokio::test]
async fn an_empty_rust_log_still_logs_and_files_get_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (grpc, metrics) = two_addresses();
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let mut server = clean_command(env!("CARGO_BIN_EXE_tokenlease"))
        .arg("serve")
        .env("TOKENLEASE_LISTEN", grpc.to_string())
        .env("TOKENLEASE_DATA_DIR", dir.path().join("data"))
        .env("TOKENLEASE_METRICS__LISTEN", metrics.to_string())
        .env("RUST_LOG", "")
        .stderr(log)
        .spawn()
        .expect("start tokenlease serve");
    let _ = connect_when_ready(&dir.path().join("data"), grpc).await;
    // The listener is bound before the serving line is written: a connection alone
    // does not mean the line is there yet (on a loaded machine it was not).
    let log_path = dir.path().join("serve.log");
    let serving = super::helpers::eventually(Duration::from_secs(10), "the serving line", || {
        let text = std::fs::read_to_string(&log_path).unwrap();
        async move { text.contains("tokenlease serving").then_some(()) }
    });
    let _ = serving.await;
    let _ = server.start_kill();
    let _ = server.wait().await;
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        !text.contains('\u{1b}'),
        "ANSI codes in a log file: {text:?}"
    );
}

/// Issue 14 (first hour): `serve --help` lists every setting with its default and its
/// environment variable.
#[tokio::test]
async fn serve_help_lists_the_settings() {
    let output = clean_command(env!("CARGO_BIN_EXE_tokenlease"))
        .args(["serve", "--help"])
        .output()
        .await
        .expect("run serve --help");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for line in [
        "lease.ttl_ms = 5000    (TOKENLEASE_LEASE__TTL_MS)",
        "rebalance.automatic = false    (TOKENLEASE_REBALANCE__AUTOMATIC)",
        "traces_filter = \"info\"    (TOKENLEASE_TRACES_FILTER)",
        "DATABASE_URL, REDIS_URL",
    ] {
        assert!(help.contains(line), "{line:?} missing from:\n{help}");
    }
}

/// A replica whose Redis may evict keys (`maxmemory` with `volatile-lru`, a managed
/// Redis's usual default) says so as soon as it starts: the gauge is 1 on /metrics, and
/// the log names the policy and the fix.
#[tokio::test]
async fn a_redis_that_may_evict_is_reported_at_start() {
    let redis = super::throwaway::ThrowawayRedis::start(free_port());
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for (name, value) in [
        ("maxmemory", "104857600"),
        ("maxmemory-policy", "volatile-lru"),
    ] {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let server = clean_command(env!("CARGO_BIN_EXE_tokenlease"))
        .arg("serve")
        .env("TOKENLEASE_LISTEN", grpc.to_string())
        .env("TOKENLEASE_DATA_DIR", dir.path())
        .env("TOKENLEASE_METRICS__LISTEN", metrics.to_string())
        .env("TOKENLEASE_METRICS__REFRESH_MS", "100")
        .env("REDIS_URL", redis.url())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start tokenlease serve");
    connect_when_ready(dir.path(), grpc).await;
    let mut gauge = None;
    for _ in 0..100 {
        gauge = sample(&scrape(metrics).await, names::REDIS_MAY_EVICT, &[]);
        if gauge.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gauge, Some(1.0));
    let output = async {
        let mut server = server;
        server.start_kill().unwrap();
        server.wait_with_output().await.unwrap()
    };
    let output = output.await;
    let log = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(
        log.contains("maxmemory-policy volatile-lru") && log.contains("noeviction"),
        "{log}"
    );
}
