//! The admin HTTP API against a real broker on 127.0.0.1 with a temp data
//! dir: the topic registry, message query and deletion, trace, statistics,
//! dead letters, metrics, and bad input (docs/admin-api.md).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use dmq_client::{Message, SubscribeOptions};
use serde_json::{json, Value};

mod common;
use common::{client, http, next, options, Api, Broker};

fn create_body(name: &str) -> Value {
    json!({
        "environment": "dev", "department": "orders", "name": name,
        "owner": "alice", "description": "orders placed", "business_use": "billing",
        "partitions": 2
    })
}

async fn produce(broker: &Broker, topic: &str, count: usize, key: &str) -> Vec<String> {
    let client = client(broker).await;
    let producer = client.producer();
    let mut ids = Vec::new();
    for i in 0..count {
        let message = Message::new(topic, format!("{{\"n\":{i}}}")).key(key.to_string());
        ids.push(producer.send(message).await.unwrap().id.to_string());
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_query_trace_delete_and_stats() {
    let broker = Broker::start(|_| {}).await;
    let api = Api::new(broker.admin, None);

    // Register: the name is generated; development mode approves at once.
    let created = http({
        let api = api.clone();
        move || api.ok_post("/api/topics", create_body("created"))
    })
    .await;
    assert_eq!(created["name"], "dev.orders.created");
    assert_eq!(created["status"], "approved");
    let topic = "dev.orders.created";
    let (status, body) = http({
        let api = api.clone();
        move || api.post("/api/topics", create_body("created"))
    })
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "conflict");

    let ids = produce(&broker, topic, 20, "order-7").await;
    let other = produce(&broker, topic, 3, "order-8").await;

    // Consume and ack everything once, so the trace has deliveries.
    let client = client(&broker).await;
    let mut subscription = client
        .consumer()
        .subscribe(topic, "billing", options("m1"))
        .await
        .unwrap();
    for _ in 0..23 {
        let message = next(&mut subscription, Duration::from_secs(10))
            .await
            .unwrap();
        message.ack().await.unwrap();
    }

    let api2 = api.clone();
    let first = ids[0].clone();
    let checks = http(move || {
        let api = api2;
        // By key: exactly that key's messages, paged.
        let page = api.ok(&format!(
            "/api/topics/{topic}/messages?key=order-7&limit=15"
        ));
        assert_eq!(page["messages"].as_array().unwrap().len(), 15);
        let cursor = page["next_cursor"].as_str().unwrap().to_string();
        let rest = api.ok(&format!(
            "/api/topics/{topic}/messages?key=order-7&limit=15&cursor={cursor}"
        ));
        assert_eq!(rest["messages"].as_array().unwrap().len(), 5);
        assert!(rest["next_cursor"].is_null());
        let message = &page["messages"][0];
        assert_eq!(message["key"], "order-7");
        assert_eq!(message["preview"]["format"], "json");
        assert_eq!(message["deleted"], false);

        // By time range: everything produced in the last minute.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let all = api.ok(&format!(
            "/api/topics/{topic}/messages?from_ms={}&to_ms={}&limit=100",
            now - 60_000,
            now + 60_000
        ));
        assert_eq!(all["messages"].as_array().unwrap().len(), 23);

        // By id, in the topic and across topics, with the group's state.
        let by_id = api.ok(&format!("/api/topics/{topic}/messages?id={first}"));
        assert_eq!(by_id["messages"][0]["message_id"], first.as_str());
        let one = api.ok(&format!("/api/messages/{first}"));
        assert_eq!(one["message"]["topic"], topic);
        let groups = one["groups"].as_array().unwrap();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0]["group"], "billing");
        assert_eq!(groups[0]["acked"], true);

        // By offset range.
        let partition = one["message"]["partition"].as_u64().unwrap();
        let offsets = api.ok(&format!(
            "/api/topics/{topic}/messages?partition={partition}&from_offset=0&to_offset=5"
        ));
        assert!(!offsets["messages"].as_array().unwrap().is_empty());

        // The trace: produced, stored, delivered, acked, in order.
        let trace = api.ok(&format!("/api/trace/{first}"));
        let kinds: Vec<&str> = trace["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap())
            .collect();
        for kind in ["produced", "stored", "delivered", "acked"] {
            assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
        }
        assert_eq!(kinds[0], "produced");

        // Statistics count what happened this minute.
        let stats = api.ok(&format!("/api/stats?topic={topic}&minutes=5"));
        assert_eq!(stats["minutes"].as_array().unwrap().len(), 5);
        assert_eq!(stats["totals"]["produced"], 23);
        assert_eq!(stats["totals"]["acked"], 23);

        // Delete by key: a dry run counts, the real one deletes, once.
        let dry = api.ok_post(
            &format!("/api/topics/{topic}/messages/delete"),
            json!({"key": "order-7", "dry_run": true}),
        );
        assert_eq!(dry["matched"], 20);
        let still = api.ok(&format!(
            "/api/topics/{topic}/messages?key=order-7&limit=100"
        ));
        assert!(still["messages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["deleted"] == false));
        let done = api.ok_post(
            &format!("/api/topics/{topic}/messages/delete"),
            json!({"key": "order-7", "dry_run": false}),
        );
        assert_eq!(done["matched"], 20);
        let again = api.ok_post(
            &format!("/api/topics/{topic}/messages/delete"),
            json!({"key": "order-7", "dry_run": true}),
        );
        assert_eq!(again["matched"], 0, "already deleted");
        let after = api.ok(&format!(
            "/api/topics/{topic}/messages?key=order-7&limit=100"
        ));
        assert!(after["messages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["deleted"] == true));
        let kept = api.ok(&format!("/api/topics/{topic}/messages?key=order-8"));
        assert_eq!(kept["messages"][0]["deleted"], false);

        // "Delete the 2016 messages": one call, nothing of now matches.
        let year = api.ok_post(
            &format!("/api/topics/{topic}/messages/delete"),
            json!({"from_ms": 1_451_606_400_000i64, "to_ms": 1_483_228_800_000i64,
                   "dry_run": false}),
        );
        assert_eq!(year["matched"], 0);

        // Topic page: partitions and the group with its lag.
        let detail = api.ok(&format!("/api/topics/{topic}"));
        assert_eq!(detail["partitions"].as_array().unwrap().len(), 2);
        assert_eq!(detail["groups"][0]["name"], "billing");
    });
    checks.await;
    drop(other);

    // A new group starting at the earliest message never sees the deleted ones.
    let mut late = client
        .consumer()
        .subscribe(topic, "audit", options("a1"))
        .await
        .unwrap();
    let mut keys = Vec::new();
    while let Some(message) = next(&mut late, Duration::from_millis(1500)).await {
        keys.push(message.key.clone().unwrap());
        message.ack().await.unwrap();
    }
    assert_eq!(keys.len(), 3, "only order-8 is left");
    assert!(keys.iter().all(|k| k.as_ref() == b"order-8"));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_message_dead_letters_resend_and_metrics() {
    let broker = Broker::start(|_| {}).await;
    let api = Api::new(broker.admin, None);
    let topic = "dev.orders.paid";
    http({
        let api = api.clone();
        move || api.ok_post("/api/topics", create_body("paid"))
    })
    .await;
    let sent = http({
        let api = api.clone();
        move || {
            api.ok_post(
                &format!("/api/topics/{topic}/test-message"),
                json!({"value": "hello", "key": "k1", "headers": {"h": "v"}}),
            )
        }
    })
    .await;
    let id = sent["message_id"].as_str().unwrap().to_string();

    // One attempt only: a nack sends it to the dead-letter topic.
    let client = client(&broker).await;
    let mut subscription = client
        .consumer()
        .subscribe(
            topic,
            "shipping",
            SubscribeOptions {
                settings: dmq_protocol::GroupSettings {
                    max_attempts: Some(1),
                    ..Default::default()
                },
                ..options("s1")
            },
        )
        .await
        .unwrap();
    let message = next(&mut subscription, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(message.id.to_string(), id);
    assert_eq!(message.value.as_ref(), b"hello");
    message.nack(None).await.unwrap();

    let dlq = format!("{topic}.shipping.dlq");
    let api2 = api.clone();
    let (id2, dlq2) = (id.clone(), dlq.clone());
    http(move || {
        let api = api2;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let list = api.ok("/api/dlq");
            let entry = list
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["topic"] == dlq2.as_str())
                .cloned();
            if entry.as_ref().is_some_and(|e| e["messages"] == 1) {
                assert_eq!(entry.unwrap()["source_topic"], topic);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not dead-lettered: {list}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let trace = api.ok(&format!("/api/trace/{id2}"));
        assert!(trace["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "dead_lettered"));
        let one = api.ok(&format!("/api/messages/{id2}"));
        assert_eq!(
            one["message"]["topic"], topic,
            "the source topic comes first"
        );
        assert_eq!(one["groups"][0]["dead_lettered"], true);
        let resent = api.ok_post(&format!("/api/dlq/{dlq2}/resend"), json!({}));
        assert_eq!(resent["resent"], 1);
        let again = api.ok_post(&format!("/api/dlq/{dlq2}/resend"), json!({}));
        assert_eq!(
            again["resent"], 0,
            "resent messages leave the dead-letter topic"
        );
        let list = api.ok("/api/dlq");
        assert_eq!(list[0]["messages"], 0, "{list}");
        // A resend is a produce like any other: traced (who, where) and
        // counted. It used to bypass the produce path and leave no trace.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let trace = api.ok(&format!("/api/trace/{id2}"));
            let produced: Vec<&serde_json::Value> = trace["events"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["kind"] == "produced")
                .collect();
            if produced.len() == 2 {
                assert!(
                    produced.iter().all(|e| e["topic"] == topic),
                    "the test message and its resent copy, both on the source topic: {trace}"
                );
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the resend left no `produced` trace: {trace}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let metrics = api.get("/metrics");
        assert_eq!(metrics.0, 200);
        let text = metrics.1.as_str().unwrap().to_string();
        for name in [
            "dmq_messages_produced_total",
            "dmq_messages_dead_lettered_total",
            "dmq_fsync_duration_seconds",
            "dmq_connections",
            "dmq_group_lag_messages",
            "dmq_delays_pending",
            "dmq_build_info",
        ] {
            assert!(text.contains(name), "{name} missing from /metrics");
        }
    })
    .await;

    // The resent message comes back to the group, same id, no dlq headers.
    let mut again = client
        .consumer()
        .subscribe(topic, "shipping2", options("s2"))
        .await
        .unwrap();
    let mut seen = Vec::new();
    while let Some(message) = next(&mut again, Duration::from_millis(1500)).await {
        seen.push(message);
    }
    assert_eq!(seen.len(), 2, "the original and the resent copy");
    assert!(seen.iter().all(|m| m.id.to_string() == id));
    assert!(seen
        .iter()
        .all(|m| m.headers.iter().all(|h| !h.name.starts_with(b"dmq.dlq."))));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx() {
    let broker = Broker::start(|_| {}).await;
    let api = Api::new(broker.admin, None);
    http(move || {
        api.ok_post("/api/topics", create_body("bad"));
        let topic = "dev.orders.bad";
        let cases: Vec<(&str, String, Option<&str>, u16, &str)> = vec![
            ("POST", "/api/topics".into(), Some("{\"environment\": "), 400, "invalid JSON"),
            ("POST", "/api/topics".into(), Some("[1,2]"), 400, "invalid JSON"),
            (
                "POST",
                "/api/topics".into(),
                Some("{\"environment\":\"Prod!\",\"department\":\"a\",\"name\":\"b\",\"owner\":\"o\"}"),
                400,
                "environment",
            ),
            ("GET", "/api/topics/nope".into(), None, 404, "unknown topic"),
            ("GET", "/api/cluster".into(), None, 404, "single node"),
            ("GET", "/api/topics/nope/messages?key=a".into(), None, 404, "unknown topic"),
            (
                "GET",
                format!("/api/topics/{topic}/messages?from_ms=10&to_ms=5"),
                None,
                400,
                "before",
            ),
            (
                "POST",
                format!("/api/topics/{topic}/messages/delete"),
                Some("{\"from_ms\": 10, \"to_ms\": 5}"),
                400,
                "before",
            ),
            (
                "POST",
                format!("/api/topics/{topic}/messages/delete"),
                Some("{}"),
                400,
                "exactly one selector",
            ),
            (
                "POST",
                format!("/api/topics/{topic}/messages/delete"),
                Some("{\"id\": \"x\", \"key\": \"y\"}"),
                400,
                "exactly one selector",
            ),
            ("GET", "/api/messages/not-an-id".into(), None, 400, "not a message id"),
            (
                "GET",
                "/api/messages/0000000000000000000000000000002a".into(),
                None,
                404,
                "no stored message",
            ),
            ("GET", "/api/trace/0000000000000000000000000000002a".into(), None, 404, "no trace"),
            ("GET", "/api/stats?minutes=0".into(), None, 400, "minutes"),
            ("GET", "/api/stats?topic=nope".into(), None, 404, "unknown topic"),
            ("GET", format!("/api/topics/{topic}/messages?key=a&limit=0"), None, 400, "limit"),
            ("GET", "/api/nowhere".into(), None, 404, "no route"),
            ("POST", "/api/topics/nope/approve".into(), None, 404, "not registered"),
            (
                "POST",
                format!("/api/topics/{topic}/groups/nope/seek"),
                Some("{\"to\": \"sideways\"}"),
                400,
                "earliest",
            ),
            ("POST", "/api/dlq/nope/resend".into(), Some("{}"), 404, "not a dead-letter topic"),
        ];
        for (method, path, body, status, words) in cases {
            let (got, answer) = api.call(method, &path, body);
            assert_eq!(got, status, "{method} {path}: {answer}");
            let message = answer["error"]["message"].as_str().unwrap_or_default();
            assert!(
                message.contains(words),
                "{method} {path}: {message:?} should say {words:?}"
            );
            assert!(answer["error"]["code"].is_string());
        }
    })
    .await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = || dmq_broker::BrokerConfig {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        segment_bytes: 1 << 20,
        ..dmq_broker::BrokerConfig::default()
    };
    let broker = dmq_broker::Broker::start(config()).await.unwrap();
    let api = Api::new(broker.admin_addr(), None);
    http(move || {
        api.ok_post("/api/topics", create_body("kept"));
        api.ok_post("/api/topics/dev.orders.kept/disable", json!({}));
        let (status, _) = api.call(
            "PATCH",
            "/api/topics/dev.orders.kept",
            Some("{\"owner\": \"bob\", \"default_ttl_ms\": 60000}"),
        );
        assert_eq!(status, 200);
    })
    .await;
    broker.shutdown().await;
    let broker = dmq_broker::Broker::start(config()).await.unwrap();
    let api = Api::new(broker.admin_addr(), None);
    http(move || {
        let topics = api.ok("/api/topics");
        let topic = &topics[0];
        assert_eq!(topic["name"], "dev.orders.kept");
        assert_eq!(topic["status"], "disabled");
        assert_eq!(topic["owner"], "bob");
        assert_eq!(topic["default_ttl_ms"], 60000);
        let (status, _) = api.call("DELETE", "/api/topics/dev.orders.kept", None);
        assert_eq!(status, 204);
        assert_eq!(api.ok("/api/topics").as_array().unwrap().len(), 0);
        assert_eq!(api.get("/api/topics/dev.orders.kept").0, 404);
    })
    .await;
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topics_defaults_apply_to_its_messages_and_groups() {
    let broker = Broker::start(|_| {}).await;
    let api = Api::new(broker.admin, None);
    http(move || {
        let mut body = create_body("short");
        body["default_ttl_ms"] = json!(300);
        body["max_attempts"] = json!(1);
        api.ok_post("/api/topics", body);
    })
    .await;
    let topic = "dev.orders.short";
    let client = client(&broker).await;
    let producer = client.producer();
    // No TTL of its own: the topic's 300 ms apply.
    let stale = producer
        .send(Message::new(topic, "stale").key("a"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Its own TTL wins over the default.
    let fresh = producer
        .send(
            Message::new(topic, "fresh")
                .key("a")
                .ttl(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    let mut subscription = client
        .consumer()
        .subscribe(topic, "g", options("m"))
        .await
        .unwrap();
    let message = next(&mut subscription, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(message.id, fresh.id, "the expired one is skipped");
    assert!(next(&mut subscription, Duration::from_millis(500))
        .await
        .is_none());
    // No max_attempts of its own: the topic's 1 applies, so one nack
    // dead-letters the message.
    message.nack(None).await.unwrap();
    let api = Api::new(broker.admin, None);
    let (stale, fresh) = (stale.id.to_string(), fresh.id.to_string());
    http(move || {
        let expired = api.ok(&format!("/api/trace/{stale}"));
        assert!(
            expired["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["kind"] == "expired"),
            "{expired}"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let trace = api.ok(&format!("/api/trace/{fresh}"));
            let kinds: Vec<&str> = trace["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["kind"].as_str().unwrap())
                .collect();
            if kinds.contains(&"dead_lettered") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{kinds:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await;
    broker.stop().await;
}

/// docs/admin-api.md, "Status transitions": approve from pending or
/// disabled, disable from approved; anything else, repeating an action
/// included, is 409 `conflict` with the documented body and changes
/// nothing (both were always 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_changes_the_status_forbids_are_409() {
    const TOKEN: &str = "admin-token-0123456789";
    let broker = Broker::start(|config| {
        config.admin_tokens = vec![dmq_broker::auth::hash_secret(TOKEN).unwrap()];
    })
    .await;
    let api = Api::new(broker.admin, Some(TOKEN));
    http(move || {
        let created = api.ok_post("/api/topics", create_body("flow"));
        assert_eq!(created["status"], "pending", "production registers pending");
        let topic = "/api/topics/dev.orders.flow";
        let status = |api: &Api| api.ok(topic)["topic"]["status"].clone();
        let refused = |action: &str, from: &str, allowed: &str| {
            let before = api.ok(topic)["topic"].clone();
            let (code, body) = api.post(&format!("{topic}/{action}"), json!({}));
            assert_eq!(code, 409, "{action} from {from}: {body}");
            let error = body.as_object().unwrap();
            assert_eq!(error.len(), 1, "{body}");
            assert_eq!(body["error"].as_object().unwrap().len(), 2, "{body}");
            assert_eq!(body["error"]["code"], "conflict");
            let message = body["error"]["message"].as_str().unwrap();
            assert_eq!(
                message,
                format!(
                    "topic \"dev.orders.flow\" is {from}: {action} is allowed only from {allowed}"
                )
            );
            assert_eq!(api.ok(topic)["topic"], before, "nothing changed");
        };
        let allowed = |action: &str, to: &str| {
            let changed = api.ok_post(&format!("{topic}/{action}"), json!({}));
            assert_eq!(changed["status"], to, "{action}");
            assert_eq!(status(&api), to);
        };
        refused("disable", "pending", "approved");
        allowed("approve", "approved");
        refused("approve", "approved", "pending or disabled");
        allowed("disable", "disabled");
        refused("disable", "disabled", "approved");
        allowed("approve", "approved");
        let (code, body) = api.post("/api/topics/dev.orders.none/disable", json!({}));
        assert_eq!(
            (code, body["error"]["code"].as_str()),
            (404, Some("not_found"))
        );
    })
    .await;
    broker.stop().await;
}

/// docs/admin-api.md, `POST /api/topics`: 409 for a topic that exists,
/// registered or not. A dead-letter topic (`dev.web.dlq`: topic `dev`,
/// group `web`) is not registered; creating its name was 201 and adopted
/// it into the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_a_topic_that_exists_unregistered_is_409() {
    let broker = Broker::start(|_| {}).await;
    let client = client(&broker).await;
    client.create_topic("dev", 1, false).await.unwrap();
    let sent = client
        .producer()
        .send(Message::new("dev", "poison"))
        .await
        .unwrap();
    let mut subscription = client
        .consumer()
        .subscribe(
            "dev",
            "web",
            SubscribeOptions {
                settings: dmq_protocol::GroupSettings {
                    max_attempts: Some(1),
                    ..Default::default()
                },
                ..options("m")
            },
        )
        .await
        .unwrap();
    let message = next(&mut subscription, Duration::from_secs(10))
        .await
        .unwrap();
    message.nack(None).await.unwrap();
    let api = Api::new(broker.admin, None);
    let id = sent.id.to_string();
    http(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let trace = api.ok(&format!("/api/trace/{id}"));
            let dead = trace["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["kind"] == "dead_lettered");
            if dead {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{trace}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let body = json!({"environment": "dev", "department": "web", "name": "dlq",
                          "owner": "alice"});
        let (status, answer) = api.post("/api/topics", body);
        assert_eq!(status, 409, "{answer}");
        assert_eq!(answer["error"]["code"], "conflict");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("already exists"),
            "{answer}"
        );
        let registered: Vec<String> = api
            .ok("/api/topics")
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            registered,
            ["dev"],
            "the dead-letter topic stays unregistered"
        );
    })
    .await;
    broker.stop().await;
}
