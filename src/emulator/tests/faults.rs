//! Injected faults (502 with HTML, latency), set in-process or over HTTP, and the stats
//! endpoint.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use serde_json::json;

use super::{get_json, manual_config, ping, raw_post, send, start};
use crate::baselinker::Outcome;
use crate::emulator::{EmulatorHandle, Fault, TokenStats};

async fn post_fault(emulator: &EmulatorHandle, body: serde_json::Value) -> (u16, String) {
    let request = http::Request::post(format!("{}/_emulator/faults", emulator.url()))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    send(request).await
}

/// An injected 502 answers with an HTML body; a fraction spreads evenly (0.5 = every
/// other request); by default 502s still count toward the limit; only the faulty token
/// is affected; clearing the fault restores normal answers.
#[tokio::test]
async fn injected_bad_gateway_serves_html_502() {
    let (config, _clock) = manual_config(100, 60_000);
    let emulator = start(config).await;
    emulator.set_fault("t", Fault::bad_gateway(1.0));
    let (status, body) = raw_post(&emulator, Some("t"), &[("method", "getJournalList")]).await;
    assert_eq!(status, 502);
    assert!(
        body.starts_with("<html>") && body.contains("502 Bad Gateway"),
        "{body}"
    );
    assert!(matches!(
        ping(&emulator, "healthy").await,
        Outcome::Success(_)
    ));

    emulator.set_fault("t", Fault::bad_gateway(0.5));
    let mut outcomes = Vec::new();
    for _ in 0..4 {
        outcomes.push(ping(&emulator, "t").await);
    }
    let failed: Vec<bool> = outcomes
        .iter()
        .map(|o| *o == Outcome::UpstreamFailure(502))
        .collect();
    assert_eq!(failed, [false, true, false, true]);

    emulator.set_fault("t", Fault::none());
    assert!(matches!(ping(&emulator, "t").await, Outcome::Success(_)));
    let stats = emulator.stats("t");
    assert_eq!((stats.bad_gateway, stats.accepted), (3, 6));
}

/// With `bad_gateway_counts_toward_limit` off, a 502 is served before the limiter and
/// leaves the window untouched.
#[tokio::test]
async fn bad_gateway_can_bypass_the_limit() {
    let (config, _clock) = manual_config(2, 60_000);
    let emulator = start(config).await;
    let fault = Fault {
        bad_gateway_counts_toward_limit: false,
        ..Fault::bad_gateway(1.0)
    };
    emulator.set_fault("t", fault);
    for _ in 0..5 {
        assert_eq!(ping(&emulator, "t").await, Outcome::UpstreamFailure(502));
    }
    emulator.set_fault("t", Fault::none());
    for _ in 0..2 {
        assert!(matches!(ping(&emulator, "t").await, Outcome::Success(_)));
    }
    let stats = emulator.stats("t");
    assert_eq!(
        (stats.bad_gateway, stats.accepted, stats.violations),
        (5, 2, 0)
    );
}

/// Injected latency delays the answer by at least the latency, for that token only.
#[tokio::test]
async fn injected_latency_delays_answers() {
    let (config, _clock) = manual_config(100, 60_000);
    let emulator = start(config).await;
    emulator.set_fault(
        "slow",
        Fault::none().with_latency(Duration::from_millis(150)),
    );
    let started = Instant::now();
    assert!(matches!(ping(&emulator, "slow").await, Outcome::Success(_)));
    assert!(started.elapsed() >= Duration::from_millis(150));
    let timed_out = emulator
        .client()
        .with_timeout(Duration::from_millis(50))
        .call("slow", "getJournalList", &json!({}))
        .await;
    assert!(timed_out.is_err(), "{timed_out:?}");
}

/// `POST /_emulator/faults` sets the same faults as the in-process API, and refuses a
/// fraction outside 0..1 or a body without a token.
#[tokio::test]
async fn faults_settable_over_http() {
    let (config, _clock) = manual_config(100, 60_000);
    let emulator = start(config).await;
    let (status, _) = post_fault(&emulator, json!({"token": "t", "bad_gateway_fraction": 1})).await;
    assert_eq!(status, 200);
    assert_eq!(ping(&emulator, "t").await, Outcome::UpstreamFailure(502));
    let (status, _) = post_fault(&emulator, json!({"token": "t", "latency_ms": 0})).await;
    assert_eq!(status, 200);
    assert!(matches!(ping(&emulator, "t").await, Outcome::Success(_)));
    let (status, body) =
        post_fault(&emulator, json!({"token": "t", "bad_gateway_fraction": 2})).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = post_fault(&emulator, json!({"bad_gateway_fraction": 0.5})).await;
    assert_eq!(status, 400);
}

/// `GET /_emulator/stats` serves exactly what `EmulatorHandle::stats` reports, for all
/// tokens and for one (`?token=`), after accepted, blocked and 502 answers.
#[tokio::test]
async fn stats_over_http_match_stats_in_process() {
    let (config, clock) = manual_config(2, 1000);
    let emulator = start(config).await;
    emulator.set_fault("flaky", Fault::bad_gateway(0.5));
    for _ in 0..4 {
        ping(&emulator, "busy").await;
        ping(&emulator, "flaky").await;
        clock.advance(Duration::from_millis(7));
    }
    let all: std::collections::BTreeMap<String, TokenStats> =
        serde_json::from_value(get_json(&emulator, "/_emulator/stats").await).unwrap();
    assert_eq!(all, emulator.all_stats());
    assert_eq!(all["busy"].violations, 2);
    assert_eq!(all["flaky"].bad_gateway, 1);
    let one: TokenStats =
        serde_json::from_value(get_json(&emulator, "/_emulator/stats?token=busy").await).unwrap();
    assert_eq!(one, emulator.stats("busy"));
    let none: TokenStats =
        serde_json::from_value(get_json(&emulator, "/_emulator/stats?token=nobody").await).unwrap();
    assert_eq!(none, TokenStats::default());
}
