//! Black-box tests of the gateway against real PostgreSQL and Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agents;
mod edge;
mod health;
mod lease_api;
mod limits;
mod operators;
mod process;
mod revocations;
mod tls;
