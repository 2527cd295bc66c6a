//! Network namespaces a test makes for itself (`ip netns`, from iproute2): hosts and routers
//! on one machine, with their own interfaces, routes and sysctls. Deleted on drop.

use std::process::Command;

/// One network namespace, with `lo` up.
pub struct Netns {
    pub name: String,
}

/// Why namespaces cannot be made here, if they cannot.
pub fn unavailable() -> Option<String> {
    let probe = Netns::try_new("probe").err()?;
    Some(probe)
}

/// Fail the test, saying why, when namespaces cannot be made here: a test that needs them
/// never passes without having run (the suite runs as root, with iproute2, under
/// `./stand test`).
pub fn require() {
    if let Some(why) = unavailable() {
        panic!("this test needs network namespaces (root and iproute2), which this machine refuses: {why}");
    }
}

impl Netns {
    /// Make one named `cp-<prefix>-<random>`.
    pub fn new(prefix: &str) -> Self {
        Self::try_new(prefix).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_new(prefix: &str) -> Result<Self, String> {
        let name = format!(
            "cp-{prefix}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| format!("ip netns add: {e} (is iproute2 installed?)"))?;
        if !out.status.success() {
            return Err(format!(
                "ip netns add: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        Ok(ns)
    }

    /// `ip -n <ns> <args>`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// A command inside the namespace (`ip netns exec`), which must succeed.
    pub fn exec(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// `sysctl -w key=value` inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")]);
    }

    /// Run `f` on a thread of its own that has entered the namespace (with a current-thread
    /// tokio runtime, so all it does stays inside).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("the namespace's file");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("setns into the namespace");
            f()
        })
        .join()
        .expect("the thread inside the namespace")
    }

    /// Join two namespaces with a veth pair: `a_if` in `self` with `a_addr` (CIDR), `b_if`
    /// in `other` with `b_addr`.
    pub fn link(&self, a_if: &str, a_addr: &str, other: &Netns, b_if: &str, b_addr: &str) {
        run(
            "ip",
            &[
                "link",
                "add",
                a_if,
                "netns",
                &self.name,
                "type",
                "veth",
                "peer",
                "name",
                b_if,
                "netns",
                &other.name,
            ],
        );
        self.ip(&["addr", "add", a_addr, "dev", a_if]);
        other.ip(&["addr", "add", b_addr, "dev", b_if]);
        self.ip(&["link", "set", a_if, "up"]);
        other.ip(&["link", "set", b_if, "up"]);
    }
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}
