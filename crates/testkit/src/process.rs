//! Service binaries run as real processes: for what only a process shows (exit codes, signals,
//! several replicas at once).

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The environment every spawned service gets besides its own: PATH only, so that nothing
/// from the developer's shell leaks in.
fn base_command(bin: &Path) -> Command {
    let mut command = Command::new(bin);
    command.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    command
}

/// Run `bin args` with `env` to completion, with a bound; returns its output.
pub fn run_to_end(bin: &Path, args: &[&str], env: &[(String, String)], within: Duration) -> Output {
    let mut child = base_command(bin)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the service binary");
    let deadline = Instant::now() + within;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{} {args:?} did not exit within {within:?}", bin.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collecting output")
}

/// A service process, killed on drop.
pub struct ServiceProcess {
    child: Option<Child>,
    log: std::path::PathBuf,
}

impl ServiceProcess {
    /// Start `bin args` with `env`; its stderr goes to a temporary log file.
    pub fn spawn(bin: &Path, args: &[&str], env: &[(String, String)]) -> Self {
        let log =
            std::env::temp_dir().join(format!("cp-proc-{}.log", uuid::Uuid::new_v4().simple()));
        let file = std::fs::File::create(&log).expect("log file");
        let child = base_command(bin)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawning the service binary");
        Self {
            child: Some(child),
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    /// Send a signal by name (`TERM`, `INT`, `KILL`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name} {}", self.pid());
    }

    /// Wait for the process to exit, at most `within`.
    pub fn wait(&mut self, within: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A free TCP port on 127.0.0.1 (for a process that binds its own).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("an ephemeral port")
        .port()
}

/// The start-up checks every binary must pass: with `env` (a valid configuration) plus a
/// typo'd project variable, or plus a malformed value, it exits 78 (EX_CONFIG) naming the variable.
pub fn assert_bad_config_exits_78(bin: &Path, env: &[(String, String)]) {
    let cases: [(&str, &str, &str); 4] = [
        (
            "CHECKPLANE_NO_SUCH_SETTING",
            "1",
            "CHECKPLANE_NO_SUCH_SETTING",
        ),
        ("AGENT_HEALTH_ADR", "127.0.0.1:1", "AGENT_HEALTH_ADDR"),
        ("SHUTDOWN_TIMEOUT", "10x", "SHUTDOWN_TIMEOUT"),
        ("LOG_FORMAT", "xml", "LOG_FORMAT"),
    ];
    for (var, value, named) in cases {
        let mut env = env.to_vec();
        env.retain(|(k, _)| k != var);
        env.push((var.to_owned(), value.to_owned()));
        let out = run_to_end(bin, &[], &env, Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{var}={value}: {stderr}");
        assert!(
            stderr.contains(var),
            "{var}={value}: stderr does not name it: {stderr}"
        );
        assert!(
            stderr.contains(named),
            "{var}={value}: stderr lacks {named}: {stderr}"
        );
    }
}

/// Start `bin` with `env`, wait for `ready_url`, send SIGTERM, and expect exit 0 within
/// `bound`.
pub async fn assert_sigterm_exits_0(
    bin: &Path,
    env: &[(String, String)],
    ready_url: &str,
    bound: Duration,
) {
    let mut process = ServiceProcess::spawn(bin, &[], env);
    let http = reqwest::Client::new();
    crate::wait_ready(&http, ready_url, Duration::from_secs(20)).await;
    process.signal("TERM");
    let status = tokio::task::block_in_place(|| process.wait(bound));
    let stderr = process.stderr();
    let status = status.unwrap_or_else(|| panic!("no exit within {bound:?} of SIGTERM: {stderr}"));
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("shutting down"), "{stderr}");
}

/// `bin healthcheck` with `env` (the service's own configuration): its exit code and the one
/// line it printed.
pub fn healthcheck(bin: &Path, env: &[(String, String)]) -> (Option<i32>, String) {
    let out = run_to_end(bin, &["healthcheck"], env, Duration::from_secs(30));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    )
}

/// Run `bin healthcheck` until it exits `code` (within `within`): its line then.
pub async fn healthcheck_until(
    bin: &Path,
    env: &[(String, String)],
    code: i32,
    within: Duration,
) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (bin, env) = (bin.to_path_buf(), env.to_vec());
        let (got, line) = tokio::task::spawn_blocking(move || healthcheck(&bin, &env))
            .await
            .expect("healthcheck");
        if got == Some(code) {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "healthcheck did not exit {code} within {within:?}: last {got:?} {line}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A store-backed service's environment against `db` and a Redis of the test's own at
/// `redis_url` (so the test may pause or stop it), listening on `port`.
pub fn private_store_env(db: &crate::TestDb, redis_url: &str, port: u16) -> Vec<(String, String)> {
    vec![
        ("DATABASE_URL".to_owned(), db.url.clone()),
        ("REDIS_URL".to_owned(), redis_url.to_owned()),
        ("HTTP_ADDR".to_owned(), format!("127.0.0.1:{port}")),
        ("READY_TIMEOUT".to_owned(), "1s".to_owned()),
    ]
}
