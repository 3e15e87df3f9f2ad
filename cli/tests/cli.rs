//! `dmq` without a broker: argument parsing, `--help` of every command, and
//! the "cannot connect" error path (non-zero exit, message on stderr, no
//! panic).

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
        &["topic", "delete"],
        &["produce"],
        &["consume"],
        &["group"],
        &["group", "list"],
        &["group", "describe"],
        &["group", "seek"],
        &["group", "delete"],
        &["bench"],
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
            .and(predicate::str::contains("--client-id")),
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
