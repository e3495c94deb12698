//! A tenant moved from one pool to another by rebalancing: the audit row.

use super::Id;

/// Who decided a move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MoveMode {
    /// An admin's `ApplyRebalance`.
    Manual,
    /// The automatic mode (`rebalance.automatic`).
    Automatic,
}

impl MoveMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Manual => "manual",
            Self::Automatic => "automatic",
        }
    }

    /// The mode a stored name stands for; `None` for a name this version does not know.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "manual" => Some(Self::Manual),
            "automatic" => Some(Self::Automatic),
            _ => None,
        }
    }
}

/// One move, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantMove {
    /// The configuration version of the write that moved the tenant.
    pub version: i64,
    pub upstream_id: Id,
    pub tenant_id: Id,
    pub from_pool_id: Id,
    pub to_pool_id: Id,
    /// Why, for people.
    pub reason: String,
    pub mode: MoveMode,
    /// The admin API key's id, or `replica <id>` for the automatic mode.
    pub actor: String,
    pub move_time_ms: i64,
}
