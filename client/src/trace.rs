//! W3C `traceparent` metadata from the caller's current span, so the service's spans
//! join the caller's trace. The span context comes from the current `tracing` span when
//! an OpenTelemetry layer is installed (tracing-opentelemetry), else from the current
//! OpenTelemetry context; nothing is sent when neither has a valid one.

use opentelemetry::trace::{SpanContext, TraceContextExt};
use tonic::metadata::{MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Adds `traceparent` to `metadata` when there is a current trace.
pub(crate) fn inject(metadata: &mut MetadataMap) {
    if let Some(value) = current_traceparent()
        && let Ok(value) = MetadataValue::try_from(value)
    {
        metadata.insert("traceparent", value);
    }
}

fn current_traceparent() -> Option<String> {
    let from_tracing = tracing::Span::current().context();
    let span_context = from_tracing.span().span_context().clone();
    if span_context.is_valid() {
        return Some(traceparent(&span_context));
    }
    let from_otel = opentelemetry::Context::current();
    let span_context = from_otel.span().span_context().clone();
    span_context.is_valid().then(|| traceparent(&span_context))
}

/// `00-<trace id>-<span id>-<flags>`, version 00 of the W3C header.
fn traceparent(context: &SpanContext) -> String {
    format!(
        "00-{:032x}-{:016x}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags().to_u8()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};

    /// A current OpenTelemetry context becomes a `traceparent` header; none, no header.
    #[test]
    fn injects_the_current_context() {
        let mut metadata = MetadataMap::new();
        inject(&mut metadata);
        assert!(metadata.get("traceparent").is_none(), "no trace, no header");

        let span_context = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let _attached = opentelemetry::Context::new()
            .with_remote_span_context(span_context)
            .attach();
        inject(&mut metadata);
        assert_eq!(
            metadata.get("traceparent").unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
    }
}
