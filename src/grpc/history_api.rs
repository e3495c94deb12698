//! AdminService.GetUsageHistory: request checks (range, bucket, filters, the caller's
//! tenant scope) and the rows as proto; the read is `crate::history::read`.

use tonic::{Request, Response, Status};

use super::admin_api::AdminApi;
use super::auth::caller;
use super::convert::{duration, timestamp};
use super::pb;
use crate::auth::Caller;
use crate::domain::{Id, InvalidField};
use crate::error::ServiceError;
use crate::history::{
    DEFAULT_PAGE_SIZE, HistoryPage, HistoryQuery, HistoryRow, MAX_PAGE_SIZE, PageCursor, Selection,
    SubjectKind, check_range,
};

/// The most ids one filter may list.
const MAX_FILTER_IDS: usize = 1000;
/// Timestamps from year 0001 to 9999, as `google.protobuf.Timestamp` allows.
const TIMESTAMP_SECONDS: std::ops::RangeInclusive<i64> = -62_135_596_800..=253_402_300_799;

impl AdminApi {
    pub(super) async fn usage_history(
        &self,
        r: Request<pb::GetUsageHistoryRequest>,
    ) -> Result<Response<pb::GetUsageHistoryResponse>, Status> {
        let caller = caller(&r)?;
        let query = parse_query(&caller, r.into_inner(), self.leaser.history.bucket_ms())?;
        let page = crate::history::read(self.leaser.config.store(), &query).await?;
        Ok(Response::new(page_to_proto(page)))
    }
}

/// A required timestamp, in ms since the epoch.
pub(super) fn parse_timestamp(
    field: &str,
    value: Option<prost_types::Timestamp>,
) -> Result<i64, InvalidField> {
    let t = value.ok_or_else(|| InvalidField::new(field, "is required"))?;
    if !(0..1_000_000_000).contains(&t.nanos) || !TIMESTAMP_SECONDS.contains(&t.seconds) {
        return Err(InvalidField::new(
            field,
            "is not a valid timestamp (years 0001 to 9999, nanos 0 to 999,999,999)",
        ));
    }
    Ok(t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

fn parse_ids(field: &str, values: &[String]) -> Result<Vec<Id>, InvalidField> {
    if values.len() > MAX_FILTER_IDS {
        return Err(InvalidField::new(
            field,
            format!(
                "lists {} ids; at most {MAX_FILTER_IDS} are allowed",
                values.len()
            ),
        ));
    }
    values.iter().map(|v| Id::parse(field, v)).collect()
}

fn strings(ids: Vec<Id>) -> Vec<String> {
    ids.into_iter().map(|id| id.to_string()).collect()
}

/// The subjects the caller asked for and may see: an admin any; a worker key only its
/// tenants (a tenant outside its scope or any token is PERMISSION_DENIED).
fn selection(caller: &Caller, req: &pb::GetUsageHistoryRequest) -> Result<Selection, ServiceError> {
    let tenants = parse_ids("tenant_ids", &req.tenant_ids)?;
    let tokens = parse_ids("token_ids", &req.token_ids)?;
    let upstream_id = Id::parse_optional("upstream_id", &req.upstream_id)?.map(|u| u.to_string());
    for tenant in &tenants {
        caller.require_tenant(tenant)?;
    }
    let scope = caller.tenant_scope();
    if scope.is_some() && !tokens.is_empty() {
        return Err(ServiceError::PermissionDenied(format!(
            "token_ids: API key '{}' is a worker key; token history needs an admin key",
            caller.key_id
        )));
    }
    Ok(match (tenants.is_empty(), tokens.is_empty(), scope) {
        (true, true, Some(scope)) => Selection {
            tenants: Some(strings(scope)),
            tokens: Some(Vec::new()),
            upstream_id,
        },
        (true, true, None) => Selection {
            tenants: None,
            tokens: None,
            upstream_id,
        },
        _ => Selection {
            tenants: Some(strings(tenants)),
            tokens: Some(strings(tokens)),
            upstream_id,
        },
    })
}

fn parse_query(
    caller: &Caller,
    req: pb::GetUsageHistoryRequest,
    stored_bucket_ms: i64,
) -> Result<HistoryQuery, ServiceError> {
    let selection = selection(caller, &req)?;
    let start = parse_timestamp("start_time", req.start_time)?;
    let end = parse_timestamp("end_time", req.end_time)?;
    let bucket_ms = match req.bucket {
        None => stored_bucket_ms,
        Some(bucket) => {
            let bucket = super::convert::parse_duration("bucket", Some(bucket))?;
            i64::try_from(bucket.as_millis()).unwrap_or(i64::MAX)
        }
    };
    let (start_ms, end_ms) = check_range(start, end, bucket_ms, stored_bucket_ms)?;
    let page_size = match req.page_size as usize {
        0 => DEFAULT_PAGE_SIZE,
        size => size.min(MAX_PAGE_SIZE),
    };
    let after = match req.page_token.as_str() {
        "" => None,
        token => Some(PageCursor::parse(token)?),
    };
    Ok(HistoryQuery {
        start_ms,
        end_ms,
        bucket_ms,
        selection,
        page_size,
        after,
    })
}

fn millis(ms: u64) -> prost_types::Duration {
    duration(std::time::Duration::from_millis(ms))
}

fn row_to_proto(row: HistoryRow) -> pb::UsageHistoryRow {
    let t = &row.tally;
    let kind = match row.subject.kind {
        SubjectKind::Tenant => pb::UsageSubjectKind::Tenant,
        SubjectKind::Token => pb::UsageSubjectKind::Token,
    };
    pb::UsageHistoryRow {
        bucket_start: Some(timestamp(row.bucket_start_ms)),
        subject_kind: kind as i32,
        subject_id: row.subject.id.clone(),
        upstream_id: row.subject.upstream_id.clone(),
        asked: t.asked,
        granted: t.granted,
        denied: t.denied_total(),
        denied_tenant_quota: t.denied[0],
        denied_no_token_capacity: t.denied[1],
        denied_no_usable_token: t.denied[2],
        denied_wait_timeout: t.denied[3],
        denied_counters_recovering: t.denied[4],
        failed: t.failed,
        wait_p50: t.waits.percentile(50).map(millis),
        wait_p99: t.waits.percentile(99).map(millis),
        released_success: t.succeeded,
        upstream_errors: t.upstream_errors,
        rate_limited: t.rate_limited,
        not_used: t.not_used,
        borrowed: t.borrowed,
        borrowed_share: t.borrowed_share(),
    }
}

fn page_to_proto(page: HistoryPage) -> pb::GetUsageHistoryResponse {
    pb::GetUsageHistoryResponse {
        rows: page.rows.into_iter().map(row_to_proto).collect(),
        next_page_token: page.next_page_token,
    }
}
