//! Tests of the test harness itself, and of the repository's deployment files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod ansible;
mod compose;
mod harness;
mod observability;
mod readme;
