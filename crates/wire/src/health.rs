//! Bodies of `/livez`, `/readyz` and `/healthz`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One dependency's probe outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckOutcome {
    pub ok: bool,
    /// How long the probe took, in milliseconds.
    pub elapsed_ms: u64,
    /// Why it failed, in a few words (never a connection string or a secret).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

/// The `/readyz` body: `status` is `ready` or `not_ready`; `failed` names what failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    pub status: String,
    pub service: String,
    pub failed: Vec<String>,
    pub checks: BTreeMap<String, CheckOutcome>,
}

/// The `/healthz` body: `status` is `ok`, `degraded` (serving, needs attention) or `down`;
/// `reasons` say why (empty when `ok`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub status: String,
    pub service: String,
    pub reasons: Vec<String>,
}
