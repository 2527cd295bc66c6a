//! HAProxy instances, backends and servers: their ids (derived, so every replica and every
//! poll agrees) and the bodies of the instance API.

use serde::{Deserialize, Serialize};

/// Namespace of the derived ids (a fixed random UUID).
const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x5f0c_2b7e_9a41_4d3c_8e6f_1a2b_3c4d_5e6f);

fn derived(prefix: &str, parts: &[&str]) -> String {
    // A unit separator cannot appear in a name (they are checked), so parts never run together.
    let id = uuid::Uuid::new_v5(&NAMESPACE, parts.join("\u{1f}").as_bytes());
    format!("{prefix}{}", &id.simple().to_string()[..20])
}

/// The id of `backend` of `instance`.
pub fn backend_id(instance: &str, backend: &str) -> String {
    derived("hpb-", &[instance, backend])
}

/// The id of `server` of `backend` of `instance`.
pub fn server_id(instance: &str, backend: &str, server: &str) -> String {
    derived("hps-", &[instance, backend, server])
}

/// The id of the event a poll makes about a server.
pub fn poll_event_id(instance: &str, poll: i64, backend: &str, server: &str) -> uuid::Uuid {
    uuid::Uuid::new_v5(
        &NAMESPACE,
        [instance, &poll.to_string(), backend, server]
            .join("\u{1f}")
            .as_bytes(),
    )
}

/// A proxy or server name as HAProxy allows them (and as the Runtime API can carry them).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// `POST /v1/haproxy/instances`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterInstance {
    pub name: String,
    /// `direct` (default) or `agent`.
    #[serde(default)]
    pub transport: Option<String>,
    /// `host:port` or an absolute unix socket path (direct); the socket path on the node
    /// (agent).
    pub address: String,
    #[serde(default)]
    pub node: Option<String>,
}

impl RegisterInstance {
    /// Check every field; the error names it.
    pub fn validate(&self) -> Result<(String, String, String, Option<String>), String> {
        let name = self.name.trim();
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            return Err("name: 1-128 characters, no control characters".into());
        }
        let transport = self.transport.as_deref().unwrap_or("direct");
        if !["direct", "agent"].contains(&transport) {
            return Err("transport: expected direct or agent".into());
        }
        let address = self.address.trim();
        let path_like = address.starts_with('/') && address.len() <= 100 && !address.contains('\0');
        let host_port = address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && host.len() <= 255 && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        match transport {
            "agent" if !path_like => {
                return Err(
                    "address: the unix socket path on the node (absolute, at most 100 characters)"
                        .into(),
                )
            }
            "direct" if !(path_like || host_port) => {
                return Err("address: host:port or an absolute unix socket path".into())
            }
            _ => {}
        }
        if transport == "agent" && self.node.is_none() {
            return Err(
                "node: required with transport agent (the agent on the HAProxy host)".into(),
            );
        }
        if let Some(node) = &self.node {
            if node.is_empty() || node.len() > 64 {
                return Err("node: 1-64 characters".into());
            }
        }
        Ok((
            name.to_owned(),
            transport.to_owned(),
            address.to_owned(),
            self.node.clone(),
        ))
    }
}

/// `POST /v1/haproxy/servers/{id}/action`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    pub action: String,
    pub idempotency_key: String,
    /// For drain: wait up to this long (ms, at most 300000) for sessions to reach 0.
    #[serde(default)]
    pub drain_wait_ms: u64,
}

/// Longest drain wait.
pub const MAX_DRAIN_WAIT_MS: u64 = 300_000;

impl ActionRequest {
    pub fn validate(&self) -> Result<(), String> {
        if !["drain", "maint", "ready"].contains(&self.action.as_str()) {
            return Err("action: expected drain, maint or ready".into());
        }
        let key = &self.idempotency_key;
        if key.is_empty()
            || key.len() > 128
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        {
            return Err("idempotency_key: 1-128 of A-Z a-z 0-9 - _ . :".into());
        }
        if self.drain_wait_ms > MAX_DRAIN_WAIT_MS {
            return Err(format!("drain_wait_ms: at most {MAX_DRAIN_WAIT_MS}"));
        }
        if self.drain_wait_ms > 0 && self.action != "drain" {
            return Err("drain_wait_ms: only with action drain".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(
            server_id("hpi-1", "be", "s1"),
            server_id("hpi-1", "be", "s1")
        );
        assert_ne!(
            server_id("hpi-1", "be", "s1"),
            server_id("hpi-1", "bes", "1")
        );
        assert_ne!(backend_id("hpi-1", "be"), backend_id("hpi-2", "be"));
        assert!(server_id("a", "b", "c").starts_with("hps-"));
        assert_ne!(
            poll_event_id("i", 1, "b", "s"),
            poll_event_id("i", 2, "b", "s")
        );
    }

    #[test]
    fn registration_is_validated_field_by_field() {
        let ok = |address: &str| RegisterInstance {
            name: "lb1".into(),
            transport: None,
            address: address.into(),
            node: None,
        };
        assert!(ok("127.0.0.1:9999").validate().is_ok());
        assert!(ok("/run/haproxy/admin.sock").validate().is_ok());
        assert!(ok("[::1]:9999").validate().is_ok());
        for bad in ["", "nohost", "host:0", "host:99999", "relative/path.sock"] {
            assert!(
                ok(bad).validate().unwrap_err().starts_with("address"),
                "{bad}"
            );
        }
        let agent = RegisterInstance {
            transport: Some("agent".into()),
            ..ok("/run/h.sock")
        };
        assert!(agent.validate().unwrap_err().starts_with("node"));
        let odd = RegisterInstance {
            transport: Some("ssh".into()),
            ..ok("/x")
        };
        assert!(odd.validate().unwrap_err().starts_with("transport"));
    }
}
