//! The wait queue and guarantees (`QueueTicket::guaranteed`): a caller whose tenant is
//! within its guarantee goes ahead of every waiter of a tenant beyond its own, so a
//! quiet tenant does not queue behind a flooding one; within a class the deadlines keep
//! their order. On every backend.

use super::*;

/// A cost-1 request on pool token k-1 (limit 95) that waits, with its tenant's guarantee.
fn waiting(h: &Harness, tenant: &str, guaranteed: u32, score: Option<i64>) -> AcquireRequest {
    AcquireRequest {
        queue: Some(QueueTicket {
            queue_id: "pool".into(),
            priority_offset_ms: 0,
            score,
            wait_ms: 10 * h.window_ms(),
            guaranteed,
        }),
        ..h.request(tenant, 10_000, &[], &["k-1"])
    }
}

on_both_backends! {
    /// The flooder fills the token and keeps three callers queued. When a slot frees,
    /// a quiet tenant asking within its guarantee takes it although it came last; a
    /// flooder's newcomer does not (the flooder's waiters are ahead of it); once the
    /// quiet tenant is beyond its guarantee it queues behind the flooder like anyone.
    async fn a_tenant_within_its_guarantee_does_not_queue_behind_a_flooder(h: Harness) {
        let mut held = Vec::new();
        for _ in 0..95 {
            held.push(h.grant(&waiting(&h, "flood", 0, None)).await);
        }
        for _ in 0..3 {
            let d = h.deny(&waiting(&h, "flood", 0, None)).await;
            assert_eq!(d.reason, DenyReason::NoTokenCapacity);
        }
        // Later deadlines than the waiters' (a tie is not "ahead"; the memory clock
        // stands still otherwise).
        h.advance(Duration::from_millis(2)).await;
        let first = held.remove(0);
        let freed = h.release(&first.key, ReleaseOutcome::NotUsed).await;
        assert_eq!(freed, ReleaseResult::Released);

        let newcomer = h.deny(&waiting(&h, "flood", 0, None)).await;
        assert_eq!(newcomer.reason, DenyReason::NoTokenCapacity, "behind its own waiters");
        let quiet = h.grant(&waiting(&h, "quiet", 1, None)).await;
        assert_eq!(quiet.grant.tenant_used, 1);

        // Beyond its guarantee now (1 held, guarantee 1): a freed slot is the queue's.
        let second = held.remove(0);
        h.release(&second.key, ReleaseOutcome::NotUsed).await;
        let over = h.deny(&waiting(&h, "quiet", 1, None)).await;
        assert_eq!(over.reason, DenyReason::NoTokenCapacity, "queued like the others");
    }
}

on_both_backends! {
    /// A caller behind a waiter that fills the pool's room is told the instant room
    /// grows: here, when the entry of a lease released early leaves the window. The
    /// index re-scores a ready token at most once per W / 8 and does not keep that
    /// instant (`index_scripts.rs`); the denial reads it from the token's window.
    async fn behind_waiters_the_retry_is_when_a_ready_tokens_use_drops(h: Harness) {
        let limited = |tenant: &str| AcquireRequest {
            token_limit: 3,
            ..waiting(&h, tenant, 0, None)
        };
        let held = [
            h.grant(&limited("a")).await,
            h.grant(&limited("a")).await,
            h.grant(&limited("a")).await,
        ];
        let queued = h.deny(&limited("b")).await;
        assert_eq!(queued.reason, DenyReason::NoTokenCapacity);
        h.advance(Duration::from_millis(2)).await;
        // One slot back: the token has room for the waiter, and only for it.
        h.release(&held[0].key, ReleaseOutcome::NotUsed).await;
        let before = h.now_ms().await;
        h.release(&held[1].key, ReleaseOutcome::Success).await;
        let after = h.now_ms().await;

        let behind = h.deny(&limited("c")).await;
        assert_eq!(behind.reason, DenyReason::NoTokenCapacity, "behind the waiter");
        let retry = free_at(&behind);
        assert!(
            (before + h.window_ms() + 1..=after + h.window_ms() + 1).contains(&retry),
            "retry {retry}: the early release's entry leaves the window at {}..={}",
            before + h.window_ms() + 1,
            after + h.window_ms() + 1,
        );
        assert!(retry < held[1].grant.expires_at_ms + h.window_ms() + 1);
    }
}
