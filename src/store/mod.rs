//! Storage, with different jobs:
//!
//! - **Configuration** (`sql.rs`): upstream profiles, tokens, pools, tiers, tenants and
//!   API keys, in Postgres for replicas or in a SQLite file for the embedded mode. One
//!   implementation over sqlx's `Any` driver serves both (the SQL is portable and the
//!   migrations in `migrations/` run on both), and one behaviour suite tests both.
//! - **Lease counters** (`counters/`): the sliding windows and live leases, in Redis for
//!   replicas or in process memory for the embedded mode.
//! - **Event relay** (`event_relay.rs`): events between replicas over Redis pub/sub.

pub mod counters;
pub mod event_relay;
mod sql;
#[cfg(test)]
mod sql_tests;

pub use sql::{
    Backend, Changes, ConfigDelta, ConfigStore, GrantTotal, MoveHistory, MoveOrder, StoredConfig,
    TokenMover,
};

use crate::domain::InvalidField;

/// What kind of object a store error is about, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Upstream,
    Token,
    Pool,
    Tier,
    Tenant,
    ApiKey,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Upstream => "upstream",
            Self::Token => "token",
            Self::Pool => "pool",
            Self::Tier => "tier",
            Self::Tenant => "tenant",
            Self::ApiKey => "api key",
        }
    }

    /// How request fields name this kind (`api_key.id`, `tenant.id`).
    pub fn field_prefix(self) -> &'static str {
        match self {
            Self::ApiKey => "api_key",
            other => other.as_str(),
        }
    }
}

/// Why a configuration store call failed. Each variant maps to one gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist (NOT_FOUND). `field` is the request field that named it.
    #[error("{field}: {} '{id}' does not exist", kind.as_str())]
    NotFound {
        kind: Kind,
        id: String,
        field: String,
    },
    /// The id is taken (ALREADY_EXISTS).
    #[error("{} '{id}' already exists", kind.as_str())]
    AlreadyExists { kind: Kind, id: String },
    /// The write would break a rule that spans objects, or removes something in use
    /// (FAILED_PRECONDITION). The message names the field and what to do.
    #[error("{0}")]
    FailedPrecondition(InvalidField),
    /// The database could not be reached or timed out (UNAVAILABLE).
    #[error("the configuration database is unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The write moves tokens to another counters space, and their lease counters
    /// could not be handed over (Redis unavailable): nothing was written (UNAVAILABLE).
    #[error("the lease counters of the tokens this change moves could not be handed over: {0}")]
    Handover(String),
    /// Anything else (INTERNAL; logged, not shown to callers).
    #[error("configuration store error: {0}")]
    Internal(#[source] anyhow::Error),
}

impl StoreError {
    pub(crate) fn from_sqlx(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => Self::Unavailable(err),
            other => Self::Internal(other.into()),
        }
    }
}
