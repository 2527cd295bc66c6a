//! `events` stays partitioned by day and within its retention.

use std::time::Duration;

use checkplane_runtime::retention::maintain_events;
use checkplane_testkit::events::presence;
use checkplane_testkit::TestDb;

use crate::count;

#[tokio::test]
async fn partitions_are_made_ahead_and_expired_days_dropped() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let day_ms: i64 = 86_400_000;
    let now = checkplane_runtime::clock::now_ms();
    // An event from 40 days ago lands in the default partition; one from 10 days ago too.
    for (age_days, version) in [(40, 1), (10, 2), (0, 3)] {
        let event = presence("old", version, true, now - age_days * day_ms);
        checkplane_runtime::projection::record(&client, &event)
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

    let done = maintain_events(&client, Duration::from_secs(30 * 86_400))
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
    let again = maintain_events(&client, Duration::from_secs(30 * 86_400))
        .await
        .unwrap();
    assert_eq!((again.created, again.dropped, again.deleted), (0, 0, 0));
}
