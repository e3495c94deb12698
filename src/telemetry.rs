//! Logs and traces.
//!
//! Logs: `RUST_LOG` filters (default `info`, also when set empty), text or JSON lines on
//! stderr (colours only on a terminal). Nothing logged anywhere in the crate carries a
//! token or an API key.
//!
//! Traces: OpenTelemetry over OTLP/gRPC, configured by the standard `OTEL_*` variables
//! and on only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`) is set;
//! `OTEL_SERVICE_NAME` defaults to `tokenlease`; `OTEL_SDK_DISABLED=true` turns them off;
//! the exporter reads `OTEL_EXPORTER_OTLP_HEADERS`/`_TIMEOUT` and the SDK
//! `OTEL_TRACES_SAMPLER`/`_ARG` themselves. Every gRPC call gets a server span
//! (`grpc_request_span`) whose parent is the caller's span from the W3C `traceparent`
//! metadata; the lease use cases and counter calls are spans beneath it, with tenant and
//! token ids as fields — never a secret: span fields are ids, reasons and outcomes only.
//! Spans have their own filter (the `traces_filter` setting, default `info`), apart from
//! `RUST_LOG`: `RUST_LOG=warn` quiets the logs, not the traces.
//!
//! A failed export (collector unreachable, refusing, too slow) is logged as a warning
//! when it happens, not only at shutdown: the first failure at once, then at most one
//! line per `EXPORT_FAILURE_LOG_EVERY` (a minute) saying how many failed meanwhile, and
//! one info line when exports succeed again (`LoggedExporter`). The SDK's own error
//! reporting is compiled out (no `internal-logs` feature), so without this a collector
//! that went away was silent: spans were dropped and nobody knew.
//!
//! `tracer_provider` and `otel_layer` take their inputs as arguments, so a test can
//! build a pipeline towards its own receiver without touching the process environment.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use tonic::codegen::http;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// The `service.name` when `OTEL_SERVICE_NAME` is unset.
pub const DEFAULT_SERVICE_NAME: &str = "tokenlease";

/// Where and as what to export traces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://otel-collector:4317`.
    pub endpoint: String,
    pub service_name: String,
}

impl OtlpConfig {
    /// Reads the standard variables; `None` when tracing is not asked for.
    pub fn from_env() -> Option<OtlpConfig> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Option<OtlpConfig> {
        let get = |name: &str| {
            get(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        if get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return None;
        }
        let endpoint = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| get("OTEL_EXPORTER_OTLP_ENDPOINT"))?;
        Some(OtlpConfig {
            endpoint,
            service_name: get("OTEL_SERVICE_NAME").unwrap_or_else(|| DEFAULT_SERVICE_NAME.into()),
        })
    }
}

/// Builds a tracer provider exporting in batches over OTLP/gRPC to `config.endpoint`.
/// Must be called inside a Tokio runtime: the batch processor is a task on it (the
/// SDK's default thread-based one has no reactor for tonic).
pub fn tracer_provider(config: &OtlpConfig) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(config.endpoint.clone())
        .build()
        .with_context(|| {
            format!(
                "cannot set up the OTLP trace exporter towards {}",
                config.endpoint
            )
        })?;
    let exporter = LoggedExporter::new(exporter, config.endpoint.clone());
    let processor =
        BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(config.service_name.clone())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build())
}

/// How often a failing export is logged at most (the first failure is logged at once).
pub const EXPORT_FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// What to log after one export.
#[derive(Debug, PartialEq, Eq)]
enum ExportLog {
    Nothing,
    /// A failure to log, with the failures not logged since the last line.
    Failed {
        unlogged: u64,
    },
    /// Exports work again after `failed` failures.
    Recovered {
        failed: u64,
    },
}

/// Failed exports, for logging them at most once per `every`.
#[derive(Debug)]
struct ExportFailures {
    every: Duration,
    last_logged: Option<Instant>,
    /// Failures since the last line.
    unlogged: u64,
    /// Failures since the last success.
    in_a_row: u64,
}

impl ExportFailures {
    fn new(every: Duration) -> Self {
        Self {
            every,
            last_logged: None,
            unlogged: 0,
            in_a_row: 0,
        }
    }

    /// Records one export's result at `now` and says what to log.
    fn record(&mut self, ok: bool, now: Instant) -> ExportLog {
        if ok {
            let failed = std::mem::take(&mut self.in_a_row);
            self.unlogged = 0;
            return match failed {
                0 => ExportLog::Nothing,
                failed => ExportLog::Recovered { failed },
            };
        }
        self.in_a_row += 1;
        let due = self
            .last_logged
            .is_none_or(|last| now.duration_since(last) >= self.every);
        if !due {
            self.unlogged += 1;
            return ExportLog::Nothing;
        }
        self.last_logged = Some(now);
        ExportLog::Failed {
            unlogged: std::mem::take(&mut self.unlogged),
        }
    }
}

/// The OTLP exporter, logging its failures (see the module doc). Spans of a failed
/// export are dropped, as the SDK does; only the count and the error are logged,
/// never a span's content.
#[derive(Debug)]
struct LoggedExporter<E> {
    inner: E,
    endpoint: String,
    failures: Mutex<ExportFailures>,
}

impl<E> LoggedExporter<E> {
    fn new(inner: E, endpoint: String) -> Self {
        Self {
            inner,
            endpoint,
            failures: Mutex::new(ExportFailures::new(EXPORT_FAILURE_LOG_EVERY)),
        }
    }
}

impl<E: SpanExporter> SpanExporter for LoggedExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        let log =
            (self.failures.lock().expect("not poisoned")).record(result.is_ok(), Instant::now());
        let endpoint = &self.endpoint;
        match (&log, &result) {
            (ExportLog::Failed { unlogged }, Err(error)) => tracing::warn!(
                %endpoint,
                %error,
                dropped_spans = spans,
                failed_exports_not_logged = unlogged,
                "cannot export spans over OTLP; they are dropped (this warning is repeated \
                 at most once a minute while exports fail)"
            ),
            (ExportLog::Recovered { failed }, _) => tracing::info!(
                %endpoint,
                failed_exports = failed,
                "exporting spans over OTLP again"
            ),
            _ => {}
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// The `tracing` layer that turns spans into OpenTelemetry spans of `provider`. The
/// exporter's own transport (tonic, h2, hyper) is left out, so exporting never traces
/// itself.
pub fn otel_layer<S>(provider: &SdkTracerProvider) -> impl Layer<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    let layer: OpenTelemetryLayer<S, SdkTracer> =
        tracing_opentelemetry::layer().with_tracer(provider.tracer("tokenlease"));
    layer.with_filter(tracing_subscriber::filter::filter_fn(|meta| {
        let target = meta.target();
        !["h2", "hyper", "tonic", "tower", "opentelemetry"]
            .iter()
            .any(|skip| target.starts_with(skip))
    }))
}

/// Installed logging and tracing; `shutdown` flushes the spans not yet exported.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporter. Runs the SDK's blocking calls
    /// off the runtime's threads: the batch processor is a task that must keep running.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = shutdown(provider).await
        {
            tracing::warn!(
                error = format!("{error:#}"),
                "could not flush traces on shutdown"
            );
        }
    }
}

/// Exports what `provider` buffers and stops it. Call it rather than dropping the last
/// clone inside the runtime: the drop shuts down with a blocking wait on the batch
/// task, which a single-threaded runtime then never runs.
pub async fn shutdown(provider: SdkTracerProvider) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || provider.shutdown())
        .await
        .context("shutdown task failed")?
        .context("cannot flush traces")
}

/// Flushes `provider` without stopping it (tests use it to see spans right away).
pub async fn flush(provider: &SdkTracerProvider) -> anyhow::Result<()> {
    let provider = provider.clone();
    tokio::task::spawn_blocking(move || provider.force_flush())
        .await
        .context("flush task failed")?
        .context("cannot flush traces")
}

/// Installs the global subscriber: logs, and traces when `OTEL_*` asks for them. Must
/// run inside the Tokio runtime. A second call installs nothing.
pub fn init(log_format: &str, traces_filter: &str) -> anyhow::Result<Telemetry> {
    let provider = OtlpConfig::from_env()
        .map(|config| tracer_provider(&config))
        .transpose()?;
    let traces_filter = EnvFilter::try_new(traces_filter)
        .with_context(|| format!("invalid setting traces_filter = {traces_filter:?}"))?;
    let log_filter = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let traces = provider.as_ref().map(|p| (p, traces_filter));
    let installed = subscriber(log_format, log_filter, traces)
        .try_init()
        .is_ok();
    if installed && let Some(provider) = &provider {
        opentelemetry::global::set_tracer_provider(provider.clone());
        tracing::info!("exporting traces over OTLP");
    }
    Ok(Telemetry {
        provider: provider.filter(|_| installed),
    })
}

/// Logs and traces as `init` installs them: the log lines under `log_filter`
/// (`RUST_LOG`) and the spans exported over OTLP under their own `traces_filter` (the
/// `traces_filter` setting), so that quieting the logs does not silence the traces.
pub fn subscriber(
    log_format: &str,
    log_filter: EnvFilter,
    traces: Option<(&SdkTracerProvider, EnvFilter)>,
) -> impl tracing::Subscriber + Send + Sync + 'static {
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colours());
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = if log_format == "json" {
        Box::new(fmt.json().with_filter(log_filter))
    } else {
        Box::new(fmt.with_filter(log_filter))
    };
    let otel = traces.map(|(provider, filter)| otel_layer(provider).with_filter(filter));
    tracing_subscriber::registry().with(fmt).with(otel)
}

/// Installs logs only (for the short-lived admin commands).
pub fn init_logging(log_format: &str) {
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colours());
    let _ = if log_format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The log filter from `RUST_LOG`: unset, empty or blank means `info` (an empty
/// `RUST_LOG=` used to silence everything, the "serving" line included); a value that
/// does not parse falls back to `info` too, with a line on stderr saying so.
fn log_filter(rust_log: Option<&str>) -> EnvFilter {
    match rust_log.map(str::trim).filter(|v| !v.is_empty()) {
        None => EnvFilter::new("info"),
        Some(value) => EnvFilter::try_new(value).unwrap_or_else(|error| {
            eprintln!("RUST_LOG={value:?} is not a valid filter ({error}); logging at info");
            EnvFilter::new("info")
        }),
    }
}

/// Colour codes only for a terminal: logs redirected to a file or a pipe stay plain.
fn colours() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// Reads W3C trace context from HTTP/2 headers (gRPC metadata).
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The server span of one gRPC call (for `Server::trace_fn`), named like OpenTelemetry's
/// RPC conventions (`tokenlease.v1.LeaseService/AcquireLease`), child of the caller's
/// span when the call carries a valid `traceparent`. Health probes and reflection get
/// none: probes every few seconds would bury the traces that matter.
pub fn grpc_request_span(request: &http::Request<()>) -> tracing::Span {
    let path = request.uri().path().trim_start_matches('/');
    if path.starts_with("grpc.health.") || path.starts_with("grpc.reflection.") {
        return tracing::Span::none();
    }
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    let span = tracing::info_span!(
        "grpc_request",
        otel.name = %path,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
    );
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
    // Fails only when no OpenTelemetry layer is installed: nothing to link then.
    let _ = span.set_parent(parent);
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Quieting the logs does not silence the traces (issue 14): under a `warn` log
    /// filter, an info span is still enabled for the OTLP layer with its own `info`
    /// filter, and a debug span is enabled for neither. With one filter over both, as
    /// before, the info span was disabled and nothing was exported.
    #[test]
    fn quiet_logs_do_not_silence_traces() {
        let provider = SdkTracerProvider::builder().build();
        let traces = Some((&provider, EnvFilter::new("info")));
        let both = subscriber("text", EnvFilter::new("warn"), traces);
        tracing::subscriber::with_default(both, || {
            assert!(!tracing::info_span!("lease.acquire").is_disabled());
            assert!(tracing::debug_span!("detail").is_disabled());
        });
        // Without traces, the log filter alone decides.
        let logs_only = subscriber("text", EnvFilter::new("warn"), None);
        tracing::subscriber::with_default(logs_only, || {
            assert!(tracing::info_span!("lease.acquire").is_disabled());
        });
    }

    /// An unset, empty or blank `RUST_LOG` is `info`; a valid one is kept; an invalid
    /// one falls back to `info`.
    #[test]
    fn rust_log_empty_means_the_default() {
        for value in [None, Some(""), Some("  ")] {
            assert_eq!(log_filter(value).to_string(), "info", "{value:?}");
        }
        // EnvFilter prints its directives most specific first.
        assert_eq!(
            log_filter(Some("warn,tokenlease=debug")).to_string(),
            "tokenlease=debug,warn"
        );
        assert_eq!(log_filter(Some("=[[")).to_string(), "info");
    }

    /// A failing exporter is logged at its first failure, then at most once per
    /// interval with the failures in between counted, and once when it recovers.
    #[test]
    fn export_failures_are_logged_at_most_once_per_interval() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut failures = ExportFailures::new(Duration::from_secs(60));
        assert_eq!(failures.record(true, at(0)), ExportLog::Nothing);
        assert_eq!(
            failures.record(false, at(1)),
            ExportLog::Failed { unlogged: 0 }
        );
        for s in 2..=60 {
            assert_eq!(failures.record(false, at(s)), ExportLog::Nothing, "{s}");
        }
        assert_eq!(
            failures.record(false, at(61)),
            ExportLog::Failed { unlogged: 59 }
        );
        assert_eq!(
            failures.record(true, at(62)),
            ExportLog::Recovered { failed: 61 }
        );
        assert_eq!(failures.record(true, at(63)), ExportLog::Nothing);
        // A new outage within the interval waits for it, however short the first.
        assert_eq!(failures.record(false, at(64)), ExportLog::Nothing);
        assert_eq!(
            failures.record(false, at(121)),
            ExportLog::Failed { unlogged: 1 }
        );
    }

    /// Tracing is on only with an endpoint; the service name defaults to tokenlease;
    /// OTEL_SDK_DISABLED wins.
    #[test]
    fn otlp_config_from_the_standard_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(OtlpConfig::from_lookup(env(&[])), None);
        assert_eq!(
            OtlpConfig::from_lookup(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")])),
            Some(OtlpConfig {
                endpoint: "http://c:4317".into(),
                service_name: "tokenlease".into()
            })
        );
        let both = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4317"),
            ("OTEL_SERVICE_NAME", "tl-eu"),
        ]);
        assert_eq!(
            OtlpConfig::from_lookup(both),
            Some(OtlpConfig {
                endpoint: "http://t:4317".into(),
                service_name: "tl-eu".into()
            })
        );
        let disabled = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_SDK_DISABLED", "true"),
        ]);
        assert_eq!(OtlpConfig::from_lookup(disabled), None);
    }
}
