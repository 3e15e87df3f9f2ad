//! `dmq` against a real broker (started in this test process on a random
//! 127.0.0.1 port with a temp data dir): every command over the binary
//! protocol, in table and JSON form, as a person or a script would use it.
//! The admin API commands are in `admin_e2e.rs`.

mod common;

use common::{json, TestBroker as Broker};
use predicates::prelude::*;

#[test]
fn topics_produce_consume_groups_and_seek() {
    let broker = Broker::start();
    broker
        .dmq()
        .args(["topic", "create", "orders", "--partitions", "2"])
        .assert()
        .success()
        .stdout(predicate::str::contains("orders"));
    let topics = json(&broker.stdout(&["--format", "json", "topic", "list"]));
    assert_eq!(topics[0]["name"], "orders");
    assert_eq!(topics[0]["partitions"], 2);
    // A single broker names no leader: everything goes to it.
    let leaders = json(&broker.stdout(&["--format", "json", "topic", "leaders", "orders"]));
    assert_eq!(
        leaders,
        serde_json::json!([
            {"partition": 0, "node_id": null, "address": null},
            {"partition": 1, "node_id": null, "address": null},
        ])
    );
    let table = broker.stdout(&["topic", "leaders", "orders"]);
    assert!(table.contains("(the node asked)"), "{table}");

    // Produce from arguments: one line per acknowledged message, in order.
    let produced = broker.stdout(&["produce", "orders", "--partition", "0", "one", "two"]);
    let lines: Vec<&str> = produced.lines().collect();
    assert_eq!(lines.len(), 2, "{produced}");
    assert!(lines[0].contains("partition 0 offset 0"), "{produced}");
    assert!(lines[1].contains("partition 0 offset 1"), "{produced}");

    // From stdin, with a key and a header, as JSON lines.
    let output = broker
        .dmq()
        .args([
            "--format",
            "json",
            "produce",
            "orders",
            "--key",
            "k1",
            "--header",
            "source=test",
        ])
        .write_stdin("three\nfour\n")
        .output()
        .expect("dmq ran");
    assert!(output.status.success());
    let receipts: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .expect("utf-8")
        .lines()
        .map(json)
        .collect();
    assert_eq!(receipts.len(), 2);
    assert_eq!(
        receipts[0]["partition"], receipts[1]["partition"],
        "same key, same partition"
    );

    // A delayed message is reported as delayed, without an offset.
    let delayed = json(&broker.stdout(&[
        "--format", "json", "produce", "orders", "--delay", "10m", "later",
    ]));
    assert!(delayed["offset"].is_null());
    assert!(delayed["deliver_at"].is_string());

    // Consume: prints and acks; a second consume of the group gets nothing.
    let consumed = broker.stdout(&[
        "--format", "json", "consume", "orders", "--group", "billing", "--from", "earliest",
        "--count", "4", "--idle", "5s",
    ]);
    let values: Vec<String> = consumed
        .lines()
        .map(|line| json(line)["value"].as_str().expect("value").to_string())
        .collect();
    let mut sorted = values.clone();
    sorted.sort();
    assert_eq!(sorted, vec!["four", "one", "three", "two"]);
    let again = broker.stdout(&[
        "consume", "orders", "--group", "billing", "--count", "1", "--idle", "500ms",
    ]);
    assert!(again.trim().is_empty(), "acked messages came back: {again}");

    let group =
        json(&broker.stdout(&["--format", "json", "group", "describe", "orders", "billing"]));
    let partitions = group["partitions"].as_array().expect("partitions");
    let lag: u64 = partitions
        .iter()
        .map(|p| p["lag"].as_u64().expect("lag"))
        .sum();
    assert_eq!(lag, 0);
    let groups = broker.stdout(&["group", "list", "orders"]);
    assert!(groups.contains("billing"), "{groups}");

    // Seek: a dry run changes nothing; --execute replays.
    let dry = broker.stdout(&["group", "seek", "orders", "billing", "--earliest"]);
    assert!(dry.contains("dry run"), "{dry}");
    let still_nothing = broker.stdout(&[
        "consume", "orders", "--group", "billing", "--count", "1", "--idle", "500ms",
    ]);
    assert!(still_nothing.trim().is_empty());
    broker.stdout(&[
        "group",
        "seek",
        "orders",
        "billing",
        "--earliest",
        "--execute",
    ]);
    let replayed = broker.stdout(&[
        "consume", "orders", "--group", "billing", "--count", "4", "--idle", "5s",
    ]);
    assert_eq!(replayed.lines().count(), 4, "{replayed}");

    // --no-ack: printed but redelivered next time.
    broker.stdout(&["topic", "create", "jobs"]);
    broker.stdout(&["produce", "jobs", "job-1"]);
    let first = broker.stdout(&[
        "consume", "jobs", "--group", "w", "--count", "1", "--no-ack", "--idle", "5s",
    ]);
    assert!(first.contains("job-1"));
    let second = broker.stdout(&[
        "consume", "jobs", "--group", "w", "--count", "1", "--idle", "5s",
    ]);
    assert!(
        second.contains("job-1"),
        "unacked message not redelivered: {second}"
    );
    assert!(
        second.contains("attempt=2") || second.contains("attempt 2"),
        "{second}"
    );
}

#[test]
fn errors_are_clear_and_exit_non_zero() {
    let broker = Broker::start();
    broker
        .dmq()
        .args(["produce", "missing-topic", "x"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("UnknownTopic"));
    broker
        .dmq()
        .args(["group", "describe", "missing-topic", "g"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("error"));
}

/// `topic create` of a name that exists fails with a clear message (the
/// broker answers TopicExists); `--if-not-exists` accepts it when its
/// settings match, and only then.
#[test]
fn creating_an_existing_topic_fails_unless_asked_to_accept_it() {
    let broker = Broker::start();
    broker.stdout(&["topic", "create", "orders", "--partitions", "2"]);
    broker
        .dmq()
        .args(["topic", "create", "orders", "--partitions", "2"])
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("already exists")
                .and(predicate::str::contains("--if-not-exists")),
        );
    let accepted = json(&broker.stdout(&[
        "--format",
        "json",
        "topic",
        "create",
        "orders",
        "--partitions",
        "2",
        "--if-not-exists",
    ]));
    assert_eq!(accepted["exists"], "orders");
    broker
        .dmq()
        .args(["topic", "create", "orders", "--if-not-exists"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("exists with 2 partition"));
    // A new name is simply created, with or without the flag.
    let created = json(&broker.stdout(&[
        "--format",
        "json",
        "topic",
        "create",
        "jobs",
        "--if-not-exists",
    ]));
    assert_eq!(created["created"], "jobs");
}

#[test]
fn bench_reports_throughput_and_percentiles() {
    let broker = Broker::start();
    let output = broker.stdout(&[
        "--format",
        "json",
        "bench",
        "--producers",
        "2",
        "--consumers",
        "1",
        "--count",
        "2000",
        "--size",
        "256",
        "--acks",
    ]);
    let report = json(&output);
    assert_eq!(report["produced"], 2000);
    assert_eq!(report["delivered"], 2000);
    assert_eq!(report["errors"], 0);
    assert!(report["produce_msgs_per_sec"].as_f64().expect("rate") > 0.0);
    for latency in ["produce_to_ack", "produce_to_deliver"] {
        let p50 = report[latency]["p50_us"].as_u64().expect("p50");
        let p99 = report[latency]["p99_us"].as_u64().expect("p99");
        let max = report[latency]["max_us"].as_u64().expect("max");
        assert!(p50 <= p99 && p99 <= max, "{latency}: {report}");
    }
}
