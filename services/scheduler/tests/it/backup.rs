//! scripts/backup and scripts/restore (issue 26): a backup of a database with a row in every
//! projection table, restored into another (empty) database, has every projection table equal
//! (canonical dump); `scheduler rebuild` from the restored `events` reproduces them again. A
//! restore into a database with tables is refused without `--force`; a backup whose checksum
//! does not match is refused.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use checkplane_core::projection::canonical_dump;
use checkplane_testkit::{workspace_root, TestDb};

fn script(name: &str, args: &[&str], url: &str) -> Output {
    Command::new(workspace_root().join("scripts").join(name))
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("DATABASE_URL", url)
        .output()
        .unwrap_or_else(|e| panic!("scripts/{name}: {e}"))
}

fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_restored_into_another_database_has_every_projection_and_rebuilds_them() {
    let live = crate::rebuild::every_table_filled().await;
    let before = canonical_dump(&live.client().await).await.unwrap();
    assert!(
        before.iter().all(|(_, rows)| !rows.is_empty()),
        "{before:?}"
    );

    let dir = checkplane_testkit::servers::scratch_dir("backup");
    let (backups, copies, config) = (dir.join("backups"), dir.join("copies"), dir.join("etc"));
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(
        config.join("scheduler.env"),
        "DATABASE_URL=postgres://secret\n",
    )
    .unwrap();
    let dirs = [
        backups.to_str().unwrap(),
        copies.to_str().unwrap(),
        config.to_str().unwrap(),
    ];
    let args = [
        "--dir",
        dirs[0],
        "--keep",
        "2",
        "--copy-to",
        dirs[1],
        "--config",
        dirs[2],
    ];
    for round in 0..3 {
        let out = tokio::task::block_in_place(|| script("backup", &args, &live.url));
        assert!(out.status.success(), "{}", said(&out));
        assert!(
            said(&out).contains("backup: wrote checkplane-"),
            "{}",
            said(&out)
        );
        assert!(
            !said(&out).contains(&live.url),
            "the URL stays out of its output"
        );
        if round < 2 {
            // Names are per second.
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
    }
    let mut sets: Vec<String> = std::fs::read_dir(&backups)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    sets.sort();
    assert_eq!(
        sets.len(),
        6,
        "the newest 2 of 3, three files each: {sets:?}"
    );
    let newest = sets.iter().rfind(|f| f.ends_with(".dump")).unwrap().clone();
    let dump = backups.join(&newest);
    for file in &sets {
        assert_eq!(mode(&backups.join(file)), 0o600, "{file}");
    }
    assert_eq!(
        std::fs::read(copies.join(&newest)).unwrap(),
        std::fs::read(&dump).unwrap(),
        "the copy"
    );
    assert_eq!(std::fs::read_dir(&copies).unwrap().count(), 6);

    // Into another, empty database: every projection table equal.
    let restored = TestDb::empty().await;
    let dump_arg = dump.to_str().unwrap();
    let out = tokio::task::block_in_place(|| script("restore", &[dump_arg], &restored.url));
    assert!(out.status.success(), "{}", said(&out));
    assert_eq!(
        canonical_dump(&restored.client().await).await.unwrap(),
        before
    );

    // Again into it, now that it has tables: refused; with --force, replaced.
    let out = tokio::task::block_in_place(|| script("restore", &[dump_arg], &restored.url));
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    assert!(said(&out).contains("add --force"), "{}", said(&out));
    let out =
        tokio::task::block_in_place(|| script("restore", &["--force", dump_arg], &restored.url));
    assert!(out.status.success(), "{}", said(&out));
    assert_eq!(
        canonical_dump(&restored.client().await).await.unwrap(),
        before
    );

    // `rebuild` from the restored events reproduces them.
    crate::rebuild_binary(&restored.url);
    assert_eq!(
        canonical_dump(&restored.client().await).await.unwrap(),
        before
    );

    // A dump that does not match its checksum is not restored.
    let other = TestDb::empty().await;
    let mut bytes = std::fs::read(&dump).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&dump, bytes).unwrap();
    let out = tokio::task::block_in_place(|| script("restore", &[dump_arg], &other.url));
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    assert!(
        said(&out).contains("does not match its checksums"),
        "{}",
        said(&out)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
