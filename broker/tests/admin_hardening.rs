//! Hardening of the admin HTTP listener and its credentials
//! (docs/admin-api.md, docs/manager.md), against a real broker on
//! 127.0.0.1:
//! - a web page cannot drive the development-mode API (foreign `Origin`,
//!   non-JSON bodies) nor read it through DNS rebinding (foreign `Host`);
//! - half-sent requests and connection floods cannot exhaust the broker's
//!   descriptors, and are closed after the header timeout;
//! - cheap failed HELLOs cannot reset an admin-token lockout;
//! - the small rules: deletions default to a dry run, delays that overflow
//!   are refused, echoed input is cut short, every error is JSON, topic
//!   names fit the dispatcher's rules.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::{http, Api, Broker, Connection};

/// An HTTP answer read from a raw socket.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {:?}", self.status, self.body))
    }

    /// Asserts a JSON error with `status`; returns its message.
    fn error(&self, status: u16) -> String {
        assert_eq!(self.status, status, "{self:?}");
        assert!(
            self.header("content-type")
                .is_some_and(|t| t.starts_with("application/json")),
            "errors are JSON: {self:?}"
        );
        let body = self.json();
        assert!(body["error"]["code"].is_string(), "{body}");
        body["error"]["message"].as_str().unwrap().to_string()
    }
}

/// Sends one request exactly as given (with `Connection: close`; `Host` is
/// the broker's address unless `headers` has one) and reads the answer.
fn send(
    admin: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Reply {
    let mut text = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        text.push_str(&format!("Host: {admin}\r\n"));
    }
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        text.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    text.push_str("\r\n");
    text.push_str(body.unwrap_or_default());
    let mut stream = TcpStream::connect(admin).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(text.as_bytes()).unwrap();
    read_reply(&mut stream)
}

/// Reads one answer until the broker closes the connection.
fn read_reply(stream: &mut TcpStream) -> Reply {
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || tail.len() < size {
            break;
        }
        out.push_str(&tail[..size]);
        rest = tail[size..].trim_start_matches("\r\n");
    }
    out
}

const JSON: (&str, &str) = ("Content-Type", "application/json");
const PLAIN: (&str, &str) = ("Content-Type", "text/plain");
const EVIL: (&str, &str) = ("Origin", "http://evil.example");

fn create_body(name: &str) -> String {
    json!({"environment": "dev", "department": "web", "name": name, "owner": "o"}).to_string()
}

fn topic_names(api: &Api) -> Vec<String> {
    api.ok("/api/topics")
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn development_mode_refuses_requests_a_web_page_could_send() {
    let broker = Broker::start(|_| {}).await;
    let admin = broker.admin;
    let api = Api::new(admin, None);
    http(move || {
        let topic = "dev.web.kept";
        api.ok_post(
            "/api/topics",
            serde_json::from_str(&create_body("kept")).unwrap(),
        );
        let sent = api.ok_post(
            &format!("/api/topics/{topic}/test-message"),
            json!({"value": "v", "key": "k"}),
        );
        let id = sent["message_id"].as_str().unwrap().to_string();

        // What a foreign page can send without a preflight: a "simple"
        // text/plain POST from its own origin. Refused, and nothing done.
        let simple: Vec<(&str, String, String)> = vec![
            ("POST", "/api/topics".into(), create_body("evil")),
            (
                "POST",
                format!("/api/topics/{topic}/messages/delete"),
                json!({"key": "k", "dry_run": false}).to_string(),
            ),
            (
                "POST",
                format!("/api/topics/{topic}/test-message"),
                json!({"value": "injected"}).to_string(),
            ),
            ("POST", format!("/api/topics/{topic}/disable"), "{}".into()),
        ];
        for (method, path, body) in &simple {
            let reply = send(admin, method, path, &[EVIL, PLAIN], Some(body));
            reply.error(403);
            // Even with the JSON content type (which needs a preflight that
            // a browser would not pass): the origin is foreign.
            let reply = send(admin, method, path, &[EVIL, JSON], Some(body));
            reply.error(403);
            // From no origin at all (curl, a form without Origin): the body
            // must say it is JSON.
            let reply = send(admin, method, path, &[PLAIN], Some(body));
            let message = reply.error(415);
            assert!(message.contains("application/json"), "{message}");
            let reply = send(admin, method, path, &[], Some(body));
            reply.error(415);
        }
        let reply = send(
            admin,
            "PATCH",
            &format!("/api/topics/{topic}"),
            &[PLAIN],
            Some("{\"owner\":\"x\"}"),
        );
        reply.error(415);
        // A sandboxed page sends "Origin: null".
        let reply = send(
            admin,
            "DELETE",
            &format!("/api/topics/{topic}"),
            &[("Origin", "null")],
            None,
        );
        reply.error(403);
        assert_eq!(topic_names(&api), vec![topic.to_string()]);
        let detail = api.ok(&format!("/api/topics/{topic}"));
        assert_eq!(detail["topic"]["status"], "approved");
        let stored: u64 = detail["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["end_offset"].as_u64().unwrap())
            .sum();
        assert_eq!(stored, 1, "no message injected");
        let one = api.ok(&format!("/api/messages/{id}"));
        assert_eq!(one["message"]["deleted"], false, "nothing deleted");

        // Reading the API from a foreign page is refused too.
        for path in ["/api/topics", "/api/info", "/metrics"] {
            send(admin, "GET", path, &[EVIL], None).error(403);
        }

        // The console's own calls: same origin, JSON bodies.
        let own = format!("http://{admin}");
        let reply = send(
            admin,
            "POST",
            "/api/topics",
            &[("Origin", &own), JSON],
            Some(&create_body("console")),
        );
        assert_eq!(reply.status, 201, "{reply:?}");
        let reply = send(admin, "GET", "/api/topics", &[("Origin", &own)], None);
        assert_eq!(reply.status, 200, "{reply:?}");
        // JSON with a charset parameter is JSON. (The topic is approved:
        // disable is the status change it allows.)
        let reply = send(
            admin,
            "POST",
            &format!("/api/topics/{topic}/disable"),
            &[("Content-Type", "application/json; charset=utf-8")],
            Some("{}"),
        );
        assert_eq!(reply.status, 200, "{reply:?}");
    })
    .await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_host_names_are_refused_dns_rebinding() {
    let broker = Broker::start(|config| {
        config.admin_allowed_hosts = vec!["dmq.internal".into(), "Proxy.Example:8443".into()];
    })
    .await;
    let admin = broker.admin;
    http(move || {
        let port = admin.port();
        for host in [
            format!("evil.example:{port}"),
            "evil.example".to_string(),
            format!("127.0.0.1.evil.example:{port}"),
            format!("localhost.:{port}"),
            format!("proxy.example:{port}"),
            format!("127.0.0.1:{}", port.wrapping_add(1)),
            String::new(),
        ] {
            for path in ["/api/topics", "/api/info", "/metrics"] {
                let reply = send(admin, "GET", path, &[("Host", &host)], None);
                let message = reply.error(403);
                assert!(message.contains("Host"), "{host:?}: {message}");
            }
            let reply = send(
                admin,
                "POST",
                "/api/topics",
                &[("Host", &host), JSON],
                Some(&create_body("rebound")),
            );
            reply.error(403);
        }
        for host in [
            admin.to_string(),
            format!("localhost:{port}"),
            format!("LOCALHOST:{port}"),
            "localhost".to_string(),
            format!("127.0.0.1:{port}"),
            format!("[::1]:{port}"),
            "dmq.internal".to_string(),
            format!("dmq.internal:{port}"),
            "proxy.example:8443".to_string(),
        ] {
            let reply = send(admin, "GET", "/api/info", &[("Host", &host)], None);
            assert_eq!(reply.status, 200, "{host:?}: {reply:?}");
        }
        // The same origin as an allowed host may call; another may not.
        let reply = send(
            admin,
            "POST",
            "/api/topics",
            &[
                ("Host", "proxy.example:8443"),
                ("Origin", "https://proxy.example:8443"),
                JSON,
            ],
            Some(&create_body("proxied")),
        );
        assert_eq!(reply.status, 201, "{reply:?}");
        let reply = send(
            admin,
            "GET",
            "/api/topics",
            &[
                ("Host", "dmq.internal"),
                ("Origin", "http://localhost:3000"),
            ],
            None,
        );
        reply.error(403);
    })
    .await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_says_nosniff() {
    let broker = Broker::start(|_| {}).await;
    let admin = broker.admin;
    http(move || {
        for (method, path) in [
            ("GET", "/"),
            ("GET", "/assets/js/app.js"),
            ("GET", "/assets/nope.js"),
            ("GET", "/api/info"),
            ("GET", "/api/nowhere"),
            ("GET", "/metrics"),
            ("PUT", "/api/topics"),
        ] {
            let reply = send(admin, method, path, &[], None);
            assert_eq!(
                reply.header("x-content-type-options"),
                Some("nosniff"),
                "{method} {path}: {reply:?}"
            );
        }
        let reply = send(admin, "GET", "/api/info", &[("Host", "evil.example")], None);
        assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
    })
    .await;
    broker.stop().await;
}

/// Number of open descriptors of process `pid`.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// `dmqd` started with a configuration file, stopped on drop.
struct Dmqd {
    child: std::process::Child,
    admin: SocketAddr,
    /// Its log lines so far.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Drop for Dmqd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Dmqd {
    /// Log lines that contain `text`.
    fn log_lines(&self, text: &str) -> Vec<String> {
        let log = self.log.lock().unwrap();
        log.iter().filter(|l| l.contains(text)).cloned().collect()
    }
}

/// Starts `dmqd` on ports it picks itself (a port picked here could be
/// taken by another test's client connections before dmqd binds it), and
/// learns the admin address from its "dmqd ready" log line.
fn spawn_configured(extra: &str) -> Dmqd {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "data_dir = {:?}\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{extra}\n",
        dir.path().join("data").to_str().unwrap(),
    );
    let path = dir.path().join("dmqd.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dmqd"))
        .args(["--config", path.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (ready, admin) = std::sync::mpsc::channel();
    // dmqd logs to its standard output.
    let output = child.stdout.take().unwrap();
    std::thread::spawn({
        let log = log.clone();
        move || {
            for line in std::io::BufReader::new(output).lines() {
                let Ok(line) = line else { break };
                if line.contains("dmqd ready") {
                    let address = line
                        .split("http://")
                        .nth(1)
                        .and_then(|rest| {
                            rest.split(|c: char| c.is_whitespace() || c == '\u{1b}')
                                .next()
                        })
                        .and_then(|address| address.parse::<SocketAddr>().ok());
                    let _ = ready.send(address);
                }
                log.lock().unwrap().push(line);
            }
        }
    });
    let admin = admin
        .recv_timeout(Duration::from_secs(30))
        .expect("dmqd said it is ready")
        .expect("the ready line names the admin address");
    Dmqd {
        child,
        admin,
        log,
        _dir: dir,
    }
}

/// Opens `count` connections from local address `from` that each send
/// half a request and wait.
async fn half_sent(admin: SocketAddr, from: &str, count: usize) -> Vec<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut streams = Vec::new();
    for _ in 0..count {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let Ok(mut stream) = socket.connect(admin).await else {
            continue;
        };
        let half = format!("GET /api/info HTTP/1.1\r\nHost: {admin}\r\nX-Slow: ");
        if stream.write_all(half.as_bytes()).await.is_ok() {
            streams.push(stream);
        }
    }
    streams
}

/// How many of `streams` the broker has closed within `within`.
async fn closed(streams: &mut [tokio::net::TcpStream], within: Duration) -> usize {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + within;
    let mut count = 0;
    for stream in streams.iter_mut() {
        let mut buffer = [0u8; 512];
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(_)) | Ok(Err(_)) => count += 1,
            Err(_) => {}
        }
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_cannot_exhaust_the_admin_listener() {
    let dmqd = tokio::task::spawn_blocking(|| {
        spawn_configured(
            "admin_max_connections = 48\nadmin_max_connections_per_address = 16\n\
             admin_header_timeout_ms = 1500\nadmin_body_timeout_ms = 1500",
        )
    })
    .await
    .unwrap();
    let admin = dmqd.admin;
    let pid = dmqd.child.id();
    let baseline = descriptors(pid);

    // 300 half-sent requests from one address: 16 are held, the rest are
    // closed at once, and a request from another address is answered.
    let mut flood = half_sent(admin, "127.0.0.2", 300).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = descriptors(pid) - baseline;
    assert!(held <= 16 + 4, "{held} descriptors for one address");
    let api = Api::new(admin, None);
    let answered = http({
        let api = api.clone();
        move || api.get("/api/info").0
    })
    .await;
    assert_eq!(answered, 200, "others are still served");
    let refused = closed(&mut flood, Duration::from_secs(1)).await;
    assert!(refused >= 300 - 16, "only {refused} of 300 were closed");

    // From many addresses: the total limit holds.
    let mut floods = Vec::new();
    for last in 3..12 {
        floods.push(half_sent(admin, &format!("127.0.0.{last}"), 16).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = descriptors(pid) - baseline;
    assert!(held <= 48 + 4, "{held} descriptors in all");

    // The header timeout closes every half-sent request.
    let started = Instant::now();
    for streams in floods.iter_mut().chain(std::iter::once(&mut flood)) {
        let count = streams.len();
        let gone = closed(streams, Duration::from_secs(10)).await;
        assert_eq!(
            gone, count,
            "a half-sent request outlived the header timeout"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(floods);
    drop(flood);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(descriptors(pid) <= baseline + 4, "descriptors come back");

    // Refusals are counted.
    let metrics = http({
        let api = api.clone();
        move || api.ok_metrics()
    })
    .await;
    let refused = |reason: &str| -> u64 {
        let line = format!("dmq_admin_connections_rejected_total{{reason=\"{reason}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .unwrap_or_else(|| panic!("{line} missing from {metrics}"))
            .trim()
            .parse()
            .unwrap()
    };
    assert!(refused("too_many_from_address") >= 284, "{metrics}");
    assert!(refused("too_many_connections") >= 1, "{metrics}");

    // An idle keep-alive connection is closed after the header timeout.
    let idle = http(move || {
        let mut stream = TcpStream::connect(admin).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let request = format!("GET /api/info HTTP/1.1\r\nHost: {admin}\r\n\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        let started = Instant::now();
        let reply = read_reply(&mut stream);
        (reply.status, started.elapsed())
    })
    .await;
    assert_eq!(idle.0, 200);
    assert!(idle.1 < Duration::from_secs(5), "closed after {:?}", idle.1);

    // A body that never arrives is answered 408 after the body timeout.
    let reply = http(move || {
        let mut stream = TcpStream::connect(admin).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let head = format!(
            "POST /api/topics HTTP/1.1\r\nHost: {admin}\r\nContent-Type: application/json\r\n\
             Content-Length: 100\r\n\r\n{{\"environment\""
        );
        stream.write_all(head.as_bytes()).unwrap();
        let started = Instant::now();
        let reply = read_reply(&mut stream);
        (reply, started.elapsed())
    })
    .await;
    reply.0.error(408);
    assert!(reply.1 < Duration::from_secs(5), "{:?}", reply.1);
    let answered = http(move || api.get("/api/info").0).await;
    assert_eq!(answered, 200);
    // Hundreds of refusals, at most a line or two of log.
    let warnings = dmqd.log_lines("connections refused");
    assert!(
        (1..=2).contains(&warnings.len()),
        "{} refusal warnings: {warnings:#?}",
        warnings.len()
    );
    drop(dmqd);
}

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

/// A development broker with topic `dev.web.rules` holding one message
/// with key `k`; runs `check` on it.
async fn with_rules_topic(check: impl FnOnce(SocketAddr, Api, &'static str) + Send + 'static) {
    let broker = Broker::start(|_| {}).await;
    let admin = broker.admin;
    let api = Api::new(admin, None);
    http(move || {
        let topic = "dev.web.rules";
        api.ok_post(
            "/api/topics",
            serde_json::from_str(&create_body("rules")).unwrap(),
        );
        api.ok_post(
            &format!("/api/topics/{topic}/test-message"),
            json!({"value": "v", "key": "k"}),
        );
        check(admin, api, topic);
    })
    .await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_without_dry_run_is_a_dry_run() {
    with_rules_topic(|_, api, topic| {
        let answer = api.ok_post(
            &format!("/api/topics/{topic}/messages/delete"),
            json!({"key": "k"}),
        );
        assert_eq!(answer["dry_run"], true, "{answer}");
        assert_eq!(answer["matched"], 1);
        let page = api.ok(&format!("/api/topics/{topic}/messages?key=k"));
        assert_eq!(page["messages"][0]["deleted"], false, "nothing deleted");
        let answer = api.ok_post(
            &format!("/api/topics/{topic}/messages/delete"),
            json!({"key": "k", "dry_run": false}),
        );
        assert_eq!(
            (answer["dry_run"].as_bool(), answer["matched"].as_u64()),
            (Some(false), Some(1))
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_whose_deliver_time_overflows_are_refused() {
    with_rules_topic(|_, api, topic| {
        for delay in [
            "9223372036854775808",
            "18446744073709551615",
            "9223372036854775807",
            "9223372036854000000",
        ] {
            let (status, answer) = api.call(
                "POST",
                &format!("/api/topics/{topic}/test-message"),
                Some(&format!("{{\"value\": \"late\", \"delay_ms\": {delay}}}")),
            );
            assert_eq!(status, 400, "delay_ms {delay}: {answer}");
            assert!(answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("delay_ms"));
        }
        let page = api.ok(&format!(
            "/api/topics/{topic}/messages?partition=0&from_offset=0&to_offset=100"
        ));
        assert_eq!(
            page["messages"].as_array().unwrap().len(),
            1,
            "nothing produced"
        );
        let sent = api.ok_post(
            &format!("/api/topics/{topic}/test-message"),
            json!({"value": "later", "delay_ms": 3_600_000}),
        );
        assert!(sent["deliver_at_ms"].as_i64().unwrap() > 0, "{sent}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoed_input_is_cut_short() {
    with_rules_topic(|_, api, topic| {
        let huge = "a".repeat(20_000);
        let echoes: Vec<(&str, String, Option<String>, u16)> = vec![
            ("GET", format!("/api/topics/{huge}"), None, 404),
            ("GET", format!("/api/messages/{huge}"), None, 400),
            (
                "GET",
                format!("/api/topics/{topic}/messages?key=k&cursor={huge}"),
                None,
                400,
            ),
            (
                "POST",
                "/api/topics".into(),
                Some(
                    json!({"environment": huge, "department": "d", "name": "n", "owner": "o"})
                        .to_string(),
                ),
                400,
            ),
            (
                "POST",
                "/api/topics".into(),
                Some(format!("{{\"{huge}\": 1}}")),
                400,
            ),
            (
                "POST",
                format!("/api/topics/{topic}/groups/g/seek"),
                Some(json!({"to": huge}).to_string()),
                400,
            ),
        ];
        for (method, path, body, status) in echoes {
            let (got, answer) = api.call(method, &path, body.as_deref());
            assert_eq!(
                got,
                status,
                "{method} {}: {answer}",
                &path[..40.min(path.len())]
            );
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(
                message.len() < 600,
                "{} bytes: {}",
                message.len(),
                &message[..200]
            );
            assert!(message.contains('…'), "{message}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_and_unknown_methods_get_json_errors() {
    with_rules_topic(|admin, _, _| {
        // Refused from its Content-Length, before it is read.
        let reply = http_head_only(admin, "POST", "/api/topics", 2 << 20);
        reply.error(413);
        let reply = send(admin, "PUT", "/api/topics", &[JSON], Some("{}"));
        reply.error(405);
        let reply = send(admin, "DELETE", "/api/info", &[], None);
        reply.error(405);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_topic_names_follow_the_dispatcher_rules() {
    with_rules_topic(|_, api, topic| {
        let long = "n".repeat(40);
        let (status, answer) = api.post(
            "/api/topics",
            json!({"environment": long, "department": long, "name": long, "owner": "o"}),
        );
        assert_eq!(status, 400, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains("100"), "{message}");
        let (status, answer) = api.post(
            "/api/topics",
            json!({"environment": "__sys", "department": "d", "name": "n", "owner": "o"}),
        );
        assert_eq!(status, 400, "{answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains("__"));
        assert_eq!(topic_names(&api), vec![topic.to_string()]);
        // 100 characters exactly is fine.
        let name = "m".repeat(100 - 2 * 40 - 2);
        let created = api.ok_post(
            "/api/topics",
            json!({"environment": long, "department": long, "name": name, "owner": "o"}),
        );
        assert_eq!(created["name"].as_str().unwrap().len(), 100);
    })
    .await;
}

/// Sends only the head of a request announcing `length` body bytes.
fn http_head_only(admin: SocketAddr, method: &str, path: &str, length: usize) -> Reply {
    let mut stream = TcpStream::connect(admin).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    read_reply(&mut stream)
}
