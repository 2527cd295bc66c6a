//! The short chaos run: a minute of faults on a fixed seed against the debug binaries the
//! suite built (`bench/run chaos` is the long one). It fails when anything was lost, and
//! when a fault class it was asked to inject happened zero times.

use std::path::Path;
use std::process::Command;

#[test]
fn a_minute_of_chaos_loses_nothing() {
    let bench = Path::new(env!("CARGO_BIN_EXE_checkplane-bench"));
    let bin_dir = bench.parent().expect("the binaries' directory");
    for service in ["gateway", "scheduler", "haproxy-sync", "agent"] {
        assert!(
            bin_dir.join(service).exists(),
            "{} is missing: build the workspace's binaries first (cargo nextest run --workspace does)",
            bin_dir.join(service).display()
        );
    }
    // One re-run of a failing seed (not three): it bounds the suite's time. Its progress
    // and each run's summary go to stderr as they happen, so a run cut short by the test
    // harness's timeout still says what it saw.
    let out = Command::new(bench)
        .args([
            "chaos",
            "--minutes",
            "1",
            "--seed",
            "7",
            "--reruns",
            "1",
            "--bin-dir",
        ])
        .arg(bin_dir)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("running checkplane-bench chaos");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the chaos run failed ({:?}):\n{stdout}",
        out.status.code()
    );
    // What it printed is the run's own account: every fault class happened, work was done.
    assert!(stdout.contains("PASSED"), "{stdout}");
    for counted in [
        "fault redis-kill",
        "fault pg-restart",
        "fault pause",
        "acknowledged reports",
        "actions success",
    ] {
        assert!(
            stdout.contains(counted),
            "{counted} missing from:\n{stdout}"
        );
    }
}
