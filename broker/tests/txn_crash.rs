//! Crash test for transactions: a real `dmqd` is killed with SIGKILL at a
//! random moment while a client begins, fills, commits and rolls back
//! transactions (20 cycles by default, `DMQ_TXN_CRASH_CYCLES` for more),
//! then restarted on the same data directory; transactions left open, or
//! whose end got no answer, are ended in later cycles by handle.
//!
//! At the end a new group reads the topic from the start, and:
//! - every record of a transaction whose TXN_END commit was answered is
//!   delivered;
//! - no record of a transaction rolled back, or still open, is;
//! - a transaction whose end got no answer is all delivered or none;
//! - no record is stored twice (the topic holds exactly the distinct
//!   records delivered).
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dmq_protocol::{
    Body, ErrorCode, MessageId, ProduceRecord, Push, Request, Response, TxnEnd, TxnOutcome,
    TxnProduce,
};

mod common;
use common::{free_port, spawn_dmqd, Connection};

const TOPIC: &str = "txn-crash";
const GROUP: &str = "producers";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    Committed,
    RolledBack,
    /// An end (or a produce) got no answer before the kill.
    Unsure,
}

#[derive(Debug)]
struct Txn {
    id: String,
    handle: u64,
    state: State,
    /// Ids of records whose produce was answered.
    records: Vec<MessageId>,
    /// Its end is no longer asked for (the broker forgot it after a
    /// restart: it ended one way or the other).
    forgotten: bool,
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Sends `request` and waits for its answer; `None` if the broker died.
async fn ask(connection: &mut Connection, request: Request) -> Option<Response> {
    let id = connection.send(request).await;
    loop {
        let frame = connection.frame_within(Duration::from_secs(10)).await?;
        if frame.correlation_id == id {
            if let Body::Response(response) = frame.body {
                return Some(response);
            }
        }
    }
}

fn produce(txn: usize, id: &str, handle: u64, first: usize, count: usize) -> Request {
    Request::TxnProduce(TxnProduce {
        producer_group: GROUP.into(),
        transaction_id: id.into(),
        handle,
        topic: TOPIC.into(),
        partition: None,
        records: (first..first + count)
            .map(|k| ProduceRecord {
                value: Bytes::from(format!("{txn}/{k}")),
                ..Default::default()
            })
            .collect(),
    })
}

fn end(id: &str, handle: u64, outcome: TxnOutcome) -> Request {
    Request::TxnEnd(TxnEnd {
        producer_group: GROUP.into(),
        transaction_id: id.into(),
        handle,
        outcome,
    })
}

/// One cycle's client: works on transactions until the broker dies.
async fn run_cycle(addr: SocketAddr, txns: &mut Vec<Txn>, rng: &mut Rng, cycle: u64) {
    let mut connection = Connection::hello_when_up(addr).await;
    let mut counter = 0usize;
    loop {
        counter += 1;
        let unfinished: Vec<usize> = (0..txns.len())
            .filter(|&i| {
                matches!(txns[i].state, State::Open | State::Unsure)
                    && txns[i].handle != 0
                    && !txns[i].forgotten
            })
            .collect();
        let roll = rng.below(100);
        if roll < 35 || unfinished.is_empty() {
            let index = txns.len();
            let id = format!("c{cycle}-{counter}");
            let count = 1 + rng.below(4) as usize;
            txns.push(Txn {
                id: id.clone(),
                handle: 0,
                state: State::Unsure,
                records: Vec::new(),
                forgotten: false,
            });
            match ask(&mut connection, produce(index, &id, 0, 0, count)).await {
                Some(Response::TxnProduceOk(ok)) => {
                    let txn = &mut txns[index];
                    txn.handle = ok.handle;
                    txn.state = State::Open;
                    txn.records = ok.records.iter().map(|r| r.message_id).collect();
                }
                Some(other) => panic!("begin: {other:?}"),
                // Unknown whether stored; no handle to end it with: it
                // stays unsure (all or none).
                None => return,
            }
            continue;
        }
        let i = unfinished[rng.below(unfinished.len() as u64) as usize];
        let (id, handle, state) = (txns[i].id.clone(), txns[i].handle, txns[i].state);
        if roll < 55 && state == State::Open {
            let first = txns[i].records.len() + 100 * (counter % 100);
            let count = 1 + rng.below(3) as usize;
            match ask(&mut connection, produce(i, &id, handle, first, count)).await {
                Some(Response::TxnProduceOk(ok)) => {
                    assert_eq!(ok.handle, handle);
                    txns[i]
                        .records
                        .extend(ok.records.iter().map(|r| r.message_id));
                }
                Some(Response::Error(e)) if e.code == ErrorCode::TransactionLimit => {}
                Some(other) => panic!("produce into {id}: {other:?}"),
                None => return,
            }
            continue;
        }
        let outcome = if rng.below(100) < 60 {
            TxnOutcome::Commit
        } else {
            TxnOutcome::Rollback
        };
        let asked = match outcome {
            TxnOutcome::Commit => State::Committed,
            TxnOutcome::Rollback => State::RolledBack,
        };
        txns[i].state = State::Unsure;
        match ask(&mut connection, end(&id, handle, outcome)).await {
            Some(Response::TxnEnded(_)) => txns[i].state = asked,
            Some(Response::Error(e)) if e.code == ErrorCode::TransactionConflict => {
                // An unsure end that happened the other way.
                assert_eq!(state, State::Unsure, "{id}: {e:?}");
                txns[i].state = match outcome {
                    TxnOutcome::Commit => State::RolledBack,
                    TxnOutcome::Rollback => State::Committed,
                };
            }
            // An unsure end settled before a restart: forgotten.
            Some(Response::Error(e)) if e.code == ErrorCode::UnknownTransaction => {
                assert_eq!(state, State::Unsure, "{id}: {e:?}");
                txns[i].forgotten = true;
            }
            Some(other) => panic!("end of {id}: {other:?}"),
            None => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_stay_atomic_across_sigkill() {
    let cycles = common::env_count("DMQ_TXN_CRASH_CYCLES", 20);
    let dir = tempfile::tempdir().unwrap();
    let mut txns: Vec<Txn> = Vec::new();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for cycle in 0..cycles {
        let addr = free_port();
        let mut child = spawn_dmqd(dir.path(), addr, None);
        if cycle == 0 {
            let mut admin = Connection::hello_when_up(addr).await;
            let created = admin
                .request(Request::CreateTopic(dmq_protocol::CreateTopic {
                    name: TOPIC.into(),
                    partitions: 2,
                    ordered: false,
                }))
                .await;
            assert_eq!(created, Response::Ok);
        }
        // The kill comes a random time after the broker is up (recovery
        // may take longer than the run).
        drop(Connection::hello_when_up(addr).await);
        let run_for = Duration::from_millis(50 + rng.below(400));
        let kill_at = Instant::now() + run_for;
        let killer = tokio::spawn(async move {
            tokio::time::sleep_until(kill_at.into()).await;
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
        });
        run_cycle(addr, &mut txns, &mut rng, cycle).await;
        killer.await.unwrap();
    }

    // Final run: a new group reads everything.
    let addr = free_port();
    let mut child = spawn_dmqd(dir.path(), addr, None);
    let mut consumer = Connection::hello_when_up(addr).await;
    let Response::Subscribed(subscription) = consumer
        .request(Request::Subscribe(dmq_protocol::Subscribe {
            topic: TOPIC.into(),
            group: "final".into(),
            member_name: "c".into(),
            credit: 100_000,
            start: dmq_protocol::StartPosition::Earliest,
            ..Default::default()
        }))
        .await
    else {
        panic!("subscribe failed")
    };
    let mut delivered: HashSet<MessageId> = HashSet::new();
    let mut delivered_txns: HashMap<usize, usize> = HashMap::new();
    while let Some(frame) = consumer.frame_within(Duration::from_secs(2)).await {
        let Body::Push(Push::Deliver(delivery)) = frame.body else {
            continue;
        };
        if delivered.insert(delivery.message_id) {
            let value = String::from_utf8(delivery.value.to_vec()).unwrap();
            let txn: usize = value.split('/').next().unwrap().parse().unwrap();
            *delivered_txns.entry(txn).or_default() += 1;
        }
        consumer
            .send_ack(
                subscription.subscription_id,
                delivery.partition,
                delivery.offset,
            )
            .await;
    }
    let Response::TopicDescription(topic) = consumer
        .request(Request::DescribeTopic(dmq_protocol::DescribeTopic {
            name: TOPIC.into(),
        }))
        .await
    else {
        panic!("describe failed")
    };
    child.kill().unwrap();
    child.wait().unwrap();

    let stored: u64 = topic
        .partitions
        .iter()
        .map(|p| p.end_offset - p.start_offset)
        .sum();
    assert_eq!(
        stored,
        delivered.len() as u64,
        "the topic holds a record twice (or one never delivered)"
    );
    let mut counts = HashMap::new();
    for (index, txn) in txns.iter().enumerate() {
        *counts.entry(format!("{:?}", txn.state)).or_insert(0) += 1;
        let known: Vec<bool> = txn
            .records
            .iter()
            .map(|id| delivered.contains(id))
            .collect();
        let any = delivered_txns.contains_key(&index);
        match txn.state {
            State::Committed => assert!(
                known.iter().all(|&d| d),
                "committed {} ({}): delivered {known:?}",
                txn.id,
                txn.handle
            ),
            State::RolledBack | State::Open => assert!(
                !any,
                "{:?} {} ({}): {} records delivered",
                txn.state, txn.id, txn.handle, delivered_txns[&index]
            ),
            // A begin that got no answer has no handle: nobody can commit
            // it.
            State::Unsure if txn.handle == 0 => assert!(
                !any,
                "an unanswered begin {}: {} records delivered",
                txn.id, delivered_txns[&index]
            ),
            State::Unsure => assert!(
                known.iter().all(|&d| d) || !any,
                "unsure {} ({}): delivered {known:?}, partly",
                txn.id,
                txn.handle
            ),
        }
    }
    assert!(
        counts.get("Committed").copied().unwrap_or(0) > 10,
        "too few commits to mean anything: {counts:?}"
    );
    eprintln!(
        "{cycles} kills: transactions by final state {counts:?}, {} records delivered",
        delivered.len()
    );
}
