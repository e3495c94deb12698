//! The configuration model: upstream profiles, tokens, pools, tiers, tenants, API keys.
//!
//! Pure types with `parse`-style constructors. Nothing here knows about gRPC, SQL or
//! Redis; `grpc/convert.rs` turns proto messages into these and back.

mod id;
mod model;
mod priority;
mod tenant_move;
mod token_health;
mod validate;

pub use id::Id;
pub use model::{
    ApiKeyRecord, ApiKeyRole, Pool, SharedAccess, Tenant, Tier, TokenOwner, TokenRecord, Upstream,
};
pub use model::{check_display_name, check_monthly_cost};
pub use priority::{Priority, PriorityMap, RequestKind};
pub use tenant_move::{MoveMode, TenantMove, TokenMove};
pub use token_health::{
    BreakerPolicy, MAX_BLOCK_FACTOR, QUARANTINE_MAX, QUARANTINE_MIN, TokenState, quarantine_max,
};
pub use validate::{
    CapacityReport, ConfigView, MAX_GUARANTEED_SHARE, check_guarantees, check_pool_report,
    drawn_guarantee, token_of_another_upstream,
};

/// A value that breaks a rule of the model, naming the field so a person can fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidField {
    /// The field path, e.g. `tenant.tier_id`.
    pub field: String,
    /// What is wrong and what would be accepted.
    pub reason: String,
}

impl InvalidField {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
