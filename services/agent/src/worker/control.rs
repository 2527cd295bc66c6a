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
    Refused {
        status: u16,
        body: String,
        /// The gateway's `Retry-After` (a 429 or 503).
        retry_after: Option<Duration>,
    },
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

impl CallError {
    /// The gateway's `Retry-After`, when it gave one.
    pub(super) fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A refusal from the call's answer (its body shortened for the log).
    async fn refused(response: reqwest::Response) -> Self {
        let status = response.status().as_u16();
        let retry_after = retry_after(response.headers());
        let body = response.text().await.unwrap_or_default();
        Self::Refused {
            status,
            body: body.chars().take(300).collect(),
            retry_after,
        }
    }
}

/// `Retry-After` in seconds (the gateway never sends a date), at most an hour.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs.min(3600)))
}

pub(super) struct Control {
    pub(super) http: reqwest::Client,
    pub(super) base: reqwest::Url,
    /// Replaced when the agent registers again (its token was refused).
    pub(super) identity: std::sync::RwLock<Identity>,
    /// The pace of claims (both lanes') and of reports: under the gateway's default limits
    /// (`GATEWAY_RATE_CLAIM`, `GATEWAY_RATE_REPORT`: 50/s, burst 60), so a busy agent gathers
    /// its free workers into fewer claims and its results into fewer reports instead of
    /// being refused. Not slower: the scheduler gives an agent new tasks as its reports
    /// arrive, so every paced report and claim delays the next task (5/s cut a four-worker
    /// agent of 1 ms checks from 40 to 10 checks a second).
    pub(super) claims: Pace,
    pub(super) reports: Pace,
}

/// The wait between registrations the gateway refused as a takeover (409): only an admin's
/// approval changes the answer.
pub(super) const REFUSED_WAIT: Duration = Duration::from_secs(300);

/// Calls a second and at once that the agent makes of one kind, at most.
pub(super) const PACE_PER_SECOND: u32 = 20;
pub(super) const PACE_BURST: u32 = 20;

/// One kind of call's pace: `burst` at once, then one per `interval` (GCRA, the algorithm of
/// the gateway's limits).
pub(super) struct Pace {
    interval: Duration,
    burst: u32,
    /// When the next call would be one interval ahead of the pace.
    tat: std::sync::Mutex<tokio::time::Instant>,
}

impl Pace {
    pub(super) fn new(per_second: u32, burst: u32) -> Self {
        Self {
            interval: Duration::from_secs(1) / per_second.max(1),
            burst: burst.max(1),
            tat: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Wait for this call's turn (the turn is taken at once, so callers queue in order).
    pub(super) async fn turn(&self) {
        let wait = {
            let mut tat = self.tat.lock().unwrap_or_else(|p| p.into_inner());
            let now = tokio::time::Instant::now();
            let start = (*tat).max(now);
            *tat = start + self.interval;
            // Allowed once `start` is no more than burst - 1 intervals ahead of now.
            let ahead = self.interval * (self.burst - 1);
            start.saturating_duration_since(now + ahead)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// [`Pace::turn`], or false when `stop` fired first.
    pub(super) async fn turn_or_stop(&self, stop: &CancellationToken) -> bool {
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = self.turn() => true,
        }
    }
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
        if !response.status().is_success() {
            metrics::counter!("checkplane_agent_control_plane_errors_total", "call" => path.to_owned())
                .increment(1);
            return Err(CallError::refused(response).await);
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

    /// The wait after `error`: the next step, or longer when the gateway said when to come
    /// back (`Retry-After` on a 429).
    pub(super) fn after(&mut self, error: &CallError) -> Duration {
        let step = self.next();
        self.at_least(step, error)
    }

    /// `wait`, or longer when `error` carries a `Retry-After` (spread by [`Backoff::spread`]).
    pub(super) fn at_least(&self, wait: Duration, error: &CallError) -> Duration {
        error
            .retry_after()
            .map_or(wait, |after| wait.max(self.spread(after)))
    }

    /// `wait` and up to a tenth more, so agents refused together do not all return at once.
    pub(super) fn spread(&self, wait: Duration) -> Duration {
        wait.mul_f64(1.0 + 0.1 * (self.jitter)().clamp(0.0, 1.0))
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
        // The token this host holds, its proof when it registers again.
        let mut current: Option<String> = None;
        match identity::load(state_file) {
            Ok(Some(identity))
                if enrollment.is_some() && identity.declared != Some(declared(settings)) =>
            {
                // Registered with other kinds or pool sizes (an upgrade, a changed
                // configuration): register again, so the control plane knows what it runs.
                tracing::info!(agent_id = %identity.agent_id, "declared kinds changed since registration; registering again");
                current = Some(identity.token);
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
        let wait = match register(http, settings, enrollment, state_file, current.as_deref()).await
        {
            Ok(identity) => {
                tracing::info!(agent_id = %identity.agent_id, "registered with the control plane");
                return Some(identity);
            }
            Err(RegisterError::Call(error)) => {
                tracing::warn!(%error, "registration failed");
                match error {
                    CallError::Refused { status: 409, .. } => REFUSED_WAIT,
                    _ => backoff.after(&error),
                }
            }
            Err(error) => {
                tracing::warn!(%error, "registration failed");
                backoff.next()
            }
        };
        if !sleep_or_stop(wait, stop).await {
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
/// used: without the file a restart would register anew). `current` is the token this host
/// holds, if any: a host the control plane knows registers again only with it (or with an
/// admin's approval).
pub(super) async fn register(
    http: &reqwest::Client,
    settings: &Settings,
    enrollment: &checkplane_runtime::Secret,
    state_file: &std::path::Path,
    current: Option<&str>,
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
    let mut request = http.post(url);
    if let Some(token) = current {
        request = request.header("x-agent-token", token);
    }
    let response = request
        .header("x-enrollment-token", enrollment.expose())
        .header(protocol::HEADER, protocol::CURRENT)
        .timeout(Duration::from_secs(10))
        .json(&body)
        .send()
        .await
        .map_err(CallError::Transport)?;
    if response.status() == reqwest::StatusCode::CONFLICT {
        tracing::error!(
            hostname = %settings.hostname,
            "the control plane knows this host under another token (its agent's token was lost, \
             or another host has the same name): an admin must approve its re-enrollment \
             (POST /v1/agents/<id>/reenroll, the id is in the answer)"
        );
    }
    if !response.status().is_success() {
        return Err(CallError::refused(response).await.into());
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

/// The control plane no longer takes this agent's token (a re-registration of this host whose
/// answer was lost rotated it, or an admin approved another enrollment of the host): register
/// again with the token it holds, which the gateway takes in the first case; in the second it
/// answers 409 and only an admin can help, so the agent then waits [`REFUSED_WAIT`] between
/// tries instead of spending its address's failed-authentication budget.
///
/// The wait before the next try, when the gateway asked for one (`Retry-After`) or refused.
pub(super) async fn reregister(shared: &Shared) -> Option<Duration> {
    let Source::Enrolled {
        enrollment: Some(enrollment),
        state_file,
    } = &shared.settings.source
    else {
        tracing::error!("heartbeat failed: the control plane refuses this agent's token, and there is no AGENT_ENROLLMENT_TOKEN to register again");
        return None;
    };
    tracing::warn!(
        "heartbeat failed: the control plane refuses this agent's token; registering again"
    );
    let current = shared
        .control
        .identity
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .token
        .clone();
    match register(
        &shared.control.http,
        &shared.settings,
        enrollment,
        state_file,
        Some(&current),
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
            None
        }
        Err(error) => {
            tracing::warn!(%error, "registration failed");
            match error {
                RegisterError::Call(CallError::Refused { status: 409, .. }) => Some(REFUSED_WAIT),
                RegisterError::Call(CallError::Refused { retry_after, .. }) => retry_after,
                _ => None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_pace_lets_a_burst_through_then_one_call_per_interval() {
        let pace = Pace::new(5, 3);
        let start = tokio::time::Instant::now();
        let mut at = Vec::new();
        for _ in 0..6 {
            pace.turn().await;
            at.push(start.elapsed().as_millis());
        }
        assert_eq!(at, [0, 0, 0, 200, 400, 600]);
        // Idle for a while: the burst is back.
        tokio::time::advance(Duration::from_secs(2)).await;
        let again = tokio::time::Instant::now();
        for _ in 0..3 {
            pace.turn().await;
        }
        assert_eq!(again.elapsed(), Duration::ZERO);
    }

    #[test]
    fn a_refusal_with_retry_after_waits_at_least_that_long() {
        let mut backoff = Backoff::with_jitter(|| 0.0);
        let limited = CallError::Refused {
            status: 429,
            body: String::new(),
            retry_after: Some(Duration::from_secs(7)),
        };
        assert_eq!(backoff.after(&limited), Duration::from_secs(7));
        let plain = CallError::Refused {
            status: 503,
            body: String::new(),
            retry_after: None,
        };
        assert_eq!(backoff.after(&plain), Duration::from_millis(750));
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::RETRY_AFTER, "12".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(12)));
        headers.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
    }

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
