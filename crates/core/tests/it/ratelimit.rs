//! The rate limiter against a real Redis: one budget shared by every replica, counted on
//! Redis's clock, and the in-memory fallback when Redis fails mid-call.

use std::time::Duration;

use checkplane_core::keys::Keys;
use checkplane_core::ratelimit::{Limiter, Rate};
use checkplane_testkit::servers::RedisServer;
use checkplane_testkit::TestRedis;

#[tokio::test]
async fn replicas_on_one_redis_share_one_budget() {
    let redis = TestRedis::new();
    let keys = Keys::new(redis.prefix.clone(), 1);
    // Two gateways' limiters, each with its own connection.
    let (one, two) = (Limiter::new(keys.clone()), Limiter::new(keys.clone()));
    let (mut a, mut b) = (redis.connection().await, redis.connection().await);
    let rate = Rate::parse("6/1m:3").unwrap();

    let first = one.check(Some(&mut a), "heartbeat", "agt-1", &rate).await;
    let second = two.check(Some(&mut b), "heartbeat", "agt-1", &rate).await;
    let third = one.check(Some(&mut a), "heartbeat", "agt-1", &rate).await;
    for (d, left) in [(first, 2), (second, 1), (third, 0)] {
        assert!(d.allowed && d.shared, "{d:?}");
        assert_eq!((d.limit, d.remaining), (3, left), "{d:?}");
    }
    let refused = two.check(Some(&mut b), "heartbeat", "agt-1", &rate).await;
    assert!(!refused.allowed && refused.shared, "{refused:?}");
    assert_eq!(refused.remaining, 0);
    // One call per 10 s: the next is due within 10 s, the whole burst within 30 s.
    assert!(
        refused.retry_after > Duration::ZERO && refused.retry_after <= Duration::from_secs(10),
        "{refused:?}"
    );
    assert!(refused.reset > Duration::from_secs(20) && refused.reset <= Duration::from_secs(30));

    // Looking does not count: the burst of another caller is whole after any number of looks.
    for _ in 0..5 {
        let look = one.peek(Some(&mut a), "auth", "10.0.0.1", &rate).await;
        assert!(look.allowed && look.remaining == 2, "{look:?}");
    }

    // Other callers and other endpoints have their own budgets.
    assert!(
        one.check(Some(&mut a), "heartbeat", "agt-2", &rate)
            .await
            .allowed
    );
    assert!(
        one.check(Some(&mut a), "report", "agt-1", &rate)
            .await
            .allowed
    );

    // The state expires with its last call's interval: nothing is left behind.
    let ttl: i64 = redis::cmd("PTTL")
        .arg(keys.rate("heartbeat", "agt-1"))
        .query_async(&mut a)
        .await
        .unwrap();
    assert!(ttl > 20_000 && ttl <= 30_000, "{ttl}");
}

#[tokio::test]
async fn a_redis_that_fails_mid_call_falls_back_to_counting_in_memory() {
    let mut server = RedisServer::start();
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let limiter = Limiter::new(Keys::new("t", 1));
    let rate = Rate::parse("1/1m:1").unwrap();
    let shared = limiter
        .check(Some(&mut conn), "claim", "agt-1", &rate)
        .await;
    assert!(shared.allowed && shared.shared);

    server.stop();
    // The fallback has its own count (it cannot know Redis's): one call, then refused.
    let first = limiter
        .check(Some(&mut conn), "claim", "agt-1", &rate)
        .await;
    assert!(first.allowed && !first.shared, "{first:?}");
    let second = limiter
        .check(Some(&mut conn), "claim", "agt-1", &rate)
        .await;
    assert!(!second.allowed && !second.shared, "{second:?}");
    assert!(second.retry_after > Duration::from_secs(50), "{second:?}");
}

// Real time: paused time would fire the limiter's timeout before a live Redis answers.
#[tokio::test]
async fn a_hung_redis_is_given_up_on_at_once_and_asked_again_a_moment_later() {
    let server = RedisServer::start();
    let client = redis::Client::open(server.url()).unwrap();
    // No response timeout of its own (the client's default is 500 ms): only the limiter's
    // stands between a call and a hang.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap();
    let limiter = Limiter::new(Keys::new("t", 1));
    let rate = Rate::parse("10/1m:10").unwrap();
    assert!(
        limiter
            .check(Some(&mut conn), "claim", "agt-1", &rate)
            .await
            .shared
    );

    server.freeze();
    let hung = limiter
        .check(Some(&mut conn), "claim", "agt-1", &rate)
        .await;
    assert!(hung.allowed && !hung.shared, "{hung:?}");
    server.thaw();
    // Redis answers again, but it is not asked until its rest is over.
    let resting = limiter
        .check(Some(&mut conn), "claim", "agt-1", &rate)
        .await;
    assert!(!resting.shared, "{resting:?}");
    tokio::time::sleep(checkplane_core::ratelimit::REDIS_RETRY).await;
    let back = limiter
        .check(Some(&mut conn), "claim", "agt-1", &rate)
        .await;
    assert!(back.shared && back.allowed, "{back:?}");
    // Redis counted the first call, this one, and the one given up on (it was sent, and ran
    // once Redis woke): a call given up on may still count, never the resting ones.
    assert_eq!(back.remaining, 7, "{back:?}");
}
