//! Runtime pieces shared by every checkplane service: configuration, telemetry, pools, health
//! probes, HTTP plumbing, migrations and the launcher behind each `main.rs`. No domain here:
//! leases, projections and the rest are `checkplane-core`.

pub mod clock;
pub mod config;
#[cfg(feature = "stores")]
pub mod db;
pub mod health;
pub mod healthcheck;
pub mod http;
pub mod launch;
pub mod listener;
pub mod settings;
#[cfg(feature = "stores")]
pub mod stores;
pub mod telemetry;
pub mod tls;
pub mod vars;

pub use config::{ConfigError, Env, Secret};
pub use launch::Service;
pub use settings::BaseSettings;
#[cfg(feature = "stores")]
pub use settings::StoreSettings;
#[cfg(feature = "stores")]
pub use stores::Stores;

/// Why a service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("serving HTTP")]
    Serve(#[source] std::io::Error),
    #[cfg(feature = "stores")]
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[cfg(feature = "stores")]
    #[error("Redis")]
    Redis(#[source] redis::RedisError),
    #[error("start-up: {0}")]
    Startup(String),
}

/// An error and its sources in one line, for logs.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
