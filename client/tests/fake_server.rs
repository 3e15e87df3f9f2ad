//! The client against a tiny fake broker built on dmq-protocol: a tokio
//! listener on 127.0.0.1:0 that answers HELLO by itself and lets each test
//! script the rest (read the client's requests, send canned responses and
//! DELIVER pushes, drop the connection).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dmq_client::protocol::{
    decode_frame, encode_frame, Body, Delivery, Frame, HelloOk, Leaders, MessageId,
    PartitionLeader, ProduceOk, ProducedRecord, Request, Response, Subscribed, TopicDescription,
    TopicSummary, Topics, TxnAcked, TxnEnded, TxnOutcome, TxnProduceOk, DEFAULT_MAX_FRAME_BYTES,
};
use dmq_client::{
    Client, ClientError, ClientOptions, ErrorCode, Message, ProducerOptions, SubscribeOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(5);

struct FakeServer {
    addr: SocketAddr,
    connections: mpsc::Receiver<FakeConn>,
}

struct FakeConn {
    requests: mpsc::Receiver<Frame>,
    writer: OwnedWriteHalf,
}

async fn read_frame(stream: &mut (impl AsyncReadExt + Unpin), buf: &mut BytesMut) -> Option<Frame> {
    loop {
        if let Some((frame, used)) =
            decode_frame(buf, DEFAULT_MAX_FRAME_BYTES).expect("valid frame")
        {
            let _ = buf.split_to(used);
            return Some(frame);
        }
        if stream.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

impl FakeServer {
    async fn start() -> FakeServer {
        FakeServer::announcing(DEFAULT_MAX_FRAME_BYTES).await
    }

    /// A server whose HELLO_OK announces `max_frame_bytes`.
    async fn announcing(max_frame_bytes: u32) -> FakeServer {
        FakeServer::started(max_frame_bytes, "fake").await
    }

    /// A server that says it is cluster node `id` (HELLO_OK's broker id).
    async fn node(id: u64) -> FakeServer {
        FakeServer::started(DEFAULT_MAX_FRAME_BYTES, &id.to_string()).await
    }

    async fn started(max_frame_bytes: u32, broker_id: &str) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (sender, connections) = mpsc::channel(16);
        let broker_id = broker_id.to_string();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if let Some(conn) = FakeConn::handshake(stream, max_frame_bytes, &broker_id).await {
                    if sender.send(conn).await.is_err() {
                        return;
                    }
                }
            }
        });
        FakeServer { addr, connections }
    }

    async fn accept(&mut self) -> FakeConn {
        tokio::time::timeout(WAIT, self.connections.recv())
            .await
            .expect("a connection in time")
            .expect("listener alive")
    }

    /// Connections (past HELLO) accepted so far and not yet taken.
    fn accepted(&mut self) -> Vec<FakeConn> {
        std::iter::from_fn(|| self.connections.try_recv().ok()).collect()
    }

    fn addr(&self) -> String {
        self.addr.to_string()
    }
}

impl FakeConn {
    async fn handshake(
        stream: TcpStream,
        max_frame_bytes: u32,
        broker_id: &str,
    ) -> Option<FakeConn> {
        let (mut reader, mut writer) = stream.into_split();
        let mut buf = BytesMut::new();
        let hello = read_frame(&mut reader, &mut buf).await?;
        assert!(matches!(hello.body, Body::Request(Request::Hello(_))));
        let ok = HelloOk {
            version: 1,
            max_frame_bytes,
            broker_id: broker_id.into(),
        };
        let mut out = BytesMut::new();
        encode_frame(&Frame::response(hello.correlation_id, ok), &mut out).ok()?;
        writer.write_all(&out).await.ok()?;
        let (sender, requests) = mpsc::channel(1024);
        tokio::spawn(async move {
            while let Some(frame) = read_frame(&mut reader, &mut buf).await {
                if sender.send(frame).await.is_err() {
                    return;
                }
            }
        });
        Some(FakeConn { requests, writer })
    }

    async fn recv(&mut self) -> Frame {
        tokio::time::timeout(WAIT, self.requests.recv())
            .await
            .expect("a request in time")
            .expect("connection open")
    }

    /// The next request that is not a CREDIT (credits are answered OK).
    async fn recv_skipping_credit(&mut self) -> Frame {
        loop {
            let frame = self.recv().await;
            if matches!(frame.body, Body::Request(Request::Credit(_))) {
                self.reply(frame.correlation_id, Response::Ok).await;
                continue;
            }
            return frame;
        }
    }

    async fn send(&mut self, frame: Frame) {
        let mut out = BytesMut::new();
        encode_frame(&frame, &mut out).expect("encode");
        self.writer.write_all(&out).await.expect("write");
    }

    async fn reply(&mut self, correlation_id: u32, response: impl Into<Response>) {
        self.send(Frame::response(correlation_id, response)).await;
    }
}

fn request(frame: &Frame) -> &Request {
    match &frame.body {
        Body::Request(request) => request,
        other => panic!("expected a request, got {other:?}"),
    }
}

fn options() -> ClientOptions {
    let mut options = ClientOptions::new("test");
    options.request_timeout = Duration::from_secs(5);
    options.reconnect_backoff_initial = Duration::from_millis(10);
    options
}

fn delivery(subscription_id: u64, offset: u64) -> Delivery {
    Delivery {
        subscription_id,
        topic: "t".into(),
        partition: 0,
        offset,
        attempt: 1,
        message_id: MessageId([offset as u8; 16]),
        timestamp_ms: 1_700_000_000_000,
        key: None,
        headers: Vec::new(),
        value: Bytes::from(format!("m{offset}")),
        deliver_at_ms: None,
        expire_at_ms: None,
    }
}

#[tokio::test]
async fn pipelined_requests_match_correlation_ids() {
    let mut server = FakeServer::start().await;
    let client = Client::connect(server.addr(), options())
        .await
        .expect("connect");
    let mut conn = server.accept().await;

    let (a, b, c) = (client.clone(), client.clone(), client.clone());
    let first = tokio::spawn(async move { a.describe_topic("alpha").await });
    let second = tokio::spawn(async move { b.describe_topic("beta").await });
    let third = tokio::spawn(async move { c.list_topics().await });

    // All three are in flight before any answer: pipelining.
    let mut frames = vec![conn.recv().await, conn.recv().await, conn.recv().await];
    let mut ids: Vec<u32> = frames.iter().map(|frame| frame.correlation_id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3, "distinct correlation ids");
    frames.reverse(); // answer in reverse order
    for frame in frames {
        let response: Response = match request(&frame) {
            Request::DescribeTopic(describe) => TopicDescription {
                name: describe.name.clone(),
                ..TopicDescription::default()
            }
            .into(),
            Request::ListTopics => Topics {
                topics: vec![TopicSummary {
                    name: "listed".into(),
                    partitions: 3,
                    ordered: false,
                }],
            }
            .into(),
            other => panic!("unexpected {other:?}"),
        };
        conn.reply(frame.correlation_id, response).await;
    }
    assert_eq!(first.await.expect("join").expect("alpha").name, "alpha");
    assert_eq!(second.await.expect("join").expect("beta").name, "beta");
    assert_eq!(third.await.expect("join").expect("list")[0].name, "listed");
}

#[tokio::test]
async fn producer_batches_and_returns_receipts_in_order() {
    let mut server = FakeServer::start().await;
    let client = Client::connect(server.addr(), options())
        .await
        .expect("connect");
    let mut conn = server.accept().await;
    let producer = client.producer_with(ProducerOptions {
        linger: Duration::from_millis(20),
        ..ProducerOptions::default()
    });
    let sends: Vec<_> = (0..10)
        .map(|i| producer.send(Message::new("t", format!("v{i}")).header("h", "x")))
        .collect();
    let mut next_offset = 100;
    let mut produced = 0;
    let mut frames = 0;
    while produced < 10 {
        let frame = conn.recv().await;
        let Request::Produce(produce) = request(&frame) else {
            panic!("expected PRODUCE");
        };
        assert_eq!(produce.topic, "t");
        frames += 1;
        let records = produce
            .records
            .iter()
            .map(|_| {
                next_offset += 1;
                ProducedRecord {
                    partition: 2,
                    offset: Some(next_offset - 1),
                    message_id: MessageId([7; 16]),
                    deliver_at_ms: None,
                }
            })
            .collect::<Vec<_>>();
        produced += records.len();
        conn.reply(frame.correlation_id, ProduceOk { records })
            .await;
    }
    assert!(frames < 10, "messages were batched ({frames} frames)");
    for (i, send) in sends.into_iter().enumerate() {
        let receipt = send.await.expect("receipt");
        assert_eq!(receipt.partition, 2);
        assert_eq!(receipt.offset, Some(100 + i as u64));
    }
}

#[tokio::test]
async fn broker_errors_map_to_client_error() {
    let mut server = FakeServer::start().await;
    let client = Client::connect(server.addr(), options())
        .await
        .expect("connect");
    let mut conn = server.accept().await;
    let call = tokio::spawn(async move { client.create_topic("t", 1, false).await });
    let frame = conn.recv().await;
    assert!(matches!(request(&frame), Request::CreateTopic(_)));
    conn.send(Frame::error(
        frame.correlation_id,
        ErrorCode::TopicExists,
        "t exists",
    ))
    .await;
    match call.await.expect("join") {
        Err(ClientError::Broker { code, message }) => {
            assert_eq!(code, ErrorCode::TopicExists);
            assert_eq!(message, "t exists");
        }
        other => panic!("expected a broker error, got {other:?}"),
    }
}

#[tokio::test]
async fn pushes_reach_the_stream_and_acks_are_batched() {
    let mut server = FakeServer::start().await;
    let client = Client::connect(server.addr(), options())
        .await
        .expect("connect");
    let mut conn = server.accept().await;
    let consumer = client.consumer();
    let subscribing = tokio::spawn(async move {
        consumer
            .subscribe("t", "g", SubscribeOptions::default())
            .await
    });
    let frame = conn.recv().await;
    let Request::Subscribe(subscribe) = request(&frame) else {
        panic!("expected SUBSCRIBE");
    };
    assert_eq!(
        (subscribe.topic.as_str(), subscribe.group.as_str()),
        ("t", "g")
    );
    assert_eq!(subscribe.credit, 1000);
    conn.reply(
        frame.correlation_id,
        Subscribed {
            subscription_id: 7,
            partitions: vec![0],
        },
    )
    .await;
    // Pushes sent right behind SUBSCRIBED are routed, not lost.
    for offset in 0..3 {
        conn.send(Frame::push(delivery(7, offset))).await;
    }
    let mut subscription = subscribing.await.expect("join").expect("subscribed");
    let mut acks = Vec::new();
    for offset in 0..3 {
        let message = subscription.recv().await.expect("open").expect("message");
        assert_eq!(message.offset, offset);
        assert_eq!(message.value, Bytes::from(format!("m{offset}")));
        acks.push(message.ack());
    }
    let mut acked = Vec::new();
    while acked.len() < 3 {
        let frame = conn.recv_skipping_credit().await;
        let Request::Ack(ack) = request(&frame) else {
            panic!("expected ACK, got {frame:?}");
        };
        assert_eq!(ack.subscription_id, 7);
        acked.extend(ack.messages.iter().map(|position| position.offset));
        conn.reply(frame.correlation_id, Response::Ok).await;
    }
    assert_eq!(acked, vec![0, 1, 2]);
    for ack in acks {
        ack.await.expect("ack confirmed");
    }
}

#[tokio::test]
async fn dropped_connection_fails_in_flight_then_reconnects_and_resubscribes() {
    let mut server = FakeServer::start().await;
    let client = Client::connect(server.addr(), options())
        .await
        .expect("connect");
    let mut conn = server.accept().await;

    let consumer = client.consumer();
    let subscribing = tokio::spawn(async move {
        let options = SubscribeOptions {
            member_name: "m1".into(),
            ..SubscribeOptions::default()
        };
        consumer.subscribe("t", "g", options).await
    });
    let frame = conn.recv().await;
    conn.reply(
        frame.correlation_id,
        Subscribed {
            subscription_id: 1,
            partitions: vec![0],
        },
    )
    .await;
    let mut subscription = subscribing.await.expect("join").expect("subscribed");

    // A request in flight when the connection drops fails clearly.
    let pinger = client.clone();
    let ping = tokio::spawn(async move { pinger.ping().await });
    let frame = conn.recv_skipping_credit().await;
    assert!(matches!(request(&frame), Request::Ping));
    drop(conn);
    match ping.await.expect("join") {
        Err(ClientError::ConnectionLost(_)) => {}
        other => panic!("expected ConnectionLost, got {other:?}"),
    }

    // The client reconnects and re-subscribes with the same group/member.
    let mut conn = server.accept().await;
    let frame = conn.recv().await;
    let Request::Subscribe(subscribe) = request(&frame) else {
        panic!("expected re-SUBSCRIBE, got {frame:?}");
    };
    assert_eq!(subscribe.group, "g");
    assert_eq!(subscribe.member_name, "m1");
    conn.reply(
        frame.correlation_id,
        Subscribed {
            subscription_id: 9,
            partitions: vec![0],
        },
    )
    .await;
    conn.send(Frame::push(delivery(9, 42))).await;
    let message = tokio::time::timeout(WAIT, subscription.recv())
        .await
        .expect("in time")
        .expect("open")
        .expect("message");
    assert_eq!(message.offset, 42);

    let pinger = client.clone();
    let ping = tokio::spawn(async move { pinger.ping().await });
    let frame = conn.recv_skipping_credit().await;
    assert!(matches!(request(&frame), Request::Ping));
    conn.reply(frame.correlation_id, Response::Pong).await;
    ping.await.expect("join").expect("pong after reconnect");
}

#[tokio::test]
async fn unanswered_request_times_out() {
    let mut server = FakeServer::start().await;
    let mut options = options();
    options.request_timeout = Duration::from_millis(200);
    let client = Client::connect(server.addr(), options)
        .await
        .expect("connect");
    let _conn = server.accept().await;
    match client.ping().await {
        Err(ClientError::Timeout(_)) => {}
        other => panic!("expected Timeout, got {other:?}"),
    }
}

#[tokio::test]
async fn connect_refused_is_a_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    drop(listener);
    match Client::connect(addr, options()).await {
        Err(ClientError::Connect { .. }) => {}
        other => panic!("expected Connect error, got {other:?}"),
    }
}

#[tokio::test]
async fn fetch_pulls_and_nack_carries_delay() {
    let mut server = FakeServer::start().await;
    let client = Client::connect(server.addr(), options())
        .await
        .expect("connect");
    let mut conn = server.accept().await;
    let consumer = client.consumer();
    let subscribing = tokio::spawn(async move {
        let options = SubscribeOptions {
            credit_window: 0,
            ..SubscribeOptions::default()
        };
        consumer.subscribe("t", "g", options).await
    });
    let frame = conn.recv().await;
    conn.reply(
        frame.correlation_id,
        Subscribed {
            subscription_id: 3,
            partitions: vec![0],
        },
    )
    .await;
    let subscription = subscribing.await.expect("join").expect("subscribed");
    let fetching = tokio::spawn(async move {
        let messages = subscription.fetch(10, Duration::from_millis(100)).await;
        (subscription, messages)
    });
    let frame = conn.recv().await;
    let Request::Fetch(fetch) = request(&frame) else {
        panic!("expected FETCH");
    };
    assert_eq!(
        (fetch.subscription_id, fetch.max_messages, fetch.max_wait_ms),
        (3, 10, 100)
    );
    let deliveries = dmq_client::protocol::Deliveries {
        deliveries: vec![delivery(3, 5)],
    };
    conn.reply(frame.correlation_id, deliveries).await;
    let (_subscription, messages) = fetching.await.expect("join");
    let messages = messages.expect("fetched");
    assert_eq!(messages.len(), 1);
    let nack = messages[0].nack(Some(Duration::from_secs(2)));
    let frame = conn.recv().await;
    let Request::Nack(nack_request) = request(&frame) else {
        panic!("expected NACK, got {frame:?}");
    };
    assert_eq!(nack_request.delay_ms, Some(2000));
    assert_eq!(nack_request.messages[0].offset, 5);
    conn.reply(frame.correlation_id, Response::Ok).await;
    nack.await.expect("nack confirmed");
}

/// Subscribes `client` to t/g through `conn`, which answers SUBSCRIBED with
/// subscription id 1.
async fn subscribed(client: &Client, conn: &mut FakeConn) -> dmq_client::Subscription {
    let consumer = client.consumer();
    let subscribing = tokio::spawn(async move {
        consumer
            .subscribe("t", "g", SubscribeOptions::default())
            .await
    });
    let frame = conn.recv().await;
    assert!(matches!(request(&frame), Request::Subscribe(_)));
    conn.reply(
        frame.correlation_id,
        Subscribed {
            subscription_id: 1,
            partitions: vec![0],
        },
    )
    .await;
    subscribing.await.expect("join").expect("subscribed")
}

#[tokio::test]
async fn frames_up_to_the_brokers_announced_maximum_are_accepted() {
    // The client's own limit is smaller than what the broker announces:
    // the broker's is the one that counts once HELLO_OK says it.
    let mut server = FakeServer::announcing(1 << 20).await;
    let mut options = options();
    options.max_frame_bytes = 64 * 1024;
    let client = Client::connect(server.addr(), options)
        .await
        .expect("connect");
    let mut conn = server.accept().await;
    let mut subscription = subscribed(&client, &mut conn).await;
    let mut big = delivery(1, 0);
    big.value = Bytes::from(vec![b'x'; 512 * 1024]);
    conn.send(Frame::push(big)).await;
    let message = tokio::time::timeout(WAIT, subscription.recv())
        .await
        .expect("in time")
        .expect("open")
        .expect("a message, not an error");
    assert_eq!(message.value.len(), 512 * 1024);
}

#[tokio::test]
async fn an_undecodable_frame_ends_the_subscription_instead_of_a_reconnect_loop() {
    let max = 64 * 1024;
    let mut server = FakeServer::announcing(max).await;
    let mut options = options();
    options.max_frame_bytes = max;
    let client = Client::connect(server.addr(), options)
        .await
        .expect("connect");
    let mut conn = server.accept().await;
    let mut subscription = subscribed(&client, &mut conn).await;
    // A message the client already has, then a DELIVER over every limit
    // (a broker bug, or a record stored under a larger limit).
    conn.send(Frame::push(delivery(1, 0))).await;
    let mut big = delivery(1, 1);
    big.value = Bytes::from(vec![b'x'; max as usize]);
    conn.send(Frame::push(big)).await;
    // The stream yields the message, then the error, then ends.
    let first = tokio::time::timeout(WAIT, subscription.recv())
        .await
        .expect("in time")
        .expect("open");
    assert_eq!(first.expect("the first message").offset, 0);
    let error = tokio::time::timeout(WAIT, subscription.recv())
        .await
        .expect("in time")
        .expect("an error");
    match error {
        Err(ClientError::Protocol(dmq_client::protocol::WireError::FrameTooLarge {
            max: limit,
            ..
        })) => assert_eq!(limit, max),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    let end = tokio::time::timeout(WAIT, subscription.recv())
        .await
        .expect("in time");
    assert!(end.is_none(), "the stream ends: {end:?}");
    // No reconnect loop: within a second, at most one new connection (the
    // client stays usable), and nothing re-subscribes there.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut again = server.accepted();
    assert!(again.len() <= 1, "{} reconnects in a second", again.len());
    for conn in &mut again {
        let frame = tokio::time::timeout(Duration::from_millis(100), conn.requests.recv()).await;
        assert!(frame.is_err(), "nothing sent after a reconnect: {frame:?}");
    }
    // The client itself still works.
    let pinger = client.clone();
    let ping = tokio::spawn(async move { pinger.ping().await });
    let mut conn = match again.pop() {
        Some(conn) => conn,
        None => server.accept().await,
    };
    let frame = conn.recv().await;
    assert!(matches!(request(&frame), Request::Ping));
    conn.reply(frame.correlation_id, Response::Pong).await;
    ping.await.expect("join").expect("pong");
}

#[tokio::test]
async fn a_connection_dropped_at_once_is_retried_with_growing_backoff() {
    let mut server = FakeServer::start().await;
    let client = Client::connect(server.addr(), options())
        .await
        .expect("connect");
    // Every connection is dropped as soon as it is made: the reconnects
    // wait 10, 20, 40, 80, 160, ... ms, not nothing.
    drop(server.accept().await);
    let started = tokio::time::Instant::now();
    let mut connections = 0;
    while started.elapsed() < Duration::from_secs(1) {
        if let Ok(Some(conn)) =
            tokio::time::timeout(Duration::from_millis(50), server.connections.recv()).await
        {
            connections += 1;
            drop(conn);
        }
    }
    assert!(
        (2..=8).contains(&connections),
        "{connections} connections in a second"
    );
    drop(client);
}

#[tokio::test]
async fn a_record_over_the_brokers_maximum_fails_alone_before_sending() {
    let max = 64 * 1024;
    let mut server = FakeServer::announcing(max).await;
    let client = Client::connect(server.addr(), options())
        .await
        .expect("connect");
    let mut conn = server.accept().await;
    let producer = client.producer();
    let limit = dmq_client::protocol::max_record_bytes(max) as usize;
    // No key, no header: 9 bytes besides the value.
    let over = producer.send(Message::new("t", vec![b'x'; limit - 9 + 1]));
    match over.await {
        Err(ClientError::RecordTooLarge { bytes, max }) => {
            assert_eq!((bytes, max as usize), (limit as u64 + 1, limit));
        }
        other => panic!("expected RecordTooLarge, got {other:?}"),
    }
    let at_limit = producer.send(Message::new("t", vec![b'x'; limit - 9]));
    let frame = conn.recv().await;
    let Request::Produce(produce) = request(&frame) else {
        panic!("expected PRODUCE, got {frame:?}");
    };
    assert_eq!(produce.records.len(), 1, "only the one within the limit");
    let records = vec![ProducedRecord {
        partition: 0,
        offset: Some(0),
        message_id: MessageId([1; 16]),
        deliver_at_ms: None,
    }];
    conn.reply(frame.correlation_id, ProduceOk { records })
        .await;
    at_limit.await.expect("stored");
}

/// A transaction's send whose connection drops before the answer is sent
/// again, on the next connection, with the same number and handle (the
/// broker answers a number it has with the first answer); the next send
/// takes the next number and the answer's handle, and a commit whose
/// connection drops is sent again too.
#[tokio::test]
async fn a_transaction_send_whose_answer_is_lost_is_sent_again_with_its_number() {
    let mut server = FakeServer::start().await;
    let client = Client::connect(server.addr(), options())
        .await
        .expect("connect");
    let mut conn = server.accept().await;
    let sender = client.clone();
    let work = tokio::spawn(async move {
        let mut txn = sender.transaction("shop", "order-17");
        let first = txn.send(vec![Message::new("orders", "created")]).await?;
        let second = txn.send(vec![Message::new("orders", "paid")]).await?;
        txn.commit().await?;
        Ok::<_, ClientError>((first, second, txn.handle()))
    });
    let numbered = |frame: &Frame| match request(frame) {
        Request::TxnProduceSeq(numbered) => (
            numbered.produce.handle,
            numbered.sequence,
            numbered.produce.records.len(),
        ),
        other => panic!("expected TXN_PRODUCE_SEQ, got {other:?}"),
    };
    let answer = |value: u8| TxnProduceOk {
        handle: 42,
        records: vec![ProducedRecord {
            partition: 0,
            offset: None,
            message_id: MessageId([value; 16]),
            deliver_at_ms: None,
        }],
    };
    // The begin is taken, then the connection drops: no answer.
    let frame = conn.recv().await;
    assert_eq!(numbered(&frame), (0, 0, 1));
    drop(conn);
    let mut conn = server.accept().await;
    let frame = conn.recv().await;
    assert_eq!(numbered(&frame), (0, 0, 1), "the same begin, again");
    conn.reply(frame.correlation_id, answer(1)).await;
    let frame = conn.recv().await;
    assert_eq!(numbered(&frame), (42, 1, 1), "the next number, the handle");
    conn.reply(frame.correlation_id, answer(2)).await;
    let frame = conn.recv().await;
    assert!(matches!(request(&frame), Request::TxnEnd(end) if end.handle == 42));
    drop(conn);
    let mut conn = server.accept().await;
    let frame = conn.recv().await;
    assert!(
        matches!(request(&frame), Request::TxnEnd(end) if end.handle == 42 && end.outcome == TxnOutcome::Commit),
        "the commit, again: {frame:?}"
    );
    conn.reply(
        frame.correlation_id,
        TxnEnded {
            outcome: TxnOutcome::Commit,
        },
    )
    .await;
    let (first, second, handle) = tokio::time::timeout(WAIT, work)
        .await
        .expect("in time")
        .expect("join")
        .expect("the transaction went through");
    assert_eq!(handle, 42);
    assert_eq!(first[0].id, MessageId([1; 16]));
    assert_eq!(second[0].id, MessageId([2; 16]));
}

#[tokio::test]
async fn a_transactional_ack_whose_answer_is_lost_is_sent_again_under_the_new_subscription() {
    let mut server = FakeServer::start().await;
    let client = Client::connect(server.addr(), options())
        .await
        .expect("connect");
    let mut conn = server.accept().await;
    let mut subscription = subscribed(&client, &mut conn).await;
    conn.send(Frame::push(delivery(1, 7))).await;
    let message = tokio::time::timeout(WAIT, subscription.recv())
        .await
        .expect("in time")
        .expect("open")
        .expect("message");
    let acker = client.clone();
    let work = tokio::spawn(async move {
        let mut txn = acker.transaction("shipping", "ship-7");
        txn.ack(&[&message]).await?;
        txn.commit().await?;
        Ok::<_, ClientError>(txn.handle())
    });
    let acked = |frame: &Frame| match request(frame) {
        Request::TxnAck(ack) => (
            ack.handle,
            ack.subscription_id,
            ack.messages
                .iter()
                .map(|m| (m.partition, m.offset))
                .collect::<Vec<_>>(),
        ),
        other => panic!("expected TXN_ACK, got {other:?}"),
    };
    // The begin is taken, then the connection drops: no answer.
    let frame = conn.recv_skipping_credit().await;
    assert_eq!(acked(&frame), (0, 1, vec![(0, 7)]));
    drop(conn);
    // The client re-subscribes (a new id), then sends the ack again
    // under that id.
    let mut conn = server.accept().await;
    let frame = conn.recv().await;
    assert!(
        matches!(request(&frame), Request::Subscribe(_)),
        "{frame:?}"
    );
    conn.reply(
        frame.correlation_id,
        Subscribed {
            subscription_id: 9,
            partitions: vec![0],
        },
    )
    .await;
    let frame = conn.recv_skipping_credit().await;
    assert_eq!(acked(&frame), (0, 9, vec![(0, 7)]), "the same begin, again");
    conn.reply(frame.correlation_id, TxnAcked { handle: 42 })
        .await;
    let frame = conn.recv_skipping_credit().await;
    assert!(
        matches!(request(&frame), Request::TxnEnd(end) if end.handle == 42),
        "{frame:?}"
    );
    conn.reply(
        frame.correlation_id,
        TxnEnded {
            outcome: TxnOutcome::Commit,
        },
    )
    .await;
    let handle = tokio::time::timeout(WAIT, work)
        .await
        .expect("in time")
        .expect("join")
        .expect("the transaction went through");
    assert_eq!(handle, 42);
}

/// The next request, answering PARTITION_LEADERS (with `leaders`, node
/// id and address per partition) on the way.
async fn recv_answering_leaders(conn: &mut FakeConn, leaders: &[(u64, String)]) -> Frame {
    loop {
        let frame = conn.recv().await;
        if let Request::PartitionLeaders(_) = request(&frame) {
            let partitions = leaders
                .iter()
                .enumerate()
                .map(|(partition, (node_id, address))| PartitionLeader {
                    partition: partition as u32,
                    node_id: *node_id,
                    address: address.clone(),
                })
                .collect();
            conn.reply(frame.correlation_id, Leaders { partitions })
                .await;
            continue;
        }
        return frame;
    }
}

fn stored(produce: &Request, offset: u64) -> ProduceOk {
    let Request::Produce(produce) = produce else {
        panic!("expected PRODUCE, got {produce:?}");
    };
    ProduceOk {
        records: produce
            .records
            .iter()
            .map(|_| ProducedRecord {
                partition: produce.partition.expect("routed to a partition"),
                offset: Some(offset),
                message_id: MessageId([offset as u8; 16]),
                deliver_at_ms: None,
            })
            .collect(),
    }
}

/// On a cluster (HELLO_OK names node 1), a producer asks PARTITION_LEADERS
/// and sends a partition its own node leads on its connection. When the
/// leadership moves to node 2, the next batch goes to node 2 over a
/// connection of its own, but only once the batch in flight at node 1 is
/// answered: it must not overtake it.
#[tokio::test]
async fn a_batch_routed_to_a_new_leader_waits_for_the_batch_in_flight_at_the_old() {
    let mut first = FakeServer::node(1).await;
    let mut second = FakeServer::node(2).await;
    let client = Client::connect(first.addr(), options())
        .await
        .expect("connect");
    let mut conn = first.accept().await;
    let producer = client.producer();
    let one = producer.send(Message::new("t", "one").partition(0));
    let at_first = [(1, first.addr())];
    let produce = recv_answering_leaders(&mut conn, &at_first).await;
    let Request::Produce(batch) = request(&produce) else {
        panic!("expected PRODUCE");
    };
    assert_eq!(batch.partition, Some(0));
    // Leaders are asked again after 3 s: node 2 leads by then.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    // Placed by its key now that the topic's partitions are known.
    let two = producer.send(Message::new("t", "two").key("k"));
    let at_second = [(2, second.addr())];
    let asked = recv_answering_leaders(&mut conn, &at_second);
    // Nothing else comes to node 1; node 2 gets a connection but no
    // PRODUCE while the first batch is unanswered.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), asked)
            .await
            .is_err(),
        "a request other than PARTITION_LEADERS at node 1"
    );
    let mut link = second.accept().await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), link.recv())
            .await
            .is_err(),
        "the second batch overtook the first"
    );
    conn.reply(produce.correlation_id, stored(request(&produce), 7))
        .await;
    assert_eq!(one.await.expect("first stored").offset, Some(7));
    let produce = link.recv().await;
    link.reply(produce.correlation_id, stored(request(&produce), 8))
        .await;
    let receipt = two.await.expect("second stored");
    assert_eq!((receipt.partition, receipt.offset), (0, Some(8)));
}

/// A keyed message that joined a topic's unplaced batch (sent before the
/// producer knew the topic's partitions) leaves before a later message of
/// the same key that joined its partition's batch once they were known.
#[tokio::test]
async fn a_key_placed_once_leaders_are_known_does_not_overtake_its_unplaced_batch() {
    let mut server = FakeServer::node(1).await;
    let client = Client::connect(server.addr(), options())
        .await
        .expect("connect");
    let mut conn = server.accept().await;
    let producer = client.producer_with(ProducerOptions {
        linger: Duration::from_secs(10),
        max_batch_messages: 2,
        max_in_flight_batches: 1,
        ..ProducerOptions::default()
    });
    let value = |produce: &Request| match produce {
        Request::Produce(produce) => produce
            .records
            .iter()
            .map(|record| String::from_utf8(record.value.to_vec()).expect("utf-8"))
            .collect::<Vec<_>>(),
        other => panic!("expected PRODUCE, got {other:?}"),
    };
    let a = producer.send(Message::new("t", "a").key("k"));
    // The first batch asks where to go; meanwhile "b" joins an unplaced
    // batch too.
    let ask = conn.recv().await;
    assert!(matches!(request(&ask), Request::PartitionLeaders(_)));
    let b = producer.send(Message::new("t", "b").key("k"));
    let partitions = vec![PartitionLeader {
        partition: 0,
        node_id: 1,
        address: server.addr(),
    }];
    conn.reply(ask.correlation_id, Leaders { partitions }).await;
    let first = conn.recv().await;
    assert_eq!(value(request(&first)), ["a"]);
    // Placed now: "c" and "d" fill their partition's batch at once.
    let c = producer.send(Message::new("t", "c").key("k"));
    let d = producer.send(Message::new("t", "d").key("k"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut offset = 0;
    let mut answer = |frame: &Frame| {
        let Request::Produce(produce) = request(frame) else {
            panic!("expected PRODUCE");
        };
        let records = produce
            .records
            .iter()
            .map(|_| {
                offset += 1;
                ProducedRecord {
                    partition: 0,
                    offset: Some(offset),
                    message_id: MessageId([offset as u8; 16]),
                    deliver_at_ms: None,
                }
            })
            .collect();
        (frame.correlation_id, ProduceOk { records })
    };
    let (id, ok) = answer(&first);
    conn.reply(id, ok).await;
    let second = conn.recv().await;
    assert_eq!(value(request(&second)), ["b"], "the later key overtook");
    let (id, ok) = answer(&second);
    conn.reply(id, ok).await;
    let third = conn.recv().await;
    assert_eq!(value(request(&third)), ["c", "d"]);
    let (id, ok) = answer(&third);
    conn.reply(id, ok).await;
    let offsets: Vec<_> = [a.await, b.await, c.await, d.await]
        .into_iter()
        .map(|receipt| receipt.expect("stored").offset.expect("an offset"))
        .collect();
    assert_eq!(offsets, [1, 2, 3, 4]);
}
