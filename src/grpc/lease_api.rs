//! LeaseService: AcquireLease, ReleaseLease and the WatchEvents stream.

use std::pin::Pin;

use secrecy::ExposeSecret;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::auth::caller;
use super::convert::{duration, parse_optional_duration, timestamp, token_state_to_proto};
use super::pb::{self, lease_service_server::LeaseService};
use super::watch::{Streams, Watcher, parse_filter_ids};
use crate::domain::{Id, InvalidField, Priority, PriorityMap, RequestKind};
use crate::error::ServiceError;
use crate::events::{Change, Event, EventBus, EventKind, Filter, Resource};
use crate::lease::{AcquireAnswer, AcquireInput, DenialReason, Leaser, MAX_COST, Usage};
use crate::store::counters::ReleaseOutcome;

/// The LeaseService implementation.
#[derive(Clone)]
pub struct LeaseApi {
    pub leaser: Leaser,
    pub events: EventBus,
    /// Priority by request kind for calls that name none.
    pub priorities: PriorityMap,
    /// Open WatchEvents streams per API key (`watch.rs`).
    pub streams: Streams,
}

fn invalid(field: &str, reason: &str) -> Status {
    ServiceError::from(InvalidField::new(field, reason)).into()
}

fn parse_priority(value: i32) -> Result<Option<Priority>, Status> {
    match pb::Priority::try_from(value) {
        Ok(pb::Priority::Unspecified) => Ok(None),
        Ok(pb::Priority::Critical) => Ok(Some(Priority::Critical)),
        Ok(pb::Priority::High) => Ok(Some(Priority::High)),
        Ok(pb::Priority::Normal) => Ok(Some(Priority::Normal)),
        Ok(pb::Priority::Low) => Ok(Some(Priority::Low)),
        Err(_) => Err(invalid("priority", "is not a known priority")),
    }
}

fn parse_request_kind(value: i32) -> Result<RequestKind, Status> {
    use pb::RequestKind as K;
    Ok(
        match K::try_from(value)
            .map_err(|_| invalid("request_kind", "is not a known request kind"))?
        {
            K::Unspecified => RequestKind::Unspecified,
            K::OrderStatus => RequestKind::OrderStatus,
            K::Payment => RequestKind::Payment,
            K::Shipment => RequestKind::Shipment,
            K::CustomerFacing => RequestKind::CustomerFacing,
            K::OrderSync => RequestKind::OrderSync,
            K::Inventory => RequestKind::Inventory,
            K::Analytics => RequestKind::Analytics,
            K::Background => RequestKind::Background,
        },
    )
}

fn parse_acquire(
    req: pb::AcquireLeaseRequest,
    priorities: &PriorityMap,
) -> Result<AcquireInput, Status> {
    let cost = match req.cost {
        0 => 1,
        c if c > MAX_COST => {
            return Err(invalid(
                "cost",
                &format!("is {c}; at most {MAX_COST} requests per lease"),
            ));
        }
        c => c,
    };
    let explicit = parse_priority(req.priority)?;
    let kind = parse_request_kind(req.request_kind)?;
    Ok(AcquireInput {
        tenant_id: Id::parse("tenant_id", &req.tenant_id).map_err(ServiceError::from)?,
        upstream_id: Id::parse_optional("upstream_id", &req.upstream_id)
            .map_err(ServiceError::from)?,
        priority: priorities.resolve(explicit, kind),
        cost,
        max_wait: parse_optional_duration("max_wait", req.max_wait).map_err(ServiceError::from)?,
    })
}

fn parse_outcome(value: i32) -> Result<ReleaseOutcome, Status> {
    match pb::ReleaseOutcome::try_from(value) {
        Ok(pb::ReleaseOutcome::Success) => Ok(ReleaseOutcome::Success),
        Ok(pb::ReleaseOutcome::UpstreamError) => Ok(ReleaseOutcome::UpstreamError),
        Ok(pb::ReleaseOutcome::UpstreamRateLimited) => Ok(ReleaseOutcome::UpstreamRateLimited),
        Ok(pb::ReleaseOutcome::NotUsed) => Ok(ReleaseOutcome::NotUsed),
        _ => Err(invalid(
            "outcome",
            "is required: SUCCESS, UPSTREAM_ERROR, UPSTREAM_RATE_LIMITED or NOT_USED",
        )),
    }
}

/// `blocked_until` as Unix milliseconds. Far-off or past values are accepted here and
/// clamped by the breaker (see `domain::QUARANTINE_MIN`/`MAX`).
fn parse_blocked_until(value: Option<prost_types::Timestamp>) -> Result<Option<i64>, Status> {
    let Some(t) = value else {
        return Ok(None);
    };
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(invalid(
            "blocked_until",
            "is not a valid timestamp (nanos must be 0 to 999,999,999)",
        ));
    }
    Ok(Some(
        t.seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(t.nanos) / 1_000_000),
    ))
}

fn answer_to_proto(answer: AcquireAnswer) -> pb::AcquireLeaseResponse {
    use pb::acquire_lease_response::Result as R;
    let result = match answer {
        AcquireAnswer::Granted(g) => R::Lease(pb::Lease {
            lease_id: g.lease_id,
            token_id: g.token_id.to_string(),
            token: g.secret.expose_secret().to_owned(),
            expires_at: Some(timestamp(g.expires_at_ms)),
            valid_for: Some(duration(g.valid_for)),
            quota: Some(pb::QuotaRemaining {
                tenant_remaining: g.tenant_remaining,
                tenant_limit: g.tenant_limit,
                tenant_ceiling: g.tenant_ceiling,
                token_remaining: g.token_remaining,
                window: Some(duration(g.window)),
            }),
        }),
        AcquireAnswer::Denied {
            reason,
            retry_after,
            message,
        } => R::Denial(pb::Denial {
            reason: match reason {
                DenialReason::TenantQuota => pb::DenialReason::TenantQuota,
                DenialReason::NoTokenCapacity => pb::DenialReason::NoTokenCapacity,
                DenialReason::NoUsableToken => pb::DenialReason::NoUsableToken,
                DenialReason::WaitTimeout => pb::DenialReason::WaitTimeout,
                DenialReason::CountersRecovering => pb::DenialReason::CountersRecovering,
            } as i32,
            retry_after: retry_after.map(duration),
            message,
        }),
    };
    pb::AcquireLeaseResponse {
        result: Some(result),
    }
}

/// The usage read-out as its proto.
pub fn usage_to_proto(usage: Usage) -> pb::GetUsageResponse {
    pb::GetUsageResponse {
        tenants: usage
            .tenants
            .into_iter()
            .map(|t| pb::TenantUsage {
                requests_per_minute: t.requests_per_minute(),
                utilization: t.utilization(),
                borrowed_share: t.borrowed_share(),
                tenant_id: t.tenant_id.to_string(),
                upstream_id: t.upstream_id.to_string(),
                used_in_window: t.used,
                limit_per_window: t.limit,
                window: Some(duration(t.window)),
                guaranteed_per_window: t.guaranteed,
                asked_in_window: t.demand.asked,
                denied_in_window: t.demand.unmet,
                waiting_callers: t.waiting,
            })
            .collect(),
        tokens: usage
            .tokens
            .into_iter()
            .map(|t| pb::TokenUsage {
                token_id: t.token_id.to_string(),
                used_in_window: t.used,
                usable_per_window: t.usable,
                utilization: if t.usable == 0 {
                    0.0
                } else {
                    t.used as f64 / t.usable as f64
                },
                disabled: t.disabled,
                upstream_id: t.upstream_id.to_string(),
                window: Some(duration(t.window)),
                state: token_state_to_proto(t.state) as i32,
                state_until: t.state_until_ms.map(timestamp),
            })
            .collect(),
    }
}

fn event_to_proto(event: &Event) -> pb::Event {
    let kind = match &event.kind {
        EventKind::ConfigChanged {
            resource,
            id,
            change,
            version,
        } => pb::event::Kind::ConfigChanged(pb::ConfigChanged {
            resource_kind: match resource {
                Resource::Upstream => pb::ResourceKind::Upstream,
                Resource::Token => pb::ResourceKind::Token,
                Resource::Pool => pb::ResourceKind::Pool,
                Resource::Tier => pb::ResourceKind::Tier,
                Resource::Tenant => pb::ResourceKind::Tenant,
                Resource::ApiKey => pb::ResourceKind::ApiKey,
            } as i32,
            resource_id: id.clone(),
            change: match change {
                Change::Created => pb::ChangeKind::Created,
                Change::Updated => pb::ChangeKind::Updated,
                Change::Deleted => pb::ChangeKind::Deleted,
            } as i32,
            config_version: *version,
        }),
        EventKind::QuotaChanged {
            tenant_id,
            upstream_id,
            previous,
            new,
            cause,
        } => pb::event::Kind::QuotaChanged(pb::QuotaChanged {
            tenant_id: tenant_id.clone(),
            upstream_id: upstream_id.clone(),
            previous_limit: *previous,
            new_limit: *new,
            cause: cause.clone(),
        }),
        EventKind::TokenStateChanged {
            token_id,
            previous,
            new,
            until_ms,
            cause,
        } => pb::event::Kind::TokenStateChanged(pb::TokenStateChanged {
            token_id: token_id.clone(),
            previous_state: token_state_to_proto(*previous) as i32,
            new_state: token_state_to_proto(*new) as i32,
            until: until_ms.map(timestamp),
            cause: cause.clone(),
        }),
        EventKind::CountersRecovering {
            upstream_id,
            until_ms,
            cause,
        } => pb::event::Kind::CountersRecovering(pb::CountersRecovering {
            upstream_id: upstream_id.clone(),
            until: Some(timestamp(*until_ms)),
            cause: cause.clone(),
        }),
        EventKind::TenantMoved {
            tenant_id,
            from_pool_id,
            to_pool_id,
            cause,
        } => pb::event::Kind::TenantMoved(pb::TenantMoved {
            tenant_id: tenant_id.clone(),
            from_id: from_pool_id.clone(),
            to_id: to_pool_id.clone(),
            cause: cause.clone(),
        }),
        EventKind::Resync { missed } => pb::event::Kind::Resync(pb::Resync { missed: *missed }),
    };
    pb::Event {
        occurred_at: Some(timestamp(event.occurred_at_ms)),
        replica_id: event.replica_id.clone(),
        kind: Some(kind),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl LeaseService for LeaseApi {
    #[tracing::instrument(name = "acquire_lease", skip_all, fields(tenant_id = %request.get_ref().tenant_id))]
    async fn acquire_lease(
        &self,
        request: Request<pb::AcquireLeaseRequest>,
    ) -> Result<Response<pb::AcquireLeaseResponse>, Status> {
        let started = std::time::Instant::now();
        let caller = caller(&request)?;
        let input = parse_acquire(request.into_inner(), &self.priorities)?;
        let answer = self.leaser.acquire(&caller, input).await;
        let result = match &answer {
            Ok(AcquireAnswer::Granted(_)) => "granted",
            Ok(AcquireAnswer::Denied { .. }) => "denied",
            Err(_) => "error",
        };
        crate::metrics::acquire_finished(result, started.elapsed());
        Ok(Response::new(answer_to_proto(answer?)))
    }

    #[tracing::instrument(name = "release_lease", skip_all)]
    async fn release_lease(
        &self,
        request: Request<pb::ReleaseLeaseRequest>,
    ) -> Result<Response<pb::ReleaseLeaseResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let outcome = parse_outcome(req.outcome)?;
        if req.blocked_until.is_some() && outcome != ReleaseOutcome::UpstreamRateLimited {
            return Err(invalid(
                "blocked_until",
                "is only meaningful with outcome UPSTREAM_RATE_LIMITED",
            ));
        }
        let blocked_until_ms = parse_blocked_until(req.blocked_until)?;
        let latency = parse_optional_duration("upstream_latency", req.upstream_latency)
            .map_err(ServiceError::from)?;
        let already_released = self
            .leaser
            .release(&caller, &req.lease_id, outcome, blocked_until_ms)
            .await?;
        if !already_released {
            let reported = req.upstream_latency.is_some().then_some(latency);
            crate::metrics::lease_released(&req.lease_id, outcome, reported);
        }
        Ok(Response::new(pb::ReleaseLeaseResponse { already_released }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let filter = Filter {
            tenant_ids: parse_filter_ids("tenant_ids", &req.tenant_ids)?,
            token_ids: parse_filter_ids("token_ids", &req.token_ids)?,
        };
        for tenant in &filter.tenant_ids {
            caller.require_tenant(tenant)?;
        }
        let slot = self.streams.open(&caller.key_id)?;
        let (out, rx) = mpsc::channel(64);
        let watcher = Watcher {
            events: self.events.subscribe(),
            out,
            caller,
            filter,
            config: self.leaser.config.clone(),
            slot,
        };
        tokio::spawn(watcher.pump(event_to_proto));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
