//! The one JSON error envelope every HTTP answer uses:
//! `{"error": {"code": "ERR_...", "message": "..."}}`.

use serde::{Deserialize, Serialize};

/// The enum, its wire names, [`ErrorCode::as_str`] and [`ErrorCode::ALL`] from one list, so
/// that no code can be missing from any of them.
macro_rules! error_codes {
    ($( $(#[doc = $doc:literal])* $variant:ident => $code:literal, )*) => {
        /// Machine-readable error codes; clients branch on these, never on messages.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum ErrorCode {
            $( $(#[doc = $doc])* #[serde(rename = $code)] $variant, )*
        }

        impl ErrorCode {
            /// Every code, in the order declared.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),*];

            /// The code as it appears on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( Self::$variant => $code, )*
                }
            }
        }
    };
}

/// A field that failed validation: which, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: String,
    pub reason: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for Invalid {}

error_codes! {
    BadRequest => "ERR_BAD_REQUEST",
    Validation => "ERR_VALIDATION",
    Unauthorized => "ERR_UNAUTHORIZED",
    Forbidden => "ERR_FORBIDDEN",
    NotFound => "ERR_NOT_FOUND",
    MethodNotAllowed => "ERR_METHOD_NOT_ALLOWED",
    PayloadTooLarge => "ERR_PAYLOAD_TOO_LARGE",
    /// The request's path and query are over the listener's limit (414).
    UriTooLong => "ERR_URI_TOO_LONG",
    /// The request has too many header fields, or too many bytes of them (431).
    HeadersTooLarge => "ERR_HEADERS_TOO_LARGE",
    /// The request's body did not arrive within the listener's body timeout (408).
    RequestTimeout => "ERR_REQUEST_TIMEOUT",
    UnsupportedMediaType => "ERR_UNSUPPORTED_MEDIA_TYPE",
    RateLimited => "ERR_RATE_LIMITED",
    NotReady => "ERR_NOT_READY",
    Unavailable => "ERR_UNAVAILABLE",
    Internal => "ERR_INTERNAL",
    /// A check target in a private, loopback, link-local, multicast or reserved range.
    TargetForbidden => "ERR_TARGET_FORBIDDEN",
    /// No online agent matches a check's selection.
    NoAgents => "ERR_NO_AGENTS",
    /// The request conflicts with what exists (a name in use).
    Conflict => "ERR_CONFLICT",
    /// An HAProxy instance cannot be commanded now (its node's agent is offline, or its
    /// circuit breaker is open).
    InstanceUnavailable => "ERR_INSTANCE_UNAVAILABLE",
    /// A lease token's entry is held by another consumer or was delivered again since (per
    /// token in an extend or report answer).
    LeaseLost => "ERR_LEASE_LOST",
    /// A lease token's task was closed (its deadline passed, or it was cancelled).
    LeaseClosed => "ERR_LEASE_CLOSED",
    /// A lease token names no task there is.
    LeaseUnknown => "ERR_LEASE_UNKNOWN",
    /// An agent speaks a protocol version this gateway does not (`X-Agent-Protocol`).
    UnsupportedProtocol => "ERR_UNSUPPORTED_PROTOCOL",
}

impl std::str::FromStr for ErrorCode {
    type Err = ();

    /// A wire name back to its code.
    fn from_str(code: &str) -> Result<Self, ()> {
        Self::ALL
            .iter()
            .copied()
            .find(|c| c.as_str() == code)
            .ok_or(())
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
    fn every_code_serialises_as_its_wire_name_and_parses_back() {
        assert!(ErrorCode::ALL.len() >= 19);
        let mut seen = std::collections::HashSet::new();
        for &code in ErrorCode::ALL {
            let json = serde_json::to_value(code).unwrap();
            assert_eq!(json, serde_json::Value::String(code.as_str().to_owned()));
            assert_eq!(serde_json::from_value::<ErrorCode>(json).unwrap(), code);
            assert_eq!(code.as_str().parse::<ErrorCode>(), Ok(code));
            assert!(code.as_str().starts_with("ERR_"), "{code:?}");
            assert!(seen.insert(code.as_str()), "{} twice", code.as_str());
        }
        assert_eq!("ERR_NOPE".parse::<ErrorCode>(), Err(()));
    }
}
