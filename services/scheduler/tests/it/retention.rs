//! `events` stays partitioned by day and within its retention.

use std::time::Duration;

use checkplane_core::retention::maintain_events;
use checkplane_testkit::events::presence;
use checkplane_testkit::TestDb;

use crate::count;

#[tokio::test]
async fn partitions_are_made_ahead_and_expired_days_dropped() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let day_ms: i64 = 86_400_000;
    let now = checkplane_runtime::clock::now_ms();
    // An event from 40 days ago lands in the default partition; one from 10 days ago too.
    for (age_days, version) in [(40, 1), (10, 2), (0, 3)] {
        let event = presence("old", version, true, now - age_days * day_ms);
        checkplane_core::projection::record(&client, &event)
            .await
            .unwrap();
    }
    // A whole daily partition from 35 days ago, as an older install would have left.
    client
        .query_one(
            "SELECT cp_ensure_event_partition((current_date - 35)::date)",
            &[],
        )
        .await
        .unwrap();

    let done = maintain_events(&mut client, Duration::from_secs(30 * 86_400))
        .await
        .unwrap();
    assert_eq!(done.dropped, 1, "{done:?}");
    assert_eq!(
        done.deleted, 1,
        "only the 40-day-old event is past the retention: {done:?}"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 2);
    let ahead = count(
        &db,
        "SELECT count(*) FROM pg_class WHERE relname = 'events_p' || to_char(current_date + 7, 'YYYYMMDD')",
    )
    .await;
    assert_eq!(ahead, 1, "a partition a week ahead exists");
    // Running it again changes nothing.
    let again = maintain_events(&mut client, Duration::from_secs(30 * 86_400))
        .await
        .unwrap();
    assert_eq!((again.created, again.dropped, again.deleted), (0, 0, 0));
}

#[tokio::test]
async fn old_results_and_metrics_are_deleted_in_batches() {
    use checkplane_core::retention::{trim_results, Ages};
    let db = TestDb::new().await;
    let client = db.client().await;
    // Five checks finished 40 days ago, one 10 days ago, one still running from 40 days ago
    // (it is not finished, so it stays), each with a slot.
    client
        .batch_execute(
            "INSERT INTO checks (check_id, kind, target, options, selection, status, slots,
                                 created_at, created_by, deadline, finished_at)
             SELECT gen_random_uuid(), 'dns', 'example.com', '{}', '{}', st, 1,
                    now() - age, 'test', now() - age, CASE WHEN st = 'finished' THEN now() - age END
             FROM (VALUES ('finished', interval '40 days'), ('finished', interval '40 days'),
                          ('finished', interval '40 days'), ('finished', interval '40 days'),
                          ('finished', interval '40 days'), ('finished', interval '10 days'),
                          ('in_progress', interval '40 days')) AS v(st, age);
             INSERT INTO check_slots (check_id, slot, attempt, status)
             SELECT check_id, 0, 1, 'done' FROM checks;
             INSERT INTO agent_metrics (agent_id, recorded_at, metrics)
             SELECT 'agt-' || i, now() - (i || ' days')::interval + interval '12 hours', '{}'
             FROM generate_series(1, 45) AS i;
             INSERT INTO concurrency_windows (agent_id, recorded_at, window_size, max_window,
                                              inflight, queued, backpressure)
             SELECT 'agt-1', now() - (i || ' days')::interval + interval '12 hours', 4, 8, 4, 0, false
             FROM generate_series(1, 35) AS i;
             INSERT INTO haproxy_server_status_history (event_id, server_id, occurred_at, new_state,
                                                        changed_by, poll)
             SELECT gen_random_uuid(), 'hps-x', now() - (i || ' days')::interval + interval '12 hours',
                    'ready', 'sync', i
             FROM generate_series(1, 33) AS i;",
        )
        .await
        .unwrap();
    let month = Duration::from_secs(30 * 86_400);
    let ages = Ages {
        results: month,
        metrics: month,
        history: month,
    };
    let done = trim_results(&client, ages, 2).await.unwrap();
    assert_eq!(
        (done.checks, done.metrics, done.windows),
        (5, 15, 5),
        "{done:?}"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM checks").await, 2);
    assert_eq!(
        count(&db, "SELECT count(*) FROM check_slots").await,
        2,
        "slots go with their check"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM agent_metrics").await, 30);
    let again = trim_results(&client, ages, 2).await.unwrap();
    assert_eq!(
        (again.checks, again.metrics, again.windows, again.history),
        (0, 0, 0, 0)
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM haproxy_server_status_history").await,
        30
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM concurrency_windows").await,
        30
    );
}
