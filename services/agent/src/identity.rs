//! Who the agent is to the control plane: `AGENT_ID` + `AGENT_AUTH_TOKEN` when given, else
//! the identity kept in `AGENT_STATE_FILE` from an earlier registration, else a registration
//! with `AGENT_ENROLLMENT_TOKEN`, whose answer is written to the state file (atomically: a
//! temporary file in the same folder, mode 0600, synced, then renamed over the old one) before
//! the agent uses it, so a crash never leaves a half-written identity behind.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use checkplane_runtime::Secret;
use serde::{Deserialize, Serialize};

/// The agent's identity.
#[derive(Clone, Serialize, Deserialize)]
pub struct Identity {
    pub agent_id: String,
    pub token: String,
    /// How often the gateway wants heartbeats (ms), as it said at registration.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_interval_ms: u64,
    /// The kinds (and pool sizes) that registration declared: an agent started with other
    /// ones registers again, so the control plane sends it what it now runs.
    #[serde(default)]
    pub declared: Option<std::collections::BTreeMap<String, u32>>,
}

fn default_heartbeat_ms() -> u64 {
    10_000
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("agent_id", &self.agent_id)
            .field("token", &"[redacted]")
            .finish()
    }
}

/// Why the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not an agent state file")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("writing {path}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// The identity in `path`, if the file exists.
pub fn load(path: &Path) -> Result<Option<Identity>, StateError> {
    let shown = || path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StateError::Parse {
                path: shown(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Read {
            path: shown(),
            source,
        }),
    }
}

/// Write `identity` to `path` atomically, readable by its owner only.
pub fn store(path: &Path, identity: &Identity) -> Result<(), StateError> {
    let failed = |source| StateError::Write {
        path: path.display().to_string(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(failed)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let body = serde_json::to_vec_pretty(identity).map_err(|e| failed(std::io::Error::other(e)))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(failed)?;
    file.write_all(&body).map_err(failed)?;
    file.sync_all().map_err(failed)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(failed)?;
    // The rename itself survives a crash once the folder is synced.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Where the identity comes from, as configured.
#[derive(Debug, Clone)]
pub enum Source {
    /// `AGENT_ID` and `AGENT_AUTH_TOKEN`.
    Given { agent_id: String, token: Secret },
    /// The state file, or a registration with the enrollment token when it has none.
    Enrolled {
        enrollment: Option<Secret>,
        state_file: std::path::PathBuf,
    },
}
