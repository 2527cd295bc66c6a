//! A real DNS server for tests and benchmarks: Debian's `unbound`, started privately on a
//! loopback port (UDP and TCP) and serving the zone `example.test` from its own
//! configuration (`local-zone … static`: answers with the SOA for names it does not have,
//! as an authoritative server would). Killed and removed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The records `example.test` holds (and the reverse zone of 192.0.2.0/24).
pub const ZONE: &[&str] = &[
    "example.test. 3600 IN SOA ns.example.test. hostmaster.example.test. 7 3600 900 604800 60",
    "example.test. 3600 IN NS ns.example.test.",
    "example.test. 300 IN A 192.0.2.10",
    "example.test. 300 IN AAAA 2001:db8::10",
    "example.test. 300 IN MX 10 mail.example.test.",
    "example.test. 300 IN TXT \"v=spf1 -all\"",
    "example.test. 300 IN CAA 0 issue \"ca.example.test\"",
    "ns.example.test. 300 IN A 192.0.2.53",
    "mail.example.test. 300 IN A 192.0.2.25",
    "www.example.test. 300 IN CNAME example.test.",
    "short.example.test. 1 IN A 192.0.2.77",
    "_sip._tcp.example.test. 300 IN SRV 10 5 5060 sip.example.test.",
];

/// An unbound of the test's own.
pub struct Unbound {
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

impl Unbound {
    /// Start one with [`ZONE`] and one thread.
    pub fn start() -> Self {
        Self::start_with(ZONE, &[], 1)
    }

    /// Start one serving `records` (plus `example.test`'s SOA-less extras in `more`, e.g.
    /// generated names for a benchmark) with `threads` threads.
    pub fn start_with(records: &[&str], more: &[String], threads: u32) -> Self {
        let port = crate::process::free_port();
        let dir =
            std::env::temp_dir().join(format!("cp-unbound-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let mut conf = format!(
            "server:\n  interface: 127.0.0.1@{port}\n  port: {port}\n  do-daemonize: no\n  \
             username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"{d}/unbound.pid\"\n  \
             use-syslog: no\n  logfile: \"{d}/unbound.log\"\n  verbosity: 1\n  num-threads: {threads}\n  \
             do-ip6: no\n  access-control: 127.0.0.0/8 allow\n  module-config: \"iterator\"\n  \
             so-reuseport: yes\n  local-zone: \"example.test.\" static\n  \
             local-zone: \"2.0.192.in-addr.arpa.\" static\n  \
             local-data-ptr: \"192.0.2.10 example.test.\"\n",
            d = dir.display()
        );
        for record in records
            .iter()
            .copied()
            .chain(more.iter().map(String::as_str))
        {
            conf.push_str(&format!("  local-data: '{record}'\n"));
        }
        conf.push_str("remote-control:\n  control-enable: no\n");
        let path = dir.join("unbound.conf");
        std::fs::write(&path, conf).expect("unbound.conf");
        let checked = Command::new("unbound-checkconf")
            .arg(&path)
            .output()
            .expect("unbound-checkconf (./stand test installs unbound)");
        assert!(
            checked.status.success(),
            "unbound.conf: {}",
            String::from_utf8_lossy(&checked.stdout)
        );
        let child = Command::new("unbound")
            .arg("-d")
            .arg("-c")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("unbound (./stand test installs it)");
        let server = Self { port, dir, child };
        server.wait_answering(Duration::from_secs(10));
        server
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn wait_answering(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            let log = std::fs::read_to_string(self.dir.join("unbound.log")).unwrap_or_default();
            assert!(Instant::now() < deadline, "unbound did not start: {log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Unbound {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
