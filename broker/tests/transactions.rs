//! Transactions end to end: a real broker on 127.0.0.1 (random port, temp
//! data dir) and the real Rust client: half messages reach no group until
//! the commit, never after a rollback, survive a restart in between, and
//! bad requests get clear errors that change nothing.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use dmq_client::{ClientError, ErrorCode, Message, ReceivedMessage, Subscription};
use dmq_protocol::{ProduceRecord, Request, Response, TxnEnd, TxnOutcome, TxnProduce};
use serde_json::json;

mod common;
use common::{client, http, next, options, Api, Broker, Connection};

fn text(message: &ReceivedMessage) -> String {
    String::from_utf8(message.value.to_vec()).unwrap()
}

/// Every message within `within` (acked), as text, sorted.
async fn drain(subscription: &mut Subscription, within: Duration) -> Vec<String> {
    let mut seen = Vec::new();
    while let Some(message) = next(subscription, within).await {
        seen.push(text(&message));
        message.ack().await.unwrap();
    }
    seen.sort();
    seen
}

fn code(error: &ClientError) -> Option<ErrorCode> {
    match error {
        ClientError::Broker { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_delivers_to_every_group_and_rollback_to_none() {
    let broker = Broker::start(|_| {}).await;
    let client = client(&broker).await;
    client.create_topic("orders", 2, false).await.unwrap();
    client.create_topic("audit", 1, false).await.unwrap();
    let mut billing = client
        .consumer()
        .subscribe("orders", "billing", options("m"))
        .await
        .unwrap();
    let mut shipping = client
        .consumer()
        .subscribe("orders", "shipping", options("m"))
        .await
        .unwrap();
    let mut audit = client
        .consumer()
        .subscribe("audit", "log", options("m"))
        .await
        .unwrap();

    let mut committed = client.transaction("order-service", "order-17");
    let receipts = committed
        .send(vec![
            Message::new("orders", "created").key("17"),
            Message::new("orders", "paid").key("17"),
        ])
        .await
        .unwrap();
    assert_eq!(receipts.len(), 2);
    assert!(receipts.iter().all(|r| r.offset.is_none()));
    committed
        .send(vec![Message::new("audit", "order 17")])
        .await
        .unwrap();
    let mut rolled_back = client.transaction("order-service", "order-18");
    rolled_back
        .send(vec![Message::new("orders", "never")])
        .await
        .unwrap();
    // A plain message of the same topic is not held back.
    client
        .producer()
        .send(Message::new("orders", "plain"))
        .await
        .unwrap();
    assert_eq!(
        drain(&mut billing, Duration::from_millis(500)).await,
        vec!["plain"]
    );

    committed.commit().await.unwrap();
    rolled_back.rollback().await.unwrap();
    // A commit retried after a lost answer is answered the same.
    committed.commit().await.unwrap();
    assert_eq!(
        drain(&mut billing, Duration::from_millis(800)).await,
        vec!["created", "paid"]
    );
    assert_eq!(
        drain(&mut shipping, Duration::from_millis(800)).await,
        vec!["created", "paid", "plain"]
    );
    assert_eq!(
        drain(&mut audit, Duration::from_millis(800)).await,
        vec!["order 17"]
    );
    // The receipt's id is the delivered message's id, and its trace tells
    // the story.
    let api = Api::new(broker.admin, None);
    let id = receipts[0].id.to_string();
    let trace = http(move || api.ok(&format!("/api/trace/{id}"))).await;
    let kinds: Vec<String> = trace["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    for kind in ["txn_half_stored", "txn_committed", "delivered", "acked"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} in {kinds:?}");
    }

    // A rollback after the commit is a conflict; an unknown handle is
    // unknown; both change nothing.
    let error = committed.rollback().await.unwrap_err();
    assert_eq!(
        code(&error),
        Some(ErrorCode::TransactionConflict),
        "{error}"
    );
    let mut connection = Connection::hello(broker.addr).await;
    let response = connection
        .request(Request::TxnEnd(TxnEnd {
            producer_group: "order-service".into(),
            transaction_id: "order-99".into(),
            handle: 12345,
            outcome: TxnOutcome::Commit,
        }))
        .await;
    assert!(
        matches!(&response, Response::Error(e) if e.code == ErrorCode::UnknownTransaction),
        "{response:?}"
    );
    // A reserved header is refused, and the connection stays open.
    let response = connection
        .request(Request::TxnProduce(TxnProduce {
            producer_group: "order-service".into(),
            transaction_id: "order-100".into(),
            handle: 0,
            topic: "orders".into(),
            partition: None,
            records: vec![ProduceRecord {
                headers: vec![dmq_protocol::Header::new("dmq.txn.id", "x")],
                value: Bytes::from_static(b"v"),
                ..Default::default()
            }],
        }))
        .await;
    assert!(
        matches!(&response, Response::Error(e) if e.code == ErrorCode::InvalidRequest),
        "{response:?}"
    );
    assert!(matches!(
        connection.request(Request::Ping).await,
        Response::Pong
    ));
    assert!(drain(&mut billing, Duration::from_millis(300))
        .await
        .is_empty());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_transaction_survives_a_restart_and_commits_after_it() {
    let broker = Broker::start(|_| {}).await;
    let first = client(&broker).await;
    first.create_topic("orders", 1, false).await.unwrap();
    let mut txn = first.transaction("shop", "t1");
    txn.send(vec![
        Message::new("orders", "one"),
        Message::new("orders", "two"),
    ])
    .await
    .unwrap();
    let handle = txn.handle();
    drop(first);
    let broker = broker.restart(|_| {}).await;
    let client = client(&broker).await;
    let mut billing = client
        .consumer()
        .subscribe("orders", "billing", options("m"))
        .await
        .unwrap();
    assert!(drain(&mut billing, Duration::from_millis(400))
        .await
        .is_empty());
    // The same transaction, from a new connection: its handle names it.
    let mut connection = Connection::hello(broker.addr).await;
    let response = connection
        .request(Request::TxnEnd(TxnEnd {
            producer_group: "shop".into(),
            transaction_id: "t1".into(),
            handle,
            outcome: TxnOutcome::Commit,
        }))
        .await;
    assert!(matches!(response, Response::TxnEnded(_)), "{response:?}");
    assert_eq!(
        drain(&mut billing, Duration::from_millis(800)).await,
        vec!["one", "two"]
    );
    broker.stop().await;
}

/// In production mode a transaction needs the producer right on its
/// topics, for TXN_PRODUCE and for TXN_END alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_need_the_producer_right() {
    const TOKEN: &str = "root-token-0123456789";
    let hash = |secret: &str| dmq_broker::auth::hash_secret(secret).unwrap();
    let broker = Broker::start(|config| {
        config
            .clients
            .insert("orders".into(), hash("orders-secret"));
        config
            .clients
            .insert("intruder".into(), hash("intruder-secret"));
        config.admin_tokens = vec![hash(TOKEN)];
    })
    .await;
    let api = Api::new(broker.admin, Some(TOKEN));
    http(move || {
        api.ok_post(
            "/api/topics",
            json!({"environment": "prod", "department": "pay", "name": "paid", "owner": "o",
                   "producers": ["orders"], "consumers": ["orders"]}),
        );
        api.ok_post("/api/topics/prod.pay.paid/approve", json!({}));
    })
    .await;
    let produce = |client: &str| {
        Request::TxnProduce(TxnProduce {
            producer_group: "pay".into(),
            transaction_id: format!("t-{client}"),
            handle: 0,
            topic: "prod.pay.paid".into(),
            partition: None,
            records: vec![ProduceRecord {
                value: Bytes::from_static(b"paid"),
                ..Default::default()
            }],
        })
    };
    let (mut intruder, hello) =
        Connection::hello_as(broker.addr, "intruder", "intruder-secret").await;
    assert!(matches!(hello, Response::HelloOk(_)));
    let response = intruder.request(produce("intruder")).await;
    assert!(
        matches!(&response, Response::Error(e) if e.code == ErrorCode::NotAuthorized),
        "{response:?}"
    );
    let (mut orders, hello) = Connection::hello_as(broker.addr, "orders", "orders-secret").await;
    assert!(matches!(hello, Response::HelloOk(_)));
    let Response::TxnProduceOk(ok) = orders.request(produce("orders")).await else {
        panic!("the producer may produce in a transaction");
    };
    let end = |outcome| {
        Request::TxnEnd(TxnEnd {
            producer_group: "pay".into(),
            transaction_id: "t-orders".into(),
            handle: ok.handle,
            outcome,
        })
    };
    // Another client may not end it.
    let response = intruder.request(end(TxnOutcome::Commit)).await;
    assert!(
        matches!(&response, Response::Error(e) if e.code == ErrorCode::NotAuthorized),
        "{response:?}"
    );
    let response = orders.request(end(TxnOutcome::Rollback)).await;
    assert!(matches!(response, Response::TxnEnded(_)), "{response:?}");
    broker.stop().await;
}

/// An operator lists unsettled transactions and resolves one whose
/// producer is gone; `/metrics` counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_lists_and_resolves_transactions() {
    let broker = Broker::start(|_| {}).await;
    let client = client(&broker).await;
    client.create_topic("orders", 1, false).await.unwrap();
    let mut txn = client.transaction("shop", "abandoned");
    txn.send(vec![
        Message::new("orders", "a"),
        Message::new("orders", "b"),
    ])
    .await
    .unwrap();
    let handle = txn.handle();
    drop(txn);
    let mut billing = client
        .consumer()
        .subscribe("orders", "billing", options("m"))
        .await
        .unwrap();
    let api = Api::new(broker.admin, None);
    let listed = {
        let api = api.clone();
        http(move || api.ok("/api/transactions")).await
    };
    let transactions = listed["transactions"].as_array().unwrap();
    assert_eq!(transactions.len(), 1, "{listed}");
    assert_eq!(transactions[0]["transaction_id"], "abandoned");
    assert_eq!(transactions[0]["handle"], handle);
    assert_eq!(transactions[0]["stage"], "open");
    assert_eq!(transactions[0]["records"], 2);
    let metrics = {
        let api = api.clone();
        http(move || api.ok_metrics()).await
    };
    assert!(metrics.contains("dmq_transactions_open 1"), "{metrics}");
    assert!(
        metrics.contains("dmq_transaction_half_messages 2"),
        "{metrics}"
    );

    let (wrong, right, again, bad) = {
        let api = api.clone();
        http(move || {
            (
                api.post(
                    "/api/transactions/shop/abandoned/commit",
                    json!({"handle": handle + 1}),
                ),
                api.post(
                    "/api/transactions/shop/abandoned/commit",
                    json!({"handle": handle}),
                ),
                api.post(
                    "/api/transactions/shop/abandoned/rollback",
                    json!({"handle": handle}),
                ),
                api.post(
                    "/api/transactions/shop/abandoned/maybe",
                    json!({"handle": handle}),
                ),
            )
        })
        .await
    };
    assert_eq!(wrong.0, 404, "{}", wrong.1);
    assert_eq!(right.0, 200, "{}", right.1);
    assert_eq!(right.1["outcome"], "commit");
    assert_eq!(again.0, 409, "a rollback after the commit: {}", again.1);
    assert_eq!(bad.0, 404, "{}", bad.1);
    assert_eq!(
        drain(&mut billing, Duration::from_millis(800)).await,
        vec!["a", "b"]
    );
    let listed = http(move || api.ok("/api/transactions")).await;
    assert!(listed["transactions"].as_array().unwrap().is_empty());
    broker.stop().await;
}

/// Check-back end to end: a producer that began a transaction and went
/// away; a live member of its producer group, listening with the real
/// client, is asked how it ended and answers commit: delivered. Another
/// transaction nobody answers for is checked until it is unresolved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_answers_check_backs() {
    let broker = Broker::start(|config| {
        config.transaction_timeout_ms = 300;
        config.transaction_max_checks = 2;
        config.transaction_check_backoff_max_ms = 300;
    })
    .await;
    let producer = client(&broker).await;
    producer.create_topic("orders", 1, false).await.unwrap();
    let mut committed_in_db = producer.transaction("shop", "order-42");
    committed_in_db
        .send(vec![Message::new("orders", "order 42 created")])
        .await
        .unwrap();
    let mut orphan = producer.transaction("other-shop", "order-43");
    orphan
        .send(vec![Message::new("orders", "order 43 created")])
        .await
        .unwrap();
    drop(producer);

    let member = client(&broker).await;
    let mut billing = member
        .consumer()
        .subscribe("orders", "billing", options("m"))
        .await
        .unwrap();
    let mut checks = member.transaction_checks("shop").await.unwrap();
    let check = tokio::time::timeout(Duration::from_secs(10), checks.recv())
        .await
        .expect("a check-back within 10 s")
        .unwrap();
    assert_eq!(check.producer_group, "shop");
    assert_eq!(check.transaction_id, "order-42");
    assert_eq!(check.handle, committed_in_db.handle());
    assert_eq!(check.checks, 1);
    // "Did order 42 commit in our database?" Yes.
    check.commit().await.unwrap();
    assert_eq!(
        drain(&mut billing, Duration::from_millis(800)).await,
        vec!["order 42 created"]
    );
    // Nobody listens for "other-shop": after its two checks it is
    // unresolved, still open, and nothing of it is delivered.
    let api = Api::new(broker.admin, None);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let listed = {
            let api = api.clone();
            http(move || api.ok("/api/transactions")).await
        };
        let orphan_row = listed["transactions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["producer_group"] == "other-shop")
            .cloned()
            .unwrap();
        if orphan_row["unresolved"] == true {
            assert_eq!(orphan_row["checks"], 2);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{listed}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = http(move || api.ok_metrics()).await;
    assert!(
        metrics.contains("dmq_transactions_unresolved 1"),
        "{metrics}"
    );
    assert!(drain(&mut billing, Duration::from_millis(300))
        .await
        .is_empty());
    broker.stop().await;
}

/// Fencing: a second instance of a transactional producer (TXN_INIT)
/// fences the first: its COMMIT and its new transactions are refused with
/// ProducerFenced, also when it tries to resume its epoch on a new
/// connection; the current instance ends the transaction; epochs survive a
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_instance_fences_a_zombie_producer() {
    let broker = Broker::start(|_| {}).await;
    let zombie = client(&broker).await;
    zombie.create_topic("payments", 1, false).await.unwrap();
    assert_eq!(zombie.init_transactions("pay", "p1").await.unwrap(), 1);
    let mut txn = zombie.transaction("pay", "pay-7");
    txn.send(vec![Message::new("payments", "paid 7")])
        .await
        .unwrap();
    let handle = txn.handle();

    let current = client(&broker).await;
    assert_eq!(current.init_transactions("pay", "p1").await.unwrap(), 2);
    let fenced = |result: Result<_, ClientError>| {
        matches!(
            result,
            Err(ClientError::Broker {
                code: ErrorCode::ProducerFenced,
                ..
            })
        )
    };
    assert!(fenced(txn.commit().await));
    let mut late = zombie.transaction("pay", "pay-8");
    assert!(fenced(
        late.send(vec![Message::new("payments", "x")])
            .await
            .map(|_| ())
    ));
    // Resuming the old epoch on a new connection does not unfence it.
    let mut raw = Connection::hello(broker.addr).await;
    let response = raw
        .request(Request::TxnInit(dmq_protocol::TxnInit {
            producer_group: "pay".into(),
            producer_id: "p1".into(),
            epoch: 1,
        }))
        .await;
    assert!(
        matches!(&response, Response::Error(e) if e.code == ErrorCode::ProducerFenced),
        "{response:?}"
    );
    let response = raw
        .request(Request::TxnEnd(TxnEnd {
            producer_group: "pay".into(),
            transaction_id: "pay-7".into(),
            handle,
            outcome: TxnOutcome::Commit,
        }))
        .await;
    assert!(
        matches!(&response, Response::Error(e) if e.code == ErrorCode::ProducerFenced),
        "{response:?}"
    );
    // The current instance decides.
    let mut billing = current
        .consumer()
        .subscribe("payments", "billing", options("m"))
        .await
        .unwrap();
    let response = {
        let mut own = Connection::hello(broker.addr).await;
        let resumed = own
            .request(Request::TxnInit(dmq_protocol::TxnInit {
                producer_group: "pay".into(),
                producer_id: "p1".into(),
                epoch: 2,
            }))
            .await;
        assert!(matches!(resumed, Response::TxnInitOk(ok) if ok.epoch == 2));
        own.request(Request::TxnEnd(TxnEnd {
            producer_group: "pay".into(),
            transaction_id: "pay-7".into(),
            handle,
            outcome: TxnOutcome::Commit,
        }))
        .await
    };
    assert!(matches!(response, Response::TxnEnded(_)), "{response:?}");
    assert_eq!(
        drain(&mut billing, Duration::from_millis(800)).await,
        vec!["paid 7"]
    );
    drop((zombie, current, billing));
    let broker = broker.restart(|_| {}).await;
    let next = client(&broker).await;
    assert_eq!(next.init_transactions("pay", "p1").await.unwrap(), 3);
    broker.stop().await;
}

/// Atomic consume-and-produce between two topics with TXN_ACK: each
/// payment becomes exactly one shipment, across a rolled-back attempt, a
/// second transaction racing for the same message, and a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_and_produce_in_one_transaction_is_exactly_once() {
    let broker = Broker::start(|_| {}).await;
    let client = client(&broker).await;
    client.create_topic("payments", 1, false).await.unwrap();
    client.create_topic("shipments", 1, false).await.unwrap();
    for n in 0..10 {
        client
            .producer()
            .send(Message::new("payments", format!("paid {n}")))
            .await
            .unwrap();
    }
    let fast_retry = dmq_client::SubscribeOptions {
        settings: dmq_client::GroupSettings {
            ack_timeout_ms: Some(300),
            backoff: Some(dmq_client::Backoff::Fixed {
                delays_ms: vec![10],
            }),
            ..dmq_client::GroupSettings::default()
        },
        ..options("m")
    };
    let mut payments = client
        .consumer()
        .subscribe("payments", "shipper", fast_retry)
        .await
        .unwrap();
    let mut rolled_back_once = false;
    let mut shipped = 0;
    while shipped < 10 {
        let paid = next(&mut payments, Duration::from_secs(5))
            .await
            .expect("a payment within 5 s");
        let n = text(&paid).trim_start_matches("paid ").to_string();
        let mut txn = client.transaction("shipper", format!("ship-{n}-{}", paid.attempt));
        txn.send(vec![Message::new("shipments", format!("ship {n}"))])
            .await
            .unwrap();
        txn.ack(&[&paid]).await.unwrap();
        // Settled by the transaction: a plain ack now is refused locally.
        assert!(paid.ack().await.is_err());
        if n == "3" && !rolled_back_once {
            // A second transaction cannot ack the same message meanwhile.
            let mut rival = client.transaction("shipper", "rival");
            let error = rival.ack(&[&paid]).await.unwrap_err();
            assert!(matches!(error, ClientError::InvalidArgument(_)), "{error}");
            let mut raw = Connection::hello(broker.addr).await;
            let response = raw
                .request(Request::TxnAck(dmq_protocol::TxnAck {
                    producer_group: "shipper".into(),
                    transaction_id: "rival".into(),
                    handle: 0,
                    subscription_id: 1,
                    messages: vec![dmq_protocol::MessagePosition {
                        partition: paid.partition,
                        offset: paid.offset,
                    }],
                }))
                .await;
            assert!(
                matches!(&response, Response::Error(e) if e.code == ErrorCode::UnknownSubscription),
                "{response:?}"
            );
            // Rolled back: no shipment, and the payment comes back.
            txn.rollback().await.unwrap();
            rolled_back_once = true;
            continue;
        }
        txn.commit().await.unwrap();
        shipped += 1;
    }
    assert!(rolled_back_once);
    // Nothing is delivered again: every payment was acked by its commit.
    assert!(next(&mut payments, Duration::from_millis(800))
        .await
        .is_none());
    let mut audit = client
        .consumer()
        .subscribe("shipments", "audit", options("m"))
        .await
        .unwrap();
    let expected: Vec<String> = {
        let mut all: Vec<String> = (0..10).map(|n| format!("ship {n}")).collect();
        all.sort();
        all
    };
    assert_eq!(
        drain(&mut audit, Duration::from_millis(800)).await,
        expected
    );
    // The acks are durable: after a restart no payment comes back.
    drop((payments, audit, client));
    let broker = broker.restart(|_| {}).await;
    let again = common::client(&broker).await;
    let mut payments = again
        .consumer()
        .subscribe("payments", "shipper", options("m"))
        .await
        .unwrap();
    assert!(next(&mut payments, Duration::from_millis(800))
        .await
        .is_none());
    broker.stop().await;
}
