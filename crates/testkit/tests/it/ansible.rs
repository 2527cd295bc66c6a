//! infra/ansible: linted (production profile, offline) and syntax-checked, then run for real
//! against this machine into a scratch tree with the debug binaries the suite built. There
//! is no systemd as PID 1 here: the service user is root (it exists), units are not started,
//! and the test names the tasks that skips.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use checkplane_testkit::workspace_root;
use serde_json::Value;

/// The virtualenv `./stand test` makes from infra/ansible/requirements.txt.
fn venv() -> PathBuf {
    std::env::var_os("CHECKPLANE_ANSIBLE_VENV").map_or_else(
        || PathBuf::from("/var/cache/checkplane/ansible-venv"),
        PathBuf::from,
    )
}

fn ansible(tool: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let bin = venv().join("bin").join(tool);
    let mut command = Command::new(&bin);
    command
        .args(args)
        .current_dir(workspace_root().join("infra/ansible"))
        .env(
            "PATH",
            format!(
                "{}:/usr/sbin:/usr/bin:/sbin:/bin",
                venv().join("bin").display()
            ),
        )
        .env("ANSIBLE_NOCOLOR", "1")
        .env(
            "ANSIBLE_LOCAL_TEMP",
            std::env::temp_dir().join("cp-ansible-tmp"),
        );
    for (k, v) in env {
        command.env(k, v);
    }
    command
        .output()
        .unwrap_or_else(|e| panic!("{} ({e}): ./stand test installs it", bin.display()))
}

fn ok(out: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

const VAULT: [&str; 2] = [
    "--vault-password-file",
    "inventories/local/vault-password.txt",
];

#[test]
fn the_playbook_passes_ansible_lint_and_the_syntax_check() {
    let lint = ok(&ansible(
        "ansible-lint",
        &["--offline", "--profile", "production"],
        &[],
    ));
    assert!(
        lint.contains("Profile 'production' was required, and it passed"),
        "{lint}"
    );
    for inventory in ["inventories/local/hosts.yml", "inventories/prod/hosts.yml"] {
        let mut args = vec!["-i", inventory, "--syntax-check", "site.yml"];
        if inventory.contains("local") {
            args.extend(VAULT);
        }
        ok(&ansible("ansible-playbook", &args, &[]));
    }
}

/// The directory the suite's binaries are in (this test runs from `<target>/debug/deps`).
fn binaries() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let debug = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    for name in ["gateway", "scheduler", "haproxy-sync", "agent"] {
        assert!(
            debug.join(name).is_file(),
            "{} not built",
            debug.join(name).display()
        );
    }
    debug
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// One run of site.yml on localhost into `root`: what it printed.
/// The test's stores and the services' addresses, as inventory variables (extra vars: above
/// the inventory and the role defaults).
struct Site {
    db: checkplane_testkit::TestDb,
    redis: checkplane_testkit::TestRedis,
    ports: [u16; 4],
}

impl Site {
    fn vars(&self) -> Value {
        let at = |p: u16| format!("127.0.0.1:{p}");
        let [gateway, scheduler, sync, agent] = self.ports;
        serde_json::json!({
            "checkplane_store_env": {
                "DATABASE_URL": self.db.url,
                "REDIS_URL": self.redis.url,
                "STREAM_PREFIX": self.redis.prefix,
            },
            "gateway_listen": at(gateway),
            "scheduler_listen": at(scheduler),
            "haproxy_sync_listen": at(sync),
            "agent_health_listen": at(agent),
            "agent_control_plane": format!("http://{}", at(gateway)),
        })
    }
}

fn deploy(root: &Path, site: &Site) -> String {
    let bin = binaries();
    let sums: serde_json::Map<String, Value> = ["gateway", "scheduler", "haproxy-sync", "agent"]
        .iter()
        .map(|n| ((*n).to_owned(), Value::String(sha256(&bin.join(n)))))
        .collect();
    let vars = serde_json::json!({
        "checkplane_service_prefix": root.join("opt"),
        "checkplane_service_unit_dir": root.join("units"),
        "checkplane_service_logrotate_dir": root.join("logrotate.d"),
        "checkplane_service_state_dir": root.join("state"),
        "checkplane_service_log_dir": root.join("log"),
        // No user made here: root exists, and the test says so.
        "checkplane_service_user": "root",
        "checkplane_service_manage_user": false,
        // No systemd as PID 1: nothing is started.
        "checkplane_service_start": false,
        "checkplane_release_url": format!("file://{}", bin.display()),
        "checkplane_sha256": sums,
    });
    let mut vars = vars;
    if let (Value::Object(all), Value::Object(site)) = (&mut vars, site.vars()) {
        all.extend(site);
    }
    let vars_file = root.join("vars.json");
    std::fs::write(&vars_file, vars.to_string()).unwrap();
    let extra = format!("@{}", vars_file.display());
    let mut args = vec![
        "-i",
        "inventories/local/hosts.yml",
        "site.yml",
        "-e",
        &extra,
    ];
    args.extend(VAULT);
    ok(&ansible("ansible-playbook", &args, &[]))
}

/// (changed, the names of the tasks skipped, in order) of a run's output (the default
/// callback: `TASK [role : name]` headers, `skipping: [localhost]` lines, the recap).
fn summary(output: &str) -> (u64, Vec<String>) {
    let mut task = String::new();
    let mut skipped: Vec<String> = Vec::new();
    let mut changed = None;
    for line in output.lines() {
        let header = line
            .strip_prefix("TASK [")
            .or_else(|| line.strip_prefix("RUNNING HANDLER ["));
        if let Some(header) = header {
            let inside = header.split(']').next().unwrap_or_default();
            task = inside.rsplit(" : ").next().unwrap_or(inside).to_owned();
        } else if line.starts_with("skipping: [localhost]") && skipped.last() != Some(&task) {
            skipped.push(task.clone());
        } else if line.starts_with("localhost ") && line.contains("changed=") {
            let n = line
                .split("changed=")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap();
            changed = Some(n.parse().unwrap());
        }
    }
    (changed.expect("a recap"), skipped)
}

/// `KEY=VALUE` lines of an env file (comments and blank lines aside).
fn env_file(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// The value of `key=` in a unit file.
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {unit}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_playbook_installs_every_service_and_a_second_run_changes_nothing() {
    use checkplane_testkit::process::{free_port, ServiceProcess};
    let site = Site {
        db: checkplane_testkit::TestDb::new().await,
        redis: checkplane_testkit::TestRedis::new(),
        ports: [free_port(), free_port(), free_port(), free_port()],
    };
    let root = checkplane_testkit::servers::scratch_dir("ansible");
    let (changed, skipped) = summary(&deploy(&root, &site));
    assert!(changed > 0);
    // Exactly what a host without systemd (and without a user to make) skips: per service,
    // making the user and group, and starting the units.
    let per_service = [
        "Make the service group",
        "Make the service user",
        "Enable and start the service and its health check",
    ];
    let expected: Vec<String> = (0..4)
        .flat_map(|_| per_service.iter().map(|s| (*s).to_owned()))
        .collect();
    // The restart handler, notified by the first run's changes, skips too (once a play).
    let mut expected = expected;
    expected.insert(9, "Restart the service".to_owned());
    expected.push("Restart the service".to_owned());
    assert_eq!(skipped, expected);
    let (again, _) = summary(&deploy(&root, &site));
    assert_eq!(again, 0, "a second run changes nothing");

    for name in ["gateway", "scheduler", "haproxy-sync", "agent"] {
        let binary = root.join("opt/bin").join(name);
        assert_eq!(sha256(&binary), sha256(&binaries().join(name)));
        use std::os::unix::fs::PermissionsExt;
        let env = root.join(format!("opt/etc/{name}.env"));
        let mode = std::fs::metadata(&env).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "{name}.env holds secrets");
        // The units as systemd reads them.
        let mut units: Vec<PathBuf> = Vec::new();
        for suffix in ["", "-health"] {
            for kind in ["service", "timer"] {
                let unit = root.join(format!("units/checkplane-{name}{suffix}.{kind}"));
                if unit.exists() {
                    units.push(unit);
                }
            }
        }
        assert_eq!(units.len(), 3, "{units:?}");
        let verify = Command::new("systemd-analyze")
            .arg("verify")
            .arg("--man=no")
            .args(&units)
            .output()
            .expect("systemd-analyze (Debian's systemd package)");
        assert!(verify.status.success(), "{verify:?}");
        assert!(
            verify.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&verify.stderr)
        );
    }
    let unit = std::fs::read_to_string(root.join("units/checkplane-agent.service")).unwrap();
    for line in [
        "Restart=on-failure",
        "NoNewPrivileges=true",
        "ProtectSystem=strict",
        "ProtectHome=true",
        "PrivateTmp=true",
        "CapabilityBoundingSet=CAP_NET_RAW",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} in {unit}");
    }
    let gateway = std::fs::read_to_string(root.join("units/checkplane-gateway.service")).unwrap();
    assert_eq!(
        gateway.matches("ExecCondition=").count(),
        2,
        "waits for PostgreSQL and Redis"
    );
    assert!(
        gateway.lines().any(|l| l == "CapabilityBoundingSet="),
        "{gateway}"
    );

    // logrotate reads what the play installed.
    let rotate = Command::new("logrotate")
        .arg("-d")
        .arg("-s")
        .arg(root.join("logrotate.status"))
        .arg(root.join("logrotate.d/checkplane"))
        .output()
        .expect("logrotate");
    let said = String::from_utf8_lossy(&rotate.stderr);
    assert!(rotate.status.success(), "{said}");
    assert!(!said.contains("error"), "{said}");

    // Each installed binary started exactly as its unit says (ExecStart, EnvironmentFile)
    // answers /readyz: the gateway first (it migrates), the agent last (it needs the gateway).
    let http = reqwest::Client::new();
    let mut running = Vec::new();
    for (name, port) in ["gateway", "scheduler", "haproxy-sync", "agent"]
        .into_iter()
        .zip(site.ports)
    {
        let unit =
            std::fs::read_to_string(root.join(format!("units/checkplane-{name}.service"))).unwrap();
        let exec = PathBuf::from(unit_value(&unit, "ExecStart"));
        let env = env_file(Path::new(&unit_value(&unit, "EnvironmentFile")));
        let process = ServiceProcess::spawn(&exec, &[], &env);
        let url = format!("http://127.0.0.1:{port}/readyz");
        checkplane_testkit::eventually(
            &format!("{name} ready as deployed"),
            std::time::Duration::from_secs(30),
            || {
                let request = http.get(&url).send();
                async move { (request.await.ok()?.status().as_u16() == 200).then_some(()) }
            },
        )
        .await;
        running.push(process);
    }
    drop(running);
    std::fs::remove_dir_all(&root).unwrap();
}
