//! A broker on a small, then full, disk (a tmpfs): it starts on a 24 MiB
//! disk (the trace log is sized by the configuration, not a fixed 64 MiB),
//! refuses produces with DiskFull once the disk is full, and restarts on
//! the full disk, serving reads, acks and deletions.
//!
//! Needs root (to mount the tmpfs); CI runs as root and fails the test if
//! the mount fails. Elsewhere it says why it skipped and passes.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use dmq_protocol::{ErrorCode, ProduceRecord, Request, Response};

mod common;
use common::{Connection, TmpfsMount};

fn config(data_dir: &Path) -> dmq_broker::BrokerConfig {
    dmq_broker::BrokerConfig {
        data_dir: data_dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        segment_bytes: 1 << 20,
        disk_reserve_bytes: 2 << 20,
        ..dmq_broker::BrokerConfig::default()
    }
}

fn produce(topic: &str, bytes: usize) -> Request {
    Request::Produce(dmq_protocol::Produce {
        topic: topic.into(),
        partition: Some(0),
        idempotence: None,
        records: vec![ProduceRecord {
            value: Bytes::from(vec![b'x'; bytes]),
            ..Default::default()
        }],
    })
}

/// Writes `path` until the disk has no room left.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0x55u8; 4096];
    while file.write_all(&chunk).is_ok() {}
    let _ = file.sync_all();
}

async fn stop(broker: dmq_broker::Broker) {
    tokio::time::timeout(Duration::from_secs(20), broker.shutdown())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_starts_on_a_small_and_on_a_full_disk() {
    let dir = tempfile::tempdir().unwrap();
    let _mount = match TmpfsMount::mount(dir.path(), "24m") {
        Ok(mount) => mount,
        Err(why) => {
            assert!(std::env::var("CI").is_err(), "CI must run this: {why}");
            eprintln!("skipped: cannot mount a tmpfs ({why})");
            return;
        }
    };
    let data = dir.path().join("data");
    let broker = dmq_broker::Broker::start(config(&data)).await.unwrap();
    let mut connection = Connection::hello(broker.protocol_addr()).await;
    let create = Request::CreateTopic(dmq_protocol::CreateTopic {
        name: "fill".into(),
        partitions: 1,
        ordered: false,
    });
    assert_eq!(connection.request(create).await, Response::Ok);
    // Fill the disk: 64 KiB records until the broker says DiskFull.
    let mut stored = 0u64;
    loop {
        match connection.request(produce("fill", 64 * 1024)).await {
            Response::ProduceOk(_) => stored += 1,
            Response::Error(error) => {
                assert_eq!(error.code, ErrorCode::DiskFull, "{error:?}");
                break;
            }
            other => panic!("{other:?}"),
        }
        assert!(stored < 1_000, "24 MiB never filled");
    }
    assert!(stored > 10, "only {stored} records fit");
    assert!(
        data.join("reserve").exists(),
        "the reserve is made at start"
    );
    drop(connection);
    stop(broker).await;
    // Whatever room is left goes to another file: the disk is really full.
    fill(&dir.path().join("filler"));

    // Restart on the full disk: reads, acks and deletions are served.
    let broker = dmq_broker::Broker::start(config(&data))
        .await
        .expect("dmqd starts on a full disk");
    assert!(!data.join("reserve").exists(), "the reserve is released");
    let mut connection = Connection::hello(broker.protocol_addr()).await;
    let response = connection.request(produce("fill", 64 * 1024)).await;
    assert!(
        matches!(&response, Response::Error(e) if e.code == ErrorCode::DiskFull),
        "{response:?}"
    );
    let subscribe = Request::Subscribe(dmq_protocol::Subscribe {
        topic: "fill".into(),
        group: "reader".into(),
        member_name: "m".into(),
        credit: 1_000,
        ..Default::default()
    });
    let Response::Subscribed(subscribed) = connection.request(subscribe).await else {
        panic!("subscribe on a full disk")
    };
    let mut positions = Vec::new();
    for _ in 0..stored {
        let delivery = connection.push().await;
        positions.push(dmq_protocol::MessagePosition {
            partition: delivery.partition,
            offset: delivery.offset,
        });
    }
    let ack = Request::Ack(dmq_protocol::Ack {
        subscription_id: subscribed.subscription_id,
        messages: positions,
    });
    assert_eq!(connection.request(ack).await, Response::Ok);
    let delete = Request::DeleteMessages(dmq_protocol::DeleteMessages {
        topic: "fill".into(),
        tombstone: dmq_protocol::Tombstone::OffsetRange {
            partition: 0,
            start: 0,
            end: stored / 2,
        },
    });
    assert_eq!(connection.request(delete).await, Response::Ok);
    // Deleting the topic (and the filler) frees the disk: produces work
    // again.
    std::fs::remove_file(dir.path().join("filler")).unwrap();
    let delete_topic = Request::DeleteTopic(dmq_protocol::DeleteTopic {
        name: "fill".into(),
    });
    assert_eq!(connection.request(delete_topic).await, Response::Ok);
    let create = Request::CreateTopic(dmq_protocol::CreateTopic {
        name: "again".into(),
        partitions: 1,
        ordered: false,
    });
    assert_eq!(connection.request(create).await, Response::Ok);
    let response = connection.request(produce("again", 1024)).await;
    assert!(matches!(response, Response::ProduceOk(_)), "{response:?}");
    drop(connection);
    stop(broker).await;
}
