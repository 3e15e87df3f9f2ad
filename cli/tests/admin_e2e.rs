//! The admin API commands against a real broker (binary protocol and admin
//! HTTP API on random 127.0.0.1 ports, temp data dir): `dmq message
//! query|get|delete`, `dmq trace`, `dmq stats`, `dmq dlq list|resend`, and
//! admin tokens in production mode.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::{json, TestBroker};
use predicates::prelude::*;
use serde_json::Value;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

/// Retries `check` for up to 10 s (the trace and the statistics are
/// recorded off the produce path).
fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ids_of(page: &Value) -> Vec<String> {
    page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|message| message["message_id"].as_str().expect("id").to_string())
        .collect()
}

#[test]
fn query_get_trace_delete_and_stats() {
    let broker = TestBroker::start();
    broker.stdout(&["topic", "create", "orders", "--partitions", "2"]);
    let before = now_ms();
    let keyed: Vec<Value> = broker
        .stdout(&[
            "--format",
            "json",
            "produce",
            "orders",
            "--key",
            "k1",
            "--header",
            "source=test",
            "one",
            "two",
        ])
        .lines()
        .map(json)
        .collect();
    let unkeyed: Vec<Value> = broker
        .stdout(&["--format", "json", "produce", "orders", "three", "four"])
        .lines()
        .map(json)
        .collect();
    let after = now_ms() + 1;
    let id = |receipt: &Value| receipt["id"].as_str().expect("id").to_string();
    let (one, two, three) = (id(&keyed[0]), id(&keyed[1]), id(&unkeyed[0]));

    // By key.
    let page = broker.json(&["message", "query", "--topic", "orders", "--key", "k1"]);
    assert_eq!(ids_of(&page), vec![one.clone(), two.clone()], "{page}");
    assert!(page["next_cursor"].is_null());
    assert_eq!(page["messages"][0]["key"], "k1");
    assert_eq!(page["messages"][0]["deleted"], false);
    let table = broker.stdout(&["message", "query", "--topic", "orders", "--key", "k1"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("PARTITION  OFFSET  TIME"), "{table}");
    assert!(lines[0].ends_with("KEY  DELETED  PREVIEW"), "{table}");
    assert!(
        lines[1].contains(&one) && lines[1].contains("k1"),
        "{table}"
    );
    assert!(
        lines[1].contains("false") && lines[1].ends_with("one"),
        "{table}"
    );

    // By time range, in ms and in RFC 3339.
    let from = before.to_string();
    let to = after.to_string();
    let page = broker.json(&[
        "message", "query", "--topic", "orders", "--from", &from, "--to", &to,
    ]);
    assert_eq!(ids_of(&page).len(), 4, "{page}");
    let rfc = |ms: u64| {
        humantime::format_rfc3339_millis(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
            .to_string()
    };
    let page = broker.json(&[
        "message",
        "query",
        "--topic",
        "orders",
        "--from",
        &rfc(before),
        "--to",
        &rfc(after),
    ]);
    assert_eq!(ids_of(&page).len(), 4, "{page}");
    // Nothing in 2016.
    let page = broker.json(&[
        "message",
        "query",
        "--topic",
        "orders",
        "--from",
        "2016-01-01T00:00:00Z",
        "--to",
        "2017-01-01T00:00:00Z",
    ]);
    assert!(ids_of(&page).is_empty(), "{page}");

    // --all follows the cursor: one message per page, each printed.
    let lines: Vec<Value> = broker
        .stdout(&[
            "--format", "json", "message", "query", "--topic", "orders", "--from", &from, "--to",
            &to, "--limit", "1", "--all",
        ])
        .lines()
        .map(json)
        .collect();
    assert_eq!(lines.len(), 4);
    let mut ids: Vec<String> = lines
        .iter()
        .map(|message| message["message_id"].as_str().expect("id").to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "no message twice");
    let table = broker.stdout(&[
        "message", "query", "--topic", "orders", "--from", &from, "--to", &to, "--limit", "1",
        "--all",
    ]);
    assert_eq!(table.lines().count(), 1 + 4 + 1, "{table}");
    assert!(table.ends_with("4 messages\n"), "{table}");
    // Without --all, one page and a hint.
    let table = broker.stdout(&[
        "message", "query", "--topic", "orders", "--from", &from, "--to", &to, "--limit", "1",
    ]);
    assert!(table.contains("more: add --all, or --cursor "), "{table}");

    // By id and by offsets.
    let page = broker.json(&["message", "query", "--topic", "orders", "--id", &three]);
    assert_eq!(ids_of(&page), vec![three.clone()]);
    let partition = keyed[0]["partition"].to_string();
    let page = broker.json(&[
        "message",
        "query",
        "--topic",
        "orders",
        "--partition",
        &partition,
        "--from-offset",
        "0",
        "--to-offset",
        "1",
    ]);
    assert_eq!(ids_of(&page).len(), 1, "{page}");

    // Consume them all, so that the group has a state and the trace events.
    let consumed = broker.stdout(&[
        "consume", "orders", "--group", "billing", "--count", "4", "--idle", "5s",
    ]);
    assert_eq!(consumed.lines().count(), 4, "{consumed}");

    // get: fields, headers, preview, groups.
    let got = broker.json(&["message", "get", &one]);
    let message = &got["message"];
    assert_eq!(message["message_id"], one.as_str());
    assert_eq!(message["topic"], "orders");
    assert_eq!(message["key"], "k1");
    assert_eq!(message["headers"]["source"], "test");
    assert_eq!(message["preview"]["text"], "one");
    let billing = got["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .find(|group| group["group"] == "billing")
        .cloned()
        .unwrap_or_else(|| panic!("no billing state: {got}"));
    assert_eq!(billing["acked"], true, "{got}");
    let table = broker.stdout(&["message", "get", &one]);
    for expected in [
        format!("id          {one}"),
        "topic       orders".to_string(),
        "key         k1 (hex 6b31)".to_string(),
        "headers:\n  source: test\n".to_string(),
        "preview (text):\none\n".to_string(),
        "GROUP    MEMBER".to_string(),
        "billing".to_string(),
    ] {
        assert!(table.contains(&expected), "{expected:?} not in\n{table}");
    }
    let hex = broker.json(&["message", "get", &one, "--preview", "hex"]);
    assert_eq!(hex["message"]["preview"]["format"], "hex");
    assert_eq!(hex["message"]["preview"]["text"], "6f6e65");

    // trace: produced, stored, delivered, acked.
    let trace = eventually("the acked event", || {
        let trace = broker.json(&["trace", &one]);
        let kinds: Vec<String> = trace["events"]
            .as_array()?
            .iter()
            .filter_map(|event| event["kind"].as_str().map(str::to_string))
            .collect();
        kinds.contains(&"acked".to_string()).then_some(kinds)
    });
    assert_eq!(trace[0], "produced", "{trace:?}");
    assert!(trace.contains(&"stored".to_string()), "{trace:?}");
    assert!(trace.contains(&"delivered".to_string()), "{trace:?}");
    let table = broker.stdout(&["trace", &one]);
    assert!(
        table.starts_with(&format!("message {one}\nTIME                      KIND")),
        "{table}"
    );
    assert!(
        table.contains("produced") && table.contains("stored"),
        "{table}"
    );
    assert!(table.contains("billing"), "{table}");

    // stats: produced and acked counts, per minute and in total.
    let stats = eventually("the statistics", || {
        let stats = broker.json(&["stats", "--topic", "orders", "--minutes", "5"]);
        (stats["totals"]["produced"].as_u64() == Some(4)
            && stats["totals"]["acked"].as_u64() == Some(4))
        .then_some(stats)
    });
    assert_eq!(stats["minutes"].as_array().expect("minutes").len(), 5);
    let table = broker.stdout(&["stats", "--topic", "orders", "--minutes", "5"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 1 + 5 + 1, "{table}");
    assert!(lines[0].starts_with("MINUTE"), "{table}");
    assert!(
        lines[6].starts_with("total") && lines[6].contains(" 4 "),
        "{table}"
    );
    let grouped = broker.json(&["stats", "--topic", "orders", "--group", "billing"]);
    assert_eq!(grouped["minutes"].as_array().expect("minutes").len(), 60);

    // delete: a dry run counts and changes nothing.
    let dry = broker.json(&[
        "message",
        "delete",
        "--topic",
        "orders",
        "--key",
        "k1",
        "--dry-run",
    ]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["matched"], 2);
    let dry = broker.stdout(&[
        "message",
        "delete",
        "--topic",
        "orders",
        "--key",
        "k1",
        "--dry-run",
    ]);
    assert!(dry.starts_with("2 messages match in orders"), "{dry}");
    assert!(dry.contains("nothing deleted"), "{dry}");
    let page = broker.json(&["message", "query", "--topic", "orders", "--key", "k1"]);
    assert_eq!(page["messages"][0]["deleted"], false);

    // --yes deletes; the messages are listed as deleted.
    let done = broker.stdout(&[
        "message", "delete", "--topic", "orders", "--key", "k1", "--yes",
    ]);
    assert_eq!(done, "deleted 2 messages from orders\n");
    let page = broker.json(&["message", "query", "--topic", "orders", "--key", "k1"]);
    assert_eq!(ids_of(&page).len(), 2);
    for message in page["messages"].as_array().expect("messages") {
        assert_eq!(message["deleted"], true, "{page}");
    }
    let table = broker.stdout(&["message", "query", "--topic", "orders", "--key", "k1"]);
    assert!(
        table.lines().skip(1).all(|line| line.contains("true")),
        "{table}"
    );
    let again = broker.json(&[
        "message",
        "delete",
        "--topic",
        "orders",
        "--key",
        "k1",
        "--dry-run",
    ]);
    assert_eq!(again["matched"], 0, "already deleted");

    // Interactive: the topic name must be typed.
    broker
        .dmq()
        .args(["message", "delete", "--topic", "orders", "--id", &three])
        .write_stdin("order\n")
        .assert()
        .failure()
        .code(1)
        .stderr(
            predicate::str::contains("1 message matches in orders")
                .and(predicate::str::contains("type the topic name"))
                .and(predicate::str::contains("not confirmed")),
        );
    broker
        .dmq()
        .args(["message", "delete", "--topic", "orders", "--id", &three])
        .write_stdin("")
        .assert()
        .failure()
        .stderr(predicate::str::contains("not confirmed"));
    let page = broker.json(&["message", "query", "--topic", "orders", "--id", &three]);
    assert_eq!(
        page["messages"][0]["deleted"], false,
        "not deleted unconfirmed"
    );
    broker
        .dmq()
        .args(["message", "delete", "--topic", "orders", "--id", &three])
        .write_stdin("orders\n")
        .assert()
        .success()
        .stdout("deleted 1 message from orders\n");
    let page = broker.json(&["message", "query", "--topic", "orders", "--id", &three]);
    assert_eq!(page["messages"][0]["deleted"], true);
    // Nothing left to match: no question asked.
    broker
        .dmq()
        .args(["message", "delete", "--topic", "orders", "--id", &three])
        .assert()
        .success()
        .stdout(predicate::str::contains("nothing to delete"));

    // "Delete all of 2016".
    let done = broker.stdout(&[
        "message",
        "delete",
        "--topic",
        "orders",
        "--from",
        "2016-01-01T00:00:00Z",
        "--to",
        "2017-01-01T00:00:00Z",
        "--yes",
    ]);
    assert_eq!(done, "deleted 0 messages from orders\n");
    // The whole time range: the one message left.
    let done = broker.json(&[
        "message", "delete", "--topic", "orders", "--from", &from, "--to", &to, "--yes",
    ]);
    assert_eq!(done["matched"], 1, "{done}");
    assert_eq!(done["dry_run"], false);
}

#[test]
fn api_errors_are_reported_with_status_and_message() {
    let broker = TestBroker::start();
    broker.stdout(&["topic", "create", "orders"]);
    broker
        .dmq()
        .args(["message", "get", "0000019ac3d1e2f0000000000000002a"])
        .assert()
        .failure()
        .code(1)
        .stdout(predicate::str::is_empty())
        .stderr(
            predicate::str::contains("admin API: 404 not_found: ")
                .and(predicate::str::contains("panicked").not()),
        );
    broker
        .dmq()
        .args(["message", "get", "not-an-id"])
        .assert()
        .failure()
        .code(1)
        .stderr(predicate::str::contains("admin API: 400 bad_request: "));
    broker
        .dmq()
        .args(["message", "query", "--topic", "missing", "--key", "k"])
        .assert()
        .failure()
        .code(1)
        .stderr(predicate::str::contains("admin API: 404 not_found: "));
    broker
        .dmq()
        .args([
            "message", "delete", "--topic", "missing", "--key", "k", "--yes",
        ])
        .assert()
        .failure()
        .code(1)
        .stderr(predicate::str::contains("admin API: 404"));
    broker
        .dmq()
        .args(["trace", "0000019ac3d1e2f0000000000000002a"])
        .assert()
        .failure()
        .code(1)
        .stderr(predicate::str::contains("admin API: 404"));
    broker
        .dmq()
        .args(["dlq", "resend", "missing.dlq"])
        .assert()
        .failure()
        .code(1)
        .stderr(predicate::str::contains("admin API: 404"));
    // The binary protocol port does not speak HTTP: not a hang, an error.
    assert_cmd::Command::cargo_bin("dmq")
        .expect("dmq")
        .env_remove("DMQ_ADMIN_TOKEN")
        .env("DMQ_ADMIN", broker.addr.to_string())
        .args(["--timeout", "3s", "stats"])
        .timeout(Duration::from_secs(30))
        .assert()
        .failure()
        .code(1)
        .stderr(predicate::str::contains("admin API"));
}

#[test]
fn dead_letters_are_listed_and_resent() {
    use dmq_client::{Client, ClientOptions, GroupSettings, SubscribeOptions};

    let broker = TestBroker::start();
    assert_eq!(
        broker.stdout(&["dlq", "list"]),
        "no dead-letter topics\n",
        "empty at first"
    );
    assert_eq!(broker.json(&["dlq", "list"]), serde_json::json!([]));
    broker.stdout(&["topic", "create", "jobs"]);
    let receipt = broker.json(&["produce", "jobs", "job-1"]);
    let id = receipt["id"].as_str().expect("id").to_string();

    // A consumer that rejects it, with one attempt allowed: dead-lettered.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let addr = broker.addr.to_string();
    runtime.block_on(async move {
        let client = Client::connect(addr, ClientOptions::new("nacker"))
            .await
            .expect("connect");
        let options = SubscribeOptions {
            member_name: "nacker-1".into(),
            settings: GroupSettings {
                max_attempts: Some(1),
                ..GroupSettings::default()
            },
            ..SubscribeOptions::default()
        };
        let mut subscription = client
            .consumer()
            .subscribe("jobs", "workers", options)
            .await
            .expect("subscribe");
        let message = tokio::time::timeout(Duration::from_secs(10), subscription.recv())
            .await
            .expect("delivered in time")
            .expect("a message")
            .expect("no error");
        assert_eq!(message.value.as_ref(), b"job-1");
        message.nack(None).await.expect("nack confirmed");
        subscription.unsubscribe().await.expect("unsubscribe");
    });

    let listed = eventually("the dead letter", || {
        let listed = broker.json(&["dlq", "list"]);
        (listed[0]["messages"].as_u64() == Some(1)).then_some(listed)
    });
    let dlq = listed[0]["topic"].as_str().expect("topic").to_string();
    assert_eq!(listed[0]["source_topic"], "jobs");
    assert_eq!(listed[0]["group"], "workers");
    let table = broker.stdout(&["dlq", "list"]);
    assert!(table.starts_with("DLQ_TOPIC"), "{table}");
    assert!(table.contains(&dlq) && table.contains("workers"), "{table}");
    let got = broker.json(&["message", "get", &id]);
    assert!(
        got["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .any(|group| group["group"] == "workers" && group["dead_lettered"] == true),
        "{got}"
    );
    let trace = broker.json(&["trace", &id]);
    assert!(
        trace["events"]
            .as_array()
            .expect("events")
            .iter()
            .any(|event| event["kind"] == "dead_lettered"),
        "{trace}"
    );

    // Resend it (by id): back in the source topic, gone from the DLQ.
    let resent = broker.stdout(&["dlq", "resend", &dlq, "--id", &id]);
    assert_eq!(resent, format!("resent 1 message from {dlq}\n"));
    let page = broker.json(&[
        "message",
        "query",
        "--topic",
        "jobs",
        "--partition",
        "0",
        "--from-offset",
        "0",
        "--to-offset",
        "100",
    ]);
    let values: Vec<&str> = page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|message| message["preview"]["text"].as_str())
        .collect();
    assert_eq!(values, vec!["job-1", "job-1"], "{page}");
    // Resent messages are deleted from the DLQ: nothing left to resend.
    let resent = broker.json(&["dlq", "resend", &dlq]);
    assert_eq!(resent["resent"], 0);
}

#[test]
fn production_mode_needs_the_admin_token() {
    // The hash comes from `dmq hash-secret`, as an operator would make it.
    let hash = {
        let output = assert_cmd::Command::cargo_bin("dmq")
            .expect("dmq")
            .arg("hash-secret")
            .write_stdin("the-admin-token\n")
            .output()
            .expect("dmq ran");
        assert!(output.status.success());
        String::from_utf8(output.stdout)
            .expect("utf-8")
            .trim()
            .to_string()
    };
    let broker = TestBroker::start_with(move |config| {
        config.admin_tokens = vec![hash];
    });
    for token in [None, Some("wrong-token")] {
        let mut command = broker.dmq();
        if let Some(token) = token {
            command.args(["--token", token]);
        }
        command
            .args(["stats"])
            .assert()
            .failure()
            .code(1)
            .stdout(predicate::str::is_empty())
            .stderr(
                predicate::str::contains("admin API: 401 unauthorized: ")
                    .and(predicate::str::contains("--token"))
                    .and(predicate::str::contains("DMQ_ADMIN_TOKEN")),
            );
    }
    let stats = broker.json(&["--token", "the-admin-token", "stats", "--minutes", "2"]);
    assert_eq!(stats["minutes"].as_array().expect("minutes").len(), 2);
    broker
        .dmq()
        .env("DMQ_ADMIN_TOKEN", "the-admin-token")
        .args(["dlq", "list"])
        .assert()
        .success()
        .stdout("no dead-letter topics\n");
}

/// `dmq tx list` shows an abandoned transaction; `dmq tx resolve` ends it.
#[test]
fn transactions_are_listed_and_resolved() {
    let broker = TestBroker::start();
    broker.stdout(&["topic", "create", "orders"]);
    assert_eq!(broker.stdout(&["tx", "list"]), "no open transactions\n");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let handle = runtime.block_on(async {
        let client = dmq_client::Client::connect(
            broker.addr.to_string(),
            dmq_client::ClientOptions::new("shop"),
        )
        .await
        .expect("connect");
        let mut txn = client.transaction("shop", "order-17");
        txn.send(vec![dmq_client::Message::new("orders", "created")])
            .await
            .expect("send");
        txn.handle()
    });
    let listed = broker.json(&["tx", "list"]);
    assert_eq!(listed["transactions"][0]["handle"], handle, "{listed}");
    let table = broker.stdout(&["tx", "list"]);
    assert!(
        table.contains("order-17") && table.contains("open"),
        "{table}"
    );
    // A wrong handle is refused with the API's message; the right one
    // rolls the transaction back.
    broker
        .dmq()
        .args([
            "tx",
            "resolve",
            "shop",
            "order-17",
            &(handle + 1).to_string(),
            "rollback",
        ])
        .assert()
        .failure()
        .stderr(predicate::str::contains("404"));
    let done = broker.stdout(&[
        "tx",
        "resolve",
        "shop",
        "order-17",
        &handle.to_string(),
        "rollback",
    ]);
    assert!(done.contains("rollback"), "{done}");
    assert_eq!(broker.stdout(&["tx", "list"]), "no open transactions\n");
}
