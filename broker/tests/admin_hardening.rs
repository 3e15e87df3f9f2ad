//! Hardening of the admin HTTP listener and its credentials
//! (docs/admin-api.md, docs/manager.md), against a real broker on
//! 127.0.0.1:
//! - cheap failed HELLOs cannot reset an admin-token lockout.
#![allow(clippy::unwrap_used)]

mod common;
use common::{http, Api, Broker, Connection};

const TOKEN: &str = "root-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cheap_failed_hellos_do_not_reset_an_admin_lockout() {
    let broker = Broker::start(|config| {
        let hash = |secret: &str| dmq_broker::auth::hash_secret(secret).unwrap();
        config
            .clients
            .insert("orders".into(), hash("orders-secret"));
        config.admin_tokens = vec![hash(TOKEN)];
    })
    .await;
    let api = Api::new(broker.admin, Some(TOKEN));
    let locked = http({
        let api = api.clone();
        move || {
            let wrong = api.with_token(Some("guess"));
            for _ in 0..10 {
                assert_eq!(wrong.get("/api/topics").0, 401);
            }
            api.get("/api/topics").0
        }
    })
    .await;
    assert_eq!(locked, 429, "ten failures lock the address out");

    // The old attack: 10,050 failed HELLOs as other client ids (no
    // argon2: unknown ids cost nothing) pushed the lockout out of the
    // table.
    let addr = broker.addr;
    let mut tasks = Vec::new();
    for task in 0..10u32 {
        tasks.push(tokio::spawn(async move {
            for i in 0..1005u32 {
                let client = format!("c{task}-{i}");
                let (_, response) = Connection::hello_as(addr, &client, "x").await;
                assert!(
                    matches!(response, dmq_protocol::Response::Error(_)),
                    "{response:?}"
                );
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let after = http(move || api.get("/api/topics").0).await;
    assert_eq!(after, 429, "still locked out within the minute");
    broker.stop().await;
}
