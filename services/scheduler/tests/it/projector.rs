//! The projector: exactly-once application under concurrency, reordering, duplicates, poison
//! entries, a killed process and restarted dependencies.

use std::time::Duration;

use checkplane_core::keys::Keys;
use checkplane_core::projection::{canonical_dump, record_and_apply};
use checkplane_core::projector::{Projector, ProjectorConfig};
use checkplane_testkit::events::{presence, registered, xadd};
use checkplane_testkit::process::{free_port, ServiceProcess};
use checkplane_testkit::servers::{PostgresServer, RedisServer};
use checkplane_testkit::{eventually, TestDb, TestRedis};
use checkplane_wire::events::Event;
use proptest::prelude::*;
use tokio_util::sync::CancellationToken;

fn projector(
    db: &TestDb,
    redis_url: &str,
    streams: Vec<String>,
    consumer: &str,
    configure: impl FnOnce(&mut ProjectorConfig),
) -> Projector {
    let pg = checkplane_runtime::db::pool(&db.config, 4).unwrap();
    let mut config = ProjectorConfig::new(streams, "projector", consumer);
    config.block = Duration::from_millis(50);
    configure(&mut config);
    Projector::new(config, pg, redis::Client::open(redis_url).unwrap())
}

async fn pending(redis: &TestRedis, stream: &str) -> i64 {
    let mut conn = redis.connection().await;
    let reply: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
        .arg(stream)
        .arg("projector")
        .query_async(&mut conn)
        .await
        .unwrap();
    reply.count() as i64
}

#[tokio::test]
async fn a_poison_event_is_parked_and_the_stream_keeps_flowing() {
    checkplane_runtime::telemetry::prometheus();
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let stream = Keys::new(redis.prefix.clone(), 1).presence_events(0);
    let mut conn = redis.connection().await;
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("event")
        .arg("{not json")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("other")
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    xadd(
        &mut conn,
        &stream,
        &presence("after-poison", 1, true, 1_000),
    )
    .await;

    let shutdown = CancellationToken::new();
    let task = tokio::spawn(
        projector(&db, &redis.url, vec![stream.clone()], "p1", |c| {
            c.max_attempts = 3
        })
        .run(shutdown.clone()),
    );
    eventually(
        "the good event applied",
        Duration::from_secs(10),
        || async {
            (crate::count(
                &db,
                "SELECT count(*) FROM agents WHERE agent_id = 'after-poison'",
            )
            .await
                == 1)
                .then_some(())
        },
    )
    .await;
    eventually(
        "both bad entries parked",
        Duration::from_secs(10),
        || async {
            (crate::count(&db, "SELECT count(*) FROM projection_failures").await == 2).then_some(())
        },
    )
    .await;
    let attempts = crate::count(&db, "SELECT min(attempts)::bigint FROM projection_failures").await;
    assert_eq!(attempts, 3);
    let error: String = db
        .client()
        .await
        .query_one(
            "SELECT error FROM projection_failures WHERE entry LIKE '{not json%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(error.contains("undecodable"), "{error}");
    eventually("nothing left pending", Duration::from_secs(5), || async {
        (pending(&redis, &stream).await == 0).then_some(())
    })
    .await;
    let metrics = checkplane_runtime::telemetry::prometheus().render();
    assert!(
        metrics.contains("checkplane_projector_parked_total"),
        "{metrics}"
    );
    shutdown.cancel();
    task.await.unwrap();
}

/// An event published from the outbox was applied in the transaction that wrote its outbox
/// row: the projector acknowledges it without applying it again. Shown with an event that
/// was published but never applied (which the outbox itself never does): it stays out of
/// PostgreSQL, while the plain entry beside it is applied.
#[tokio::test]
async fn an_event_published_from_the_outbox_is_acknowledged_without_a_transaction() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let stream = Keys::new(redis.prefix.clone(), 1).presence_events(0);
    let pool = deadpool_redis::Config::from_url(redis.url.as_str())
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .unwrap();
    let pg = checkplane_runtime::db::pool(&db.config, 2).unwrap();
    let edge = registered("published-edge", 1, 1_000);
    checkplane_core::outbox::publish(&pg, &pool, &stream, &edge, Duration::from_secs(5)).await;
    let mut conn = redis.connection().await;
    xadd(&mut conn, &stream, &registered("published-plain", 1, 1_000)).await;

    let shutdown = CancellationToken::new();
    let task = tokio::spawn(
        projector(&db, &redis.url, vec![stream.clone()], "p1", |_| {}).run(shutdown.clone()),
    );
    eventually(
        "both entries acknowledged",
        Duration::from_secs(10),
        || async {
            // The plain entry first: once applied, the projector's group exists.
            (crate::count(
                &db,
                "SELECT count(*) FROM agents WHERE agent_id = 'published-plain'",
            )
            .await
                == 1
                && pending(&redis, &stream).await == 0)
                .then_some(())
        },
    )
    .await;
    shutdown.cancel();
    task.await.unwrap();
    let edge_rows = crate::count(
        &db,
        &format!(
            "SELECT (SELECT count(*) FROM events WHERE event_id = '{}')
                  + (SELECT count(*) FROM agents WHERE agent_id = 'published-edge')",
            edge.event_id
        ),
    )
    .await;
    assert_eq!(edge_rows, 0, "the outbox's event was applied again");
}

/// A batch's slot statements read the checks it is about and their slots, not the whole of
/// `checks` and `check_slots`: on fresh tables (never analyzed, as on the benchmark's fresh
/// database) the planner believed small, one batch used to read every slot of every check.
#[tokio::test]
async fn a_batch_reads_only_its_own_checks_slots() {
    use checkplane_core::projection::record_and_apply_batch;
    let db = TestDb::new().await;
    let pg = db.client().await;
    assert!(record_and_apply(&pg, &check_created(10)).await.unwrap());
    // 80 other checks with 8,000 slots, written just now (as a busy installation's would be).
    pg.batch_execute(
        "INSERT INTO checks (check_id, kind, target, options, selection, status, slots,
                             created_at, created_by, deadline)
         SELECT md5('other' || c)::uuid, 'dns', 'example.com', '{}', '{}', 'in_progress', 100,
                now(), 'key:test', now() + interval '1 minute'
         FROM generate_series(1, 80) AS c;
         INSERT INTO check_slots (check_id, slot, attempt, agent_id, status)
         SELECT md5('other' || c)::uuid, s, 1, 'agent-' || s, 'pending'
         FROM generate_series(1, 80) AS c, generate_series(0, 99) AS s",
    )
    .await
    .unwrap();
    // Rows read by sequential scans of both tables so far.
    let seq_read = || async {
        let reader = db.client().await;
        reader
            .query_one(
                "SELECT pg_stat_clear_snapshot()::text, sum(seq_tup_read)::bigint
                 FROM pg_stat_user_tables WHERE relname IN ('checks', 'check_slots')",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(1)
    };
    pg.query_one("SELECT pg_stat_force_next_flush()", &[])
        .await
        .unwrap();
    let before = seq_read().await;
    // Every slot of the check granted and reported, in one batch.
    let events: Vec<Event> = (0..20)
        .flat_map(|slot| {
            check_task_events(
                &format!("agent-{}", slot / 2),
                &format!("{slot}-0"),
                Some(format!("{CHECK}:{slot}:1")),
                &[Step::Granted(1), Step::Reported(1)],
            )
        })
        .collect();
    let applied = record_and_apply_batch(&pg, &events).await.unwrap();
    assert_eq!(applied.applied, 40);
    pg.query_one("SELECT pg_stat_force_next_flush()", &[])
        .await
        .unwrap();
    let read = seq_read().await - before;
    let done: i64 = pg
        .query_one(
            "SELECT count(*) FROM check_slots WHERE check_id = $1 AND status = 'done'",
            &[&CHECK],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(done, 20, "the batch ended every slot of its check");
    assert!(
        read < 50,
        "the batch read {read} rows by sequential scan (81 checks, 8,020 slots)"
    );
}

/// A log of registrations and presence transitions of a few agents, in version order.
fn ordered_log(agents: usize, registrations: i64, transitions: i64) -> Vec<Event> {
    let mut log = Vec::new();
    for a in 0..agents {
        let agent = format!("agent-{a}");
        for v in 1..=registrations {
            log.push(registered(&agent, v, 1_000 * v));
        }
        for v in 1..=transitions {
            log.push(presence(&agent, v, v % 2 == 1, 10_000 + 1_000 * v));
        }
        // Two tasks: one run twice (Redis lost the first report) and reported twice, one
        // granted and closed.
        log.extend(task_events(
            &agent,
            "1-0",
            &[
                Step::Granted(1),
                Step::Extended(1),
                Step::Reported(1),
                Step::Granted(2),
                Step::Reported(2),
            ],
        ));
        log.extend(task_events(
            &agent,
            "2-0",
            &[Step::Granted(1), Step::Closed],
        ));
        // Two slots of one check: one reported, one closed by its deadline. Both projectors
        // move slots of the same check at once.
        let slot = |n: usize| Some(checkplane_wire::checks::task_id(CHECK, n as u32, 1));
        log.extend(check_task_events(
            &agent,
            "3-0",
            slot(2 * a),
            &[Step::Granted(1), Step::Reported(1)],
        ));
        log.extend(check_task_events(
            &agent,
            "4-0",
            slot(2 * a + 1),
            &[Step::Granted(1), Step::Closed],
        ));
    }
    log
}

enum Step {
    Granted(i64),
    Extended(i64),
    Reported(i64),
    Closed,
}

/// The check whose slots the log's check tasks move: one pair of slots per agent, made (as
/// the edge does) before any lease event is projected.
pub(crate) fn check_created(agents: usize) -> Event {
    use checkplane_wire::events::{CheckCreated, CheckSlot, EventBody, Location};
    let slots = (0..2 * agents)
        .map(|slot| CheckSlot {
            slot: slot as u32,
            agent_id: format!("agent-{}", slot / 2),
            location: Location::default(),
            constraint: None,
        })
        .collect();
    checkplane_wire::events::Event::new(
        format!("check:{CHECK}"),
        1,
        "key:test",
        EventBody::CheckCreated(Box::new(CheckCreated {
            check_id: CHECK,
            kind: "dns".into(),
            target: "example.com".into(),
            options: serde_json::json!({}),
            selection: serde_json::json!({"anywhere": 2 * agents}),
            deadline: 900_000,
            slots,
            max_parallel: None,
        })),
    )
}

pub(crate) const CHECK: uuid::Uuid =
    uuid::Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);

/// The lease events of one task, versions 1, 2, … in order, as the scripts make them.
fn task_events(agent: &str, entry: &str, steps: &[Step]) -> Vec<Event> {
    check_task_events(agent, entry, None, steps)
}

/// The same for a task of a check slot (`task`: its id).
fn check_task_events(agent: &str, entry: &str, task: Option<String>, steps: &[Step]) -> Vec<Event> {
    use checkplane_wire::events::{
        EventBody, LeaseClosed, LeaseExtended, LeaseGranted, LeaseReported,
    };
    steps
        .iter()
        .enumerate()
        .map(|(i, step)| {
            let version = i64::try_from(i).unwrap() + 1;
            let at = 100_000 + 1_000 * version;
            let (aggregate, body) = match step {
                Step::Granted(epoch) => (
                    None,
                    EventBody::LeaseGranted(LeaseGranted {
                        task: task.clone(),
                        agent_id: agent.into(),
                        kind: "dns".into(),
                        entry: entry.into(),
                        epoch: *epoch,
                        deadline: at + 30_000,
                    }),
                ),
                Step::Extended(epoch) => (
                    Some(format!("extend:{agent}")),
                    EventBody::LeaseExtended(LeaseExtended {
                        agent_id: agent.into(),
                        tokens: vec![format!("{agent}.dns.{entry}.{epoch}")],
                        deadline: at + 60_000,
                    }),
                ),
                Step::Reported(epoch) => (
                    None,
                    EventBody::LeaseReported(LeaseReported {
                        task: task.clone(),
                        agent_id: agent.into(),
                        kind: "dns".into(),
                        entry: entry.into(),
                        epoch: *epoch,
                        outcome: "finished".into(),
                        result: serde_json::json!({"run": epoch}),
                    }),
                ),
                Step::Closed => (
                    None,
                    EventBody::LeaseClosed(LeaseClosed {
                        task: task.clone(),
                        agent_id: agent.into(),
                        kind: "dns".into(),
                        entry: entry.into(),
                        reason: "timeout".into(),
                    }),
                ),
            };
            Event {
                event_id: uuid::Uuid::now_v7(),
                aggregate_id: aggregate.unwrap_or_else(|| format!("task:{agent}:dns:{entry}")),
                version,
                occurred_at: at,
                actor: format!("agent:{agent}"),
                schema: 1,
                body,
            }
        })
        .collect()
}

async fn project_concurrently(
    setup: &Event,
    log: &[Event],
    order: &[usize],
    duplicates: &[usize],
) -> Vec<(String, Vec<String>)> {
    let db = TestDb::new().await;
    assert!(record_and_apply(&db.client().await, setup).await.unwrap());
    let redis = TestRedis::new();
    let keys = Keys::new(redis.prefix.clone(), 2);
    let streams = vec![keys.presence_events(0), keys.presence_events(1)];
    let mut conn = redis.connection().await;
    let mut entries = 0;
    for (i, &index) in order.iter().enumerate() {
        xadd(&mut conn, &streams[i % 2], &log[index]).await;
        entries += 1;
    }
    for &index in duplicates {
        xadd(&mut conn, &streams[index % 2], &log[index]).await;
        entries += 1;
    }
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    for consumer in ["a", "b"] {
        let p = projector(&db, &redis.url, streams.clone(), consumer, |c| c.batch = 3);
        tasks.push(tokio::spawn(p.run(shutdown.clone())));
    }
    eventually(
        "every entry acknowledged",
        Duration::from_secs(30),
        || async {
            let mut c = redis.connection().await;
            let mut acked = true;
            for stream in &streams {
                let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg(stream)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                let group = groups.groups.iter().find(|g| g.name == "projector");
                acked &= group.is_some_and(|g| g.pending == 0 && g.lag == Some(0));
            }
            acked.then_some(())
        },
    )
    .await;
    shutdown.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    assert!(entries >= log.len());
    let unique = crate::count(&db, "SELECT count(*) FROM events").await;
    assert_eq!(
        unique as usize,
        log.len() + 1,
        "every event recorded exactly once"
    );
    canonical_dump(&db.client().await).await.unwrap()
}

async fn project_in_order(setup: &Event, log: &[Event]) -> Vec<(String, Vec<String>)> {
    let db = TestDb::new().await;
    let client = db.client().await;
    for event in std::iter::once(setup).chain(log) {
        assert!(record_and_apply(&client, event).await.unwrap());
    }
    canonical_dump(&client).await.unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    /// Two projectors over a shuffled, partly duplicated log leave the same tables as the log
    /// applied in order. Without the dedupe, duplicates count twice in `status_changes`;
    /// without the version guard, an older status overwrites a newer one.
    #[test]
    fn concurrent_projectors_over_a_shuffled_duplicated_log_match_the_ordered_log(
        agents in 1usize..4,
        registrations in 1i64..4,
        transitions in 1i64..6,
        seed in any::<u64>(),
        duplicate_every in 2usize..5,
    ) {
        let log = ordered_log(agents, registrations, transitions);
        let mut order: Vec<usize> = (0..log.len()).collect();
        // Deterministic shuffle from the seed (Fisher-Yates with an LCG).
        let mut state = seed | 1;
        for i in (1..order.len()).rev() {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let j = (state >> 33) as usize % (i + 1);
            order.swap(i, j);
        }
        let duplicates: Vec<usize> = order.iter().copied().step_by(duplicate_every).collect();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let check = check_created(agents);
        let (concurrent, ordered) = runtime.block_on(async {
            let concurrent = project_concurrently(&check, &log, &order, &duplicates).await;
            let ordered = project_in_order(&check, &log).await;
            (concurrent, ordered)
        });
        // The check finished with every slot ended once, whatever the order.
        let checks = &ordered.iter().find(|(t, _)| t == "checks").unwrap().1;
        prop_assert!(checks[0].contains(r#""status": "finished""#), "{:?}", checks);
        prop_assert_eq!(concurrent, ordered);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_mid_batch_and_restarted_dependencies_still_project_exactly_once() {
    let pg = PostgresServer::start();
    let mut redis_server = RedisServer::start();
    let prefix = "kill";
    let keys = Keys::new(prefix, 4);
    let total: i64 = 3_000;
    {
        let client = redis::Client::open(redis_server.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        // Recent times: events older than the retention would be deleted by the scheduler.
        let now = checkplane_runtime::clock::now_ms();
        for i in 0..total {
            let agent = format!("a{}", i % 50);
            let event = presence(&agent, i + 1, i % 2 == 0, now + i);
            xadd(
                &mut conn,
                &keys.presence_events(keys.shard_of(&agent)),
                &event,
            )
            .await;
        }
    }
    let (pg_url, redis_url) = (pg.url(), redis_server.url());
    let env = |port: u16| {
        vec![
            ("DATABASE_URL".to_owned(), pg_url.clone()),
            ("REDIS_URL".to_owned(), redis_url.clone()),
            ("STREAM_PREFIX".to_owned(), prefix.to_owned()),
            ("HTTP_ADDR".to_owned(), format!("127.0.0.1:{port}")),
            ("CONSUMER_NAME".to_owned(), "replica-1".to_owned()),
        ]
    };
    let mut first = ServiceProcess::spawn(crate::bin(), &[], &env(free_port()));
    let applied = || async {
        let client = checkplane_runtime::db::connect(&pg.url().parse().unwrap())
            .await
            .ok()?;
        let n: i64 = client
            .query_one("SELECT count(*) FROM events", &[])
            .await
            .ok()?
            .get(0);
        Some(n)
    };
    eventually("some events applied", Duration::from_secs(30), || async {
        applied().await.filter(|n| *n > 0)
    })
    .await;
    first.signal("KILL");
    first.wait(Duration::from_secs(5)).unwrap();

    pg.stop();
    pg.resume();
    redis_server.stop();
    redis_server.resume();

    let second = ServiceProcess::spawn(crate::bin(), &[], &env(free_port()));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = applied().await;
        if n == Some(total) {
            break;
        }
        if std::time::Instant::now() > deadline {
            let client = redis::Client::open(redis_url.as_str()).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let mut state = String::new();
            for shard in 0..4 {
                let stream = keys.presence_events(shard);
                let info: redis::Value = redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg(&stream)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                let len: i64 = redis::cmd("XLEN")
                    .arg(&stream)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                state.push_str(&format!("{stream} len={len} groups={info:?}\n"));
            }
            panic!(
                "{n:?} of {total} applied; redis:\n{state}\nscheduler log:\n{}",
                second.stderr()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = checkplane_runtime::db::connect(&pg.url().parse().unwrap())
        .await
        .unwrap();
    let history: i64 = client
        .query_one("SELECT count(*) FROM agent_status_history", &[])
        .await
        .unwrap()
        .get(0);
    let changes: i64 = client
        .query_one("SELECT sum(status_changes)::bigint FROM agents", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        (history, changes),
        (total, total),
        "each event applied exactly once"
    );
}

#[tokio::test]
async fn streams_are_trimmed_below_every_group_and_idle_consumers_removed() {
    checkplane_runtime::telemetry::prometheus();
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let stream = Keys::new(redis.prefix.clone(), 1).presence_events(0);
    let mut conn = redis.connection().await;
    let now = checkplane_runtime::clock::now_ms();
    for v in 1..=20 {
        xadd(&mut conn, &stream, &presence("trim", v, v % 2 == 1, now)).await;
    }
    // A second group that reads and never acknowledges, and a consumer that never reads.
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("laggard")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("laggard")
        .arg("l1")
        .arg("COUNT")
        .arg(5)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("projector")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: i64 = redis::cmd("XGROUP")
        .arg("CREATECONSUMER")
        .arg(&stream)
        .arg("projector")
        .arg("ghost")
        .query_async(&mut conn)
        .await
        .unwrap();

    let len = |mut c: redis::aio::MultiplexedConnection, s: String| async move {
        redis::cmd("XLEN")
            .arg(s)
            .query_async::<i64>(&mut c)
            .await
            .unwrap()
    };
    let shutdown = CancellationToken::new();
    // The laggard holds trimming back: its first pending entry stays.
    let task = tokio::spawn(
        projector(&db, &redis.url, vec![stream.clone()], "p1", |c| {
            c.housekeeping_every = Duration::from_millis(50);
            c.idle_consumer_after = Duration::from_millis(100);
        })
        .run(shutdown.clone()),
    );
    eventually("all applied", Duration::from_secs(10), || async {
        (crate::count(&db, "SELECT count(*) FROM agent_status_history").await == 20).then_some(())
    })
    .await;
    // The housekeeping (every 50 ms) trims what every group acknowledged and deletes the
    // consumer idle past 100 ms: waited for, not slept through.
    let consumers = |mut c: redis::aio::MultiplexedConnection, s: String| async move {
        let reply: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(s)
            .arg("projector")
            .query_async(&mut c)
            .await
            .unwrap();
        reply
            .consumers
            .iter()
            .map(|c| c.name.clone())
            .collect::<Vec<String>>()
    };
    let names = eventually(
        "the idle consumer deleted",
        Duration::from_secs(10),
        || async {
            let names = consumers(conn.clone(), stream.clone()).await;
            (names.len() == 1).then_some(names)
        },
    )
    .await;
    assert_eq!(
        len(conn.clone(), stream.clone()).await,
        20,
        "the laggard's entries were trimmed"
    );
    assert_eq!(names, ["p1"], "the idle consumer was not deleted");
    shutdown.cancel();
    task.await.unwrap();

    // Declared stalled, the laggard no longer pins the stream: it is trimmed to what the
    // projector acknowledged, and the stall is a metric.
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(
        projector(&db, &redis.url, vec![stream.clone()], "p1", |c| {
            c.housekeeping_every = Duration::from_millis(50);
            c.stall_after = Duration::from_millis(1);
        })
        .run(shutdown.clone()),
    );
    eventually(
        "trimmed past the stalled group",
        Duration::from_secs(10),
        || async { (len(conn.clone(), stream.clone()).await <= 1).then_some(()) },
    )
    .await;
    let metrics = checkplane_runtime::telemetry::prometheus().render();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("checkplane_stream_group_stalled")
                && l.contains("laggard")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    shutdown.cancel();
    task.await.unwrap();
}
