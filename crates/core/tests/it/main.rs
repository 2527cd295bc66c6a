//! The domain's Redis scripts against a real Redis (and a 3-node cluster); the event
//! envelopes they build against `checkplane_wire::events::Event`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod envelopes;
mod leases;
mod presence_cluster;
mod ratelimit;
