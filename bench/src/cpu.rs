//! CPU time by part, read from `/proc`: this process's threads grouped by their name's
//! prefix (each service runs on a runtime of its own, its threads named after it), and the
//! PostgreSQL and Redis server processes. Differences of two readings say where a run's CPU
//! went.

use std::collections::BTreeMap;

/// Clock ticks per second of `/proc/*/stat` (USER_HZ; 100 on every Linux this runs on).
const TICKS_PER_S: f64 = 100.0;

/// utime and stime of one `/proc/.../stat` line, in ticks; the fields after the `(comm)`.
fn ticks(stat: &str) -> Option<(String, u64, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_owned();
    let rest: Vec<&str> = stat[close + 2..].split(' ').collect();
    // After the comm: state(0) ppid pgrp session tty tpgid flags minflt cminflt majflt
    // cmajflt utime(11) stime(12).
    let user: u64 = rest.get(11)?.parse().ok()?;
    let system: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, user, system))
}

/// Adds one thread's or process's ticks to its group's total and to its group's kernel part.
fn add(out: &mut BTreeMap<String, f64>, group: &str, user: u64, system: u64) {
    *out.entry(group.to_owned()).or_default() += (user + system) as f64 / TICKS_PER_S;
    *out.entry(format!("{group} (kernel)")).or_default() += system as f64 / TICKS_PER_S;
}

/// (name, utime, stime) of every `<dir>/*/stat` that reads.
fn stats(dir: &str) -> Vec<(String, u64, u64)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|stat| ticks(&stat))
        .collect()
}

/// CPU seconds so far (and the kernel's part of them): `groups` of this process's threads
/// (by thread-name prefix, the rest under "bench+agents"), and every `postgres` and
/// `redis-server` process on the machine.
pub fn reading(groups: &[&str]) -> BTreeMap<String, f64> {
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    for (comm, user, system) in stats("/proc/self/task") {
        let group = groups
            .iter()
            .find(|g| comm.starts_with(**g))
            .map_or("bench+agents", |g| g);
        add(&mut out, group, user, system);
    }
    for (comm, user, system) in stats("/proc") {
        if comm == "postgres" || comm == "redis-server" {
            add(&mut out, &comm, user, system);
        }
    }
    out
}

/// `after - before`, in milliseconds per `runs`.
pub fn per_run(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    runs: usize,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| {
            let spent = v - before.get(k).copied().unwrap_or(0.0);
            let ms = spent * 1000.0 / runs.max(1) as f64;
            (k.clone(), (ms * 10.0).round() / 10.0)
        })
        .collect()
}

/// The machine's CPU time so far, in ticks: (stolen by the hypervisor, all).
#[derive(Debug, Clone, Copy, Default)]
pub struct Machine {
    steal: u64,
    total: u64,
}

impl Machine {
    /// The `cpu` line of `/proc/stat` (zeros where it does not read).
    pub fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .filter_map(|f| f.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        Self {
            steal: fields.get(7).copied().unwrap_or(0),
            total: fields.iter().take(8).sum(),
        }
    }

    /// The share of the machine's CPU time the hypervisor took since `self`, in percent: the
    /// noise a run's figures carry (this machine's latencies double from ~5 %).
    pub fn steal_since(self) -> f64 {
        let now = Self::now();
        let total = now.total.saturating_sub(self.total).max(1) as f64;
        let steal = now.steal.saturating_sub(self.steal) as f64;
        (steal * 1000.0 / total).round() / 10.0
    }
}
