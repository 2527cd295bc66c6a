//! Applications against a real HAProxy: servers link by name template and by IP:port (an
//! application made after its servers were seen links them too), a batch over a group drains
//! every server of its applications (read back through the socket), and the links survive a
//! backend renamed by a reload through the master CLI.

use std::time::Duration;

use checkplane_testkit::haproxy::Haproxy;
use checkplane_testkit::{eventually, TestDb, TestRedis};
use serde_json::{json, Value};

use crate::actions::{admin_bits_in, settled};
use crate::sync::{call, gateway, haproxy_sync_with, servers_page, Service};

async fn post(http: &reqwest::Client, gw: &Service, path: &str, body: Value) -> (u16, Value) {
    call(http, gw, "POST", path, Some(body)).await
}

/// The linked servers of `app` once there are `n`.
async fn linked(http: &reqwest::Client, gw: &Service, app: &str, n: usize) -> Vec<Value> {
    eventually("servers linked", Duration::from_secs(15), || async {
        let (_, page) = call(
            http,
            gw,
            "GET",
            &format!("/v1/applications/{app}/servers"),
            None,
        )
        .await;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        (items.len() == n).then_some(items)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn servers_link_to_applications_and_a_group_batch_drains_them_across_a_rename() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let layout = |shop_backend: &'static str| {
        vec![
            (
                shop_backend,
                vec![("web1_shop_1", 18401), ("web2_shop_1", 18402)],
            ),
            ("be_api", vec![("api-a", 18501), ("api-b", 18502)]),
            ("be_misc", vec![("web1_blog_1", 18601)]),
        ]
    };
    let ha = Haproxy::start(&layout("be_shop"));
    let gw = gateway(&db, &redis).await;
    let http = reqwest::Client::new();

    // An application by name, made before its servers are seen.
    let (status, shop) = post(&http, &gw, "/v1/applications", json!({"name": "shop"})).await;
    assert_eq!(status, 201, "{shop}");
    assert_eq!(shop["linked_by"], "name");
    let shop = shop["id"].as_str().unwrap().to_owned();
    let (status, taken) = post(&http, &gw, "/v1/applications", json!({"name": "shop"})).await;
    assert_eq!(status, 409, "{taken}");
    let (status, bad) = post(
        &http,
        &gw,
        "/v1/applications",
        json!({"name": "api", "port": 18501}),
    )
    .await;
    assert_eq!(status, 422, "{bad}");
    assert!(bad["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("addresses"));

    let (status, instance) = post(
        &http,
        &gw,
        "/v1/haproxy/instances",
        json!({"name": "lb-apps", "address": ha.stats.to_string()}),
    )
    .await;
    assert_eq!(status, 201, "{instance}");
    let _sync = haproxy_sync_with(&db, &redis, &[]).await;
    let shop_servers = linked(&http, &gw, &shop, 2).await;
    assert!(shop_servers
        .iter()
        .all(|s| s["matched_by"] == "name" && s["backend"] == "be_shop"));
    let names: Vec<&str> = shop_servers
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web1_shop_1", "web2_shop_1"], "not web1_blog_1");

    // An application by IP:port, made after its server was seen: only api-a has its port.
    let (status, api) = post(
        &http,
        &gw,
        "/v1/applications",
        json!({"name": "api", "port": 18501, "addresses": ["127.0.0.1"]}),
    )
    .await;
    assert_eq!(status, 201, "{api}");
    assert_eq!(api["servers"], 1, "{api}");
    let api = api["id"].as_str().unwrap().to_owned();
    let api_servers = linked(&http, &gw, &api, 1).await;
    assert_eq!(api_servers[0]["name"], "api-a");
    assert_eq!(api_servers[0]["matched_by"], "address");

    // The server view names its application.
    let backend = api_servers[0]["backend"].as_str().unwrap();
    let backend_id =
        checkplane_wire::haproxy::backend_id(instance["id"].as_str().unwrap(), backend);
    let page = servers_page(&http, &gw, &backend_id).await;
    assert_eq!(page["items"][0]["applications"][0]["name"], "api");
    assert_eq!(page["items"][1]["applications"], json!([]), "{page}");

    // Groups: the applications must exist.
    let (status, bad) = post(
        &http,
        &gw,
        "/v1/application-groups",
        json!({"name": "front", "applications": [shop, "app-00000000000000000000"]}),
    )
    .await;
    assert_eq!(status, 422, "{bad}");
    assert!(bad["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("applications[1]"));
    let (status, group) = post(
        &http,
        &gw,
        "/v1/application-groups",
        json!({"name": "front", "applications": [shop, api]}),
    )
    .await;
    assert_eq!(status, 201, "{group}");
    let group = group["id"].as_str().unwrap().to_owned();
    let (_, groups) = call(&http, &gw, "GET", "/v1/application-groups", None).await;
    assert_eq!(groups["total"], 1);
    assert_eq!(
        groups["items"][0]["applications"].as_array().unwrap().len(),
        2
    );

    // A batch over the group: both shop servers and api-a, nothing else.
    for bad in [
        json!({"action": "drain", "idempotency_key": "g1", "group": group, "servers": []}),
        json!({"action": "drain", "idempotency_key": "g1"}),
        json!({"action": "drain", "idempotency_key": "g1", "group": "apg-00000000000000000000"}),
    ] {
        let (status, body) = post(&http, &gw, "/v1/haproxy/batch/action", bad).await;
        assert_eq!(status, 422, "{body}");
    }
    let (status, batch) = post(
        &http,
        &gw,
        "/v1/haproxy/batch/action",
        json!({"action": "drain", "idempotency_key": "front-drain", "group": group}),
    )
    .await;
    assert_eq!(status, 202, "{batch}");
    let items = batch["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 3, "{batch}");
    for item in &items {
        let done = settled(&http, &gw, item["action"]["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "success", "{done}");
    }
    for (backend, server, bits) in [
        ("be_shop", "web1_shop_1", 8),
        ("be_shop", "web2_shop_1", 8),
        ("be_api", "api-a", 8),
        ("be_api", "api-b", 0),
        ("be_misc", "web1_blog_1", 0),
    ] {
        assert_eq!(admin_bits_in(&ha, backend, server), bits, "{server}");
    }

    // The shop backend renamed by a reload: its servers come back under the new name, still
    // linked to shop (the old rows soft-deleted after two polls).
    ha.reload(&layout("be_storefront"));
    let moved = eventually(
        "shop's servers under the new backend",
        Duration::from_secs(20),
        || async {
            let (_, page) = call(
                &http,
                &gw,
                "GET",
                &format!("/v1/applications/{shop}/servers"),
                None,
            )
            .await;
            let items = page["items"].as_array().cloned().unwrap_or_default();
            (items.len() == 2 && items.iter().all(|s| s["backend"] == "be_storefront"))
                .then_some(items)
        },
    )
    .await;
    assert!(moved.iter().all(|s| s["matched_by"] == "name"));
    let (_, apps) = call(&http, &gw, "GET", "/v1/applications", None).await;
    let shop_view = apps["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "shop")
        .unwrap()
        .clone();
    assert_eq!(shop_view["servers"], 2, "{apps}");
}
