//! The rebalancing calls of AdminService (PlanRebalance, ApplyRebalance,
//! ListTenantMoves), kept apart from the CRUD in `admin_api.rs`; the work is in
//! `lease::Rebalancer`.

use tonic::{Request, Response, Status};

use super::admin_api::{AdminApi, admin, page, parse_id};
use super::convert::{duration, timestamp};
use super::pb;
use crate::domain::{Id, MoveMode, TenantMove};
use crate::error::ServiceError;
use crate::lease::{MoveOutcome, PlanReport};
use crate::quota::rebalance::Move;

/// The most moves one ApplyRebalance may carry.
const MAX_MOVES: usize = 1000;

type Reply<T> = Result<Response<T>, Status>;

impl AdminApi {
    pub(super) async fn plan(
        &self,
        r: Request<pb::PlanRebalanceRequest>,
    ) -> Reply<pb::PlanRebalanceResponse> {
        admin(&r)?;
        let upstream = parse_id("upstream_id", &r.get_ref().upstream_id)?;
        let report = self.rebalancer.plan(&upstream).await?;
        Ok(Response::new(plan_to_proto(report)))
    }

    pub(super) async fn apply(
        &self,
        r: Request<pb::ApplyRebalanceRequest>,
    ) -> Reply<pb::ApplyRebalanceResponse> {
        let caller = admin(&r)?;
        let req = r.into_inner();
        let upstream = parse_id("upstream_id", &req.upstream_id)?;
        if req.moves.len() > MAX_MOVES {
            return Err(ServiceError::from(crate::domain::InvalidField::new(
                "moves",
                format!(
                    "holds {} moves; at most {MAX_MOVES} per call",
                    req.moves.len()
                ),
            ))
            .into());
        }
        let moves = (!req.moves.is_empty()).then(|| {
            req.moves
                .into_iter()
                .map(|m| Move {
                    tenant: m.tenant_id,
                    from: m.from_pool_id,
                    to: m.to_pool_id,
                    reason: m.reason,
                })
                .collect()
        });
        let actor = format!("admin key {}", caller.key_id);
        let outcomes = (self.rebalancer)
            .apply(&upstream, moves, MoveMode::Manual, &actor)
            .await?;
        let mut answer = pb::ApplyRebalanceResponse::default();
        for outcome in outcomes {
            match outcome {
                MoveOutcome::Applied(m) => answer.applied.push(move_to_proto(&m)),
                MoveOutcome::Skipped { planned, reason } => answer.skipped.push(pb::SkippedMove {
                    r#move: Some(planned_to_proto(planned)),
                    reason,
                }),
            }
        }
        Ok(Response::new(answer))
    }

    pub(super) async fn moves(
        &self,
        r: Request<pb::ListTenantMovesRequest>,
    ) -> Reply<pb::ListTenantMovesResponse> {
        admin(&r)?;
        let req = r.into_inner();
        let upstream =
            Id::parse_optional("upstream_id", &req.upstream_id).map_err(ServiceError::from)?;
        let tenant = Id::parse_optional("tenant_id", &req.tenant_id).map_err(ServiceError::from)?;
        let (after, limit) = page(req.page_size, &req.page_token)?;
        let before = match after {
            None => None,
            Some(token) => Some(token.parse::<i64>().map_err(|_| {
                ServiceError::from(crate::domain::InvalidField::new(
                    "page_token",
                    "is not a token from a previous page",
                ))
            })?),
        };
        let store = self.leaser.config.store();
        let list = store.list_tenant_moves(upstream.as_ref(), tenant.as_ref(), before, limit + 1);
        let mut moves = self.write(list).await?;
        let next_page_token = if moves.len() > limit as usize {
            moves.truncate(limit as usize);
            moves
                .last()
                .map(|m| m.version.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListTenantMovesResponse {
            moves: moves.iter().map(move_to_proto).collect(),
            next_page_token,
        }))
    }
}

fn plan_to_proto(report: PlanReport) -> pb::PlanRebalanceResponse {
    let share = |used: f64, capacity: u32| {
        if capacity == 0 {
            0.0
        } else {
            used / f64::from(capacity)
        }
    };
    pb::PlanRebalanceResponse {
        pools: report
            .pools
            .iter()
            .map(|p| pb::PoolLoad {
                pool_id: p.pool_id.as_str().to_owned(),
                capacity_per_window: p.capacity,
                used_per_window: p.used,
                utilization: share(p.used, p.capacity),
                utilization_after: share(p.used_after, p.capacity),
                guaranteed_per_window: p.guaranteed.min(u64::from(u32::MAX)) as u32,
                guaranteed_after: p.guaranteed_after.min(u64::from(u32::MAX)) as u32,
            })
            .collect(),
        moves: report.moves.into_iter().map(planned_to_proto).collect(),
        history: Some(duration(report.history)),
        high: report.band.high,
        low: report.band.low,
        note: report.note,
    }
}

fn planned_to_proto(m: Move) -> pb::RebalanceMove {
    pb::RebalanceMove {
        tenant_id: m.tenant,
        from_pool_id: m.from,
        to_pool_id: m.to,
        reason: m.reason,
    }
}

fn move_to_proto(m: &TenantMove) -> pb::TenantMove {
    pb::TenantMove {
        version: m.version,
        upstream_id: m.upstream_id.as_str().to_owned(),
        tenant_id: m.tenant_id.as_str().to_owned(),
        from_pool_id: m.from_pool_id.as_str().to_owned(),
        to_pool_id: m.to_pool_id.as_str().to_owned(),
        reason: m.reason.clone(),
        mode: match m.mode {
            MoveMode::Manual => pb::MoveMode::Manual,
            MoveMode::Automatic => pb::MoveMode::Automatic,
        } as i32,
        actor: m.actor.clone(),
        move_time: Some(timestamp(m.move_time_ms)),
    }
}
