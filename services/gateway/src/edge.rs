//! The edge's way to write a command's events: [`checkplane_core::outbox::Written`] (record
//! and apply each in the command's transaction with its outbox row; publish after the commit)
//! with the gateway's error and its task tracker. [`Written::publish`] sends them on the
//! gateway's tracker (the answer does not wait, and shutdown waits for it);
//! [`Written::publish_now`] awaits them where the answer should follow the stream.

use checkplane_core::outbox;
use checkplane_core::projection::ApplyError;
use checkplane_runtime::db::Sql;
use checkplane_runtime::http::ApiError;
use checkplane_wire::events::Event;

use crate::state::AppState;

/// A command's events, appended in its transaction and published after its commit.
#[derive(Debug, Default)]
#[must_use = "what is appended is published after the commit"]
pub struct Written(outbox::Written);

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
        self.0.append(tx, stream, event).await
    }

    /// After the commit: publish in the background, on the gateway's tracker.
    pub(crate) fn publish(self, app: &AppState) {
        self.0.publish(&app.stores, &app.tracker);
    }

    /// After the commit: publish, and return when done.
    pub(crate) async fn publish_now(self, app: &AppState) {
        self.0.publish_now(&app.stores).await;
    }
}
