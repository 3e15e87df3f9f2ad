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
//!
//! Every produce is numbered (TXN_PRODUCE_SEQ), and one whose answer the
//! kill took is sent again in a later cycle (a lost begin too, with
//! handle 0) before anything else happens to its transaction: so a
//! committed transaction delivers exactly the records its answers named,
//! none twice (without the numbers the retry stored its records again).
//!
//! A second test kills the broker while a worker moves payments from one
//! topic to another exactly once (TXN_ACK, TXN_PRODUCE and a commit per
//! payment): every payment ends with exactly one shipment.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dmq_protocol::{
    Body, ErrorCode, MessageId, ProduceRecord, Push, Request, Response, TxnEnd, TxnOutcome,
    TxnProduce, TxnProduceSeq,
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
    /// The number of its next produce.
    sequence: u32,
    /// A produce whose answer a kill took: sent again first.
    pending: Option<Request>,
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

fn produce(
    txn: usize,
    id: &str,
    handle: u64,
    sequence: u32,
    first: usize,
    count: usize,
) -> Request {
    Request::TxnProduceSeq(TxnProduceSeq {
        produce: TxnProduce {
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
        },
        sequence,
    })
}

/// Every message of `topic` for a new group `group` from the earliest
/// offset (until none comes for 2 s), each acked.
async fn read_everything(
    connection: &mut Connection,
    topic: &str,
    group: &str,
) -> Vec<dmq_protocol::Delivery> {
    let Response::Subscribed(subscription) = connection
        .request(Request::Subscribe(dmq_protocol::Subscribe {
            topic: topic.into(),
            group: group.into(),
            member_name: "reader".into(),
            credit: 100_000,
            start: dmq_protocol::StartPosition::Earliest,
            ..Default::default()
        }))
        .await
    else {
        panic!("subscribe failed")
    };
    let mut deliveries = Vec::new();
    while let Some(frame) = connection.frame_within(Duration::from_secs(2)).await {
        let Body::Push(Push::Deliver(delivery)) = frame.body else {
            continue;
        };
        connection
            .send_ack(
                subscription.subscription_id,
                delivery.partition,
                delivery.offset,
            )
            .await;
        deliveries.push(delivery);
    }
    deliveries
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
async fn run_cycle(
    addr: SocketAddr,
    txns: &mut Vec<Txn>,
    rng: &mut Rng,
    cycle: u64,
    retries: &mut usize,
) {
    let mut connection = Connection::hello_when_up(addr).await;
    let mut counter = 0usize;
    loop {
        counter += 1;
        // A produce a kill left unanswered goes first, again.
        if let Some(i) = txns.iter().position(|t| t.pending.is_some()) {
            *retries += 1;
            let request = txns[i].pending.clone().unwrap();
            match ask(&mut connection, request).await {
                Some(Response::TxnProduceOk(ok)) => {
                    let txn = &mut txns[i];
                    assert!(txn.handle == 0 || txn.handle == ok.handle, "{}", txn.id);
                    txn.handle = ok.handle;
                    txn.state = State::Open;
                    txn.records.extend(ok.records.iter().map(|r| r.message_id));
                    txn.sequence += 1;
                    txn.pending = None;
                }
                Some(Response::Error(e)) if e.code == ErrorCode::TransactionLimit => {
                    txns[i].pending = None;
                }
                Some(other) => panic!("retry into {}: {other:?}", txns[i].id),
                None => return,
            }
            continue;
        }
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
            let request = produce(index, &id, 0, 0, 0, count);
            txns.push(Txn {
                id: id.clone(),
                handle: 0,
                state: State::Unsure,
                records: Vec::new(),
                forgotten: false,
                sequence: 0,
                pending: None,
            });
            match ask(&mut connection, request.clone()).await {
                Some(Response::TxnProduceOk(ok)) => {
                    let txn = &mut txns[index];
                    txn.handle = ok.handle;
                    txn.state = State::Open;
                    txn.records = ok.records.iter().map(|r| r.message_id).collect();
                    txn.sequence = 1;
                }
                Some(other) => panic!("begin: {other:?}"),
                // Unknown whether stored: sent again in the next cycle
                // (until then it has no handle and stays unsure).
                None => {
                    txns[index].pending = Some(request);
                    return;
                }
            }
            continue;
        }
        let i = unfinished[rng.below(unfinished.len() as u64) as usize];
        let (id, handle, state) = (txns[i].id.clone(), txns[i].handle, txns[i].state);
        if roll < 55 && state == State::Open {
            let first = txns[i].records.len() + 100 * (counter % 100);
            let count = 1 + rng.below(3) as usize;
            let request = produce(i, &id, handle, txns[i].sequence, first, count);
            match ask(&mut connection, request.clone()).await {
                Some(Response::TxnProduceOk(ok)) => {
                    assert_eq!(ok.handle, handle);
                    txns[i]
                        .records
                        .extend(ok.records.iter().map(|r| r.message_id));
                    txns[i].sequence += 1;
                }
                Some(Response::Error(e)) if e.code == ErrorCode::TransactionLimit => {}
                Some(other) => panic!("produce into {id}: {other:?}"),
                None => {
                    txns[i].pending = Some(request);
                    return;
                }
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
    let mut retries = 0;
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
        run_cycle(addr, &mut txns, &mut rng, cycle, &mut retries).await;
        killer.await.unwrap();
    }

    // Final run: a new group reads everything.
    let addr = free_port();
    let mut child = spawn_dmqd(dir.path(), addr, None);
    let mut consumer = Connection::hello_when_up(addr).await;
    let mut delivered: HashSet<MessageId> = HashSet::new();
    let mut delivered_txns: HashMap<usize, usize> = HashMap::new();
    let mut delivered_ids: HashMap<usize, Vec<MessageId>> = HashMap::new();
    for delivery in read_everything(&mut consumer, TOPIC, "final").await {
        if delivered.insert(delivery.message_id) {
            let value = String::from_utf8(delivery.value.to_vec()).unwrap();
            let txn: usize = value.split('/').next().unwrap().parse().unwrap();
            *delivered_txns.entry(txn).or_default() += 1;
            delivered_ids
                .entry(txn)
                .or_default()
                .push(delivery.message_id);
        }
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
        // Records delivered that no answer named: a produce stored twice
        // (or one whose retry never came: only the last cycle's).
        let unnamed = delivered_ids.get(&index).map_or(0, |ids| {
            ids.iter().filter(|id| !txn.records.contains(id)).count()
        });
        assert!(
            unnamed == 0 || txn.pending.is_some(),
            "{:?} {} ({}): {unnamed} records delivered that no answer named",
            txn.state,
            txn.id,
            txn.handle
        );
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
        "{cycles} kills: transactions by final state {counts:?}, {} records delivered, \
         {} produces sent again after a kill",
        delivered.len(),
        retries
    );
}

// ----- consume-and-produce across SIGKILL ---------------------------------

const INPUT: &str = "pipeline-in";
const OUTPUT: &str = "pipeline-out";
const WORKERS: &str = "workers";
/// Payments produced at the start of each cycle (so that every kill lands
/// amid the work).
const PAYMENTS_PER_CYCLE: usize = 200;

/// A worker connection that keeps the pushes (deliveries, check-backs)
/// that arrive while it waits for an answer.
struct Worker {
    connection: Connection,
    pushes: std::collections::VecDeque<Push>,
    subscription: u64,
}

impl Worker {
    /// Subscribes group `worker` to the input and listens for the
    /// workers' check-backs; None if the broker died meanwhile.
    async fn start(addr: SocketAddr) -> Option<Worker> {
        let connection = Connection::hello_when_up(addr).await;
        let mut worker = Worker {
            connection,
            pushes: std::collections::VecDeque::new(),
            subscription: 0,
        };
        let listen = Request::TxnListen(dmq_protocol::TxnListen {
            producer_group: WORKERS.into(),
        });
        assert_eq!(worker.ask(listen).await?, Response::Ok);
        let subscribe = Request::Subscribe(dmq_protocol::Subscribe {
            topic: INPUT.into(),
            group: "worker".into(),
            member_name: "w".into(),
            credit: 8,
            start: dmq_protocol::StartPosition::Earliest,
            settings: dmq_protocol::GroupSettings {
                ack_timeout_ms: Some(1_500),
                ..Default::default()
            },
            ..Default::default()
        });
        match worker.ask(subscribe).await? {
            Response::Subscribed(subscribed) => worker.subscription = subscribed.subscription_id,
            other => panic!("subscribe: {other:?}"),
        }
        Some(worker)
    }

    /// Sends `request` and waits for its answer; None if the broker died.
    async fn ask(&mut self, request: Request) -> Option<Response> {
        let id = self.connection.try_send(request).await?;
        loop {
            let frame = self
                .connection
                .frame_within(Duration::from_secs(10))
                .await?;
            match frame.body {
                Body::Response(response) if frame.correlation_id == id => return Some(response),
                Body::Push(push) => self.pushes.push_back(push),
                _ => {}
            }
        }
    }

    /// The next push within `idle`; None when idle that long or dead.
    async fn push(&mut self, idle: Duration) -> Option<Push> {
        if let Some(push) = self.pushes.pop_front() {
            return Some(push);
        }
        loop {
            let frame = self.connection.frame_within(idle).await?;
            if let Body::Push(push) = frame.body {
                return Some(push);
            }
        }
    }
}

/// Works on payments until the broker dies (or nothing arrives for
/// `idle`): each delivery is acked in a transaction that produces its
/// shipment, then committed; every check-back is answered with a rollback
/// (a transaction is left open only by a kill). Returns the commits
/// answered and the check-backs answered.
async fn work(addr: SocketAddr, cycle: u64, idle: Duration) -> (usize, usize) {
    let Some(mut worker) = Worker::start(addr).await else {
        return (0, 0);
    };
    let (mut committed, mut checks) = (0, 0);
    let mut counter = 0;
    while let Some(push) = worker.push(idle).await {
        let delivery = match push {
            Push::Deliver(delivery) => delivery,
            Push::TxnCheck(check) => {
                let rollback = end(&check.transaction_id, check.handle, TxnOutcome::Rollback);
                let rollback = match rollback {
                    Request::TxnEnd(end) => Request::TxnEnd(TxnEnd {
                        producer_group: WORKERS.into(),
                        ..end
                    }),
                    other => other,
                };
                // Ended (or it committed, or it is forgotten): all fine.
                checks += 1;
                if worker.ask(rollback).await.is_none() {
                    return (committed, checks);
                }
                continue;
            }
        };
        counter += 1;
        // The push credit back (its OK is skipped like any answer not
        // waited for).
        let credit = Request::Credit(dmq_protocol::Credit {
            subscription_id: worker.subscription,
            credit: 1,
        });
        if worker.connection.try_send(credit).await.is_none() {
            return (committed, checks);
        }
        let payment = String::from_utf8(delivery.value.to_vec()).unwrap();
        let id = format!("{payment}-{cycle}-{counter}");
        let ack = Request::TxnAck(dmq_protocol::TxnAck {
            producer_group: WORKERS.into(),
            transaction_id: id.clone(),
            handle: 0,
            subscription_id: worker.subscription,
            messages: vec![dmq_protocol::MessagePosition {
                partition: delivery.partition,
                offset: delivery.offset,
            }],
        });
        let handle = match worker.ask(ack).await {
            Some(Response::TxnAcked(acked)) => acked.handle,
            // Claimed by a transaction a kill left open: its check-back
            // rolls it back, and the payment comes again after its ack
            // timeout.
            Some(Response::Error(e)) if e.code == ErrorCode::TransactionConflict => continue,
            Some(other) => panic!("txn ack of {payment}: {other:?}"),
            None => return (committed, checks),
        };
        let produce = Request::TxnProduce(TxnProduce {
            producer_group: WORKERS.into(),
            transaction_id: id.clone(),
            handle,
            topic: OUTPUT.into(),
            partition: None,
            records: vec![ProduceRecord {
                value: Bytes::from(payment.replace("paid", "ship")),
                ..Default::default()
            }],
        });
        match worker.ask(produce).await {
            Some(Response::TxnProduceOk(_)) => {}
            // Rolled back by a check-back meanwhile (a slow machine).
            Some(Response::Error(e)) if e.code == ErrorCode::TransactionConflict => continue,
            Some(other) => panic!("txn produce of {payment}: {other:?}"),
            None => return (committed, checks),
        }
        let commit = Request::TxnEnd(TxnEnd {
            producer_group: WORKERS.into(),
            transaction_id: id,
            handle,
            outcome: TxnOutcome::Commit,
        });
        match worker.ask(commit).await {
            Some(Response::TxnEnded(_)) => committed += 1,
            Some(Response::Error(e)) if e.code == ErrorCode::TransactionConflict => {}
            Some(other) => panic!("commit of {payment}: {other:?}"),
            None => return (committed, checks),
        }
    }
    (committed, checks)
}

/// Exactly once between two topics across SIGKILL: a worker moves 200
/// payments per cycle to shipments, each in one transaction that acks the payment
/// (TXN_ACK) and produces its shipment, while the broker is killed at
/// random moments; transactions a kill leaves open are rolled back by the
/// worker's check-back answers. At the end every payment has exactly one
/// shipment, and no payment is left to the worker's group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_and_produce_stays_exactly_once_across_sigkill() {
    let cycles = common::env_count("DMQ_TXN_CRASH_CYCLES", 20);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dmqd.toml");
    // Check-backs within the test's time.
    std::fs::write(
        &config,
        "transaction_timeout_ms = 1000\ntransaction_check_backoff_max_ms = 1000\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let spawn = |addr: SocketAddr| {
        std::process::Command::new(env!("CARGO_BIN_EXE_dmqd"))
            .args([
                "--config",
                config.to_str().unwrap(),
                "--data-dir",
                data.to_str().unwrap(),
                "--listen",
                &addr.to_string(),
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut committed, mut checks) = (0, 0);
    for cycle in 0..cycles {
        let addr = free_port();
        let mut child = spawn(addr);
        let mut admin = Connection::hello_when_up(addr).await;
        if cycle == 0 {
            for topic in [INPUT, OUTPUT] {
                let created = admin
                    .request(Request::CreateTopic(dmq_protocol::CreateTopic {
                        name: topic.into(),
                        partitions: 1,
                        ordered: false,
                    }))
                    .await;
                assert_eq!(created, Response::Ok);
            }
        }
        let first = cycle as usize * PAYMENTS_PER_CYCLE;
        for n in first..first + PAYMENTS_PER_CYCLE {
            let produced = admin
                .request(Request::Produce(dmq_protocol::Produce {
                    topic: INPUT.into(),
                    records: vec![ProduceRecord {
                        value: Bytes::from(format!("paid {n}")),
                        ..Default::default()
                    }],
                    ..Default::default()
                }))
                .await;
            assert!(matches!(produced, Response::ProduceOk(_)), "{produced:?}");
        }
        drop(admin);
        let kill_at = Instant::now() + Duration::from_millis(20 + rng.below(300));
        let killer = tokio::spawn(async move {
            tokio::time::sleep_until(kill_at.into()).await;
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
        });
        let (done, answered) = work(addr, cycle, Duration::from_secs(10)).await;
        committed += done;
        checks += answered;
        killer.await.unwrap();
    }

    // No more kills: the worker finishes (check-backs roll back what the
    // kills left open; those payments come again after their ack timeout).
    let addr = free_port();
    let mut child = spawn(addr);
    let (done, answered) = work(addr, cycles, Duration::from_secs(6)).await;
    committed += done;
    checks += answered;

    // A new group reads every shipment.
    let mut reader = Connection::hello_when_up(addr).await;
    let mut shipments: HashMap<String, usize> = HashMap::new();
    for delivery in read_everything(&mut reader, OUTPUT, "audit").await {
        let value = String::from_utf8(delivery.value.to_vec()).unwrap();
        *shipments.entry(value).or_default() += 1;
    }
    let Response::GroupDescription(worker_group) = reader
        .request(Request::DescribeGroup(dmq_protocol::DescribeGroup {
            topic: INPUT.into(),
            group: "worker".into(),
        }))
        .await
    else {
        panic!("describe group failed")
    };
    child.kill().unwrap();
    child.wait().unwrap();

    let twice: Vec<_> = shipments.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "payments shipped twice: {twice:?}");
    let payments = cycles as usize * PAYMENTS_PER_CYCLE;
    let missing: Vec<usize> = (0..payments)
        .filter(|n| !shipments.contains_key(&format!("ship {n}")))
        .collect();
    assert!(missing.is_empty(), "payments never shipped: {missing:?}");
    for partition in &worker_group.partitions {
        assert_eq!(
            (partition.ack_floor, partition.unacked),
            (partition.end_offset, 0),
            "payments left to the worker's group: {partition:?}"
        );
    }
    eprintln!(
        "{cycles} kills: {payments} payments shipped exactly once ({committed} commits \
         answered, {checks} check-backs of transactions left open rolled back)"
    );
}
