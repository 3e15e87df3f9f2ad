//! A raw-protocol test connection shared by the broker's integration tests.
#![allow(clippy::unwrap_used, dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

pub mod cluster;

use bytes::{Bytes, BytesMut};
use dmq_broker::BrokerConfig;
use dmq_protocol::{
    decode_frame, encode_frame, Body, ErrorCode, Frame, Push, Request, Response,
    DEFAULT_MAX_FRAME_BYTES, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One connection speaking raw frames.
pub struct Connection {
    pub stream: TcpStream,
    buffer: BytesMut,
    next_id: u32,
}

impl Connection {
    pub async fn open(addr: SocketAddr) -> Connection {
        Connection {
            stream: TcpStream::connect(addr).await.unwrap(),
            buffer: BytesMut::new(),
            next_id: 1,
        }
    }

    pub async fn hello(addr: SocketAddr) -> Connection {
        let mut connection = Connection::open(addr).await;
        let response = connection
            .request(Request::Hello(dmq_protocol::Hello {
                min_version: 1,
                max_version: PROTOCOL_VERSION,
                client_id: "test".into(),
                secret: Bytes::new(),
            }))
            .await;
        assert!(matches!(response, Response::HelloOk(_)), "{response:?}");
        connection
    }

    /// A connection that said HELLO as `client_id` with `secret`; returns
    /// the connection and the answer.
    pub async fn hello_as(
        addr: SocketAddr,
        client_id: &str,
        secret: &str,
    ) -> (Connection, Response) {
        let mut connection = Connection::open(addr).await;
        let response = connection
            .request(Request::Hello(dmq_protocol::Hello {
                min_version: 1,
                max_version: PROTOCOL_VERSION,
                client_id: client_id.into(),
                secret: Bytes::from(secret.to_string()),
            }))
            .await;
        (connection, response)
    }

    /// HELLO to a broker that may still be starting (a `dmqd` just
    /// spawned): waits up to 20 s for its port.
    pub async fn hello_when_up(addr: SocketAddr) -> Connection {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Connection::hello(addr).await;
            }
            assert!(std::time::Instant::now() < deadline, "dmqd did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends ACK of one message of `subscription_id` without waiting for
    /// the answer; returns its correlation id.
    pub async fn send_ack(&mut self, subscription_id: u64, partition: u32, offset: u64) -> u32 {
        self.send(Request::Ack(dmq_protocol::Ack {
            subscription_id,
            messages: vec![dmq_protocol::MessagePosition { partition, offset }],
        }))
        .await
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    pub async fn send(&mut self, request: Request) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        let mut buffer = BytesMut::new();
        encode_frame(&Frame::request(id, request), &mut buffer).unwrap();
        self.send_raw(&buffer).await;
        id
    }

    /// Sends `request`; None if the connection is gone (a killed broker).
    pub async fn try_send(&mut self, request: Request) -> Option<u32> {
        let id = self.next_id;
        self.next_id += 1;
        let mut buffer = BytesMut::new();
        encode_frame(&Frame::request(id, request), &mut buffer).unwrap();
        self.stream.write_all(&buffer).await.ok()?;
        Some(id)
    }

    /// The next frame within `timeout`, or None (timeout or closed).
    pub async fn frame_within(&mut self, timeout: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(Some((frame, used))) = decode_frame(&self.buffer, DEFAULT_MAX_FRAME_BYTES) {
                let _ = self.buffer.split_to(used);
                return Some(frame);
            }
            let read =
                tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buffer)).await;
            match read {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }

    /// The next frame, or None when the broker closed the connection.
    pub async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some((frame, used)) =
                decode_frame(&self.buffer, DEFAULT_MAX_FRAME_BYTES).unwrap()
            {
                let _ = self.buffer.split_to(used);
                return Some(frame);
            }
            let read = tokio::time::timeout(
                Duration::from_secs(10),
                self.stream.read_buf(&mut self.buffer),
            )
            .await
            .expect("broker answered in time")
            .unwrap_or(0);
            if read == 0 {
                return None;
            }
        }
    }

    /// The next frame and its size in bytes, decoded with the broker's
    /// `max_frame_bytes`: a frame over it fails the test. None when the
    /// broker closed the connection or sent nothing within 10 s.
    pub async fn sized_frame(&mut self, max_frame_bytes: u32) -> Option<(Frame, usize)> {
        loop {
            match decode_frame(&self.buffer, max_frame_bytes) {
                Ok(Some((frame, used))) => {
                    let _ = self.buffer.split_to(used);
                    return Some((frame, used));
                }
                Ok(None) => {}
                Err(error) => panic!("the broker sent a frame over {max_frame_bytes}: {error}"),
            }
            let read = tokio::time::timeout(
                Duration::from_secs(10),
                self.stream.read_buf(&mut self.buffer),
            )
            .await
            .ok()?
            .unwrap_or(0);
            if read == 0 {
                return None;
            }
        }
    }

    pub async fn request(&mut self, request: Request) -> Response {
        let id = self.send(request).await;
        loop {
            let frame = self.frame().await.expect("a response");
            if let Body::Response(response) = frame.body {
                assert_eq!(frame.correlation_id, id);
                return response;
            }
        }
    }

    pub async fn push(&mut self) -> dmq_protocol::Delivery {
        loop {
            let frame = self.frame().await.expect("a push");
            if let Body::Push(Push::Deliver(delivery)) = frame.body {
                return delivery;
            }
        }
    }

    pub async fn expect_error_and_close(&mut self, code: ErrorCode) {
        let frame = self.frame().await.expect("an ERROR frame");
        match frame.body {
            Body::Response(Response::Error(error)) => assert_eq!(error.code, code, "{error:?}"),
            other => panic!("expected ERROR {code}, got {other:?}"),
        }
        assert!(self.frame().await.is_none(), "connection should be closed");
    }
}

/// A broker served in this test process on a random 127.0.0.1 port with a
/// temp data dir.
pub struct Broker {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    running: Option<dmq_broker::Broker>,
    _dir: tempfile::TempDir,
}

impl Broker {
    pub async fn start(configure: impl FnOnce(&mut BrokerConfig)) -> Broker {
        Broker::start_in(tempfile::tempdir().unwrap(), configure)
            .await
            .unwrap()
    }

    /// A broker on `dir`, with the tests' small settings under `configure`.
    async fn start_in(
        dir: tempfile::TempDir,
        configure: impl FnOnce(&mut BrokerConfig),
    ) -> Result<Broker, dmq_broker::StartError> {
        let mut config = BrokerConfig {
            data_dir: dir.path().to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            segment_bytes: 1 << 20,
            disk_reserve_bytes: 1 << 20,
            handshake_timeout_ms: 500,
            ..BrokerConfig::default()
        };
        configure(&mut config);
        let running = dmq_broker::Broker::start(config).await?;
        Ok(Broker {
            addr: running.protocol_addr(),
            admin: running.admin_addr(),
            running: Some(running),
            _dir: dir,
        })
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            tokio::time::timeout(Duration::from_secs(20), running.shutdown())
                .await
                .unwrap();
        }
    }

    /// Stops the broker; its data directory lives as long as the result.
    pub async fn stop_keeping_data(mut self) -> tempfile::TempDir {
        if let Some(running) = self.running.take() {
            tokio::time::timeout(Duration::from_secs(20), running.shutdown())
                .await
                .unwrap();
        }
        self._dir
    }

    /// The broker's data directory.
    pub fn data_dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// Stops the broker and starts it again on the same data dir (new
    /// ports), configured by `configure` as at its first start. Panics if
    /// it does not start: that is what the hostile tests check.
    pub async fn restart(mut self, configure: impl FnOnce(&mut BrokerConfig)) -> Broker {
        if let Some(running) = self.running.take() {
            tokio::time::timeout(Duration::from_secs(20), running.shutdown())
                .await
                .unwrap();
        }
        Broker::start_in(self._dir, configure)
            .await
            .expect("the broker starts again after a hostile request")
    }
}

/// A real client connected to `broker`.
pub async fn client(broker: &Broker) -> dmq_client::Client {
    dmq_client::Client::connect(
        broker.addr.to_string(),
        dmq_client::ClientOptions::new("e2e"),
    )
    .await
    .unwrap()
}

/// Subscription options for member `member`, from the earliest message.
pub fn options(member: &str) -> dmq_client::SubscribeOptions {
    dmq_client::SubscribeOptions {
        member_name: member.into(),
        start: dmq_client::Start::Earliest,
        ..dmq_client::SubscribeOptions::default()
    }
}

/// The next message within `within`, or None.
pub async fn next(
    subscription: &mut dmq_client::Subscription,
    within: Duration,
) -> Option<dmq_client::ReceivedMessage> {
    match tokio::time::timeout(within, subscription.recv()).await {
        Ok(Some(message)) => Some(message.unwrap()),
        _ => None,
    }
}

/// A small blocking client of the admin HTTP API.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub token: Option<String>,
    agent: ureq::Agent,
}

impl Api {
    pub fn new(admin: SocketAddr, token: Option<&str>) -> Api {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Api {
            base: format!("http://{admin}"),
            token: token.map(str::to_string),
            agent,
        }
    }

    pub fn with_token(&self, token: Option<&str>) -> Api {
        Api {
            token: token.map(str::to_string),
            ..self.clone()
        }
    }

    /// (status, JSON body or Null) of a call with an optional raw body.
    /// Panics naming the call and the transport's error if no answer came.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        self.call_or_error(method, path, body)
            .unwrap_or_else(|error| panic!("{method} {path}: no answer: {error}"))
    }

    /// Like [`call`](Self::call); `None` if the broker could not be reached
    /// or the connection broke.
    pub fn try_call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Option<(u16, serde_json::Value)> {
        self.call_or_error(method, path, body).ok()
    }

    /// Like [`call`](Self::call), with the transport's error if no answer
    /// came.
    fn call_or_error(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, serde_json::Value), ureq::Error> {
        let url = format!("{}{path}", self.base);
        let mut request = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let response = match body {
            Some(body) => self.agent.run(
                request
                    .header("Content-Type", "application/json")
                    .body(body.to_string())
                    .unwrap(),
            ),
            None => self.agent.run(request.body(()).unwrap()),
        };
        let mut response = response?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string()?;
        let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        Ok((status, json))
    }

    pub fn get(&self, path: &str) -> (u16, serde_json::Value) {
        self.call("GET", path, None)
    }

    pub fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.call("POST", path, Some(&body.to_string()))
    }

    /// GET that must answer 200.
    pub fn ok(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// POST that must answer 2xx.
    pub fn ok_post(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let (status, answer) = self.post(path, body);
        assert!(
            (200..300).contains(&status),
            "POST {path}: {status} {answer}"
        );
        answer
    }
}

/// Runs blocking HTTP calls off the test's async threads.
pub async fn http<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work).await.unwrap()
}

/// A free 127.0.0.1 port (bound, then released).
pub fn free_port() -> SocketAddr {
    // The kernel may hand a port just released back to the next bind: two
    // tests of one binary (run in parallel) then gave one port to two
    // nodes (a client of one reached the other's admin HTTP server). Each
    // port is handed out once per process.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    // Ports refused are held until one is found, so the kernel moves on.
    let mut refused = Vec::new();
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&addr.port()) {
            given.push(addr.port());
            return addr;
        }
        refused.push(listener);
    }
}

/// Starts the real `dmqd` binary on `data_dir`, the protocol on `addr` and
/// the admin API on `admin` (a free port if `None`), logs silenced.
pub fn spawn_dmqd(
    data_dir: &std::path::Path,
    addr: SocketAddr,
    admin: Option<SocketAddr>,
) -> std::process::Child {
    let admin = admin.map_or_else(|| "127.0.0.1:0".to_string(), |a| a.to_string());
    std::process::Command::new(env!("CARGO_BIN_EXE_dmqd"))
        .args([
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--listen",
            &addr.to_string(),
            "--admin-listen",
            &admin,
        ])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

impl Api {
    /// `GET /metrics`, which must answer 200: the exposition's text.
    pub fn ok_metrics(&self) -> String {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "GET /metrics: {body}");
        body.as_str().unwrap().to_string()
    }
}

/// A tmpfs mounted for a test (needs root), unmounted (lazily) on drop.
pub struct TmpfsMount(std::path::PathBuf);

impl TmpfsMount {
    /// Mounts a tmpfs of `size` (as `mount -o size=` reads it) on `path`;
    /// the error says why not (not root, or what mount printed).
    pub fn mount(path: &std::path::Path, size: &str) -> Result<TmpfsMount, String> {
        use std::os::unix::fs::MetadataExt;
        let is_root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        if !is_root {
            return Err("not root".into());
        }
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if output.status.success() {
            Ok(TmpfsMount(path.to_path_buf()))
        } else {
            Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
        }
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A count from the environment (a campaign run by hand), or `default`.
pub fn env_count(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}
