//! Exhaustion against a real `dmqd` process, with its memory (RSS) and
//! open descriptors read from /proc: what an unauthenticated peer, or an
//! authenticated client that never reads its answers, can make it hold.
//!
//! Each test regresses an attack that worked: 40 connections each buffering
//! up to 16 MiB before HELLO (RSS 9 → 611 MB); trickling bytes restarting
//! the handshake timeout; 1 MB per 500 produces of a client that never
//! reads; connections without a per-address cap.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dmq_protocol::{encode_frame_to_vec, Frame, ProduceRecord, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;
use common::{free_port, Connection};

struct Dmqd {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Dmqd {
    fn start(settings: &str) -> Dmqd {
        let dir = tempfile::tempdir().unwrap();
        let addr = free_port();
        let admin = free_port();
        let config = dir.path().join("dmqd.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\nlisten = \"{addr}\"\nadmin_listen = \"{admin}\"\n\
                 segment_bytes = 1048576\nfsync = \"never\"\ntrace = false\n{settings}\n",
                dir.path().join("data")
            ),
        )
        .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_dmqd"))
            .args(["--config", config.to_str().unwrap()])
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "dmqd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Dmqd {
            child,
            addr,
            _dir: dir,
        }
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    fn descriptors(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }
}

impl Drop for Dmqd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads until the peer closes, at most `within`; true if it closed.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut sink = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_peers_cannot_exhaust_the_broker() {
    let dmqd = Dmqd::start("handshake_timeout_ms = 1000\nmax_connections_per_address = 30");
    let rss_before = dmqd.rss_kib();
    let descriptors_before = dmqd.descriptors();

    // Big frames before HELLO: refused from their length prefix.
    let mut flood = Vec::new();
    for _ in 0..25 {
        let mut stream = TcpStream::connect(dmqd.addr).await.unwrap();
        let mut bytes = (16u32 << 20).to_le_bytes().to_vec();
        bytes.extend(std::iter::repeat_n(7u8, 4 << 20));
        // The broker may close before all of it is written.
        let _ = stream.write_all(&bytes).await;
        flood.push(stream);
    }
    for stream in &mut flood {
        assert!(closed_within(stream, Duration::from_secs(5)).await);
    }
    drop(flood);
    let rss_after = dmqd.rss_kib();
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );

    // Trickling peers: one byte every 100 ms never extends the handshake.
    let started = Instant::now();
    let mut trickles = Vec::new();
    for _ in 0..10 {
        let mut stream = TcpStream::connect(dmqd.addr).await.unwrap();
        // A 200-byte frame announced, then its body one byte at a time.
        stream.write_all(&200u32.to_le_bytes()).await.unwrap();
        trickles.push(stream);
    }
    let mut closed = 0;
    'trickle: for _ in 0..50 {
        for stream in &mut trickles {
            if stream.write_all(&[1]).await.is_err() {
                closed += 1;
                if closed == 10 {
                    break 'trickle;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for stream in &mut trickles {
        assert!(closed_within(stream, Duration::from_secs(3)).await);
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "trickling peers were held {:?}",
        started.elapsed()
    );
    drop(trickles);

    // One address holds at most 30 connections; the 31st is refused.
    let mut idle = Vec::new();
    for _ in 0..30 {
        idle.push(TcpStream::connect(dmqd.addr).await.unwrap());
    }
    let mut refused = TcpStream::connect(dmqd.addr).await.unwrap();
    assert!(
        closed_within(&mut refused, Duration::from_secs(2)).await,
        "a 31st connection from one address was kept"
    );
    // The descriptors are bounded, and freed when the handshake deadline
    // closes the idle ones.
    assert!(dmqd.descriptors() <= descriptors_before + 32);
    for stream in &mut idle {
        assert!(closed_within(stream, Duration::from_secs(3)).await);
    }
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(5);
    while dmqd.descriptors() > descriptors_before + 2 {
        assert!(Instant::now() < deadline, "descriptors were not freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A real client is served.
    let mut connection = Connection::hello(dmqd.addr).await;
    assert_eq!(
        connection.request(Request::Ping).await,
        dmq_protocol::Response::Pong
    );
}

/// A connection to `dmqd` that made the one-partition topic "flood".
async fn flood_topic(dmqd: &Dmqd) -> Connection {
    let mut connection = Connection::hello(dmqd.addr).await;
    let response = connection
        .request(Request::CreateTopic(dmq_protocol::CreateTopic {
            name: "flood".into(),
            partitions: 1,
            ordered: false,
        }))
        .await;
    assert_eq!(response, dmq_protocol::Response::Ok);
    connection
}

fn produce_frame(correlation_id: u32) -> Vec<u8> {
    let frame = Frame::request(
        correlation_id,
        Request::Produce(dmq_protocol::Produce {
            topic: "flood".into(),
            partition: Some(0),
            idempotence: None,
            records: vec![ProduceRecord {
                value: Bytes::from_static(&[b'x'; 100]),
                ..Default::default()
            }],
        }),
    );
    encode_frame_to_vec(&frame).unwrap()
}

/// Regression: a producer that never reads its answers grew the broker by
/// about 2 KB per request, without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_answers_is_stopped_not_buffered() {
    let dmqd =
        Dmqd::start("max_inflight_requests_per_connection = 256\nconnection_queue_frames = 64");
    let mut connection = flood_topic(&dmqd).await;
    let rss_before = dmqd.rss_kib();
    // Write produces in chunks and never read: the broker must stop
    // reading (the write stalls) long before 400,000 requests.
    let mut chunk = Vec::new();
    for i in 0..1_000 {
        chunk.extend(produce_frame(i));
    }
    let stream = &mut connection.stream;
    let mut sent = 0u64;
    let stalled = loop {
        if sent >= 400_000 {
            break false;
        }
        match tokio::time::timeout(Duration::from_secs(3), stream.write_all(&chunk)).await {
            Ok(Ok(())) => sent += 1_000,
            Ok(Err(error)) => panic!("the broker closed the connection: {error}"),
            Err(_) => break true,
        }
    };
    let rss_after = dmqd.rss_kib();
    assert!(
        stalled,
        "the broker read all {sent} requests without answering"
    );
    assert!(
        rss_after < rss_before + 96 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB after {sent} unread produces"
    );
    // Reading the answers lets it go on.
    drop(connection);
    let mut other = Connection::hello(dmqd.addr).await;
    assert_eq!(
        other.request(Request::Ping).await,
        dmq_protocol::Response::Pong
    );
}

/// Regression: every idempotent producer id stayed in the dedup window
/// until restart (200,000 ids held 235 MB). The window is bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_idempotent_producers_hold_bounded_memory() {
    let dmqd = Dmqd::start("producer_window_max = 1000");
    let mut connection = flood_topic(&dmqd).await;
    let rss_before = dmqd.rss_kib();
    const PRODUCERS: u64 = 40_000;
    const PIPELINE: u64 = 1_000;
    // Answers of 50 records each: the window would hold ~2 KB per producer.
    let records: Vec<ProduceRecord> = (0..50)
        .map(|_| ProduceRecord {
            value: Bytes::from_static(b"x"),
            ..Default::default()
        })
        .collect();
    for chunk in 0..PRODUCERS / PIPELINE {
        let mut bytes = Vec::new();
        for i in 0..PIPELINE {
            let producer_id = chunk * PIPELINE + i + 1;
            let frame = Frame::request(
                producer_id as u32,
                Request::Produce(dmq_protocol::Produce {
                    topic: "flood".into(),
                    partition: Some(0),
                    idempotence: Some(dmq_protocol::ProducerSequence {
                        producer_id,
                        sequence: 1,
                    }),
                    records: records.clone(),
                }),
            );
            bytes.extend(encode_frame_to_vec(&frame).unwrap());
        }
        connection.stream.write_all(&bytes).await.unwrap();
        for _ in 0..PIPELINE {
            let frame = connection.frame().await.expect("an answer");
            assert!(
                matches!(
                    frame.body,
                    dmq_protocol::Body::Response(dmq_protocol::Response::ProduceOk(_))
                ),
                "{frame:?}"
            );
        }
    }
    let rss_after = dmqd.rss_kib();
    assert!(
        rss_after < rss_before + 48 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB over {PRODUCERS} producers"
    );
    // The newest producers are still remembered: a retry gets its offsets.
    let retry = Request::Produce(dmq_protocol::Produce {
        topic: "flood".into(),
        partition: Some(0),
        idempotence: Some(dmq_protocol::ProducerSequence {
            producer_id: PRODUCERS,
            sequence: 1,
        }),
        records: records.clone(),
    });
    let end_before = flood_end(&mut connection).await;
    let response = connection.request(retry).await;
    assert!(matches!(response, dmq_protocol::Response::ProduceOk(_)));
    assert_eq!(flood_end(&mut connection).await, end_before, "stored twice");
}

/// The end offset of "flood"'s partition 0.
async fn flood_end(connection: &mut Connection) -> u64 {
    let response = connection
        .request(Request::DescribeTopic(dmq_protocol::DescribeTopic {
            name: "flood".into(),
        }))
        .await;
    let dmq_protocol::Response::TopicDescription(description) = response else {
        panic!("{response:?}")
    };
    description.partitions[0].end_offset
}
