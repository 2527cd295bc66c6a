//! The presence scripts on a 3-node Redis Cluster: every key a script touches is passed in
//! KEYS and shares the shard's hash tag, so Redis routes each call to one node.

use checkplane_core::keys::Keys;
use checkplane_core::presence::Presence;
use checkplane_testkit::servers::RedisCluster;

#[tokio::test]
async fn presence_scripts_run_on_a_cluster() {
    let cluster = RedisCluster::start();
    let mut conn = cluster.connection().await;
    let keys = Keys::new("cp", 4);
    let presence = Presence::new(keys.clone());
    let agents: Vec<String> = (0..16).map(|i| format!("agent-{i}")).collect();
    let shards: std::collections::BTreeSet<u32> = agents.iter().map(|a| keys.shard_of(a)).collect();
    assert_eq!(shards.len(), 4, "the agents cover every shard");

    for agent in &agents {
        let beat = presence
            .heartbeat(&mut conn, agent, 1_000, 100)
            .await
            .unwrap();
        assert!(beat.came_online);
    }
    let mut marked = 0;
    for n in 0..4 {
        // The first sweep holds back one grace period; sweeps closer together than the grace
        // then go on.
        assert!(
            presence
                .sweep(&mut conn, n, 2_000, 500, 100)
                .await
                .unwrap()
                .resuming
        );
        assert!(
            presence
                .sweep(&mut conn, n, 2_300, 500, 100)
                .await
                .unwrap()
                .resuming
        );
        marked += presence
            .sweep(&mut conn, n, 2_500, 500, 100)
            .await
            .unwrap()
            .marked;
    }
    assert_eq!(marked, 16);
    let mut events = 0;
    for n in 0..4 {
        let len: i64 = redis::cmd("XLEN")
            .arg(keys.presence_events(n))
            .query_async(&mut conn)
            .await
            .unwrap();
        events += len;
    }
    assert_eq!(events, 32, "one online and one offline event per agent");
}
