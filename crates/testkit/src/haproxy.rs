//! A real HAProxy of the test's own (Debian's `haproxy`), in master-worker mode on loopback:
//! an admin Runtime API on TCP and on a unix socket, an operator-level socket, and the master
//! CLI for reloads. Backends and servers are the test's; servers have no health checks unless
//! asked, so their state is what the test sets. Killed and removed on drop.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One server of a backend: name and port on 127.0.0.1.
pub type Server = (&'static str, u16);

/// A private HAProxy.
pub struct Haproxy {
    pub dir: PathBuf,
    pub stats: SocketAddr,
    pub admin_socket: PathBuf,
    pub operator_socket: PathBuf,
    pub master_socket: PathBuf,
    child: Child,
}

/// Where a private HAProxy listens.
struct Places {
    stats: SocketAddr,
    admin_socket: PathBuf,
    operator_socket: PathBuf,
    /// The server-state file a reload loads, when one was saved ([`Haproxy::save_state`]).
    state_file: PathBuf,
}

fn config(h: &Places, backends: &[(&str, Vec<Server>)]) -> String {
    let mut c = format!(
        "global\n    stats socket ipv4@{} level admin\n    stats socket {} mode 600 level admin\n    \
         stats socket {} mode 600 level operator\n    stats timeout 30s\n    server-state-file {}\n\n\
         defaults\n    mode http\n    timeout connect 2s\n    timeout client 10s\n    timeout server 10s\n    \
         load-server-state-from-file global\n\n",
        h.stats,
        h.admin_socket.display(),
        h.operator_socket.display(),
        h.state_file.display()
    );
    for (backend, servers) in backends {
        c.push_str(&format!("backend {backend}\n    balance roundrobin\n"));
        for (name, port) in servers {
            c.push_str(&format!("    server {name} 127.0.0.1:{port}\n"));
        }
        c.push('\n');
    }
    c
}

impl Haproxy {
    /// Start one with `backends`.
    pub fn start(backends: &[(&str, Vec<Server>)]) -> Self {
        let dir =
            std::env::temp_dir().join(format!("cp-haproxy-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let places = Places {
            stats: SocketAddr::from(([127, 0, 0, 1], crate::process::free_port())),
            admin_socket: dir.join("admin.sock"),
            operator_socket: dir.join("operator.sock"),
            state_file: dir.join("server-state"),
        };
        let master_socket = dir.join("master.sock");
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, config(&places, backends)).expect("haproxy.cfg");
        let checked = Command::new("haproxy")
            .args(["-c", "-q", "-f"])
            .arg(&cfg)
            .output()
            .expect("haproxy (./stand test installs it)");
        assert!(
            checked.status.success(),
            "haproxy.cfg: {}",
            String::from_utf8_lossy(&checked.stderr)
        );
        let child = Command::new("haproxy")
            .arg("-W")
            .arg("-S")
            .arg(format!("{},level,admin", master_socket.display()))
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy");
        let h = Self {
            stats: places.stats,
            admin_socket: places.admin_socket,
            operator_socket: places.operator_socket,
            master_socket,
            child,
            dir,
        };
        h.wait_answering(None);
        h
    }

    fn places(&self) -> Places {
        Places {
            stats: self.stats,
            admin_socket: self.admin_socket.clone(),
            operator_socket: self.operator_socket.clone(),
            state_file: self.dir.join("server-state"),
        }
    }

    /// Save the servers' runtime state to the state file the next reload loads (as an
    /// operator's reload script does before `systemctl reload`).
    pub fn save_state(&self) {
        let state = self.command("show servers state");
        std::fs::write(self.dir.join("server-state"), state).expect("server-state file");
    }

    /// Remove the state file: the next reload starts every server from the configuration.
    pub fn forget_state(&self) {
        let _ = std::fs::remove_file(self.dir.join("server-state"));
    }

    /// One Runtime API command over TCP: the reply.
    pub fn command(&self, command: &str) -> String {
        let mut s = std::net::TcpStream::connect_timeout(&self.stats, Duration::from_secs(2))
            .expect("the Runtime API");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("{command}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        reply
    }

    /// `Pid:` of `show info`.
    pub fn pid(&self) -> Option<u32> {
        self.command("show info")
            .lines()
            .find_map(|l| l.strip_prefix("Pid: ")?.trim().parse().ok())
    }

    fn wait_answering(&self, other_than: Option<u32>) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let up = std::net::TcpStream::connect_timeout(&self.stats, Duration::from_millis(200))
                .is_ok()
                && self.pid().is_some_and(|p| Some(p) != other_than);
            if up {
                return;
            }
            assert!(Instant::now() < deadline, "HAProxy did not answer");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Rewrite the configuration with `backends` and reload through the master CLI; returns
    /// when the new worker answers.
    pub fn reload(&self, backends: &[(&str, Vec<Server>)]) {
        let old = self.pid();
        std::fs::write(
            self.dir.join("haproxy.cfg"),
            config(&self.places(), backends),
        )
        .unwrap();
        // The master starts its CLI once its worker runs: it may still be on its way.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut master = loop {
            match std::os::unix::net::UnixStream::connect(&self.master_socket) {
                Ok(master) => break master,
                Err(e) => {
                    assert!(Instant::now() < deadline, "master CLI: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        master.write_all(b"reload\n").unwrap();
        let mut reply = String::new();
        master
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let _ = master.read_to_string(&mut reply);
        self.wait_answering(old);
    }

    /// Stop it (SIGSTOP: connections hang) or let it go on (SIGCONT).
    pub fn freeze(&self) {
        let _ = Command::new("kill")
            .args(["-STOP", &self.child.id().to_string()])
            .status();
        for pid in self.workers() {
            let _ = Command::new("kill")
                .args(["-STOP", &pid.to_string()])
                .status();
        }
    }

    pub fn thaw(&self) {
        for pid in self.workers() {
            let _ = Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        }
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
    }

    fn workers(&self) -> Vec<u32> {
        let out = Command::new("pgrep")
            .args(["-P", &self.child.id().to_string()])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        out.lines().filter_map(|l| l.trim().parse().ok()).collect()
    }

    /// Kill it (nothing listens any more).
    pub fn kill(&mut self) {
        let workers = self.workers();
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in &workers {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        // Gone, sockets closed, before this returns.
        let deadline = Instant::now() + Duration::from_secs(5);
        let alive = |pid: &u32| {
            // A zombie (state Z) has closed its sockets already.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit(')').next().map(|r| r.trim_start().to_owned()))
                .is_some_and(|r| !r.starts_with('Z'))
        };
        while workers.iter().any(alive) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.thaw();
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
