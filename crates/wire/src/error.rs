//! The one JSON error envelope every HTTP answer uses:
//! `{"error": {"code": "ERR_...", "message": "..."}}`.

use serde::{Deserialize, Serialize};

/// Machine-readable error codes; clients branch on these, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    #[serde(rename = "ERR_BAD_REQUEST")]
    BadRequest,
    #[serde(rename = "ERR_VALIDATION")]
    Validation,
    #[serde(rename = "ERR_UNAUTHORIZED")]
    Unauthorized,
    #[serde(rename = "ERR_FORBIDDEN")]
    Forbidden,
    #[serde(rename = "ERR_NOT_FOUND")]
    NotFound,
    #[serde(rename = "ERR_METHOD_NOT_ALLOWED")]
    MethodNotAllowed,
    #[serde(rename = "ERR_PAYLOAD_TOO_LARGE")]
    PayloadTooLarge,
    #[serde(rename = "ERR_UNSUPPORTED_MEDIA_TYPE")]
    UnsupportedMediaType,
    #[serde(rename = "ERR_RATE_LIMITED")]
    RateLimited,
    #[serde(rename = "ERR_NOT_READY")]
    NotReady,
    #[serde(rename = "ERR_UNAVAILABLE")]
    Unavailable,
    #[serde(rename = "ERR_INTERNAL")]
    Internal,
    /// A check target in a private, loopback, link-local, multicast or reserved range.
    #[serde(rename = "ERR_TARGET_FORBIDDEN")]
    TargetForbidden,
    /// No online agent matches a check's selection.
    #[serde(rename = "ERR_NO_AGENTS")]
    NoAgents,
    /// The request conflicts with what exists (a name in use).
    #[serde(rename = "ERR_CONFLICT")]
    Conflict,
    /// An HAProxy instance cannot be commanded now (its node's agent is offline, or its
    /// circuit breaker is open).
    #[serde(rename = "ERR_INSTANCE_UNAVAILABLE")]
    InstanceUnavailable,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "ERR_BAD_REQUEST",
            Self::Validation => "ERR_VALIDATION",
            Self::Unauthorized => "ERR_UNAUTHORIZED",
            Self::Forbidden => "ERR_FORBIDDEN",
            Self::NotFound => "ERR_NOT_FOUND",
            Self::MethodNotAllowed => "ERR_METHOD_NOT_ALLOWED",
            Self::PayloadTooLarge => "ERR_PAYLOAD_TOO_LARGE",
            Self::UnsupportedMediaType => "ERR_UNSUPPORTED_MEDIA_TYPE",
            Self::RateLimited => "ERR_RATE_LIMITED",
            Self::NotReady => "ERR_NOT_READY",
            Self::Unavailable => "ERR_UNAVAILABLE",
            Self::Internal => "ERR_INTERNAL",
            Self::TargetForbidden => "ERR_TARGET_FORBIDDEN",
            Self::NoAgents => "ERR_NO_AGENTS",
            Self::Conflict => "ERR_CONFLICT",
            Self::InstanceUnavailable => "ERR_INSTANCE_UNAVAILABLE",
        }
    }
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong, for machines (`code`) and for people (`message`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code,
                message: message.into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_serialises_with_wire_codes() {
        let body = ErrorBody::new(ErrorCode::NotFound, "no such route");
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": {"code": "ERR_NOT_FOUND", "message": "no such route"}})
        );
    }

    #[test]
    fn as_str_matches_serde_name() {
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::Validation,
            ErrorCode::Unauthorized,
            ErrorCode::Forbidden,
            ErrorCode::NotFound,
            ErrorCode::MethodNotAllowed,
            ErrorCode::PayloadTooLarge,
            ErrorCode::UnsupportedMediaType,
            ErrorCode::RateLimited,
            ErrorCode::NotReady,
            ErrorCode::Unavailable,
            ErrorCode::Internal,
        ] {
            let json = serde_json::to_value(code).unwrap();
            assert_eq!(json, serde_json::Value::String(code.as_str().to_owned()));
        }
    }
}
