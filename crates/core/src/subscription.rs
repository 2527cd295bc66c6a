//! A Redis pub/sub subscription kept alive: subscribed again with a backoff whenever it
//! fails or drops, until shutdown. Messages sent while it was down are lost, which is why the
//! follower hears when it (re)subscribed and when it lost the connection.

use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// What a follower hears.
#[derive(Debug)]
pub enum Heard {
    /// Subscribed (again): whatever was published meanwhile was missed.
    Subscribed,
    /// A message on a channel, or on a channel of a pattern.
    Message { from_pattern: bool, payload: String },
    /// The subscription dropped; it is being made again.
    Lost,
}

/// Subscribe to `channels` and `patterns` and pass what is heard to `on` until `shutdown`;
/// `what` names the subscription in the log.
pub async fn follow(
    client: redis::Client,
    channels: &[String],
    patterns: &[String],
    what: &str,
    shutdown: CancellationToken,
    mut on: impl FnMut(Heard),
) {
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let attempt = async {
            let mut pubsub = client.get_async_pubsub().await?;
            if !channels.is_empty() {
                pubsub.subscribe(channels).await?;
            }
            if !patterns.is_empty() {
                pubsub.psubscribe(patterns).await?;
            }
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            _ = shutdown.cancelled() => return,
            attempt = attempt => attempt,
        };
        match pubsub {
            Ok(pubsub) => {
                backoff = Duration::from_millis(100);
                on(Heard::Subscribed);
                let mut messages = pubsub.into_on_message();
                loop {
                    let message = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        message = messages.next() => message,
                    };
                    let Some(message) = message else { break };
                    if let Ok(payload) = message.get_payload::<String>() {
                        on(Heard::Message {
                            from_pattern: message.from_pattern(),
                            payload,
                        });
                    }
                }
                tracing::warn!(subscription = what, "subscription lost; reconnecting");
                on(Heard::Lost);
            }
            Err(error) => {
                tracing::warn!(%error, subscription = what, retry_in = ?backoff, "subscription failed");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
