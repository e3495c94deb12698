//! Pacing (`AcquireRequest::pace_burst`, see `scripts::ACQUIRE`): a token grants its
//! back-to-back allowance at once, then one slot per W / limit; "not used" gives the
//! pace back; a waiter ahead in the queue gets the slot the pace frees. On every backend.

use super::*;

/// The token limit of these tests: low, so that paced grants are far apart (75 ms on
/// Redis's 1.5 s window) and a slow test machine does not earn pace between two calls.
const LIMIT: u32 = 20;

/// A paced cost-1 request on pool token k-1.
fn paced(h: &Harness, tenant: &str, burst: u32) -> AcquireRequest {
    AcquireRequest {
        pace_burst: burst,
        token_limit: LIMIT,
        ..h.request(tenant, 10_000, &[], &["k-1"])
    }
}

/// W / limit: how far apart paced grants are, ms.
fn step(h: &Harness) -> f64 {
    h.window_ms() as f64 / LIMIT as f64
}

fn queued(score: Option<i64>, wait_ms: i64) -> Option<QueueTicket> {
    Some(QueueTicket {
        queue_id: "pool".into(),
        priority_offset_ms: 0,
        score,
        wait_ms,
        guaranteed: 0,
    })
}

on_both_backends! {
    /// The first `burst` grants come at once; after them the token grants exactly one
    /// slot per W / limit, each denial pointing at the instant the next one is allowed.
    async fn pacing_spreads_grants_over_the_window(h: Harness) {
        let req = paced(&h, "t-a", 5);
        let first = h.grant(&req).await.grant.now_ms;
        for _ in 1..5 {
            h.grant(&req).await;
        }
        for k in 1..=6 {
            // Five slots spent from `first`: the k-th more is allowed at first + k steps.
            let at = (first as f64 + k as f64 * step(&h)).ceil() as i64;
            let lease = h.expect_free_at(&req, at).await;
            assert!(lease.grant.now_ms >= at, "granted before its pace: {lease:?}");
        }
        let usage = h.usage(&["t-a"], &["k-1"]).await;
        assert_eq!(usage, counts(&[11], &[11]));
    }

    /// A grant released "not used" gives back the pace it spent, so the next caller is
    /// granted at once; other outcomes do not.
    async fn not_used_gives_the_pace_back(h: Harness) {
        let req = paced(&h, "t-a", 2);
        h.grant(&req).await;
        let second = h.grant(&req).await;
        h.deny(&req).await;
        assert_eq!(
            h.release(&second.key, ReleaseOutcome::Success).await,
            ReleaseResult::Released
        );
        h.deny(&req).await;
        let third = h.expect_free_at(&req, free_at(&h.deny(&req).await)).await;
        assert_eq!(
            h.release(&third.key, ReleaseOutcome::NotUsed).await,
            ReleaseResult::Released
        );
        let again = h.grant(&req).await;
        assert!(
            again.grant.now_ms < third.grant.now_ms + step(&h) as i64,
            "the pace came back: granted at once"
        );
        h.deny(&req).await;
    }

    /// A full window with callers asking earns no back-to-back allowance: when its
    /// slots all free at once, a quarter of the burst is granted at once (5 of 20; 6 if
    /// a step passed meanwhile), then the pace binds again, not the window.
    async fn a_full_window_earns_no_burst(h: Harness) {
        let req = paced(&h, "t-a", LIMIT);
        let mut last = None;
        for _ in 0..LIMIT {
            last = Some(h.grant(&req).await.grant);
        }
        let last = last.expect("granted");
        let all_free = last.expires_at_ms + h.window_ms() + 1;
        h.advance_to(all_free - ms(h.lead)).await;
        // Still full, and a caller asks: the allowance drains to a quarter.
        assert_eq!(h.deny(&req).await.reason, DenyReason::NoTokenCapacity);
        h.advance_to(all_free).await;
        let mut granted = 0;
        let denied = loop {
            match h.try_acquire(&req).await {
                Ok(_) => granted += 1,
                Err(d) => break d,
            }
        };
        assert!((5..=6).contains(&granted), "{granted} granted at once");
        let usage = h.usage(&["t-a"], &["k-1"]).await;
        assert!(usage.tokens[0] < LIMIT, "the window has room: the pace binds");
        assert!(free_at(&denied) > denied.now_ms);
    }

    /// The slot the pace frees goes to the waiter ahead: a newcomer with a later
    /// virtual deadline is denied while the waiter is queued, the waiter is granted.
    async fn paced_slot_goes_to_the_waiter_ahead(h: Harness) {
        let req = paced(&h, "t-a", 1);
        h.grant(&req).await;
        let wait = 10 * h.window_ms();
        let early = AcquireRequest { queue: queued(None, wait), ..paced(&h, "t-a", 1) };
        let denied = h.deny(&early).await;
        let score = denied.queue_score.expect("queued");
        let free = free_at(&denied);
        h.advance_to(free).await;
        let late = AcquireRequest { queue: queued(Some(score + 1), wait), ..paced(&h, "t-b", 1) };
        let d = h.deny(&late).await;
        assert_eq!(d.reason, DenyReason::NoTokenCapacity);
        let waiter = AcquireRequest { queue: queued(Some(score), wait), ..early.clone() };
        h.grant(&waiter).await;
    }
}
