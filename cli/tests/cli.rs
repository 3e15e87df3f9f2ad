//! `dmq` without a broker: argument parsing, `--help` of every command,
//! the "cannot connect" and "cannot reach the admin API" error paths
//! (non-zero exit, message on stderr, no panic), `dmq hash-secret`, and
//! `dmq consume` against a scripted broker that pushes a frame over its own
//! limit (issue 9: an error and a non-zero exit, not a hang).

use assert_cmd::Command;
use predicates::prelude::*;

fn dmq() -> Command {
    Command::cargo_bin("dmq").expect("the dmq binary is built")
}

/// An address where nothing listens (a port just released).
fn dead_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    drop(listener);
    addr
}

#[test]
fn help_of_every_command() {
    let commands: &[&[&str]] = &[
        &[],
        &["topic"],
        &["topic", "create"],
        &["topic", "list"],
        &["topic", "describe"],
        &["topic", "leaders"],
        &["topic", "delete"],
        &["produce"],
        &["consume"],
        &["group"],
        &["group", "list"],
        &["group", "describe"],
        &["group", "seek"],
        &["group", "delete"],
        &["bench"],
        &["message"],
        &["message", "get"],
        &["message", "query"],
        &["message", "delete"],
        &["trace"],
        &["stats"],
        &["dlq"],
        &["dlq", "list"],
        &["dlq", "resend"],
        &["hash-secret"],
    ];
    for command in commands {
        dmq()
            .args(*command)
            .arg("--help")
            .assert()
            .success()
            .stdout(predicate::str::contains("Usage: dmq"));
    }
}

#[test]
fn help_mentions_the_documented_options() {
    dmq().args(["produce", "--help"]).assert().success().stdout(
        predicate::str::contains("--key")
            .and(predicate::str::contains("--delay"))
            .and(predicate::str::contains("--ttl"))
            .and(predicate::str::contains("--header"))
            .and(predicate::str::contains("--partition")),
    );
    dmq().args(["consume", "--help"]).assert().success().stdout(
        predicate::str::contains("--group")
            .and(predicate::str::contains("--from"))
            .and(predicate::str::contains("--count"))
            .and(predicate::str::contains("--no-ack")),
    );
    dmq().args(["bench", "--help"]).assert().success().stdout(
        predicate::str::contains("--producers")
            .and(predicate::str::contains("--rate"))
            .and(predicate::str::contains("--acks")),
    );
    dmq().arg("--help").assert().success().stdout(
        predicate::str::contains("--addr")
            .and(predicate::str::contains("--format"))
            .and(predicate::str::contains("--client-id"))
            .and(predicate::str::contains("--admin"))
            .and(predicate::str::contains("DMQ_ADMIN"))
            .and(predicate::str::contains("--token"))
            .and(predicate::str::contains("DMQ_ADMIN_TOKEN")),
    );
    for verb in ["query", "delete"] {
        dmq()
            .args(["message", verb, "--help"])
            .assert()
            .success()
            .stdout(
                predicate::str::contains("--topic")
                    .and(predicate::str::contains("--id"))
                    .and(predicate::str::contains("--key"))
                    .and(predicate::str::contains("--from"))
                    .and(predicate::str::contains("--to"))
                    .and(predicate::str::contains("--partition"))
                    .and(predicate::str::contains("--from-offset"))
                    .and(predicate::str::contains("--to-offset")),
            );
    }
    dmq()
        .args(["message", "query", "--help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("--limit").and(predicate::str::contains("--all")));
    dmq()
        .args(["message", "delete", "--help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("--dry-run").and(predicate::str::contains("--yes")));
    dmq().args(["stats", "--help"]).assert().success().stdout(
        predicate::str::contains("--topic")
            .and(predicate::str::contains("--group"))
            .and(predicate::str::contains("--minutes")),
    );
}

#[test]
fn bad_arguments_are_rejected() {
    let cases: &[&[&str]] = &[
        &["topic", "create"],                                // missing name
        &["topic", "create", "t", "--partitions", "many"],   // not a number
        &["consume", "t"],                                   // missing --group
        &["consume", "t", "--group", "g", "--from", "soon"], // bad start
        &["produce", "t", "--delay", "ten minutes-ish"],     // bad duration
        &["produce", "t", "--header", "novalue"],            // bad header
        &["group", "seek", "t", "g"],                        // no target
        &["group", "seek", "t", "g", "--earliest", "--latest"],
        &["bench", "--count", "10", "--duration", "1s"],
        &["--format", "yaml", "topic", "list"],
        &["frobnicate"],
        &["message", "get"],                   // missing id
        &["message", "query", "--id", "x"],    // missing --topic
        &["message", "query", "--topic", "t"], // no selector
        &[
            "message", "query", "--topic", "t", "--id", "x", "--key", "k",
        ], // two
        &[
            "message",
            "query",
            "--topic",
            "t",
            "--from",
            "2016-01-01T00:00:00Z",
        ], // no --to
        &[
            "message",
            "query",
            "--topic",
            "t",
            "--to",
            "2016-01-01T00:00:00Z",
        ],
        &[
            "message",
            "query",
            "--topic",
            "t",
            "--from",
            "yesterday",
            "--to",
            "0",
        ],
        &["message", "query", "--topic", "t", "--partition", "0"], // no offsets
        &[
            "message",
            "query",
            "--topic",
            "t",
            "--from-offset",
            "0",
            "--to-offset",
            "5",
        ],
        &[
            "message",
            "query",
            "--topic",
            "t",
            "--key",
            "k",
            "--from-offset",
            "1",
        ],
        &[
            "message", "query", "--topic", "t", "--key", "k", "--limit", "0",
        ],
        &[
            "message", "query", "--topic", "t", "--key", "k", "--limit", "1001",
        ],
        &[
            "message", "query", "--topic", "t", "--key", "k", "--all", "--cursor", "c",
        ],
        &["message", "delete", "--topic", "t"],
        &[
            "message",
            "delete",
            "--topic",
            "t",
            "--key",
            "k",
            "--dry-run",
            "--yes",
        ],
        &["trace"],
        &["stats", "--minutes", "0"],
        &["stats", "--minutes", "2881"],
        &["dlq", "resend"],
    ];
    for case in cases {
        dmq()
            .args(*case)
            .assert()
            .failure()
            .code(2)
            .stderr(predicate::str::contains("error"));
    }
}

#[test]
fn cannot_connect_is_a_clear_error() {
    let addr = dead_addr();
    let cases: &[&[&str]] = &[
        &["topic", "list"],
        &["topic", "create", "t"],
        &["produce", "t", "hello"],
        &["consume", "t", "--group", "g", "--count", "1"],
        &["group", "describe", "t", "g"],
        &["group", "seek", "t", "g", "--earliest"],
        &["bench", "--count", "10"],
    ];
    for case in cases {
        dmq()
            .args(["--addr", addr.as_str(), "--timeout", "2s"])
            .args(*case)
            .assert()
            .failure()
            .stderr(
                predicate::str::contains("cannot connect")
                    .and(predicate::str::contains(addr.as_str()))
                    .and(predicate::str::contains("panicked").not()),
            );
    }
    // JSON output does not change the error path.
    dmq()
        .args(["--addr", addr.as_str(), "--format", "json", "topic", "list"])
        .assert()
        .failure()
        .stdout(predicate::str::is_empty());
}

/// Reads one frame from `stream` (blocking), or None when it closes.
fn read_frame(
    stream: &mut std::net::TcpStream,
    buffer: &mut Vec<u8>,
) -> Option<dmq_client::protocol::Frame> {
    use std::io::Read;
    loop {
        let max = dmq_client::protocol::DEFAULT_MAX_FRAME_BYTES;
        if let Ok(Some((frame, used))) = dmq_client::protocol::decode_frame(buffer, max) {
            buffer.drain(..used);
            return Some(frame);
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(read) => buffer.extend_from_slice(&chunk[..read]),
        }
    }
}

/// A scripted broker: it answers HELLO on every connection (16 MiB
/// frames), SUBSCRIBED to the first SUBSCRIBE, then starts a DELIVER 42
/// bytes over its own limit, as in issue 9 (only the length prefix and the
/// header: a client refuses it from its length). Returns its address.
fn broker_pushing_an_oversize_frame() -> String {
    use dmq_client::protocol::{
        encode_frame_to_vec, Body, Frame, HelloOk, Opcode, Request, Subscribed,
        DEFAULT_MAX_FRAME_BYTES,
    };
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        let mut subscribed = false;
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut buffer = Vec::new();
            while let Some(frame) = read_frame(&mut stream, &mut buffer) {
                let mut out = Vec::new();
                match frame.body {
                    Body::Request(Request::Hello(_)) => {
                        let hello_ok = HelloOk {
                            version: 1,
                            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
                            broker_id: "scripted".into(),
                        };
                        let answer = Frame::response(frame.correlation_id, hello_ok);
                        out = encode_frame_to_vec(&answer).expect("encodes");
                    }
                    Body::Request(Request::Subscribe(_)) if !subscribed => {
                        subscribed = true;
                        let ok = Subscribed {
                            subscription_id: 1,
                            partitions: vec![0],
                        };
                        let answer = Frame::response(frame.correlation_id, ok);
                        out = encode_frame_to_vec(&answer).expect("encodes");
                        let length = DEFAULT_MAX_FRAME_BYTES + 42 - 4;
                        out.extend_from_slice(&length.to_le_bytes());
                        out.extend_from_slice(&Opcode::Deliver.as_u16().to_le_bytes());
                        out.extend_from_slice(&[0, 0, 0, 0, 0]);
                    }
                    _ => {}
                }
                let _ = stream.write_all(&out);
            }
        }
    });
    addr
}

#[test]
fn consume_reports_a_frame_it_cannot_read_and_exits() {
    let addr = broker_pushing_an_oversize_frame();
    dmq()
        .args(["--addr", addr.as_str(), "--timeout", "5s"])
        .args(["consume", "t", "--group", "g"])
        .timeout(std::time::Duration::from_secs(30))
        .assert()
        .failure()
        .code(1)
        .stderr(
            predicate::str::contains("subscription failed")
                .and(predicate::str::contains(
                    "frame of 16777258 bytes exceeds the maximum of 16777216",
                ))
                .and(predicate::str::contains("panicked").not()),
        );
}

#[test]
fn unreachable_admin_api_is_a_clear_error() {
    let url = format!("http://{}", dead_addr());
    let cases: &[&[&str]] = &[
        &["message", "get", "0000019ac3d1e2f0000000000000002a"],
        &["message", "query", "--topic", "t", "--key", "k"],
        &["message", "query", "--topic", "t", "--key", "k", "--all"],
        &["message", "delete", "--topic", "t", "--key", "k", "--yes"],
        &[
            "message",
            "delete",
            "--topic",
            "t",
            "--key",
            "k",
            "--dry-run",
        ],
        &["message", "delete", "--topic", "t", "--key", "k"],
        &["trace", "0000019ac3d1e2f0000000000000002a"],
        &["stats"],
        &["dlq", "list"],
        &["dlq", "resend", "t.g.dlq"],
    ];
    for case in cases {
        dmq()
            .args(["--admin", url.as_str(), "--timeout", "2s"])
            .args(*case)
            .assert()
            .failure()
            .code(1)
            .stdout(predicate::str::is_empty())
            .stderr(
                predicate::str::contains(format!("cannot reach the admin API at {url}"))
                    .and(predicate::str::contains("panicked").not()),
            );
    }
    // DMQ_ADMIN, and a bare host:port.
    let bare = dead_addr();
    dmq()
        .env("DMQ_ADMIN", bare.as_str())
        .args(["--format", "json", "stats"])
        .assert()
        .failure()
        .code(1)
        .stdout(predicate::str::is_empty())
        .stderr(predicate::str::contains(format!(
            "cannot reach the admin API at http://{bare}"
        )));
}

#[test]
fn inverted_ranges_are_refused_before_any_request() {
    for case in [
        &[
            "--from",
            "2017-01-01T00:00:00Z",
            "--to",
            "2016-01-01T00:00:00Z",
        ][..],
        &["--partition", "0", "--from-offset", "5", "--to-offset", "5"][..],
    ] {
        dmq()
            .args([
                "--admin",
                "http://127.0.0.1:1",
                "message",
                "query",
                "--topic",
                "t",
            ])
            .args(case)
            .assert()
            .failure()
            .code(1)
            .stderr(
                predicate::str::contains("must be")
                    .and(predicate::str::contains("cannot reach").not()),
            );
    }
}

#[test]
fn hash_secret_prints_a_verifiable_argon2id_hash() {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    use argon2::Argon2;

    let hash_of = |stdin: &str, args: &[&str]| -> String {
        let output = dmq()
            .arg("hash-secret")
            .args(args)
            .write_stdin(stdin)
            .output()
            .expect("dmq ran");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8(output.stdout).expect("utf-8");
        assert_eq!(stdout.lines().count(), 1, "{stdout}");
        stdout.trim_end().to_string()
    };
    let verifies = |hash: &str, secret: &str| {
        let parsed = PasswordHash::new(hash).expect("a PHC string");
        Argon2::default()
            .verify_password(secret.as_bytes(), &parsed)
            .is_ok()
    };
    let first = hash_of("s3cret value\nsecond line ignored\n", &[]);
    let second = hash_of("s3cret value\r\n", &[]);
    let third = hash_of("", &["--secret", "s3cret value"]);
    assert!(first.starts_with("$argon2id$"), "{first}");
    assert_ne!(first, second, "a new salt each run");
    assert_ne!(second, third);
    for hash in [&first, &second, &third] {
        assert!(verifies(hash, "s3cret value"), "{hash}");
        assert!(!verifies(hash, "s3cret value\n"), "{hash}");
        assert!(!verifies(hash, "other"), "{hash}");
    }
    // JSON.
    let output = dmq()
        .args(["--format", "json", "hash-secret"])
        .write_stdin("token-1\n")
        .output()
        .expect("dmq ran");
    assert!(output.status.success());
    let value: serde_json::Value = serde_json::from_slice(&output.stdout).expect("valid JSON");
    assert!(verifies(value["hash"].as_str().expect("hash"), "token-1"));
    // Empty secrets are refused.
    for (stdin, args) in [
        ("", &[][..]),
        ("\n", &[][..]),
        ("\r\nx\n", &[][..]),
        ("", &["--secret", ""][..]),
    ] {
        dmq()
            .arg("hash-secret")
            .args(args)
            .write_stdin(stdin)
            .assert()
            .failure()
            .code(1)
            .stdout(predicate::str::is_empty())
            .stderr(predicate::str::contains("empty secret"));
    }
}
