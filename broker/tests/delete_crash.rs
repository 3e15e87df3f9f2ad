//! Range deletion is crash-safe: a real `dmqd` is killed with SIGKILL while
//! (or just after) the admin API deletes an offset range, then restarted on
//! the same data directory. Each range must be deleted whole or not at all;
//! a range whose deletion was answered 200 must be deleted; and a group
//! reading from the start gets exactly the records outside deleted ranges.
//! 12 cycles by default, `DMQ_DELETE_CRASH_CYCLES` for more.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Child;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dmq_protocol::{ProduceRecord, Request, Response};
use serde_json::json;

mod common;
use common::{free_port, spawn_dmqd, Api, Connection};

const RANGE: u64 = 50;
const TOPIC: &str = "dev.crash.deletes";

fn start(data_dir: &std::path::Path, addr: SocketAddr, admin: SocketAddr) -> Child {
    spawn_dmqd(data_dir, addr, Some(admin))
}

fn wait_ready(api: &Api) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if api
            .try_call("GET", "/api/info", None)
            .is_some_and(|(status, _)| status == 200)
        {
            return;
        }
        assert!(Instant::now() < deadline, "dmqd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn matched(api: &Api, range: u64) -> u64 {
    let answer = api.ok_post(
        &format!("/api/topics/{TOPIC}/messages/delete"),
        json!({"partition": 0, "from_offset": range * RANGE,
               "to_offset": (range + 1) * RANGE, "dry_run": true}),
    );
    answer["matched"].as_u64().unwrap()
}

#[test]
fn a_range_deletion_killed_midway_is_whole_or_absent() {
    let cycles = common::env_count("DMQ_DELETE_CRASH_CYCLES", 12);
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (addr, admin) = (free_port(), free_port());
    let mut child = start(dir.path(), addr, admin);
    let api = Api::new(admin, None);
    wait_ready(&api);
    api.ok_post(
        "/api/topics",
        json!({"environment": "dev", "department": "crash", "name": "deletes", "owner": "t"}),
    );
    // One record per offset of every range, in partition 0.
    let total = cycles * RANGE;
    runtime.block_on(async {
        let mut connection = Connection::hello(addr).await;
        let mut sent = 0;
        while sent < total {
            let count = (total - sent).min(500);
            let response = connection
                .request(Request::Produce(dmq_protocol::Produce {
                    topic: TOPIC.into(),
                    partition: Some(0),
                    idempotence: None,
                    records: (sent..sent + count)
                        .map(|i| ProduceRecord {
                            value: Bytes::from(i.to_string()),
                            ..Default::default()
                        })
                        .collect(),
                }))
                .await;
            assert!(matches!(response, Response::ProduceOk(_)), "{response:?}");
            sent += count;
        }
    });

    let mut acknowledged = Vec::new();
    for range in 0..cycles {
        // Delete range `range` and kill dmqd a little after sending it:
        // sometimes before the broker answers, sometimes after.
        let request_api = api.clone();
        let request = std::thread::spawn(move || {
            let body = json!({"partition": 0, "from_offset": range * RANGE,
                              "to_offset": (range + 1) * RANGE, "dry_run": false});
            request_api.try_call(
                "POST",
                &format!("/api/topics/{TOPIC}/messages/delete"),
                Some(&body.to_string()),
            )
        });
        std::thread::sleep(Duration::from_micros(300 * (range % 8)));
        child.kill().unwrap();
        child.wait().unwrap();
        let answered = request.join().unwrap().map(|(status, _)| status);
        if answered == Some(200) {
            acknowledged.push(range);
        }
        child = start(dir.path(), addr, admin);
        wait_ready(&api);
        for earlier in 0..=range {
            let left = matched(&api, earlier);
            assert!(
                left == 0 || left == RANGE,
                "range {earlier} is partly deleted: {left} of {RANGE} left"
            );
            if acknowledged.contains(&earlier) {
                assert_eq!(left, 0, "range {earlier} was acknowledged but came back");
            }
        }
    }

    // A new group from the start gets exactly the records outside deleted
    // ranges, once each.
    let deleted: Vec<u64> = (0..cycles).filter(|r| matched(&api, *r) == 0).collect();
    let expected = total - deleted.len() as u64 * RANGE;
    let delivered = runtime.block_on(async {
        let mut connection = Connection::hello(addr).await;
        let response = connection
            .request(Request::Subscribe(dmq_protocol::Subscribe {
                topic: TOPIC.into(),
                group: "after".into(),
                member_name: "m".into(),
                credit: 100_000,
                ..Default::default()
            }))
            .await;
        assert!(matches!(response, Response::Subscribed(_)), "{response:?}");
        let mut offsets = Vec::new();
        while (offsets.len() as u64) < expected {
            offsets.push(connection.push().await.offset);
        }
        // Nothing more arrives.
        let extra = connection.frame_within(Duration::from_millis(500)).await;
        assert!(extra.is_none(), "an extra frame: {extra:?}");
        offsets
    });
    for offset in delivered {
        assert!(
            !deleted.contains(&(offset / RANGE)),
            "offset {offset} of a deleted range was delivered"
        );
    }
    eprintln!(
        "{} of {cycles} ranges deleted, {} answered 200 before the kill",
        deleted.len(),
        acknowledged.len()
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
