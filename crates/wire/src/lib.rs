//! Wire types shared by every checkplane service and client: request and response bodies,
//! the error envelope, events. Plain data: nothing here performs I/O.

pub mod agents;
pub mod checks;
pub mod error;
pub mod events;
pub mod haproxy;
pub mod health;
pub mod kinds;
pub mod leases;
pub mod operators;
pub mod results;
pub mod targets;

pub use error::{ErrorBody, ErrorCode, ErrorDetail};
