//! A real broker for the end-to-end tests: [`dmq_broker::Broker`] on random
//! 127.0.0.1 ports (binary protocol and admin HTTP API) with a temporary
//! data directory, in its own runtime thread, shut down on drop; and `dmq`
//! commands pointed at it.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::Duration;

use assert_cmd::Command;
use dmq_broker::BrokerConfig;

/// A running broker.
pub struct TestBroker {
    /// The binary protocol.
    pub addr: SocketAddr,
    /// The admin HTTP API.
    pub admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TestBroker {
    /// A development-mode broker (no credentials).
    pub fn start() -> TestBroker {
        TestBroker::start_with(|_| {})
    }

    /// A broker with `configure` applied to the default test configuration.
    pub fn start_with(configure: impl FnOnce(&mut BrokerConfig)) -> TestBroker {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = BrokerConfig {
            data_dir: dir.path().to_path_buf(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            segment_bytes: 1 << 20,
            ..BrokerConfig::default()
        };
        configure(&mut config);
        let (ready, addresses) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let broker = dmq_broker::Broker::start(config)
                    .await
                    .expect("the broker starts");
                ready
                    .send((broker.protocol_addr(), broker.admin_addr()))
                    .expect("report the addresses");
                let _ = stopped.await;
                broker.shutdown().await;
            });
        });
        let (addr, admin) = addresses
            .recv_timeout(Duration::from_secs(30))
            .expect("broker started");
        TestBroker {
            addr,
            admin,
            stop: Some(stop),
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// `http://<admin address>`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// `dmq --addr <broker> --admin <admin API>`, no token from the
    /// environment.
    pub fn dmq(&self) -> Command {
        let mut command = Command::cargo_bin("dmq").expect("the dmq binary is built");
        command
            .env_remove("DMQ_ADMIN")
            .env_remove("DMQ_ADMIN_TOKEN")
            .arg("--addr")
            .arg(self.addr.to_string())
            .arg("--admin")
            .arg(self.admin_url());
        command.timeout(Duration::from_secs(60));
        command
    }

    /// Runs `dmq args`, asserts success, returns stdout.
    pub fn stdout(&self, args: &[&str]) -> String {
        let output = self.dmq().args(args).output().expect("dmq ran");
        assert!(
            output.status.success(),
            "dmq {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("utf-8 output")
    }

    /// Runs `dmq --format json args`, asserts success, parses stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--format", "json"];
        all.extend_from_slice(args);
        json(&self.stdout(&all))
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Parses one JSON document.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text.trim()).expect("valid JSON")
}
