//! PostgreSQL and Redis servers owned by one test: for tests that stop and restart a
//! dependency, which must never touch the shared ones. Killed and removed on drop.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("an ephemeral port")
        .port()
}

/// A fresh directory under the system temp dir, named after `kind`.
pub fn scratch_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cp-{kind}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn wait_port(port: u16, within: Duration) {
    let deadline = Instant::now() + within;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "port {port} did not open within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A redis-server of the test's own.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    fsync: &'static str,
}

impl RedisServer {
    /// Start one on a free port.
    pub fn start() -> Self {
        Self::start_with_fsync("always")
    }

    /// Start one with `appendfsync` set to `policy` (`always`, `everysec`).
    pub fn start_with_fsync(policy: &'static str) -> Self {
        let mut server = Self {
            port: free_port(),
            dir: scratch_dir("redis"),
            child: None,
            fsync: policy,
        };
        server.resume();
        server
    }

    /// Copy its persisted data aside (to roll back to later).
    pub fn snapshot(&self) -> PathBuf {
        let copy = scratch_dir("redis-snapshot");
        let status = Command::new("cp")
            .arg("-a")
            .arg(self.dir.join("appendonlydir"))
            .arg(&copy)
            .status()
            .expect("cp");
        assert!(status.success());
        copy
    }

    /// Stop it and put back the data of `snapshot`: as if Redis lost every write since.
    pub fn lose_writes_since(&mut self, snapshot: &Path) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir.join("appendonlydir"));
        let status = Command::new("cp")
            .arg("-a")
            .arg(snapshot.join("appendonlydir"))
            .arg(&self.dir)
            .status()
            .expect("cp");
        assert!(status.success());
        let _ = std::fs::remove_dir_all(snapshot);
        self.resume();
    }

    /// `redis://127.0.0.1:port/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Stop it (SIGKILL: as abrupt as a crash).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freeze it (SIGSTOP): connections stay open but nothing answers, as with a hung server.
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    /// Let a frozen server go on (SIGCONT).
    pub fn thaw(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Start it again on the same port.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            // By default every write is synced: a restart in a test loses nothing, so what a
            // test sees after one is our code's doing. Loss is simulated on purpose instead
            // (`lose_writes_since`).
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                self.fsync,
            ])
            .args(["--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning redis-server (is it installed? ./stand test installs it)");
        self.child = Some(child);
        wait_port(self.port, Duration::from_secs(10));
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.thaw();
        }
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A PostgreSQL server of the test's own (trust auth, user `postgres`).
pub struct PostgresServer {
    pub port: u16,
    dir: PathBuf,
    bindir: PathBuf,
}

fn pg_bindir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("/usr/lib/postgresql (./stand test installs PostgreSQL)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop().expect("a PostgreSQL installation")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// PostgreSQL refuses to run as root: run its tools as `postgres` then.
fn pg_command(bin: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

impl PostgresServer {
    /// initdb and start one on a free port.
    pub fn start() -> Self {
        let dir = scratch_dir("pg");
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(status.success());
        }
        let bindir = pg_bindir();
        let out = pg_command(&bindir.join("initdb"))
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let server = Self {
            port: free_port(),
            dir,
            bindir,
        };
        server.resume();
        server
    }

    /// `postgres://postgres@127.0.0.1:port/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn pg_ctl(&self, args: &[&str]) {
        let out = pg_command(&self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stop it at once (`immediate`: as abrupt as a crash).
    pub fn stop(&self) {
        self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
    }

    /// Start it again on the same port.
    pub fn resume(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off",
            self.port,
            self.dir.join("data").display()
        );
        let log = self.dir.join("postgres.log");
        self.pg_ctl(&["-o", &opts, "-l", &log.to_string_lossy(), "-w", "start"]);
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        let _ = pg_command(&self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A 3-node Redis Cluster of the test's own (no replicas), on loopback.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Start three cluster-enabled nodes and join them with `redis-cli --cluster create`.
    pub fn start() -> Self {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let dir = scratch_dir("cluster");
            let child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .arg("--cluster-config-file")
                .arg(dir.join("nodes.conf"))
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawning a cluster node");
            wait_port(port, Duration::from_secs(10));
            nodes.push(RedisServer {
                port,
                dir,
                child: Some(child),
                fsync: "always",
            });
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Self { nodes };
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in &cluster.nodes {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &node.port.to_string(), "cluster", "info"])
                    .output()
                    .expect("cluster info");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster did not become ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster
    }

    /// `redis://127.0.0.1:port/` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// An async cluster connection.
    pub async fn connection(&self) -> redis::cluster_async::ClusterConnection {
        redis::cluster::ClusterClient::new(self.urls())
            .expect("cluster client")
            .get_async_connection()
            .await
            .expect("cluster connection")
    }
}
