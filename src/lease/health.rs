//! Token health in leasing: leases route around tokens whose circuit breaker is open,
//! that the upstream quarantined, or that are half-open with their one probe lease
//! out; releases feed the breaker; every state change becomes one event.
//!
//! # Two reads, one authoritative
//! The store decides (`store/counters/breaker.rs`). Every grant is *admitted* by it
//! after the counters granted it, in one small script: that is the correctness
//! guarantee (a token quarantined by a release that returned before the grant is never
//! handed out), and it costs one round trip per acquire.
//!
//! Besides, each replica keeps **hints**: tokens it knows to be unusable until some
//! instant, learnt from refused admissions and from `TokenStateChanged` events (its own
//! and, through the relay, every other replica's). `plan` drops hinted tokens before
//! calling the counters, so a known-bad token costs nothing instead of a grant, a
//! refusal and a give-back. A hint can only be wrong for a short while, and then
//! only costs time: a stale "unusable" hint ends at its instant (a half-open one after
//! `PROBE_HINT` at most, since a probe's release is not announced), a missing hint is
//! caught by admission. When the event feed may have missed something (`Resync`, or
//! this replica's bus lagging), all hints are forgotten.
//!
//! Hint instants are local `tokio::time::Instant`s, computed from durations on the
//! store's clock (`until − now`), so replicas' wall clocks do not matter — except for
//! hints from other replicas' events, which carry store instants only; there the local
//! wall clock stands in for the store's, and skew makes a hint a little long or short.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use super::snapshot::{Route, Snapshot};
use super::{AcquireAnswer, DenialReason, Leaser};
use crate::clock::system_now_ms;
use crate::domain::{BreakerPolicy, Id, TokenOwner, TokenState};
use crate::error::ServiceError;
use crate::events::{Event, EventBus, EventKind};
use crate::store::counters::{
    AcquireRequest, Counters, Grant, LeaseKey, OutcomeReport, Recorded, ReleaseOutcome,
    ReleaseResult, Space, Transition, Unhealthy,
};

/// The longest a hint about a half-open token with a probe out is trusted: the probe
/// may be released at any moment, on any replica, and that is not announced.
pub const PROBE_HINT: Duration = Duration::from_secs(1);

/// How long before a token comes back into service its capacity returns to the quotas:
/// so that a caller retrying at that very instant finds the quota already raised.
const RETURN_LEAD: Duration = Duration::from_millis(100);

/// Block time assumed when the upstream profile is gone from the configuration (its
/// tokens go with it, so this only covers a release racing a deletion): BaseLinker's.
const FALLBACK_BLOCK: Duration = Duration::from_secs(600);

/// A token this replica believes unusable until `usable_at`.
#[derive(Debug, Clone, Copy)]
struct Hint {
    state: TokenState,
    usable_at: Instant,
}

/// Breaker policy, event publishing and this replica's hints; cheap to clone.
#[derive(Clone)]
pub struct TokenHealth {
    policy: BreakerPolicy,
    events: EventBus,
    hints: Arc<Mutex<HashMap<Id, Hint>>>,
}

impl TokenHealth {
    pub fn new(policy: BreakerPolicy, events: EventBus) -> Self {
        Self {
            policy,
            events,
            hints: Arc::default(),
        }
    }

    pub fn policy(&self) -> &BreakerPolicy {
        &self.policy
    }

    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// Tokens this replica knows to be out of service: breaker open, or quarantined, for
    /// longer than `RETURN_LEAD` from now. (A half-open token still serves probe leases,
    /// so it counts as in service.)
    pub fn out_of_service(&self) -> BTreeSet<Id> {
        self.out_until().into_keys().collect()
    }

    /// `RETURN_LEAD` before the next instant a token out of service is expected back:
    /// when `out_of_service` changes next.
    pub fn next_return(&self) -> Option<Instant> {
        let back = self.out_until().into_values().min()?;
        Some(back - RETURN_LEAD)
    }

    /// The tokens of `out_of_service`, each with the instant it is expected back.
    fn out_until(&self) -> HashMap<Id, Instant> {
        let soon = Instant::now() + RETURN_LEAD;
        self.hints()
            .iter()
            .filter(|(_, hint)| hint.usable_at > soon)
            .filter(|(_, hint)| {
                matches!(
                    hint.state,
                    TokenState::Quarantined | TokenState::BreakerOpen
                )
            })
            .map(|(token, hint)| (token.clone(), hint.usable_at))
            .collect()
    }

    fn hints(&self) -> std::sync::MutexGuard<'_, HashMap<Id, Hint>> {
        // Each update is a single insert or remove: a poisoned map is still consistent.
        self.hints
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The route's dedicated tokens minus those known to be unusable now, and how many
    /// of its pool tokens are not known to be (the pool goes whole to the store, which
    /// keeps its unusable tokens out itself); or — when none is left — the
    /// NO_USABLE_TOKEN denial, with a retry-after at the earliest instant one of them
    /// may be usable again. Copies nothing of the pool: its cost does not grow with it
    /// while no hint is held.
    pub(super) fn route_around(
        &self,
        tenant: &Id,
        route: &Route,
    ) -> Result<(Vec<Id>, usize), AcquireAnswer> {
        let now = Instant::now();
        let mut hints = self.hints();
        hints.retain(|_, hint| hint.usable_at > now);
        let usable = |t: &&Id| !hints.contains_key(*t);
        let dedicated: Vec<Id> = route.dedicated.iter().filter(usable).cloned().collect();
        let pooled = if hints.is_empty() {
            route.pooled.len()
        } else {
            route.pooled.iter().filter(usable).count()
        };
        if !dedicated.is_empty() || pooled > 0 {
            return Ok((dedicated, pooled));
        }
        let blocked: Vec<(&Id, Hint)> = route
            .dedicated
            .iter()
            .chain(route.pooled.iter())
            .filter_map(|t| hints.get(t).map(|hint| (t, *hint)))
            .collect();
        let retry_after = blocked
            .iter()
            .map(|(_, hint)| hint.usable_at - now)
            .min()
            .unwrap_or(PROBE_HINT);
        let reasons: Vec<String> = blocked
            .iter()
            .map(|(token, hint)| {
                let why = match hint.state {
                    TokenState::Quarantined => "is quarantined after an upstream rate-limit answer",
                    TokenState::BreakerOpen => "has its circuit breaker open after upstream errors",
                    TokenState::BreakerHalfOpen => "is half-open with its one probe lease out",
                    TokenState::Active | TokenState::Disabled => "is not usable",
                };
                let wait = (hint.usable_at - now).as_secs_f64();
                format!("'{token}' {why} (may be usable in {wait:.1}s)")
            })
            .collect();
        Err(AcquireAnswer::Denied {
            reason: DenialReason::NoUsableToken,
            retry_after: Some(retry_after),
            message: format!(
                "tenant '{tenant}' has no usable token on upstream '{}' now: {}",
                route.upstream_id,
                reasons.join("; ")
            ),
        })
    }

    /// After the counters granted `grant` for `request` (the store's admission ran in
    /// the same decision): reports the transitions it made due and, for a probe lease,
    /// spares this replica's next acquires the refusal while the probe is out.
    pub(super) fn granted(&self, request: &AcquireRequest, grant: &Grant) {
        self.publish(&grant.transitions, grant.now_ms);
        if grant.probe {
            tracing::info!(token_id = %grant.token_id, tenant_id = %request.tenant_id, "probe lease granted on a half-open token");
            let for_ms = grant.expires_at_ms - grant.now_ms;
            self.remember(&grant.token_id, TokenState::BreakerHalfOpen, for_ms);
        }
    }

    /// The decision chose a token its health refuses (nothing was recorded): a hint now
    /// keeps the token out until it may be usable, and the caller plans again.
    pub(super) fn refused(&self, refused: &Unhealthy) {
        self.publish(&refused.transitions, refused.now_ms);
        self.remember(
            &refused.token_id,
            refused.state,
            refused.until_ms - refused.now_ms,
        );
    }

    /// What a release tells the token's breaker and quarantine, in this upstream's
    /// terms; warns when the reported block end is beyond what the upstream ever blocks.
    pub(super) fn outcome_report(
        &self,
        snapshot: &Snapshot,
        key: &LeaseKey,
        outcome: ReleaseOutcome,
        blocked_until_ms: Option<i64>,
        lease_ttl: Duration,
    ) -> OutcomeReport {
        let (block_duration, max_block, window) = snapshot
            .upstreams
            .get(&key.upstream_id)
            .map_or((FALLBACK_BLOCK, None, Duration::ZERO), |u| {
                (u.block_duration, u.max_block, u.window)
            });
        let report = OutcomeReport {
            key: key.clone(),
            outcome,
            blocked_until_ms,
            block_duration,
            max_block: crate::domain::quarantine_max(block_duration, max_block),
            repeat_for: lease_ttl + window,
            policy: self.policy,
        };
        if let Some(until) = blocked_until_ms {
            let cap = report.max_block.as_millis() as i64;
            let ahead = until - crate::clock::system_now_ms();
            if ahead > cap {
                tracing::warn!(
                    token_id = %key.token_id,
                    tenant_id = %key.tenant_id,
                    reported_ms = ahead,
                    cap_ms = cap,
                    "a rate-limit report's blocked_until is further ahead than this upstream \
                     ever blocks; the quarantine is cut to the cap (a worker misparsing the \
                     upstream's date?)"
                );
            }
        }
        report
    }

    /// What the store did with a release's outcome (fed for first and repeated releases
    /// alike: the store applies each lease once, so a worker that retries a release
    /// whose reply it lost still gets its report counted).
    pub(super) fn recorded(&self, key: &LeaseKey, recorded: &Recorded) {
        if recorded.applied {
            // If this was the probe of a half-open token, its slot is free again.
            self.forget_half_open(&key.token_id);
        }
        self.publish(&recorded.transitions, recorded.now_ms);
    }

    /// Puts `token` back in service (an admin's decision): forgets its quarantine and
    /// breaker in the store (in `space`, the token's counters space), here, and,
    /// through the event, on every replica. Returns its state just before.
    pub async fn reset(
        &self,
        counters: &Counters,
        space: Space<'_>,
        token: &Id,
    ) -> Result<TokenState, ServiceError> {
        let before = counters.reset_health(space, token).await?;
        self.publish(&before.transitions, before.now_ms);
        let previous = before
            .tokens
            .first()
            .map_or(TokenState::Active, |status| status.state);
        self.hints().remove(token);
        if previous != TokenState::Active {
            tracing::info!(token_id = %token, ?previous, "token health reset by an admin");
            self.events.publish_at(
                before.now_ms,
                EventKind::TokenStateChanged {
                    token_id: token.to_string(),
                    previous,
                    new: TokenState::Active,
                    until_ms: None,
                    cause: "cleared by an admin".into(),
                },
            );
        }
        Ok(previous)
    }

    /// Publishes transitions the store reported (each exactly once, by the caller that
    /// observed it) and updates this replica's hints at once, without waiting for the
    /// event to come round.
    fn publish(&self, transitions: &[Transition], store_now_ms: i64) {
        for t in transitions {
            tracing::info!(
                token_id = %t.token_id,
                previous = ?t.previous,
                new = ?t.new,
                until_ms = t.until_ms,
                "token state changed"
            );
            self.learn(t.token_id.as_str(), t.new, t.until_ms, store_now_ms);
            if t.new == TokenState::BreakerOpen {
                // Each transition is decided once across replicas, so this counts once.
                crate::metrics::breaker_opened(&t.token_id);
            }
            self.events.publish_at(
                t.at_ms,
                EventKind::TokenStateChanged {
                    token_id: t.token_id.to_string(),
                    previous: t.previous,
                    new: t.new,
                    until_ms: t.until_ms,
                    cause: t.cause.describe(&self.policy),
                },
            );
        }
    }

    /// Remembers that `token` is unusable in `state` for `for_ms` more milliseconds.
    fn remember(&self, token: &Id, state: TokenState, for_ms: i64) {
        let mut span = Duration::from_millis(for_ms.max(0) as u64);
        if state == TokenState::BreakerHalfOpen {
            span = span.min(PROBE_HINT);
        }
        let usable_at = Instant::now() + span;
        let mut hints = self.hints();
        let hint = hints
            .entry(token.clone())
            .or_insert(Hint { state, usable_at });
        if usable_at >= hint.usable_at {
            *hint = Hint { state, usable_at };
        }
    }

    fn forget_half_open(&self, token: &Id) {
        let mut hints = self.hints();
        if hints
            .get(token)
            .is_some_and(|h| h.state == TokenState::BreakerHalfOpen)
        {
            hints.remove(token);
        }
    }

    /// Updates hints from a token's new state; `until_ms` and `now_ms` on one clock.
    fn learn(&self, token: &str, new: TokenState, until_ms: Option<i64>, now_ms: i64) {
        let Ok(token) = Id::parse("token_id", token) else {
            return;
        };
        match (new, until_ms) {
            (TokenState::BreakerOpen | TokenState::Quarantined, Some(until)) => {
                self.remember(&token, new, until - now_ms)
            }
            // Usable again, or half-open (try it: admission arbitrates the probe).
            (TokenState::Active | TokenState::BreakerHalfOpen, _) => {
                self.hints().remove(&token);
            }
            // Disabled tokens leave the routes with the configuration.
            _ => {}
        }
    }

    /// Keeps hints in step with `TokenStateChanged` events from every replica and
    /// forgets them all when events may have been missed, until `shutdown` fires.
    pub fn spawn_follower(&self, mut shutdown: watch::Receiver<bool>) {
        let mut events = self.events.subscribe();
        let health = self.clone();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    event = events.recv() => event,
                    _ = shutdown.changed() => return,
                };
                match event {
                    Ok(event) => health.follow(&event),
                    Err(broadcast::error::RecvError::Lagged(_)) => health.hints().clear(),
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }

    fn follow(&self, event: &Event) {
        match &event.kind {
            // Own events were learnt when published (with the store's exact clock).
            EventKind::TokenStateChanged { .. } if event.replica_id == self.events.replica_id() => {
            }
            EventKind::TokenStateChanged {
                token_id,
                new,
                until_ms,
                ..
            } => self.learn(token_id, *new, *until_ms, system_now_ms()),
            EventKind::Resync { .. } => self.hints().clear(),
            EventKind::ConfigChanged { .. }
            | EventKind::QuotaChanged { .. }
            | EventKind::TenantMoved { .. }
            | EventKind::CountersRecovering { .. } => {}
        }
    }
}

impl Leaser {
    /// Releases a lease and feeds its outcome to the token's breaker and quarantine, in
    /// one call to the store.
    pub(super) async fn release_reporting(
        &self,
        key: &LeaseKey,
        outcome: ReleaseOutcome,
        blocked_until_ms: Option<i64>,
    ) -> Result<ReleaseResult, ServiceError> {
        let snapshot = self.config.current();
        let report =
            (self.health).outcome_report(&snapshot, key, outcome, blocked_until_ms, self.lease_ttl);
        let (result, recorded) = self.counters.release_reporting(&report).await?;
        if let Some(recorded) = recorded {
            self.health.recorded(key, &recorded);
        }
        Ok(result)
    }
}

/// Tells watchers an admin disabled or re-enabled a token; `shortfall` says what the
/// token's pool lacks now, if its guarantees no longer fit what is left.
pub fn publish_admin_toggle(
    events: &EventBus,
    token_id: &Id,
    disabled: bool,
    shortfall: Option<String>,
) {
    let (previous, new, what) = if disabled {
        (
            TokenState::Active,
            TokenState::Disabled,
            "disabled by an admin",
        )
    } else {
        (
            TokenState::Disabled,
            TokenState::Active,
            "enabled by an admin",
        )
    };
    let cause = match shortfall {
        Some(shortfall) => format!("{what}; {shortfall}"),
        None => what.to_owned(),
    };
    events.publish(EventKind::TokenStateChanged {
        token_id: token_id.to_string(),
        previous,
        new,
        until_ms: None,
        cause,
    });
}

/// The tenants that may lease `token_id` (its dedicated owner, or its pool's tenants):
/// the tenants a token's events are about, for watchers' scopes and tenant filters.
pub fn tenants_reaching(snapshot: &Snapshot, token_id: &str) -> Vec<Id> {
    let Some(token) = Id::parse("token_id", token_id)
        .ok()
        .and_then(|id| snapshot.tokens.get(&id))
    else {
        return vec![];
    };
    match &token.record.owner {
        TokenOwner::Dedicated(owner) => vec![owner.clone()],
        TokenOwner::Pool(pool) => snapshot
            .tenants
            .values()
            .filter(|t| t.pool_id.as_ref() == Some(pool))
            .map(|t| t.id.clone())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(value: &str) -> Id {
        Id::parse("test", value).unwrap()
    }

    fn route(dedicated: &[&str], pooled: &[&str]) -> Route {
        Route {
            upstream_id: id("up"),
            dedicated: dedicated.iter().map(|t| id(t)).collect(),
            pooled: pooled.iter().map(|t| id(t)).collect::<Vec<_>>().into(),
            pooled_digest: "test".into(),
        }
    }

    fn health() -> TokenHealth {
        TokenHealth::new(BreakerPolicy::default(), EventBus::new("me"))
    }

    fn remote(kind: EventKind) -> Event {
        Event {
            occurred_at_ms: system_now_ms(),
            replica_id: "other".into(),
            kind,
        }
    }

    fn changed(token: &str, new: TokenState, until_ms: Option<i64>) -> EventKind {
        EventKind::TokenStateChanged {
            token_id: token.into(),
            previous: TokenState::Active,
            new,
            until_ms,
            cause: String::new(),
        }
    }

    /// Property 7: hinted tokens are left out of the route until their instant; when
    /// all are out, NO_USABLE_TOKEN with the earliest instant and a reason per token.
    /// Hints live on tokio's clock, paused here: instants are exact.
    #[tokio::test(start_paused = true)]
    async fn routes_around_hinted_tokens_until_they_come_back() {
        let h = health();
        let r = route(&["d-1"], &["p-1", "p-2"]);
        h.remember(&id("p-1"), TokenState::Quarantined, 300);
        assert_eq!(
            h.route_around(&id("acme"), &r).ok().unwrap(),
            (vec![id("d-1")], 1)
        );
        h.remember(&id("d-1"), TokenState::BreakerOpen, 30_000);
        h.remember(&id("p-2"), TokenState::BreakerHalfOpen, 60_000);
        let Err(AcquireAnswer::Denied {
            reason,
            retry_after,
            message,
        }) = h.route_around(&id("acme"), &r)
        else {
            panic!("all tokens are hinted")
        };
        assert_eq!(reason, DenialReason::NoUsableToken);
        assert_eq!(
            retry_after,
            Some(Duration::from_millis(300)),
            "the earliest comes back first"
        );
        for part in [
            "tenant 'acme'",
            "on upstream 'up'",
            "'p-1' is quarantined",
            "'d-1' has its circuit breaker open",
            "'p-2' is half-open",
            "(may be usable in 1.0s)",
        ] {
            assert!(message.contains(part), "{part}: {message}");
        }
        tokio::time::advance(Duration::from_millis(299)).await;
        assert!(
            h.route_around(&id("acme"), &r).is_err(),
            "1 ms before p-1 is back"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(h.route_around(&id("acme"), &r).ok().unwrap(), (vec![], 1));
    }

    /// Property 8: other replicas' TokenStateChanged events add and drop hints; a
    /// Resync forgets them all; this replica's own events are not learnt twice.
    #[tokio::test]
    async fn hints_follow_other_replicas_events() {
        let h = health();
        let r = route(&[], &["p-1", "p-2"]);
        let until = system_now_ms() + 60_000;
        h.follow(&remote(changed(
            "p-1",
            TokenState::Quarantined,
            Some(until),
        )));
        assert_eq!(h.route_around(&id("a"), &r).ok().unwrap().1, 1);
        h.follow(&remote(changed("p-1", TokenState::Active, None)));
        assert_eq!(h.route_around(&id("a"), &r).ok().unwrap().1, 2);
        h.follow(&remote(changed(
            "p-2",
            TokenState::BreakerOpen,
            Some(until),
        )));
        h.follow(&remote(EventKind::Resync { missed: 3 }));
        assert_eq!(h.route_around(&id("a"), &r).ok().unwrap().1, 2);
        let own = Event {
            replica_id: "me".into(),
            ..remote(changed("p-1", TokenState::BreakerOpen, Some(until)))
        };
        h.follow(&own);
        assert_eq!(h.route_around(&id("a"), &r).ok().unwrap().1, 2);
    }
}
