//! The limit: exact counts, the blocked message, violations, sliding vs fixed windows,
//! block expiry and extension.

use std::time::Duration;

use super::{T0_MS, manual_config, ping, start};
use crate::baselinker::{BlockZone, Outcome, parse_blocked_until};
use crate::clock::Clock;
use crate::emulator::{EmulatorConfig, WindowKind};

fn is_success(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Success(_))
}

/// Exactly `limit` requests are accepted in a window, then the next one is blocked with
/// BaseLinker's message, whose time (Europe/Warsaw by default; +01:00 in November) parses back to the block end.
#[tokio::test]
async fn exactly_limit_accepted_then_blocked_with_parseable_time() {
    let (config, clock) = manual_config(5, 1000);
    clock.advance(Duration::from_millis(250));
    let emulator = start(config).await;
    for _ in 0..5 {
        assert!(is_success(&ping(&emulator, "t").await));
    }
    let Outcome::Blocked {
        until_unix_ms,
        message,
    } = ping(&emulator, "t").await
    else {
        panic!("the sixth request must be blocked");
    };
    // T0 + 250 ms + 10 min, rounded up to the second, written in Warsaw's winter time.
    assert_eq!(
        message,
        "Query limit exceeded, token blocked until 2023-11-14 23:23:21"
    );
    assert_eq!(until_unix_ms, Some(1_700_000_601_000));
    assert_eq!(
        parse_blocked_until(&message, &BlockZone::default()),
        until_unix_ms
    );
    assert_eq!(emulator.stats("t").accepted, 5);
}

/// Every violation is counted: the first request over the limit and each one during
/// the block; refused requests never enter the window.
#[tokio::test]
async fn violations_counted_first_over_limit_and_each_during_block() {
    let (config, clock) = manual_config(3, 1000);
    let emulator = start(config).await;
    for _ in 0..3 {
        ping(&emulator, "t").await;
    }
    for _ in 0..4 {
        assert!(matches!(
            ping(&emulator, "t").await,
            Outcome::Blocked { .. }
        ));
        clock.advance(Duration::from_secs(60));
    }
    let stats = emulator.stats("t");
    assert_eq!(stats.violations, 4);
    assert_eq!(stats.blocks, 1);
    assert_eq!(stats.accepted, 3);
    assert_eq!(stats.accepted_at_ms, vec![T0_MS; 3]);
    assert_eq!(emulator.stats("other"), Default::default());
}

/// The window slides: 100 requests just before a minute boundary and 100 just after
/// (200 within one second) — fixed minutes accept all 200, the sliding window refuses
/// everything after the first 100.
#[tokio::test]
async fn sliding_window_refuses_what_fixed_minutes_allow_across_a_boundary() {
    for kind in [WindowKind::Sliding, WindowKind::Fixed] {
        let (mut config, clock) = manual_config(100, 60_000);
        config.window_kind = kind;
        // T0 is 20 s past a minute: move to 500 ms before the next minute.
        clock.advance(Duration::from_millis(39_500));
        let emulator = start(config).await;
        let client = emulator.client();
        let mut accepted = 0;
        for i in 0..200 {
            if i == 100 {
                clock.advance(Duration::from_millis(600));
            }
            let outcome = client
                .call("t", "getJournalList", &serde_json::json!({}))
                .await
                .unwrap();
            accepted += usize::from(is_success(&outcome));
            clock.advance(Duration::from_millis(2));
        }
        let stats = emulator.stats("t");
        let densest = stats.max_accepted_in_any_window(Duration::from_secs(60));
        match kind {
            WindowKind::Sliding => {
                assert_eq!((accepted, densest, stats.violations), (100, 100, 100));
            }
            WindowKind::Fixed => assert_eq!((accepted, densest, stats.violations), (200, 200, 0)),
        }
    }
}

/// The sliding interval is (t − W, t]: the request exactly W after the first of a full
/// window is accepted, one a millisecond earlier is blocked.
#[tokio::test]
async fn sliding_window_boundary_is_half_open() {
    let (config, clock) = manual_config(2, 1000);
    let emulator = start(config).await;
    for token in ["early", "exact"] {
        ping(&emulator, token).await;
    }
    clock.advance(Duration::from_millis(10));
    for token in ["early", "exact"] {
        ping(&emulator, token).await;
    }
    clock.advance(Duration::from_millis(989));
    assert!(matches!(
        ping(&emulator, "early").await,
        Outcome::Blocked { .. }
    ));
    clock.advance(Duration::from_millis(1));
    assert!(is_success(&ping(&emulator, "exact").await));
    assert_eq!(
        emulator.stats("exact").accepted_at_ms,
        vec![T0_MS, T0_MS + 10, T0_MS + 1000]
    );
}

/// A block ends at the time its message gives (real clock): the request at that time
/// succeeds, and requests made during the block were never counted in the window.
#[tokio::test]
async fn block_ends_and_requests_succeed_again() {
    // The four calls must fall in one window: 1 s leaves a loaded machine room. The
    // block outlasts the window, so the calls before it are out of the window after.
    let config = EmulatorConfig {
        limit: 3,
        window: Duration::from_millis(1_000),
        block: Duration::from_millis(1_200),
        ..EmulatorConfig::default()
    };
    let emulator = start(config).await;
    for _ in 0..3 {
        assert!(is_success(&ping(&emulator, "t").await));
    }
    let Outcome::Blocked {
        until_unix_ms: Some(until),
        ..
    } = ping(&emulator, "t").await
    else {
        panic!("the fourth request must be blocked with a readable time");
    };
    assert!(matches!(
        ping(&emulator, "t").await,
        Outcome::Blocked { .. }
    ));
    let wait = until - crate::clock::system_now_ms();
    tokio::time::sleep(Duration::from_millis(wait.max(0) as u64 + 5)).await;
    for _ in 0..3 {
        assert!(is_success(&ping(&emulator, "t").await));
    }
    let stats = emulator.stats("t");
    assert_eq!((stats.accepted, stats.violations, stats.blocks), (6, 2, 1));
    assert!(stats.max_accepted_in_any_window(Duration::from_millis(1_000)) <= 3);
}

/// By default a request during a block does not move its end; with `extend_block` it
/// pushes the end to its own time plus the block length.
#[tokio::test]
async fn block_extension_is_configurable() {
    for extend_block in [false, true] {
        let (mut config, clock) = manual_config(1, 1000);
        config.extend_block = extend_block;
        let emulator = start(config).await;
        ping(&emulator, "t").await;
        let first_until = T0_MS + 600_000;
        let blocked_until = |outcome| match outcome {
            Outcome::Blocked { until_unix_ms, .. } => until_unix_ms,
            other => panic!("expected a block, got {other:?}"),
        };
        assert_eq!(blocked_until(ping(&emulator, "t").await), Some(first_until));
        clock.advance(Duration::from_secs(60));
        let later = blocked_until(ping(&emulator, "t").await);
        let expected = if extend_block {
            first_until + 60_000
        } else {
            first_until
        };
        assert_eq!(later, Some(expected), "extend_block = {extend_block}");
        clock.advance(Duration::from_millis(
            (expected - T0_MS - 60_000 - 1) as u64,
        ));
        assert!(matches!(
            ping(&emulator, "t").await,
            Outcome::Blocked { .. }
        ));
        clock.advance(Duration::from_millis(1));
        let after = ping(&emulator, "t").await;
        // Without extension the probe at `expected - 1` is the last refusal; with it, that
        // probe extended the block again, so the token is still blocked.
        assert_eq!(
            is_success(&after),
            !extend_block,
            "extend_block = {extend_block}"
        );
    }
}

/// Many concurrent callers on one token (system clock): exactly `limit` get through.
#[tokio::test]
async fn concurrent_requests_never_exceed_the_limit() {
    let config = EmulatorConfig {
        limit: 10,
        clock: Clock::System,
        ..EmulatorConfig::default()
    };
    let emulator = start(config).await;
    let client = emulator.client();
    let calls = (0..50).map(|_| {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .call("t", "getJournalList", &serde_json::json!({}))
                .await
                .unwrap()
        })
    });
    let outcomes = futures::future::join_all(calls).await;
    let accepted = outcomes
        .iter()
        .filter(|o| is_success(o.as_ref().unwrap()))
        .count();
    assert_eq!(accepted, 10);
    let stats = emulator.stats("t");
    assert_eq!((stats.accepted, stats.violations), (10, 40));
}
