//! The agent lease API: claim (with a long poll), extend, report. The protocol itself lives in
//! the Lua scripts of `checkplane_core::leases`; this module validates, authorises and
//! waits.

use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use checkplane_core::leases::{Fenced, Granted};
use checkplane_runtime::clock::now_ms;
use checkplane_runtime::http::{ApiError, ApiJson, BodyLimit};
use checkplane_wire::kinds::Kind;
use checkplane_wire::leases::api::{
    ClaimRequest, ClaimResponse, ExtendRequest, Lease, Outcome, ReportRequest, TokenOutcome,
    TokenOutcomes, MAX_CLAIM, MAX_TOKENS,
};
use checkplane_wire::leases::LeaseToken;

use crate::auth::AgentIdentity;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/agents/claim", post(claim).layer(BodyLimit(16 * 1024)))
        .route(
            "/v1/agents/extend",
            post(extend).layer(BodyLimit(1024 * 1024)),
        )
        .route(
            "/v1/agents/report",
            post(report).layer(BodyLimit(4 * 1024 * 1024)),
        )
}

fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn to_lease(g: Granted, now: i64) -> Lease {
    let spec = g
        .fields
        .iter()
        .find(|(k, _)| k == "spec")
        .and_then(|(_, v)| serde_json::from_str(v).ok())
        .unwrap_or(serde_json::Value::Null);
    Lease {
        token: g.token,
        kind: g.kind,
        spec,
        // A replayed claim answers with what is left of the original lease.
        lease_duration_ms: u64::try_from(g.deadline_ms - now).unwrap_or(0),
        lease_until_ms: g.deadline_ms,
    }
}

async fn claim(
    State(app): State<AppState>,
    agent: AgentIdentity,
    ApiJson(request): ApiJson<ClaimRequest>,
) -> Result<Json<ClaimResponse>, ApiError> {
    let agent_id = agent.agent_id.as_str().to_owned();
    if request.agent_id.as_deref().is_some_and(|a| a != agent_id) {
        return Err(ApiError::forbidden("agent_id differs from X-Agent-Id"));
    }
    if !valid_request_id(&request.request_id) {
        return Err(ApiError::validation("request_id: 1-64 of A-Z a-z 0-9 _ -"));
    }
    let mut capacities: Vec<(&'static str, u32)> = Vec::new();
    let mut total: u32 = 0;
    for (kind, count) in &request.capacities {
        let Ok(kind) = kind.parse::<Kind>().map(Kind::as_str) else {
            return Err(ApiError::validation(format!(
                "capacities.{}: unknown kind",
                kind.chars().take(32).collect::<String>()
            )));
        };
        total = total.saturating_add(*count);
        capacities.push((kind, *count));
    }
    if capacities.is_empty() || total == 0 {
        return Err(ApiError::validation(
            "capacities: ask for at least one task",
        ));
    }
    if total > MAX_CLAIM {
        return Err(ApiError::validation(format!(
            "capacities: at most {MAX_CLAIM} tasks in one claim"
        )));
    }
    // A long poll takes one of the agent's places; past them the claim is refused (429) so
    // that the agent backs off rather than loops on answers that did not wait.
    let _place = if request.wait_ms > 0 {
        Some(app.agent_claims.take(&agent_id).ok_or_else(|| {
            ApiError::rate_limited(
                format!(
                    "this agent holds {} waiting claims, the most it may; retry later",
                    app.agent_claims.max()
                ),
                1,
            )
        })?)
    } else {
        None
    };
    let wait = spread(Duration::from_millis(request.wait_ms).min(app.config.claim_block));
    let deadline = tokio::time::Instant::now() + wait;
    let bell = app.doorbell.bell(&agent_id);
    loop {
        // Listen before looking, so that work arriving in between wakes us.
        let rung = bell.listen();

        let now = now_ms();
        let (leases, agent_id, request_id, capacities) =
            (&app.leases, &agent_id, &request.request_id, &capacities);
        let granted = app
            .stores
            .on_shared(move |mut conn| async move {
                leases
                    .claim(&mut conn, agent_id, request_id, capacities, now)
                    .await
            })
            .await?;
        if !granted.is_empty() || tokio::time::Instant::now() >= deadline {
            metrics::counter!("checkplane_leases_granted_total").increment(granted.len() as u64);
            return Ok(Json(ClaimResponse {
                leases: granted.into_iter().map(|g| to_lease(g, now)).collect(),
            }));
        }
        // No doorbell rings when the agent's own leases (left by a crash of the agent or its
        // gateway) become idle enough to be handed back: look again every LEASE_TTL, so a
        // restarted agent gets them within about one term rather than at its next claim.
        let recheck = tokio::time::Instant::now() + app.config.lease_ttl;
        let _waiting = Waiting::start();
        tokio::select! {
            _ = rung => {}
            _ = app.shutdown.cancelled() => return Ok(Json(ClaimResponse { leases: Vec::new() })),
            _ = tokio::time::sleep_until(deadline.min(recheck)) => {}
        }
    }
}

/// A claim in its wait, counted by `checkplane_claims_waiting` while it lives (however the
/// wait ends: woken, timed out, or the client gone and the request dropped).
struct Waiting;

impl Waiting {
    fn start() -> Self {
        metrics::gauge!("checkplane_claims_waiting").increment(1.0);
        Self
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        metrics::gauge!("checkplane_claims_waiting").decrement(1.0);
    }
}

/// A waiting claim gives up somewhere in the last tenth of its wait rather than at its very
/// end: agents that began together (a fleet booted at once, all reconnecting after a gateway
/// restart) would otherwise time out together on every round, and all their re-claims would
/// land in the same instant, a burst of empty claims ahead of real work.
fn spread(wait: Duration) -> Duration {
    let tenth = u64::try_from((wait / 10).as_micros()).unwrap_or(u64::MAX);
    let random = uuid::Uuid::new_v4().as_u64_pair().1;
    wait.saturating_sub(Duration::from_micros(random % tenth.saturating_add(1)))
}

/// Parse every token; a malformed one fails the request, another agent's token forbids it.
fn own_tokens(agent: &AgentIdentity, tokens: &[String]) -> Result<Vec<LeaseToken>, ApiError> {
    if tokens.len() > MAX_TOKENS {
        return Err(ApiError::validation(format!(
            "tokens: at most {MAX_TOKENS} in one call"
        )));
    }
    let mut parsed = Vec::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        let token = LeaseToken::parse(t)
            .map_err(|_| ApiError::validation(format!("tokens[{i}]: not a lease token")))?;
        if token.agent != agent.agent_id {
            return Err(ApiError::forbidden(format!(
                "tokens[{i}]: the lease belongs to another agent"
            )));
        }
        parsed.push(token);
    }
    Ok(parsed)
}

async fn extend(
    State(app): State<AppState>,
    agent: AgentIdentity,
    ApiJson(request): ApiJson<ExtendRequest>,
) -> Result<Json<TokenOutcomes>, ApiError> {
    let tokens = own_tokens(&agent, &request.tokens)?;
    let (leases, agent_id, parsed, now) = (&app.leases, agent.agent_id.as_str(), &tokens, now_ms());
    let outcomes = app
        .stores
        .on_shared(
            move |mut conn| async move { leases.extend(&mut conn, agent_id, parsed, now).await },
        )
        .await?;
    Ok(Json(TokenOutcomes {
        results: request
            .tokens
            .into_iter()
            .zip(outcomes)
            .map(|(token, outcome)| match outcome {
                Fenced::Ok(deadline) => TokenOutcome {
                    token,
                    new_deadline_ms: Some(deadline),
                    status: None,
                    error: None,
                    message: None,
                },
                Fenced::Refused(refusal) => TokenOutcome {
                    token,
                    new_deadline_ms: None,
                    status: None,
                    error: Some(refusal.code().as_str().to_owned()),
                    message: None,
                },
            })
            .collect(),
    }))
}

async fn report(
    State(app): State<AppState>,
    agent: AgentIdentity,
    ApiJson(request): ApiJson<ReportRequest>,
) -> Result<Json<TokenOutcomes>, ApiError> {
    let mut items: Vec<(String, &'static str, serde_json::Value)> = Vec::new();
    // Per completed report, its outcome and result, held to its kind's schema once the
    // tokens are parsed (the token names the kind).
    let mut ends = Vec::with_capacity(request.completed.len());
    for c in request.completed {
        let outcome = c.outcome.unwrap_or(Outcome::Finished);
        ends.push(outcome);
        let result = serde_json::json!({"observations": c.observations, "result": c.result});
        items.push((c.token, outcome.as_str(), result));
    }
    for c in request.cancelled {
        let reason = c.reason.unwrap_or_default();
        if reason.len() > 256 {
            return Err(ApiError::validation(
                "cancelled[].reason: at most 256 characters",
            ));
        }
        items.push((c.token, "cancelled", serde_json::json!({"reason": reason})));
    }
    if items.is_empty() {
        return Err(ApiError::validation("report at least one lease"));
    }
    let raw: Vec<String> = items.iter().map(|(t, _, _)| t.clone()).collect();
    let tokens = own_tokens(&agent, &raw)?;
    // A result that does not fit its kind is refused on its own (the lease stays the agent's),
    // so one bad result does not hold back the others of the batch.
    let misfits: Vec<Option<String>> = items
        .iter()
        .zip(&tokens)
        .enumerate()
        .map(|(i, ((_, _, result), token))| {
            let outcome = *ends.get(i)?;
            let kind = token.kind.parse::<checkplane_wire::kinds::Kind>().ok()?;
            let why = checkplane_wire::results::check(kind, outcome, &result["result"]).err()?;
            Some(format!("completed[{i}].{why}"))
        })
        .collect();
    // All of one agent's reports in one script call.
    let reports: Vec<(&LeaseToken, &str, &serde_json::Value)> = items
        .iter()
        .zip(&tokens)
        .zip(&misfits)
        .filter(|(_, misfit)| misfit.is_none())
        .map(|(((_, outcome, result), token), _)| (token, *outcome, result))
        .collect();
    let fenced = if reports.is_empty() {
        Vec::new()
    } else {
        let (leases, batch, now) = (&app.leases, &reports, now_ms());
        app.stores
            .on_shared(
                move |mut conn| async move { leases.report_many(&mut conn, batch, now).await },
            )
            .await?
    };
    drop(reports);
    let mut fenced = fenced.into_iter();
    let mut results = Vec::with_capacity(tokens.len());
    for ((text, _, _), misfit) in items.into_iter().zip(misfits) {
        if let Some(why) = misfit {
            tracing::warn!(agent_id = %agent.agent_id, token = %text, %why, "report refused: its result does not fit its kind");
            results.push(TokenOutcome {
                token: text,
                new_deadline_ms: None,
                status: None,
                error: Some(checkplane_wire::ErrorCode::Validation.as_str().to_owned()),
                message: Some(why),
            });
            continue;
        }
        results.push(match fenced.next() {
            Some(Fenced::Ok(())) => TokenOutcome {
                token: text,
                new_deadline_ms: None,
                status: Some("acknowledged".to_owned()),
                error: None,
                message: None,
            },
            Some(Fenced::Refused(refusal)) => TokenOutcome {
                token: text,
                new_deadline_ms: None,
                status: None,
                error: Some(refusal.code().as_str().to_owned()),
                message: None,
            },
            None => {
                let short = std::io::Error::other("the report script answered fewer reports");
                return Err(ApiError::internal(&short));
            }
        });
    }
    Ok(Json(TokenOutcomes { results }))
}

#[cfg(test)]
mod tests {
    use super::spread;
    use std::time::Duration;

    #[test]
    fn a_claim_gives_up_in_the_last_tenth_of_its_wait_and_not_always_at_the_same_moment() {
        let wait = Duration::from_secs(20);
        let spread_waits: std::collections::BTreeSet<Duration> =
            (0..200).map(|_| spread(wait)).collect();
        assert!(spread_waits
            .iter()
            .all(|w| *w <= wait && *w >= wait * 9 / 10));
        // 200 draws from two million microseconds: a repeat-only answer means no spread.
        assert!(spread_waits.len() > 100, "{spread_waits:?}");
        let span = *spread_waits.last().unwrap() - *spread_waits.first().unwrap();
        assert!(span > Duration::from_millis(1_000), "{span:?}");
        assert_eq!(spread(Duration::ZERO), Duration::ZERO);
    }
}
