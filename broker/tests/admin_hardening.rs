//! Hardening of the admin HTTP listener and its credentials
//! (docs/admin-api.md, docs/manager.md), against a real broker on
//! 127.0.0.1:
//! - a web page cannot drive the development-mode API (foreign `Origin`,
//!   non-JSON bodies) nor read it through DNS rebinding (foreign `Host`);
//! - cheap failed HELLOs cannot reset an admin-token lockout.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

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
        // JSON with a charset parameter is JSON.
        let reply = send(
            admin,
            "POST",
            &format!("/api/topics/{topic}/approve"),
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
