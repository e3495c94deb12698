//! Guarantees on time (issue 13, point 1): a tenant asking within its guarantee does not
//! queue behind a flooding tenant's waiters, however patient the flooder is and at any
//! priority. Three replicas, the emulator counting violations, W = 2 s.

use std::time::Duration;

use tokenlease::grpc::pb;

use super::emulator::{Scenario, WINDOW, demand};
use super::workers::now_ms;

/// Three quiet tenants (30 guaranteed per window each) ask their guarantee: two workers
/// each starting a call every 140 ms, 28.6 per window, as a used slot counts from its
/// grant to W after its release, so a guarantee of 30 serves 30 calls per W + hold
/// (a hold of ~60 ms here). One tenant floods with 24 workers that
/// each wait up to half a window, at `flood_priority`. The quiet tenants' waits stay
/// within W/8 at p99, and every call they start is granted.
async fn quiet_tenants_do_not_wait_behind(flood_priority: pb::Priority) {
    let s = Scenario::start(3, 30, &[("c", 1.0), ("d", 1.0), ("e", 1.0), ("f", 1.0)]).await;
    let half_window = WINDOW.as_millis() as u64 / 2;
    let mut demands: Vec<_> = ["c", "e", "f"]
        .iter()
        .map(|t| demand(t, pb::Priority::Normal, 2, half_window, Some(140)))
        .collect();
    demands.push(demand("d", flood_priority, 24, half_window, None));
    let started = now_ms();
    let tallies = s.run(&demands, Duration::from_secs(10)).await;
    // Skip the first window (quotas settle as demand is measured).
    let (from, to) = (started + 2_000, started + 10_000);
    let bound = WINDOW.as_millis() as u64 / 8;
    for tenant in ["c", "e", "f"] {
        let tally = &tallies[tenant];
        let (asked, granted) = tally.asked_and_granted_between(from, to);
        let p99 = tally.p99_wait(pb::Priority::Normal).expect("granted calls");
        let longest = tally
            .waits_ms
            .values()
            .flatten()
            .max()
            .copied()
            .unwrap_or(0);
        println!(
            "tenant {tenant}: asked {asked}, granted {granted}, denied {}, wait p50/mean {:?} ms, p99 {p99} ms, max {longest} ms",
            tally.denied,
            tally.waits(pb::Priority::Normal)
        );
        assert!(
            p99 <= bound,
            "tenant {tenant} waited {p99} ms at p99 (bound W/8 = {bound} ms) beside the flood"
        );
        // The call in flight at `to` may be answered after it.
        assert!(
            granted + 1 >= asked,
            "tenant {tenant}: {granted} of {asked} granted"
        );
    }
    let flood = tallies["d"].used_between(from, to) as f64 / 4.0;
    println!(
        "flood {flood:.1} per window, denied {}",
        tallies["d"].denied
    );
    assert!(
        flood > 100.0,
        "the flood still uses the spare capacity ({flood:.1} per window)"
    );
    s.assert_no_violation();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_tenants_do_not_wait_behind_a_patient_flood() {
    quiet_tenants_do_not_wait_behind(pb::Priority::Normal).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_tenants_do_not_wait_behind_a_critical_flood() {
    quiet_tenants_do_not_wait_behind(pb::Priority::Critical).await;
}
