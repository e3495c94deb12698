//! A tenant moved from one pool to another by rebalancing (the audit row), and a token
//! whose counters change space.

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

/// A token whose lease counters change space (`counters::Space`): it joined another
/// pool, or it is dedicated to a tenant that did. The store names these in the write
/// that moves them, before it commits (`ConfigStore::set_token_mover`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenMove {
    pub token_id: Id,
    pub upstream_id: Id,
    /// The pool whose space held its counters (`None`: the upstream's own).
    pub from_pool: Option<Id>,
    /// The pool whose space holds them from now on.
    pub to_pool: Option<Id>,
}
