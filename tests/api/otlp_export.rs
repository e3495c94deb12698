//! Traces from the real binary under `RUST_LOG=warn` (issue 14, signals): spans reach
//! an in-process OTLP receiver although the logs are quiet, and an export that fails
//! is logged when it happens, rate-limited, not only at shutdown.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
use tokenlease::grpc::pb;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use super::helpers::{authed, eventually};
use super::observe::{Collector, clean_command, connect_when_ready, two_addresses};

/// `tokenlease serve` exporting spans to `collector` every 100 ms, logging at `warn`
/// into `log`.
fn serve_with_traces(
    dir: &Path,
    collector: SocketAddr,
    log: std::fs::File,
) -> tokio::process::Child {
    let (grpc, metrics) = two_addresses();
    std::fs::write(dir.join("grpc.addr"), grpc.to_string()).unwrap();
    clean_command(env!("CARGO_BIN_EXE_tokenlease"))
        .arg("serve")
        .env("TOKENLEASE_LISTEN", grpc.to_string())
        .env("TOKENLEASE_DATA_DIR", dir.join("data"))
        .env("TOKENLEASE_METRICS__LISTEN", metrics.to_string())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}"))
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("RUST_LOG", "warn")
        .stderr(log)
        .spawn()
        .expect("start tokenlease serve")
}

/// Makes `calls` admin calls, 100 ms apart (each is a server span).
async fn some_calls(dir: &Path, calls: usize) {
    let grpc: SocketAddr = std::fs::read_to_string(dir.join("grpc.addr"))
        .unwrap()
        .parse()
        .unwrap();
    let (channel, key) = connect_when_ready(&dir.join("data"), grpc).await;
    let mut admin = pb::admin_service_client::AdminServiceClient::new(channel);
    for _ in 0..calls {
        let request = pb::ListTiersRequest::default();
        admin.list_tiers(authed(request, &key)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// With `RUST_LOG=warn`, the server spans of admin calls still arrive at the OTLP
/// receiver (the separate `traces_filter`, default `info`).
#[tokio::test]
async fn quiet_logs_still_export_spans() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let mut server = serve_with_traces(dir.path(), address, log);
    some_calls(dir.path(), 3).await;
    let name = "tokenlease.v1.AdminService/ListTiers";
    eventually(
        Duration::from_secs(10),
        "a ListTiers span at the receiver",
        || async {
            let spans = collector.spans.lock().unwrap();
            spans.iter().any(|s| s.name == name).then_some(())
        },
    )
    .await;
    let _ = server.start_kill();
    let _ = server.wait().await;
    let text = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(!text.contains("cannot export spans"), "{text}");
}

/// A collector that accepts connections and drops them: every export fails. The first
/// failure is logged at once (the process keeps running), and the many failures that
/// follow within the minute add no line.
#[tokio::test]
async fn a_failing_export_is_logged_once_a_minute() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    tokio::spawn(async move {
        while let Ok((connection, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::Relaxed);
            drop(connection);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("serve.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut server = serve_with_traces(dir.path(), address, log);
    some_calls(dir.path(), 5).await;
    let warnings = || {
        let text = std::fs::read_to_string(&log_path).unwrap();
        text.lines()
            .filter(|l| l.contains("cannot export spans over OTLP"))
            .count()
    };
    eventually(
        Duration::from_secs(10),
        "a warning for the failed export",
        || async { (warnings() > 0).then_some(()) },
    )
    .await;
    // More exports fail (spans keep coming), and none adds a line within the minute.
    let before = attempts.load(Ordering::Relaxed);
    some_calls(dir.path(), 20).await;
    eventually(Duration::from_secs(10), "more export attempts", || async {
        (attempts.load(Ordering::Relaxed) >= before + 2).then_some(())
    })
    .await;
    assert!(
        server.try_wait().unwrap().is_none(),
        "the server is still running"
    );
    let _ = server.start_kill();
    let _ = server.wait().await;
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(warnings(), 1, "one warning in the minute:\n{text}");
    assert!(
        text.contains(&address.to_string()),
        "names the endpoint:\n{text}"
    );
}
