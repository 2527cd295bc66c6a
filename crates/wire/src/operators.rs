//! Operators: API keys with roles, and the audit log.
//!
//! A key is `cpk_<key_id>_<secret>`: the id (12 lower-case hex characters) finds the stored
//! SHA-256 of the whole key; the secret is 32 random bytes, URL-safe base64. The key itself is
//! shown once, when it is made.

use serde::{Deserialize, Serialize};

use crate::error::Invalid;

/// What a key may do. Each role includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads: checks, agents, results.
    Viewer,
    /// Also runs checks and HAProxy actions.
    Operator,
    /// Also manages keys and reads the audit log.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    /// The name on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }

    /// The role named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Whether a key with this role may do what `needed` allows.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Longest key name.
pub const NAME_MAX: usize = 64;
/// Length of a key id.
pub const KEY_ID_LEN: usize = 12;
/// Longest key accepted in `X-API-Key` (longer is refused before hashing).
pub const KEY_MAX: usize = 128;

/// A key name: 1–64 of `A-Z a-z 0-9 . _ -`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A key id: 12 lower-case hex characters.
pub fn valid_key_id(id: &str) -> bool {
    id.len() == KEY_ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The key id inside a presented key, if it has the shape of one.
pub fn key_id_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("cpk_")?;
    let (id, secret) = rest.split_once('_')?;
    (valid_key_id(id) && !secret.is_empty()).then_some(id)
}

/// `POST /v1/keys`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    pub name: String,
    pub role: String,
}

/// A key to create, its every field checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    pub name: String,
    pub role: Role,
}

impl CreateKeyRequest {
    /// The name and role, or what is wrong with them (the field named).
    pub fn parse(&self) -> Result<NewKey, Invalid> {
        if !valid_name(&self.name) {
            return Err(Invalid::new(
                "name",
                format!("1-{NAME_MAX} of A-Z a-z 0-9 . _ -"),
            ));
        }
        let role = Role::parse(&self.role)
            .ok_or_else(|| Invalid::new("role", "expected viewer, operator or admin"))?;
        Ok(NewKey {
            name: self.name.clone(),
            role,
        })
    }
}

/// A key as listed (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyView {
    pub key_id: String,
    pub name: String,
    pub role: Role,
    pub created_at: String,
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<String>,
}

/// The answer to `POST /v1/keys`: the only time `key` is shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedKey {
    pub key_id: String,
    pub name: String,
    pub role: Role,
    pub key: String,
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub event_id: String,
    pub occurred_at: String,
    pub actor: String,
    pub action: String,
    pub object: String,
    pub details: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_include_the_ones_below() {
        assert!(Role::Admin.allows(Role::Operator));
        assert!(Role::Operator.allows(Role::Viewer));
        assert!(!Role::Viewer.allows(Role::Operator));
        assert!(!Role::Operator.allows(Role::Admin));
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("Admin"), None);
    }

    #[test]
    fn key_ids_are_found_only_in_well_formed_keys() {
        assert_eq!(key_id_of("cpk_0123456789ab_secret"), Some("0123456789ab"));
        assert_eq!(key_id_of("cpk_0123456789AB_secret"), None);
        assert_eq!(key_id_of("cpk_0123456789ab_"), None);
        assert_eq!(key_id_of("cpk_0123456789a_secret"), None);
        assert_eq!(key_id_of("0123456789ab_secret"), None);
    }

    #[test]
    fn create_requests_name_the_bad_field() {
        let bad_name = CreateKeyRequest {
            name: "ci bot".into(),
            role: "operator".into(),
        };
        assert!(bad_name.parse().unwrap_err().field == "name");
        let bad_role = CreateKeyRequest {
            name: "ci-bot".into(),
            role: "root".into(),
        };
        assert!(bad_role.parse().unwrap_err().field == "role");
        let good = CreateKeyRequest {
            name: "ci-bot".into(),
            role: "viewer".into(),
        };
        assert_eq!(
            good.parse().unwrap(),
            NewKey {
                name: "ci-bot".into(),
                role: Role::Viewer
            }
        );
    }
}
