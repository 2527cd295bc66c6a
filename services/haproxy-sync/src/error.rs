//! Why a round of polling or an action failed.

use crate::runtime_api::ApiError;

/// Why a round failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("PostgreSQL")]
    Pg(#[from] tokio_postgres::Error),
    #[error("PostgreSQL pool")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("Redis")]
    Redis(#[from] redis::RedisError),
    #[error("applying events")]
    Apply(#[from] checkplane_core::projection::ApplyError),
    #[error("HAProxy")]
    Api(#[from] ApiError),
    /// The service is shutting down: the action stays open for the next owner or round.
    #[error("shutting down")]
    Stopped,
    /// Another replica took the instance (a newer fencing token): this one stops.
    #[error("fenced: instance {0} has a newer owner")]
    Fenced(String),
}
