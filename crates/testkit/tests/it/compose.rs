//! docker-compose.yml cannot be run here (no Docker engine), so its promises are checked as
//! data: every service present, healthchecks on the services' `healthcheck` command, dependencies wait for health, no host
//! port used twice, and every variable it sets is one the services know.

use std::collections::BTreeSet;

use checkplane_testkit::workspace_root;
use serde_yaml_ng::Value;

fn compose() -> Value {
    let text = std::fs::read_to_string(workspace_root().join("docker-compose.yml")).unwrap();
    let mut value: Value = serde_yaml_ng::from_str(&text).unwrap();
    value.apply_merge().unwrap();
    // Merge keys nest: apply again for anchors used inside merged maps.
    value.apply_merge().unwrap();
    value
}

const OURS: [&str; 4] = ["gateway", "scheduler", "haproxy-sync", "agent"];

#[test]
fn every_service_is_there_with_a_healthcheck() {
    let compose = compose();
    let services = compose["services"].as_mapping().unwrap();
    let names: BTreeSet<&str> = services.keys().filter_map(Value::as_str).collect();
    let expected: BTreeSet<&str> = [
        "postgres",
        "redis",
        "haproxy",
        "gateway",
        "scheduler",
        "haproxy-sync",
        "agent",
    ]
    .into();
    assert_eq!(names, expected);
    for (name, service) in services {
        let name = name.as_str().unwrap();
        let test = &service["healthcheck"]["test"];
        assert!(
            test.as_sequence().is_some_and(|t| !t.is_empty()),
            "{name} has no healthcheck"
        );
        if OURS.contains(&name) {
            let joined: Vec<&str> = test
                .as_sequence()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
                .collect();
            assert_eq!(
                joined,
                ["CMD", "checkplane-healthcheck"],
                "{name}: the image's healthcheck (its `healthcheck` command)"
            );
            assert_eq!(
                service["command"][0].as_str(),
                Some(name),
                "{name} runs another binary"
            );
        }
    }
}

#[test]
fn dependencies_wait_for_health() {
    let compose = compose();
    let services = compose["services"].as_mapping().unwrap();
    for (name, service) in services {
        let Some(deps) = service.get("depends_on") else {
            continue;
        };
        let deps = deps
            .as_mapping()
            .unwrap_or_else(|| panic!("{name:?}: depends_on must be a map"));
        for (dep, how) in deps {
            assert!(
                services.contains_key(dep),
                "{name:?} depends on unknown {dep:?}"
            );
            assert_eq!(
                how["condition"].as_str(),
                Some("service_healthy"),
                "{name:?} -> {dep:?}"
            );
        }
    }
    for ours in ["gateway", "scheduler", "haproxy-sync"] {
        let deps = services[ours]["depends_on"].as_mapping().unwrap();
        for needed in ["postgres", "redis"] {
            assert!(deps.contains_key(needed), "{ours} must wait for {needed}");
        }
    }
}

#[test]
fn no_host_port_is_published_twice() {
    let compose = compose();
    let mut seen = BTreeSet::new();
    for (name, service) in compose["services"].as_mapping().unwrap() {
        for port in service["ports"].as_sequence().into_iter().flatten() {
            let spec = port.as_str().unwrap();
            let parts: Vec<&str> = spec.split(':').collect();
            let host = parts[parts.len() - 2];
            assert!(
                seen.insert(host.to_owned()),
                "{name:?} publishes host port {host} again"
            );
        }
    }
    assert!(!seen.is_empty());
}

#[test]
fn every_variable_set_is_known_to_the_services() {
    let compose = compose();
    for name in OURS {
        let env = compose["services"][name]["environment"]
            .as_mapping()
            .unwrap();
        for key in env.keys() {
            let key = key.as_str().unwrap();
            assert!(
                checkplane_runtime::vars::is_known(key),
                "{name} sets {key}, which no service reads"
            );
        }
    }
}

#[test]
fn the_images_are_built_by_the_dockerfile_stages() {
    let dockerfile = std::fs::read_to_string(workspace_root().join("Dockerfile")).unwrap();
    let compose = compose();
    for name in OURS.iter().copied().chain(["haproxy"]) {
        let target = compose["services"][name]["build"]["target"]
            .as_str()
            .unwrap();
        assert!(
            dockerfile.contains(&format!(" AS {target}\n")),
            "{name}: no Dockerfile stage {target}"
        );
    }
    for binary in OURS {
        assert!(
            dockerfile.contains(&format!("target/release/{binary}")),
            "{binary} not copied"
        );
    }
}

#[test]
fn its_secrets_come_from_the_env_file_and_have_no_default() {
    let text = std::fs::read_to_string(workspace_root().join("docker-compose.yml")).unwrap();
    let example = std::fs::read_to_string(workspace_root().join(".env.example")).unwrap();
    let (mut secrets, mut optional) = (0, 0);
    for (at, _) in text.match_indices("${") {
        let reference = &text[at + 2..at + 2 + text[at + 2..].find('}').unwrap()];
        let name = reference.split([':', '-', '?']).next().unwrap();
        if !name.starts_with("CHECKPLANE_") {
            continue;
        }
        if name.ends_with("_TOKEN") || name.ends_with("_KEY") {
            secrets += 1;
            assert!(
                reference.starts_with(&format!("{name}:?")),
                "{reference}: a secret is required, no default"
            );
            assert!(
                example.lines().any(|l| l.starts_with(&format!("{name}="))),
                "{name} not in .env.example"
            );
        } else {
            optional += 1;
            assert_eq!(reference, format!("{name}:-"), "unset means unset");
            assert!(
                example
                    .lines()
                    .any(|l| l.starts_with(&format!("# {name}="))),
                "{name} not shown (commented) in .env.example"
            );
        }
    }
    assert!(
        secrets >= 3,
        "the enrollment token (twice) and the admin key"
    );
    assert_eq!(optional, 2, "the GeoIP databases");
    assert!(
        !text.contains("change-me"),
        "no placeholder default in the compose file"
    );
}

/// The README's Docker section calls only ports the compose file publishes, and names every
/// one it publishes.
#[test]
fn the_readmes_docker_section_matches_the_file() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let start = readme.find("### With Docker").expect("a Docker section");
    let section = &readme[start..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let mut called = BTreeSet::new();
    for (at, _) in section.match_indices("127.0.0.1:") {
        let port: String = section[at + 10..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        called.insert(port);
    }
    let compose = compose();
    let mut published = BTreeSet::new();
    for (_, service) in compose["services"].as_mapping().unwrap() {
        for port in service["ports"].as_sequence().into_iter().flatten() {
            let spec = port.as_str().unwrap();
            let parts: Vec<&str> = spec.split(':').collect();
            published.insert(parts[parts.len() - 2].to_owned());
        }
    }
    assert_eq!(called, published, "{section}");
    for needed in [
        "cp .env.example .env",
        "docker compose up",
        "CHECKPLANE_ADMIN_KEY",
    ] {
        assert!(section.contains(needed), "{needed} in {section}");
    }
}

/// The image's HEALTHCHECK is the script the Dockerfile copies in (the script itself runs
/// against the real services in `ansible::`).
#[test]
fn the_image_has_a_healthcheck() {
    let dockerfile = std::fs::read_to_string(workspace_root().join("Dockerfile")).unwrap();
    assert!(dockerfile
        .contains("COPY infra/docker/healthcheck /usr/local/bin/checkplane-healthcheck\n"));
    assert!(dockerfile.contains("    CMD [\"/usr/local/bin/checkplane-healthcheck\"]\n"));
    let script =
        std::fs::read_to_string(workspace_root().join("infra/docker/healthcheck")).unwrap();
    assert!(script.contains("\"$service\" healthcheck\n"));
}
