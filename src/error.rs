//! The service's error vocabulary: one variant per gRPC status the product uses, and
//! the one mapping from store and counter errors into it. `grpc/status.rs` turns these
//! into `tonic::Status`.

use std::time::Duration;

use crate::domain::InvalidField;
use crate::store::StoreError;
use crate::store::counters::CounterError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    InvalidArgument(InvalidField),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{message}")]
    ResourceExhausted {
        message: String,
        retry_after: Duration,
    },
    #[error("{message}")]
    Unavailable {
        message: String,
        retry_after: Duration,
    },
    /// Logged with its cause; callers see an opaque message.
    #[error("internal error: {0:#}")]
    Internal(anyhow::Error),
}

/// Suggested wait after a backend failure.
pub const BACKEND_RETRY_AFTER: Duration = Duration::from_secs(1);

impl From<InvalidField> for ServiceError {
    fn from(value: InvalidField) -> Self {
        Self::InvalidArgument(value)
    }
}

impl From<StoreError> for ServiceError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound { .. } => Self::NotFound(err.to_string()),
            StoreError::AlreadyExists { .. } => Self::AlreadyExists(err.to_string()),
            StoreError::FailedPrecondition(field) => Self::FailedPrecondition(field.to_string()),
            StoreError::Unavailable(_) => Self::Unavailable {
                message: format!(
                    "{err}; the change was not confirmed. Leasing goes on with the configuration \
                     loaded last, and admin reads are answered from it; retry the write once \
                     the database is back"
                ),
                retry_after: BACKEND_RETRY_AFTER,
            },
            StoreError::Handover(_) => Self::Unavailable {
                message: format!("{err}; nothing was changed, retry once Redis answers"),
                retry_after: BACKEND_RETRY_AFTER,
            },
            StoreError::Internal(e) => Self::Internal(e),
        }
    }
}

impl From<CounterError> for ServiceError {
    fn from(err: CounterError) -> Self {
        match err {
            CounterError::Unavailable(reason) => Self::Unavailable {
                message: format!("lease counters are unavailable ({reason}); no lease was granted"),
                retry_after: BACKEND_RETRY_AFTER,
            },
            CounterError::Internal(reason) => Self::Internal(anyhow::anyhow!(reason)),
        }
    }
}
