//! The edge's one way to write a command's events. [`Written::append`] records and applies
//! each in the command's transaction, with its outbox row; once the transaction committed,
//! [`Written::publish`] sends them to their streams on the gateway's task tracker (the answer
//! does not wait, and shutdown waits for it), or [`Written::publish_now`] awaits them where
//! the answer should follow the stream. Whatever publishing misses (a Redis outage, a crash
//! right after the commit), the outbox sweep publishes: an event is never lost with the process.

use checkplane_core::outbox::{self, PUBLISH_TIMEOUT};
use checkplane_core::projection::ApplyError;
use checkplane_runtime::db::Sql;
use checkplane_runtime::http::ApiError;
use checkplane_runtime::Stores;
use checkplane_wire::events::Event;

use crate::state::AppState;

/// A command's events, appended in its transaction and published after its commit.
#[derive(Debug, Default)]
#[must_use = "what is appended is published after the commit"]
pub struct Written {
    /// `(stream, event)`, in the order appended.
    events: Vec<(String, Event)>,
}

impl Written {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Record and apply `event` in `tx`, with its outbox row for `stream`.
    pub(crate) async fn append(
        &mut self,
        tx: &impl Sql,
        stream: &str,
        event: &Event,
    ) -> Result<(), ApiError> {
        self.record(tx, stream, event)
            .await
            .map_err(|e| ApiError::internal(&e))
    }

    /// [`Written::append`] for code outside a request (the `keys` command shares it): the
    /// projection's own error.
    pub(crate) async fn record(
        &mut self,
        tx: &impl Sql,
        stream: &str,
        event: &Event,
    ) -> Result<(), ApplyError> {
        outbox::append(tx, event, stream).await?;
        self.events.push((stream.to_owned(), event.clone()));
        Ok(())
    }

    /// After the commit: publish in the background, on the gateway's tracker.
    pub(crate) fn publish(self, app: &AppState) {
        if self.events.is_empty() {
            return;
        }
        let stores = app.stores.clone();
        app.tracker.spawn(async move { self.send(&stores).await });
    }

    /// After the commit: publish, and return when done (each stream's publication bounded by
    /// `PUBLISH_TIMEOUT`).
    pub(crate) async fn publish_now(self, app: &AppState) {
        self.send(&app.stores).await;
    }

    /// Each run of events of one stream in one call, in the order appended.
    async fn send(self, stores: &Stores) {
        let (pg, redis) = (&stores.pg, &stores.redis);
        let mut run: Vec<Event> = Vec::new();
        let mut stream = String::new();
        for (to, event) in self.events {
            if to != stream && !run.is_empty() {
                outbox::publish_all(pg, redis, &stream, &run, PUBLISH_TIMEOUT).await;
                run.clear();
            }
            stream = to;
            run.push(event);
        }
        outbox::publish_all(pg, redis, &stream, &run, PUBLISH_TIMEOUT).await;
    }
}
