//! Starting and stopping the servers under test: 127.0.0.1, a random port,
//! a temp dir, and a guard that stops the process when dropped.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::workload::READY_TIMEOUT;

/// A free TCP port on 127.0.0.1 (bound, then released for the server).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A running server. Dropping it sends SIGTERM, waits up to 10 s, then
/// SIGKILLs, and removes its temp dir.
pub struct Server {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
    // Dropped after the process is stopped (fields drop in order, after `drop`).
    _dir: TempDir,
}

impl Server {
    /// Starts `program` with `args` (built from the server's temp dir).
    pub fn start(
        name: &'static str,
        program: &str,
        args: impl FnOnce(&Path) -> Result<Vec<String>>,
    ) -> Result<Server> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("dmq-compare-{name}-"))
            .tempdir()
            .context("creating a temp dir")?;
        let args = args(dir.path())?;
        // The server runs in its temp dir: resolve a relative program path first.
        let program = if program.contains('/') {
            std::fs::canonicalize(program)
                .with_context(|| format!("{program} not found (build it first)"))?
                .display()
                .to_string()
        } else {
            program.to_owned()
        };
        let program = program.as_str();
        let log = dir.path().join("server.log");
        let out = File::create(&log).context("creating the server log")?;
        let err = out.try_clone()?;
        let child = Command::new(program)
            .args(&args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {program} {}", args.join(" ")))?;
        Ok(Server {
            name,
            child: Some(child),
            log,
            _dir: dir,
        })
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Fails if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(child) = &mut self.child {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{} exited ({status}); its log ends with:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
        }
        Ok(())
    }

    /// Waits until `port` on 127.0.0.1 accepts connections.
    pub async fn wait_for_port(&mut self, port: u16) -> Result<()> {
        let started = Instant::now();
        loop {
            self.check_running()?;
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "{} did not listen on 127.0.0.1:{port} within {:?}; its log ends with:\n{}",
                    self.name,
                    READY_TIMEOUT,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill(2) on our own child's pid.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => break,
            }
        }
        eprintln!("{} did not stop on SIGTERM within 10 s: SIGKILL", self.name);
        let _ = child.kill();
        let _ = child.wait();
    }
}
