//! The harness gives each test its own database and key prefix, and takes them away after.

use std::time::Duration;

use checkplane_testkit::{deps, TestDb, TestRedis};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn database_exists(name: &str) -> bool {
    let admin = checkplane_runtime::db::connect(&deps().pg_url.parse().unwrap())
        .await
        .unwrap();
    admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .unwrap()
        .is_some()
}

#[tokio::test]
async fn each_test_database_is_migrated_private_and_dropped() {
    let a = TestDb::new().await;
    let b = TestDb::new().await;
    assert_ne!(a.name, b.name);
    let installs: i64 = a
        .client()
        .await
        .query_one("SELECT count(*) FROM installation", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(installs, 1, "the template is migrated");
    a.client()
        .await
        .batch_execute("CREATE TABLE only_in_a (x int)")
        .await
        .unwrap();
    let in_b = b
        .client()
        .await
        .query_opt("SELECT 1 FROM pg_tables WHERE tablename = 'only_in_a'", &[])
        .await
        .unwrap();
    assert!(in_b.is_none(), "databases are separate");

    let name = a.name.clone();
    assert!(database_exists(&name).await);
    drop(a);
    assert!(!database_exists(&name).await, "{name} was not dropped");
}

#[tokio::test]
async fn an_empty_database_has_no_schema() {
    let db = TestDb::empty().await;
    let tables: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0);
}

#[tokio::test]
async fn redis_keys_under_a_test_prefix_are_deleted_after() {
    let mine = TestRedis::new();
    let other = TestRedis::new();
    assert_ne!(mine.prefix, other.prefix);
    let mut conn = mine.connection().await;
    let mine_key = format!("{}:k", mine.prefix);
    let other_key = format!("{}:k", other.prefix);
    let _: () = redis::cmd("SET")
        .arg(&mine_key)
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&other_key)
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    drop(mine);
    let left: i64 = redis::cmd("EXISTS")
        .arg(&mine_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let kept: i64 = redis::cmd("EXISTS")
        .arg(&other_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!((left, kept), (0, 1));
}

async fn runtime_api(addr: std::net::SocketAddr, command: &str) -> String {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
    stream
        .write_all(format!("{command}\n").as_bytes())
        .await
        .unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut reply))
        .await
        .unwrap()
        .unwrap();
    reply
}

#[tokio::test]
async fn the_private_haproxy_answers_its_runtime_api() {
    let reply = runtime_api(deps().haproxy_stats, "show info").await;
    assert!(reply.contains("\nPid: "), "{reply}");
    let state = runtime_api(deps().haproxy_stats, "show servers state be_app").await;
    let servers: Vec<&str> = state
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(3))
        .collect();
    assert_eq!(servers, ["s1", "s2"], "{state}");
    assert!(deps().haproxy_admin_socket.exists());
}
