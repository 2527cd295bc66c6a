//! checkplane's domain on Redis and PostgreSQL, shared by the services that keep state: the
//! Redis keys, the fenced lease protocol (its Lua scripts), agent presence, the doorbell that
//! wakes waiting claims, fan-out and location selection, the outbox, the projections of events
//! into PostgreSQL with the projector that applies them, retention, rate limits, dead letters
//! and parked events. The plumbing under it (configuration, pools, health, HTTP, the launcher) is
//! `checkplane-runtime`.

pub mod dead_letters;
pub mod doorbell;
pub mod failures;
pub mod fanout;
pub mod keys;
pub mod leases;
pub mod outbox;
pub mod presence;
pub mod projection;
pub mod projector;
pub mod ratelimit;
pub mod retention;
pub mod selection;
pub mod subscription;
