//! infra/prometheus: the alert rules pass `promtool check rules` and their own unit tests
//! (`promtool test rules`: each tested alert fires on the series that should fire it, stays
//! quiet otherwise), cover what the runbook needs alerts for, and every metric named in them
//! or in the Grafana dashboard is one some service exports.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use checkplane_testkit::workspace_root;

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(workspace_root().join("infra/prometheus"))
        .output()
        .expect("promtool (Debian's prometheus package; ./stand test installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}: {text}");
    text
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let checked = promtool(&["check", "rules", "alerts.yml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts_test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// The alerts the operations issue asks for, by name.
#[test]
fn the_rules_alert_on_what_operators_need_to_know() {
    let rules =
        std::fs::read_to_string(workspace_root().join("infra/prometheus/alerts.yml")).unwrap();
    for alert in [
        "CheckplaneHeartbeatsLate",
        "CheckplaneAgentsRateLimited",
        "CheckplaneConcurrencyWindowCollapsed",
        "CheckplaneProjectionLag",
        "CheckplaneDeadLettersGrowing",
        "CheckplaneParkedEvents",
        "CheckplaneHaproxyBreakerOpen",
        "CheckplaneHaproxyServersDrifting",
        "CheckplaneDependencyDown",
        "CheckplaneClockSkew",
    ] {
        assert!(
            rules.contains(&format!("- alert: {alert}\n")),
            "{alert} missing"
        );
    }
}

/// Metric names the services' code exports: the first argument of every `metrics::counter!`,
/// `gauge!` and `histogram!` (a histogram's `_bucket`, `_sum` and `_count` too).
fn exported() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let root = workspace_root();
    let mut dirs: Vec<std::path::PathBuf> = Vec::new();
    for top in ["crates", "services"] {
        for entry in std::fs::read_dir(root.join(top)).unwrap() {
            dirs.push(entry.unwrap().path().join("src"));
        }
    }
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                scan(&path, &mut names);
            }
        }
    }
    names
}

fn scan(path: &Path, names: &mut BTreeSet<String>) {
    let text = std::fs::read_to_string(path).unwrap();
    for kind in ["counter", "gauge", "histogram"] {
        let call = format!("metrics::{kind}!(");
        for (at, _) in text.match_indices(&call) {
            let rest = text[at + call.len()..].trim_start();
            let Some(rest) = rest.strip_prefix('"') else {
                continue;
            };
            let name = &rest[..rest.find('"').unwrap()];
            names.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
}

/// The metric names in a PromQL expression: identifiers of ours (`checkplane_`, `http_`),
/// and Prometheus's own `up`.
fn named_in(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut word = String::new();
    let mut in_quotes = false;
    for c in expr.chars().chain([' ']) {
        if c == '"' {
            in_quotes = !in_quotes;
            word.clear();
            continue;
        }
        if !in_quotes && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            word.push(c);
            continue;
        }
        if word.starts_with("checkplane_") || word.starts_with("http_") || word == "up" {
            names.insert(std::mem::take(&mut word));
        }
        word.clear();
    }
    names
}

#[test]
fn every_metric_in_the_rules_and_the_dashboard_is_exported_by_a_service() {
    let exported = exported();
    assert!(
        exported.contains("checkplane_projection_lag") && exported.contains("http_requests_total"),
        "the scan finds the services' metrics: {exported:?}"
    );
    let dir = workspace_root().join("infra/prometheus");
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    let mut used = BTreeSet::new();
    for line in rules.lines() {
        if let Some(expr) = line.trim().strip_prefix("expr:") {
            used.extend(named_in(expr));
        }
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dashboard.json")).unwrap())
            .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let mut dashboard_exprs = 0;
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            used.extend(named_in(target["expr"].as_str().unwrap()));
            dashboard_exprs += 1;
        }
    }
    assert!(
        dashboard_exprs >= 25,
        "{dashboard_exprs} panels with a query"
    );
    for section in ["Fleet", "Checks", "Leases", "Projector", "HAProxy"] {
        assert!(
            panels
                .iter()
                .any(|p| p["type"] == "row" && p["title"] == section),
            "no {section} row"
        );
    }
    used.remove("up");
    let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "named but exported by no service: {missing:?}"
    );
    assert!(used.len() >= 20, "{used:?}");
}

#[test]
fn the_dashboard_is_what_its_generator_writes() {
    let dir = workspace_root().join("infra/prometheus");
    let out = Command::new(dir.join("make-dashboard"))
        .output()
        .expect("python3");
    assert!(out.status.success(), "{out:?}");
    let committed = std::fs::read(dir.join("dashboard.json")).unwrap();
    assert!(
        out.stdout == committed,
        "dashboard.json differs from ./make-dashboard's output: regenerate it"
    );
}
