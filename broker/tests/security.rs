//! A production-mode broker (clients and an admin token configured): every
//! admin endpoint and every protocol request is tried without credentials
//! and with a client id that lacks the right, and must be refused.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use dmq_protocol::{ErrorCode, ProduceRecord, Request, Response};
use serde_json::json;

mod common;
use common::{http, Api, Broker, Connection};

const TOKEN: &str = "root-token-0123456789";
const TOPIC: &str = "prod.pay.paid";

async fn production_broker() -> Broker {
    let hash = |secret: &str| dmq_broker::auth::hash_secret(secret).unwrap();
    Broker::start(|config| {
        config
            .clients
            .insert("orders".into(), hash("orders-secret"));
        config
            .clients
            .insert("shipping".into(), hash("shipping-secret"));
        config
            .clients
            .insert("intruder".into(), hash("intruder-secret"));
        config.admin_tokens = vec![hash(TOKEN)];
    })
    .await
}

fn produce(topic: &str) -> Request {
    Request::Produce(dmq_protocol::Produce {
        topic: topic.into(),
        partition: None,
        idempotence: None,
        records: vec![ProduceRecord {
            value: Bytes::from_static(b"paid"),
            ..Default::default()
        }],
    })
}

fn subscribe(topic: &str) -> Request {
    Request::Subscribe(dmq_protocol::Subscribe {
        topic: topic.into(),
        group: "g".into(),
        member_name: "m".into(),
        credit: 10,
        ..Default::default()
    })
}

fn refused(response: &Response, code: ErrorCode) -> bool {
    matches!(response, Response::Error(error) if error.code == code)
}

async fn login(broker: &Broker, client: &str) -> Connection {
    let (connection, response) =
        Connection::hello_as(broker.addr, client, &format!("{client}-secret")).await;
    assert!(matches!(response, Response::HelloOk(_)), "{response:?}");
    connection
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_refuse_missing_and_wrong_tokens() {
    let broker = production_broker().await;
    let api = Api::new(broker.admin, Some(TOKEN));
    http(move || {
        api.ok_post(
            "/api/topics",
            json!({"environment": "prod", "department": "pay", "name": "paid", "owner": "o"}),
        );
        let id = "0000000000000000000000000000002a";
        let endpoints: Vec<(&str, String, Option<&str>)> = vec![
            ("GET", "/api/info".into(), None),
            ("GET", "/api/topics".into(), None),
            ("POST", "/api/topics".into(), Some("{}")),
            ("GET", format!("/api/topics/{TOPIC}"), None),
            ("PATCH", format!("/api/topics/{TOPIC}"), Some("{}")),
            ("DELETE", format!("/api/topics/{TOPIC}"), None),
            ("POST", format!("/api/topics/{TOPIC}/approve"), None),
            ("POST", format!("/api/topics/{TOPIC}/disable"), None),
            ("GET", format!("/api/topics/{TOPIC}/groups"), None),
            (
                "POST",
                format!("/api/topics/{TOPIC}/groups/g/seek"),
                Some("{\"to\":\"earliest\"}"),
            ),
            ("GET", format!("/api/topics/{TOPIC}/messages?key=k"), None),
            (
                "POST",
                format!("/api/topics/{TOPIC}/messages/delete"),
                Some("{\"key\":\"k\"}"),
            ),
            (
                "POST",
                format!("/api/topics/{TOPIC}/test-message"),
                Some("{\"value\":\"v\"}"),
            ),
            ("GET", format!("/api/messages/{id}"), None),
            ("GET", "/api/dlq".into(), None),
            ("POST", "/api/dlq/x/resend".into(), Some("{}")),
            ("GET", format!("/api/trace/{id}"), None),
            ("GET", "/api/stats".into(), None),
            ("GET", "/metrics".into(), None),
        ];
        let anonymous = api.with_token(None);
        for (method, path, body) in &endpoints {
            let (status, answer) = anonymous.call(method, path, *body);
            assert_eq!(status, 401, "{method} {path} without a token: {answer}");
            assert_eq!(answer["error"]["code"], "unauthorized");
        }
        // Wrong tokens: refused, and counted.
        let wrong = api.with_token(Some("guess"));
        for (method, path, body) in endpoints.iter().take(8) {
            let (status, _) = wrong.call(method, path, *body);
            assert_eq!(status, 401, "{method} {path} with a wrong token");
        }
        let (status, _) = api.call("POST", "/api/login", Some("{\"token\":\"guess\"}"));
        assert_eq!(status, 401, "the ninth failure");
        // The topic is intact, and the right token still works.
        let topic = api.ok(&format!("/api/topics/{TOPIC}"));
        assert_eq!(topic["topic"]["status"], "pending");
        let (status, login) = api.call(
            "POST",
            "/api/login",
            Some(&format!("{{\"token\":\"{TOKEN}\"}}")),
        );
        assert_eq!((status, login["mode"].as_str()), (200, Some("production")));
        let (status, _) = wrong.get("/api/topics");
        assert_eq!(status, 401, "the tenth failure");
        // Rate limited now: even the right token is not checked.
        let (status, answer) = wrong.get("/api/topics");
        assert_eq!(status, 429, "{answer}");
        let (status, _) = api.get("/api/topics");
        assert_eq!(
            status, 429,
            "an address over the limit waits out the minute"
        );
    })
    .await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_requests_need_credentials_and_rights() {
    let broker = production_broker().await;
    let api = Api::new(broker.admin, Some(TOKEN));
    let api2 = api.clone();
    http(move || {
        let info = api2.ok("/api/info");
        assert_eq!(info["mode"], "production");
        let topic = api2.ok_post(
            "/api/topics",
            json!({"environment": "prod", "department": "pay", "name": "paid", "owner": "o",
                   "producers": ["orders"], "consumers": ["shipping"]}),
        );
        assert_eq!(
            topic["status"], "pending",
            "production topics wait for approval"
        );
    })
    .await;

    // No secret, a wrong one, an unknown client: refused at HELLO.
    for (client, secret) in [
        ("", ""),
        ("orders", ""),
        ("orders", "shipping-secret"),
        ("nobody", "x"),
    ] {
        let (mut connection, response) = Connection::hello_as(broker.addr, client, secret).await;
        assert!(
            refused(&response, ErrorCode::AuthenticationFailed),
            "{client:?}/{secret:?}: {response:?}"
        );
        assert!(
            connection.frame().await.is_none(),
            "closed after a failed HELLO"
        );
    }
    // Nothing but HELLO before HELLO.
    let mut connection = Connection::open(broker.addr).await;
    let response = connection.request(produce(TOPIC)).await;
    assert!(
        refused(&response, ErrorCode::NotAuthenticated),
        "{response:?}"
    );

    let mut orders = login(&broker, "orders").await;
    let mut shipping = login(&broker, "shipping").await;
    let mut intruder = login(&broker, "intruder").await;

    // Pending: nobody produces or consumes.
    let response = orders.request(produce(TOPIC)).await;
    assert!(refused(&response, ErrorCode::NotAuthorized), "{response:?}");
    let response = shipping.request(subscribe(TOPIC)).await;
    assert!(refused(&response, ErrorCode::NotAuthorized), "{response:?}");

    http({
        let api = api.clone();
        move || api.ok_post(&format!("/api/topics/{TOPIC}/approve"), json!({}))
    })
    .await;
    let response = orders.request(produce(TOPIC)).await;
    assert!(matches!(response, Response::ProduceOk(_)), "{response:?}");
    let response = shipping.request(subscribe(TOPIC)).await;
    assert!(matches!(response, Response::Subscribed(_)), "{response:?}");

    // Each right is separate.
    let response = shipping.request(produce(TOPIC)).await;
    assert!(refused(&response, ErrorCode::NotAuthorized), "{response:?}");
    let response = orders.request(subscribe(TOPIC)).await;
    assert!(refused(&response, ErrorCode::NotAuthorized), "{response:?}");

    // A client without rights is refused every request on the topic.
    let requests = vec![
        produce(TOPIC),
        subscribe(TOPIC),
        produce("prod.pay.unregistered"),
        Request::DescribeTopic(dmq_protocol::DescribeTopic { name: TOPIC.into() }),
        Request::PartitionLeaders(dmq_protocol::PartitionLeaders {
            topic: TOPIC.into(),
        }),
        Request::ListGroups(dmq_protocol::ListGroups {
            topic: TOPIC.into(),
        }),
        Request::DescribeGroup(dmq_protocol::DescribeGroup {
            topic: TOPIC.into(),
            group: "g".into(),
        }),
        Request::Seek(dmq_protocol::Seek {
            topic: TOPIC.into(),
            group: "g".into(),
            partition: None,
            target: dmq_protocol::StartPosition::Earliest,
            dry_run: true,
        }),
        Request::DeleteGroup(dmq_protocol::DeleteGroup {
            topic: TOPIC.into(),
            group: "g".into(),
        }),
        Request::CreateTopic(dmq_protocol::CreateTopic {
            name: "prod.pay.mine".into(),
            partitions: 1,
            ordered: false,
        }),
        Request::DeleteTopic(dmq_protocol::DeleteTopic { name: TOPIC.into() }),
        Request::DeleteMessages(dmq_protocol::DeleteMessages {
            topic: TOPIC.into(),
            tombstone: dmq_protocol::Tombstone::OffsetRange {
                partition: 0,
                start: 0,
                end: 10,
            },
        }),
        Request::CancelDelay(dmq_protocol::CancelDelay {
            message_id: dmq_protocol::MessageId([7; 16]),
        }),
    ];
    for request in requests {
        let what = format!("{request:?}");
        let response = intruder.request(request).await;
        assert!(
            refused(&response, ErrorCode::NotAuthorized),
            "{what}: {response:?}"
        );
    }
    // Another connection's subscription cannot be driven from here.
    let Response::Subscribed(subscribed) = shipping.request(subscribe(TOPIC)).await else {
        panic!("shipping may subscribe")
    };
    let theirs = subscribed.subscription_id;
    let position = dmq_protocol::MessagePosition {
        partition: 0,
        offset: 0,
    };
    let requests = vec![
        Request::Credit(dmq_protocol::Credit {
            subscription_id: theirs,
            credit: 10,
        }),
        Request::Fetch(dmq_protocol::Fetch {
            subscription_id: theirs,
            max_messages: 10,
            max_wait_ms: 0,
        }),
        Request::Ack(dmq_protocol::Ack {
            subscription_id: theirs,
            messages: vec![position],
        }),
        Request::Nack(dmq_protocol::Nack {
            subscription_id: theirs,
            messages: vec![position],
            delay_ms: None,
        }),
        Request::Unsubscribe(dmq_protocol::Unsubscribe {
            subscription_id: theirs,
        }),
    ];
    for request in requests {
        let what = format!("{request:?}");
        let response = intruder.request(request).await;
        assert!(
            refused(&response, ErrorCode::UnknownSubscription),
            "{what}: {response:?}"
        );
    }
    // The refusal says the same whether the topic exists, is pending, or
    // not: only the topic name differs.
    http({
        let api = api.clone();
        move || {
            api.ok_post(
                "/api/topics",
                json!({"environment": "prod", "department": "pay", "name": "waiting",
                       "owner": "o", "producers": ["orders"]}),
            )
        }
    })
    .await;
    let mut messages = Vec::new();
    for topic in [TOPIC, "prod.pay.waiting", "prod.pay.nowhere"] {
        let Response::Error(error) = intruder.request(produce(topic)).await else {
            panic!("{topic}: refused expected")
        };
        assert_eq!(error.code, ErrorCode::NotAuthorized);
        messages.push(error.message.replace(topic, "T"));
    }
    assert!(
        messages.iter().all(|m| *m == messages[0]),
        "the refusals tell topics apart: {messages:?}"
    );
    let response = intruder.request(Request::ListTopics).await;
    match response {
        Response::Topics(topics) => assert!(topics.topics.is_empty(), "{topics:?}"),
        other => panic!("{other:?}"),
    }
    // Topic creation and deletion are for the admin API, whoever asks.
    let response = orders
        .request(Request::DeleteTopic(dmq_protocol::DeleteTopic {
            name: TOPIC.into(),
        }))
        .await;
    assert!(refused(&response, ErrorCode::NotAuthorized), "{response:?}");

    // Disabled: refused again, data kept.
    http({
        let api = api.clone();
        move || api.ok_post(&format!("/api/topics/{TOPIC}/disable"), json!({}))
    })
    .await;
    let response = orders.request(produce(TOPIC)).await;
    assert!(refused(&response, ErrorCode::NotAuthorized), "{response:?}");
    let stored = http(move || api.ok(&format!("/api/topics/{TOPIC}"))).await;
    let end: u64 = stored["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["end_offset"].as_u64().unwrap())
        .sum();
    assert_eq!(end, 1, "the produce before the disable is kept");
    broker.stop().await;
}
