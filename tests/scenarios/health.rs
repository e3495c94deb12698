//! Circuit breaker and quarantine against the emulator: the upstream's own answers
//! (502s, "blocked until") drive token state, seen by a watcher on another replica.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokenlease::emulator::Fault;
use tokenlease::grpc::pb::{self, event::Kind, lease_service_client::LeaseServiceClient};
use tonic::transport::Channel;

use super::emulator::{Scenario, demand};
use super::helpers::{authed, eventually};
use super::workers::now_ms;

/// (token, previous state, new state, until ms) of every token event a watcher saw.
type Seen = Arc<Mutex<Vec<(String, i32, i32, Option<i64>)>>>;

/// Watches token state changes through `client` in the background.
async fn watch_tokens(mut client: LeaseServiceClient<Channel>, key: &str) -> Seen {
    let seen: Seen = Arc::default();
    let mut stream = client
        .watch_events(authed(pb::WatchEventsRequest::default(), key))
        .await
        .unwrap()
        .into_inner();
    let sink = seen.clone();
    tokio::spawn(async move {
        while let Ok(Some(message)) = stream.message().await {
            if let Some(Kind::TokenStateChanged(change)) = message.event.and_then(|e| e.kind) {
                let until = change
                    .until
                    .map(|t| t.seconds * 1000 + t.nanos as i64 / 1_000_000);
                sink.lock().unwrap().push((
                    change.token_id,
                    change.previous_state,
                    change.new_state,
                    until,
                ));
            }
        }
    });
    seen
}

fn states(seen: &Seen, token: &str) -> Vec<i32> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|e| e.0 == token)
        .map(|e| e.2)
        .collect()
}

/// The emulator answers 502 on one token → its breaker opens (5 errors), leases move to
/// the other tokens, then after the upstream recovers, half-open probes close it; a
/// watcher on another replica sees each state change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_routes_around_and_closes() {
    let s = Scenario::start_with(
        3,
        30,
        &[("c", 1.0)],
        |settings| settings.breaker.open_ms = 1_000,
        Duration::from_secs(600),
    )
    .await;
    let seen = watch_tokens(s.replicas[2].lease().await, &s.key).await;
    s.emulator.set_fault(&s.tokens[0], Fault::bad_gateway(1.0));
    let workers = [demand("c", pb::Priority::Normal, 4, 500, Some(50))];
    let failing = s.run(&workers, Duration::from_secs(3)).await;
    let errors = failing["c"].upstream_errors;
    let used = failing["c"].used_at_ms.len();
    // 5 errors open it; each later half-open probe that fails costs one more.
    assert!(
        (5..=12).contains(&errors),
        "{errors} upstream errors while the token failed"
    );
    assert!(
        used > 100,
        "leases moved to the healthy tokens ({used} calls succeeded)"
    );
    assert_eq!(
        states(&seen, "tok-0").first(),
        Some(&(pb::TokenState::BreakerOpen as i32))
    );

    s.emulator.set_fault(&s.tokens[0], Fault::none());
    s.run(&workers, Duration::from_secs(4)).await;
    // The watcher on another replica sees the closing shortly after the run.
    eventually(
        Duration::from_secs(5),
        "tok-0 closed, seen by the watcher",
        || async {
            (states(&seen, "tok-0").last() == Some(&(pb::TokenState::Active as i32))).then_some(())
        },
    )
    .await;
    let tok0 = states(&seen, "tok-0");
    assert!(
        tok0.contains(&(pb::TokenState::BreakerHalfOpen as i32)),
        "{tok0:?}"
    );
    assert_eq!(
        tok0.last(),
        Some(&(pb::TokenState::Active as i32)),
        "closed after recovery: {tok0:?}"
    );
    assert!(
        s.emulator.stats(&s.tokens[0]).accepted > 0,
        "the recovered token is used again"
    );
    s.assert_no_violation();
}

/// A token is blocked by requests made around the service → the first workers that
/// hit it report it, the token is quarantined until the reported time (a watcher on
/// another replica sees it), no further violations, and it is used again after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_blocked_around_the_service_is_quarantined() {
    let s = Scenario::start_with(2, 30, &[("c", 1.0)], |_| {}, Duration::from_secs(3)).await;
    let seen = watch_tokens(s.replicas[1].lease().await, &s.key).await;
    // Someone outside tokenlease uses the token past its limit: the upstream blocks it.
    let outside = s.emulator.client();
    for _ in 0..101 {
        outside
            .call(&s.tokens[0], "getOrderStatusList", &serde_json::json!({}))
            .await
            .unwrap();
    }
    let blocked = s.emulator.stats(&s.tokens[0]);
    assert_eq!(blocked.violations, 1);
    let blocked_until = blocked.blocked_until_ms.unwrap();

    let workers = [demand("c", pb::Priority::Normal, 4, 500, Some(50))];
    let tally = s.run(&workers, Duration::from_secs(6)).await;
    assert!(now_ms() > blocked_until + 1_000);
    let after = s.emulator.stats(&s.tokens[0]);
    // Workers holding leases on it when it was blocked may each hit it once; no more.
    let hits = after.violations - 1;
    assert!(
        (1..=4).contains(&hits),
        "{hits} requests reached the blocked token"
    );
    assert_eq!(tally["c"].rate_limited, hits);
    let events = seen.lock().unwrap().clone();
    let quarantine = events
        .iter()
        .find(|e| e.0 == "tok-0" && e.2 == pb::TokenState::Quarantined as i32)
        .expect("a quarantine event");
    assert_eq!(
        quarantine.3,
        Some(blocked_until),
        "quarantined until the time the upstream reported"
    );
    assert_eq!(
        states(&seen, "tok-0").last(),
        Some(&(pb::TokenState::Active as i32)),
        "usable again: {events:?}"
    );
    assert!(
        after.accepted > blocked.accepted,
        "used again after the block"
    );
}
