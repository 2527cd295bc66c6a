//! Talking to the control plane: the authenticated call, its backoff, and the agent's
//! identity (given, restored from the state file, or registered, and registered again when
//! the token is refused).

use std::collections::BTreeMap;
use std::time::Duration;

use checkplane_wire::agents::{protocol, RegisterRequest, RegisterResponse};
use tokio_util::sync::CancellationToken;

use super::{Settings, Shared};
use crate::identity::{self, Identity, Source};

/// A call to the control plane that did not work.
#[derive(Debug, thiserror::Error)]
pub(super) enum CallError {
    #[error("unreachable: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("answered {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("no URL for {path}: {error}")]
    Url {
        path: String,
        error: url::ParseError,
    },
}

/// Why a registration did not give this agent an identity.
#[derive(Debug, thiserror::Error)]
pub(super) enum RegisterError {
    #[error(transparent)]
    Call(#[from] CallError),
    #[error("cannot keep the identity: {0}")]
    Keep(String),
}

pub(super) struct Control {
    pub(super) http: reqwest::Client,
    pub(super) base: reqwest::Url,
    /// Replaced when the agent registers again (its token was refused).
    pub(super) identity: std::sync::RwLock<Identity>,
}

impl Control {
    pub(super) async fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
        timeout: Duration,
    ) -> Result<T, CallError> {
        let url = self.base.join(path).map_err(|error| CallError::Url {
            path: path.to_owned(),
            error,
        })?;
        let (id, token) = {
            let identity = self.identity.read().unwrap_or_else(|p| p.into_inner());
            (identity.agent_id.clone(), identity.token.clone())
        };
        let response = self
            .http
            .post(url)
            .header("x-agent-id", id)
            .header("x-agent-token", token)
            .header(protocol::HEADER, protocol::CURRENT)
            .timeout(timeout)
            .json(body)
            .send()
            .await
            .inspect_err(|_| {
                metrics::counter!("checkplane_agent_control_plane_errors_total", "call" => path.to_owned())
                    .increment(1);
            })?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            metrics::counter!("checkplane_agent_control_plane_errors_total", "call" => path.to_owned())
                .increment(1);
            let body = response.text().await.unwrap_or_default();
            return Err(CallError::Refused {
                status,
                body: body.chars().take(300).collect(),
            });
        }
        Ok(response.json().await?)
    }
}

/// Exponential backoff with jitter: 500 ms doubling to 30 s, ±25 %.
pub(super) struct Backoff {
    next: Duration,
    /// A number in `0.0..1.0` for each wait's spread (random; a fixed one in tests).
    jitter: fn() -> f64,
}

/// The first wait, and the longest.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MOST: Duration = Duration::from_secs(30);

/// A random number in `0.0..1.0`.
fn random_unit() -> f64 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    f64::from(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])) / 4_294_967_296.0
}

impl Backoff {
    pub(super) fn new() -> Self {
        Self::with_jitter(random_unit)
    }

    fn with_jitter(jitter: fn() -> f64) -> Self {
        Self {
            next: BACKOFF_FIRST,
            jitter,
        }
    }

    pub(super) fn reset(&mut self) {
        self.next = BACKOFF_FIRST;
    }

    /// The next wait: the current step (doubling up to 30 s) spread by ±25 %.
    pub(super) fn next(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(BACKOFF_MOST);
        let spread = 0.75 + (self.jitter)().clamp(0.0, 1.0) * 0.5;
        base.mul_f64(spread)
    }
}

pub(super) async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Find or make the identity; retried with backoff until it works or `stop`.
pub(super) async fn identity(
    http: &reqwest::Client,
    settings: &Settings,
    stop: &CancellationToken,
) -> Option<Identity> {
    let (enrollment, state_file) = match &settings.source {
        Source::Given { agent_id, token } => {
            return Some(Identity {
                agent_id: agent_id.clone(),
                token: token.expose().to_owned(),
                heartbeat_interval_ms: 10_000,
                declared: None,
            })
        }
        Source::Enrolled {
            enrollment,
            state_file,
        } => (enrollment, state_file),
    };
    let mut backoff = Backoff::new();
    loop {
        match identity::load(state_file) {
            Ok(Some(identity))
                if enrollment.is_some() && identity.declared != Some(declared(settings)) =>
            {
                // Registered with other kinds or pool sizes (an upgrade, a changed
                // configuration): register again, so the control plane knows what it runs.
                tracing::info!(agent_id = %identity.agent_id, "declared kinds changed since registration; registering again");
            }
            Ok(Some(identity)) => {
                if identity
                    .declared
                    .as_ref()
                    .is_some_and(|d| *d != declared(settings))
                {
                    tracing::warn!(agent_id = %identity.agent_id, "declared kinds changed since registration, and there is no AGENT_ENROLLMENT_TOKEN to register again with");
                }
                tracing::info!(agent_id = %identity.agent_id, state_file = %state_file.display(), "restored control plane session");
                return Some(identity);
            }
            Ok(None) => {}
            Err(error) => {
                // Never overwrite a file we cannot read: an operator should look at it.
                tracing::error!(error = %checkplane_runtime::error_chain(&error), "agent state file unusable");
                if !sleep_or_stop(backoff.next(), stop).await {
                    return None;
                }
                continue;
            }
        }
        let Some(enrollment) = enrollment else {
            tracing::error!(state_file = %state_file.display(), "no identity: the state file is gone and no AGENT_ENROLLMENT_TOKEN is set");
            if !sleep_or_stop(backoff.next(), stop).await {
                return None;
            }
            continue;
        };
        match register(http, settings, enrollment, state_file).await {
            Ok(identity) => {
                tracing::info!(agent_id = %identity.agent_id, "registered with the control plane");
                return Some(identity);
            }
            Err(error) => tracing::warn!(%error, "registration failed"),
        }
        if !sleep_or_stop(backoff.next(), stop).await {
            return None;
        }
    }
}

/// The kinds and pool sizes this agent declares.
pub(super) fn declared(settings: &Settings) -> BTreeMap<String, u32> {
    settings
        .pools
        .declared()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// Register with the enrollment token and keep the answer in the state file (before it is
/// used: without the file a restart would register anew).
pub(super) async fn register(
    http: &reqwest::Client,
    settings: &Settings,
    enrollment: &checkplane_runtime::Secret,
    state_file: &std::path::Path,
) -> Result<Identity, RegisterError> {
    let body = RegisterRequest {
        hostname: settings.hostname.clone(),
        labels: BTreeMap::new(),
        capabilities: declared(settings),
        location: None,
        agent_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
    };
    let path = "v1/agents/register";
    let url = settings
        .control_plane
        .join(path)
        .map_err(|error| CallError::Url {
            path: path.to_owned(),
            error,
        })?;
    let response = http
        .post(url)
        .header("x-enrollment-token", enrollment.expose())
        .header(protocol::HEADER, protocol::CURRENT)
        .timeout(Duration::from_secs(10))
        .json(&body)
        .send()
        .await
        .map_err(CallError::Transport)?;
    let status = response.status().as_u16();
    if !(200..300).contains(&status) {
        let body = response.text().await.unwrap_or_default();
        return Err(CallError::Refused {
            status,
            body: body.chars().take(300).collect(),
        }
        .into());
    }
    let r = response
        .json::<RegisterResponse>()
        .await
        .map_err(CallError::Transport)?;
    let identity = Identity {
        agent_id: r.agent_id,
        token: r.token,
        heartbeat_interval_ms: r.heartbeat_interval_ms,
        declared: Some(declared(settings)),
    };
    identity::store(state_file, &identity)
        .map_err(|e| RegisterError::Keep(checkplane_runtime::error_chain(&e)))?;
    Ok(identity)
}

/// The control plane no longer takes this agent's token (another registration of its host
/// name rotated it, or an operator removed it): register again when an enrollment token is
/// configured, else say so. Two agents sharing a host name take each other's token this way,
/// and each such turn is logged.
pub(super) async fn reregister(shared: &Shared) {
    let Source::Enrolled {
        enrollment: Some(enrollment),
        state_file,
    } = &shared.settings.source
    else {
        tracing::error!("heartbeat failed: the control plane refuses this agent's token, and there is no AGENT_ENROLLMENT_TOKEN to register again");
        return;
    };
    tracing::warn!(
        "heartbeat failed: the control plane refuses this agent's token; registering again"
    );
    match register(
        &shared.control.http,
        &shared.settings,
        enrollment,
        state_file,
    )
    .await
    {
        Ok(identity) => {
            tracing::info!(agent_id = %identity.agent_id, "registered with the control plane");
            *shared
                .control
                .identity
                .write()
                .unwrap_or_else(|p| p.into_inner()) = identity;
        }
        Err(error) => tracing::warn!(%error, "registration failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_within_a_quarter_either_way_and_resets() {
        let mut low = Backoff::with_jitter(|| 0.0);
        let waits: Vec<u128> = (0..9).map(|_| low.next().as_millis()).collect();
        assert_eq!(
            waits,
            [375, 750, 1_500, 3_000, 6_000, 12_000, 22_500, 22_500, 22_500]
        );
        let mut high = Backoff::with_jitter(|| 1.0);
        let waits: Vec<u128> = (0..8).map(|_| high.next().as_millis()).collect();
        assert_eq!(
            waits,
            [625, 1_250, 2_500, 5_000, 10_000, 20_000, 37_500, 37_500]
        );
        high.reset();
        assert_eq!(high.next(), Duration::from_millis(625));
        // Real jitter stays inside the band.
        for _ in 0..1_000 {
            let wait = Backoff::new().next();
            assert!((375..=625).contains(&wait.as_millis()), "{wait:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_or_stop_waits_its_time_unless_stopped() {
        let stop = CancellationToken::new();
        let started = tokio::time::Instant::now();
        assert!(sleep_or_stop(BACKOFF_MOST, &stop).await);
        assert_eq!(started.elapsed(), BACKOFF_MOST);
        let waiting = tokio::spawn({
            let stop = stop.clone();
            async move { sleep_or_stop(Duration::from_secs(3600), &stop).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.cancel();
        assert!(!waiting.await.unwrap(), "stopped, not slept out");
        assert_eq!(started.elapsed(), BACKOFF_MOST + Duration::from_secs(1));
    }
}
