//! Token health (property 7): the circuit breaker and quarantine state machine, on
//! both backends (manual clock in memory with the seed's 30 s; Redis with 300 ms).
//! Every instant is checked against the store's own `now_ms` in the replies.

use super::*;
use crate::domain::{BreakerPolicy, TokenState};

const TOKEN: &str = "k-1";

/// What a clamp case is called, the `blocked_until` it reports given now, and the
/// quarantine length expected.
type ClampCase = (&'static str, fn(i64) -> Option<i64>, i64);

/// The policy of a test: the seed's thresholds, with a short open time on Redis.
fn policy(h: &Harness) -> BreakerPolicy {
    BreakerPolicy {
        open_for: match h.time {
            TimeSource::Manual(_) => Duration::from_secs(30),
            TimeSource::Server(_) => Duration::from_millis(300),
        },
        ..BreakerPolicy::default()
    }
}

fn key(nonce: &str) -> LeaseKey {
    LeaseKey {
        upstream_id: id(UPSTREAM),
        pool_id: None,
        tenant_id: id("t-a"),
        token_id: id(TOKEN),
        nonce: nonce.to_owned(),
    }
}

/// What the service tells the breaker when `lease` is released with `outcome`.
fn outcome_report(
    h: &Harness,
    lease: LeaseKey,
    outcome: ReleaseOutcome,
    blocked_until_ms: Option<i64>,
) -> OutcomeReport {
    OutcomeReport {
        key: lease,
        outcome,
        blocked_until_ms,
        block_duration: Duration::from_secs(600),
        max_block: crate::domain::quarantine_max(Duration::from_secs(600), None),
        repeat_for: h.ttl + h.window,
        policy: policy(h),
    }
}

/// Reports `outcome` for lease `nonce` of TOKEN.
async fn report(
    h: &Harness,
    nonce: &str,
    outcome: ReleaseOutcome,
    blocked_until_ms: Option<i64>,
) -> Recorded {
    let report = outcome_report(h, key(nonce), outcome, blocked_until_ms);
    h.counters
        .record_outcome(&report)
        .await
        .expect("record answered")
}

/// Reports an outcome for a fresh lease.
async fn fresh(h: &Harness, outcome: ReleaseOutcome) -> Recorded {
    report(h, &LeaseKey::new_nonce(), outcome, None).await
}

/// Asks whether lease `nonce` (valid for the harness TTL) may be handed out.
async fn admit(h: &Harness, nonce: &str) -> Admitted {
    let expires = h.now_ms().await + ms(h.ttl);
    h.counters
        .admit_grant(Space::upstream(&id(UPSTREAM)), &id(TOKEN), nonce, expires)
        .await
        .expect("admit answered")
}

async fn status(h: &Harness) -> TokenStatus {
    let report = h
        .counters
        .token_status(Space::upstream(&id(UPSTREAM)), &ids(&[TOKEN]))
        .await
        .expect("status answered");
    report.tokens[0].clone()
}

/// The one transition of `transitions`, checked.
fn only(transitions: &[Transition], previous: TokenState, new: TokenState) -> Transition {
    assert_eq!(transitions.len(), 1, "{transitions:?}");
    let t = transitions[0].clone();
    assert_eq!((t.previous, t.new), (previous, new), "{t:?}");
    assert_eq!(t.token_id, id(TOKEN));
    t
}

/// Opens the breaker with 5 failures; returns the instant it half-opens.
async fn open(h: &Harness) -> i64 {
    for _ in 0..4 {
        assert!(
            fresh(h, ReleaseOutcome::UpstreamError)
                .await
                .transitions
                .is_empty()
        );
    }
    let opened = fresh(h, ReleaseOutcome::UpstreamError).await;
    let t = only(
        &opened.transitions,
        TokenState::Active,
        TokenState::BreakerOpen,
    );
    let until = opened.now_ms + ms(policy(h).open_for);
    assert_eq!(t.until_ms, Some(until));
    until
}

/// Opens the breaker and waits until it half-opens, observed by a probe admission.
async fn half_open(h: &Harness) -> String {
    let until = open(h).await;
    h.advance_to(until).await;
    let probe = LeaseKey::new_nonce();
    let admitted = admit(h, &probe).await;
    assert_eq!(admitted.admission, Admission::Probe);
    only(
        &admitted.transitions,
        TokenState::BreakerOpen,
        TokenState::BreakerHalfOpen,
    );
    probe
}

on_both_backends! {
    /// Property 7: 4 consecutive upstream errors leave the breaker closed (leases still
    /// admitted); the 5th opens it until now + open time, reported exactly once, and
    /// admission is refused with that instant.
    async fn five_consecutive_errors_open_the_breaker(h: Harness) {
        for n in 1..=4 {
            fresh(&h, ReleaseOutcome::UpstreamError).await;
            let s = status(&h).await;
            assert_eq!((s.state, s.consecutive_failures), (TokenState::Active, n));
            assert_eq!(admit(&h, &LeaseKey::new_nonce()).await.admission, Admission::Leasable);
        }
        let opened = fresh(&h, ReleaseOutcome::UpstreamError).await;
        let t = only(&opened.transitions, TokenState::Active, TokenState::BreakerOpen);
        let until = opened.now_ms + ms(policy(&h).open_for);
        assert_eq!((t.until_ms, t.at_ms), (Some(until), opened.now_ms));
        let refused = admit(&h, &LeaseKey::new_nonce()).await;
        assert_eq!(
            refused.admission,
            Admission::Refused { state: TokenState::BreakerOpen, until_ms: until }
        );
        assert!(refused.transitions.is_empty(), "the opening is reported once");
        // Outcomes of leases granted before it opened do not count while open.
        assert!(fresh(&h, ReleaseOutcome::UpstreamError).await.transitions.is_empty());
        assert_eq!(status(&h).await.until_ms, Some(until));
    }

    /// Property 7: a success resets the count of consecutive errors; NOT_USED and
    /// UPSTREAM_RATE_LIMITED do not count for the breaker.
    async fn success_resets_the_failure_count(h: Harness) {
        for _ in 0..4 {
            fresh(&h, ReleaseOutcome::UpstreamError).await;
        }
        fresh(&h, ReleaseOutcome::Success).await;
        assert_eq!(status(&h).await.consecutive_failures, 0);
        for _ in 0..4 {
            fresh(&h, ReleaseOutcome::UpstreamError).await;
            fresh(&h, ReleaseOutcome::NotUsed).await;
        }
        let s = status(&h).await;
        assert_eq!((s.breaker, s.consecutive_failures), (TokenState::Active, 4));
        assert!(!fresh(&h, ReleaseOutcome::NotUsed).await.applied);
        let opened = fresh(&h, ReleaseOutcome::UpstreamError).await;
        only(&opened.transitions, TokenState::Active, TokenState::BreakerOpen);
    }

    /// Property 7: a repeated release (same lease, same outcome) counts once.
    async fn a_repeated_release_counts_once(h: Harness) {
        let nonce = LeaseKey::new_nonce();
        assert!(report(&h, &nonce, ReleaseOutcome::UpstreamError, None).await.applied);
        for _ in 0..5 {
            let again = report(&h, &nonce, ReleaseOutcome::UpstreamError, None).await;
            assert!(!again.applied && again.transitions.is_empty());
        }
        assert_eq!(status(&h).await.consecutive_failures, 1);
    }

    /// Property 7: an open breaker is refused until exactly its open time has passed,
    /// then half-opens (reported once, when first observed) and admits one probe lease
    /// at a time; the probe slot frees when the probe is released NOT_USED or expires.
    async fn half_open_admits_one_probe_at_a_time(h: Harness) {
        let until = open(&h).await;
        h.advance_to(until - ms(h.lead)).await;
        let early = admit(&h, &LeaseKey::new_nonce()).await;
        if early.now_ms < until {
            assert_eq!(
                early.admission,
                Admission::Refused { state: TokenState::BreakerOpen, until_ms: until }
            );
        }
        h.advance_to(until).await;
        let probe = LeaseKey::new_nonce();
        let admitted = admit(&h, &probe).await;
        assert_eq!(admitted.admission, Admission::Probe);
        let t = only(&admitted.transitions, TokenState::BreakerOpen, TokenState::BreakerHalfOpen);
        assert_eq!(t.at_ms, until, "dated when it became due");
        for _ in 0..3 {
            let other = admit(&h, &LeaseKey::new_nonce()).await;
            assert!(
                matches!(
                    other.admission,
                    Admission::Refused { state: TokenState::BreakerHalfOpen, .. }
                ),
                "{other:?}"
            );
            assert!(other.transitions.is_empty(), "half-open is reported once");
        }
        assert_eq!(status(&h).await.state, TokenState::BreakerHalfOpen);
        // Given back unused: the next lease becomes the probe.
        assert!(report(&h, &probe, ReleaseOutcome::NotUsed, None).await.applied);
        let second = LeaseKey::new_nonce();
        assert_eq!(admit(&h, &second).await.admission, Admission::Probe);
        // Never released: once it expires, another lease becomes the probe.
        h.advance(h.ttl + Duration::from_millis(2)).await;
        assert_eq!(admit(&h, &LeaseKey::new_nonce()).await.admission, Admission::Probe);
    }

    /// Property 7: two consecutive successful probes close the breaker (reported once);
    /// leases are admitted normally again. Successes of non-probe leases do not count.
    async fn two_probe_successes_close_the_breaker(h: Harness) {
        let probe = half_open(&h).await;
        assert!(!fresh(&h, ReleaseOutcome::Success).await.applied, "not a probe");
        let first = report(&h, &probe, ReleaseOutcome::Success, None).await;
        assert!(first.applied && first.transitions.is_empty());
        assert_eq!(status(&h).await.state, TokenState::BreakerHalfOpen);
        let probe = LeaseKey::new_nonce();
        assert_eq!(admit(&h, &probe).await.admission, Admission::Probe);
        let closed = report(&h, &probe, ReleaseOutcome::Success, None).await;
        only(&closed.transitions, TokenState::BreakerHalfOpen, TokenState::Active);
        let s = status(&h).await;
        assert_eq!((s.state, s.consecutive_failures), (TokenState::Active, 0));
        for _ in 0..3 {
            assert_eq!(admit(&h, &LeaseKey::new_nonce()).await.admission, Admission::Leasable);
        }
    }

    /// Property 7: a failed probe re-opens the breaker for a full open time (reported
    /// once); a non-probe lease's error while half-open changes nothing.
    async fn a_failed_probe_reopens_the_breaker(h: Harness) {
        let probe = half_open(&h).await;
        assert!(!fresh(&h, ReleaseOutcome::UpstreamError).await.applied, "not a probe");
        let failed = report(&h, &probe, ReleaseOutcome::UpstreamError, None).await;
        let t = only(&failed.transitions, TokenState::BreakerHalfOpen, TokenState::BreakerOpen);
        let until = failed.now_ms + ms(policy(&h).open_for);
        assert_eq!(t.until_ms, Some(until));
        assert_eq!(
            admit(&h, &LeaseKey::new_nonce()).await.admission,
            Admission::Refused { state: TokenState::BreakerOpen, until_ms: until }
        );
        h.advance_to(until).await;
        assert_eq!(admit(&h, &LeaseKey::new_nonce()).await.admission, Admission::Probe);
    }

    /// Property 7: UPSTREAM_RATE_LIMITED quarantines the token until the reported
    /// `blocked_until` (reported once; a later report only extends it); admission is
    /// refused until then; at that instant the quarantine is over (reported once, by
    /// the first observer) and the token is leasable again.
    async fn quarantine_lasts_until_blocked_until(h: Harness) {
        let block = match h.time {
            TimeSource::Manual(_) => 120_000,
            TimeSource::Server(_) => 1_500,
        };
        let now = h.now_ms().await;
        let blocked_until = now + block;
        let q = report(&h, &LeaseKey::new_nonce(), ReleaseOutcome::UpstreamRateLimited, Some(blocked_until)).await;
        let t = only(&q.transitions, TokenState::Active, TokenState::Quarantined);
        assert_eq!(t.until_ms, Some(blocked_until));
        // An earlier end reported later does not shorten it, and is not a transition.
        let again = report(&h, &LeaseKey::new_nonce(), ReleaseOutcome::UpstreamRateLimited, Some(now + block / 2)).await;
        assert!(again.transitions.is_empty());
        assert_eq!(
            admit(&h, &LeaseKey::new_nonce()).await.admission,
            Admission::Refused { state: TokenState::Quarantined, until_ms: blocked_until }
        );
        let s = status(&h).await;
        assert_eq!((s.state, s.until_ms, s.consecutive_failures), (TokenState::Quarantined, Some(blocked_until), 0));
        h.advance_to(blocked_until).await;
        let back = admit(&h, &LeaseKey::new_nonce()).await;
        assert_eq!(back.admission, Admission::Leasable);
        let t = only(&back.transitions, TokenState::Quarantined, TokenState::Active);
        assert_eq!(t.at_ms, blocked_until);
        assert!(admit(&h, &LeaseKey::new_nonce()).await.transitions.is_empty());
    }

    /// Property 7: quarantine ends are clamped: absent → now + the profile's block
    /// duration; in the past → now + 1 s; more than a day ahead → now + 1 day.
    async fn quarantine_ends_are_clamped(h: Harness) {
        let cases: [ClampCase; 3] = [
            ("absent", |_| None, 600_000),
            ("past", |now| Some(now - 3_600_000), 1_000),
            // Cut to 4 × the profile's block duration (10 min here).
            ("far ahead", |now| Some(now + 30 * 86_400_000), 2_400_000),
        ];
        for (i, (what, blocked_until, expected)) in cases.into_iter().enumerate() {
            // One token per case: a second report on one token would only extend.
            let token = id(&format!("k-clamp-{i}"));
            let now = h.now_ms().await;
            let report = OutcomeReport {
                key: LeaseKey { token_id: token.clone(), ..key(&LeaseKey::new_nonce()) },
                outcome: ReleaseOutcome::UpstreamRateLimited,
                blocked_until_ms: blocked_until(now),
                block_duration: Duration::from_secs(600),
                max_block: crate::domain::quarantine_max(Duration::from_secs(600), None),
                repeat_for: h.ttl + h.window,
                policy: policy(&h),
            };
            let q = h.counters.record_outcome(&report).await.expect("record answered");
            assert_eq!(q.transitions.len(), 1, "{what}: {q:?}");
            assert_eq!(q.transitions[0].token_id, token);
            assert_eq!(q.transitions[0].until_ms, Some(q.now_ms + expected), "{what}");
        }
    }

    /// Property 7: a transition time alone causes is reported by exactly one of several
    /// replicas observing it at once.
    async fn a_lazy_transition_is_reported_once_across_replicas(h: Harness) {
        let until = open(&h).await;
        h.advance_to(until).await;
        let replicas = h.replicas(4).await;
        let (upstream, tokens) = (id(UPSTREAM), ids(&[TOKEN]));
        let reads = replicas.iter().map(|c| c.token_status(Space::upstream(&upstream), &tokens));
        let reports = futures::future::join_all(reads).await;
        let seen: usize = reports.iter().map(|r| r.as_ref().unwrap().transitions.len()).sum();
        assert_eq!(seen, 1, "{reports:?}");
        for r in reports {
            assert_eq!(r.unwrap().tokens[0].state, TokenState::BreakerHalfOpen);
        }
    }
}

/// The release of `lease` with its outcome fed to TOKEN's health, as the service does.
async fn release_reporting(
    h: &Harness,
    lease: &LeaseKey,
    outcome: ReleaseOutcome,
) -> (ReleaseResult, Option<Recorded>) {
    let report = outcome_report(h, lease.clone(), outcome, None);
    h.counters
        .release_reporting(&report)
        .await
        .expect("release answered")
}

/// One acquire on TOKEN alone, through `Counters::acquire` (admission included), as the
/// tenant's dedicated token or as its pool's.
async fn acquire_on_token(h: &Harness, dedicated: bool) -> AcquireOutcome {
    let req = if dedicated {
        h.request("t-a", 10_000, &[TOKEN], &[])
    } else {
        h.request("t-a", 10_000, &[], &[TOKEN])
    };
    h.counters.acquire(&req).await.expect("acquire answered")
}

on_both_backends! {
    /// The lease decision carries the health admission (one round trip on Redis). A
    /// dedicated token refused by its health is reported `Unhealthy`, with until when,
    /// and nothing is counted; an open breaker, once due, half-opens inside the
    /// decision, whose grant is the probe (reported once); while the probe is out the
    /// token is refused until the probe's expiry.
    async fn the_decision_admits_a_dedicated_token_by_its_health(h: Harness) {
        let until = open(&h).await;
        let AcquireOutcome::Unhealthy(refused) = acquire_on_token(&h, true).await else {
            panic!("an open token was granted");
        };
        assert_eq!((refused.token_id.as_str(), refused.state), (TOKEN, TokenState::BreakerOpen));
        assert_eq!(refused.until_ms, until);
        assert_eq!(h.usage(&["t-a"], &[TOKEN]).await.tokens, vec![0], "nothing counted");
        h.advance_to(until).await;
        let AcquireOutcome::Granted(probe) = acquire_on_token(&h, true).await else {
            panic!("the half-open token's probe was not granted");
        };
        assert!(probe.probe);
        let t = only(&probe.transitions, TokenState::BreakerOpen, TokenState::BreakerHalfOpen);
        assert_eq!(t.at_ms, until);
        let AcquireOutcome::Unhealthy(busy) = acquire_on_token(&h, true).await else {
            panic!("a second probe was granted");
        };
        assert_eq!(busy.state, TokenState::BreakerHalfOpen);
        assert_eq!(busy.until_ms, probe.expires_at_ms + 1);
        assert!(busy.transitions.is_empty(), "the half-opening is reported once");
        assert_eq!(h.usage(&["t-a"], &[TOKEN]).await.tokens, vec![1], "only the probe");
    }

    /// A pool token its health refuses is not a candidate: with no other, the call is
    /// denied (no usable token) with a retry at exactly the instant the token may be
    /// leased again — the breaker's end, then the probe's expiry — and nothing counted.
    async fn a_pool_token_out_of_service_is_waited_for_exactly(h: Harness) {
        // Opened as the service opens it: five leases released as upstream errors.
        let mut opened = None;
        for _ in 0..5 {
            let lease = h.grant(&h.request("t-a", 10_000, &[], &[TOKEN])).await;
            let (_, recorded) =
                release_reporting(&h, &lease.key, ReleaseOutcome::UpstreamError).await;
            opened = recorded;
        }
        let opened = opened.expect("fed");
        let until = only(&opened.transitions, TokenState::Active, TokenState::BreakerOpen)
            .until_ms
            .expect("open until");
        let AcquireOutcome::Denied(open_denied) = acquire_on_token(&h, false).await else {
            panic!("an open pool token was not denied");
        };
        assert_eq!(open_denied.reason, DenyReason::NoUsableToken);
        assert_eq!(free_at(&open_denied), until);
        let held = h.usage(&["t-a"], &[TOKEN]).await.tokens;
        h.advance_to(until).await;
        let AcquireOutcome::Granted(probe) = acquire_on_token(&h, false).await else {
            panic!("the half-open pool token's probe was not granted");
        };
        assert!(probe.probe);
        only(&probe.transitions, TokenState::BreakerOpen, TokenState::BreakerHalfOpen);
        let AcquireOutcome::Denied(busy) = acquire_on_token(&h, false).await else {
            panic!("a second probe was granted");
        };
        assert_eq!(busy.reason, DenyReason::NoUsableToken);
        assert_eq!(free_at(&busy), probe.expires_at_ms + 1);
        assert_eq!(held, vec![5], "the denials counted nothing");
    }

    /// A lease given back (its outcome not fed to the token's health) and then released
    /// again with the outcome fed: the repeat applies it once, and the token's place in
    /// its pool follows — the fifth error opens the breaker, and the pool's next call
    /// is denied with the breaker's end, without trying the open token.
    async fn a_given_back_lease_reported_later_moves_its_pool_token(h: Harness) {
        for _ in 0..4 {
            let lease = h.grant(&h.request("t-a", 10_000, &[], &[TOKEN])).await;
            release_reporting(&h, &lease.key, ReleaseOutcome::UpstreamError).await;
        }
        let lease = h.grant(&h.request("t-a", 10_000, &[], &[TOKEN])).await;
        assert_eq!(h.release(&lease.key, ReleaseOutcome::UpstreamError).await, ReleaseResult::Released);
        let (again, recorded) = release_reporting(&h, &lease.key, ReleaseOutcome::UpstreamError).await;
        assert_eq!(again, ReleaseResult::AlreadyReleased);
        let recorded = recorded.expect("a repeated release is fed");
        assert!(recorded.applied, "{recorded:?}");
        let until = only(&recorded.transitions, TokenState::Active, TokenState::BreakerOpen)
            .until_ms
            .expect("open until");
        let AcquireOutcome::Denied(denied) = acquire_on_token(&h, false).await else {
            panic!("the open pool token was tried");
        };
        assert_eq!(denied.reason, DenyReason::NoUsableToken);
        assert_eq!(free_at(&denied), until);
    }

    /// The release carries the outcome to the token's health (one round trip on
    /// Redis): five released errors open the breaker, reported by the fifth release; a
    /// repeated release is not applied again; an unknown lease feeds nothing.
    async fn the_release_feeds_the_token_health_once(h: Harness) {
        let mut last = None;
        for n in 1..=5 {
            let Ok(lease) = h.try_acquire(&h.request("t-a", 10_000, &[], &[TOKEN])).await else {
                panic!("grant {n} refused");
            };
            let (result, recorded) = release_reporting(&h, &lease.key, ReleaseOutcome::UpstreamError).await;
            assert_eq!(result, ReleaseResult::Released);
            let recorded = recorded.expect("a release feeds the health");
            assert!(recorded.applied, "release {n}");
            if n < 5 {
                assert!(recorded.transitions.is_empty(), "release {n}: {recorded:?}");
            } else {
                let t = only(&recorded.transitions, TokenState::Active, TokenState::BreakerOpen);
                assert_eq!(t.until_ms, Some(recorded.now_ms + ms(policy(&h).open_for)));
            }
            last = Some(lease.key);
        }
        let last = last.expect("five leases");
        let (again, recorded) = release_reporting(&h, &last, ReleaseOutcome::UpstreamError).await;
        assert_eq!(again, ReleaseResult::AlreadyReleased);
        let recorded = recorded.expect("a repeated release is fed, and not applied");
        assert!(!recorded.applied && recorded.transitions.is_empty(), "{recorded:?}");
        let (conflict, none) = release_reporting(&h, &last, ReleaseOutcome::Success).await;
        assert_eq!(conflict, ReleaseResult::Conflict { previous: ReleaseOutcome::UpstreamError });
        assert!(none.is_none());
        let unknown = LeaseKey { nonce: LeaseKey::new_nonce(), ..last };
        let (missing, none) = release_reporting(&h, &unknown, ReleaseOutcome::UpstreamError).await;
        assert_eq!((missing, none), (ReleaseResult::NotFound, None));
        assert_eq!(status(&h).await.breaker, TokenState::BreakerOpen);
    }
}
