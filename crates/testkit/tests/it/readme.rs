//! The README is the operator's first page: its configuration table and commands must be
//! the real ones.

use checkplane_testkit::workspace_root;

fn read(path: &str) -> String {
    std::fs::read_to_string(workspace_root().join(path)).unwrap()
}

#[test]
fn the_configuration_table_lists_every_variable_and_nothing_else() {
    let readme = read("README.md");
    let listed: Vec<&str> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|n| {
            n.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .collect();
    for var in checkplane_runtime::vars::ALL {
        assert!(
            listed.contains(&var.name),
            "README does not document {}",
            var.name
        );
    }
    for name in &listed {
        assert!(
            checkplane_runtime::vars::is_known(name),
            "README documents {name}, which no service reads"
        );
    }
}

#[test]
fn ci_runs_the_readme_test_command() {
    let readme = read("README.md");
    let ci = read(".ci/run");
    assert!(readme.contains("./stand test"));
    assert!(readme.contains("./stand up"));
    let commands: Vec<&str> = ci
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter(|l| !l.starts_with("set ") && !l.starts_with("export ") && !l.starts_with("cd "))
        .collect();
    assert_eq!(
        commands,
        ["exec ./stand test"],
        ".ci/run must run the README's test command only"
    );
}
