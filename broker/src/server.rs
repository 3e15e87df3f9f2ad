//! The accept loop: bounded connections, one task per session, graceful
//! shutdown (stop accepting, tell sessions, let appends in flight finish,
//! then make every ack durable).
//!
//! Connection metrics: every accepted connection is counted opened when its
//! session starts and closed when it ends (`dmq_connections` is the
//! difference); a connection refused for want of a permit is counted as
//! rejected with reason `too_many_connections`. Sessions count their own
//! handshake rejections.
//!
//! Limits before authentication: at most `max_connections` in all and
//! `max_connections_per_address` from one IP address; refusals are logged
//! at most once per [`REFUSAL_LOG_INTERVAL`] (with how many were not), so a
//! flood of connections cannot flood the log.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmq_protocol::{encode_frame, ErrorCode, Frame};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::broker::Services;
use crate::session::{self, Shared};
use crate::telemetry::Telemetry;

/// Counts its connection closed when dropped.
struct OpenConnection(Telemetry);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

/// At most one WARN line per this interval for refused connections.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Open connections per peer address.
#[derive(Debug, Clone, Default)]
pub struct ConnectionsPerAddress(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One open connection of an address; counted until dropped.
#[derive(Debug)]
pub struct AddressSlot {
    table: ConnectionsPerAddress,
    address: IpAddr,
}

impl ConnectionsPerAddress {
    /// A slot for `address`, unless it already holds `max` connections.
    pub fn try_open(&self, address: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let open = table.entry(address).or_insert(0);
        if *open >= max {
            return None;
        }
        *open += 1;
        Some(AddressSlot {
            table: self.clone(),
            address,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut table = self.table.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(open) = table.get_mut(&self.address) {
            *open -= 1;
            if *open == 0 {
                table.remove(&self.address);
            }
        }
    }
}

/// Logs refused connections at most once per [`REFUSAL_LOG_INTERVAL`].
#[derive(Debug, Default)]
pub struct RefusalLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RefusalLog {
    /// Notes one refusal of `peer` for `reason`.
    pub fn refused(&mut self, listener: &str, peer: SocketAddr, reason: &str) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < REFUSAL_LOG_INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            listener,
            %peer,
            reason,
            not_logged_since_last = self.suppressed,
            "connection refused"
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// Serves `listener` until `shutdown` completes, then drains and stops.
pub async fn run(listener: TcpListener, services: Services, shutdown: impl Future<Output = ()>) {
    let engine = services.engine.clone();
    let config = Arc::clone(&services.config);
    let shared = Shared::new(services);
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let per_address = ConnectionsPerAddress::default();
    let mut refusals = RefusalLog::default();
    let (stop, stopped) = watch::channel(false);
    let mut sessions = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (mut stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let slot = per_address.try_open(peer.ip(), config.max_connections_per_address);
        let permit = Arc::clone(&permits).try_acquire_owned().ok();
        let (Some(slot), Some(permit)) = (slot, permit) else {
            refusals.refused("protocol", peer, "too many connections");
            engine
                .telemetry()
                .connection_rejected("too_many_connections");
            let mut buffer = bytes::BytesMut::new();
            let frame = Frame::error(0, ErrorCode::Overloaded, "too many connections");
            if encode_frame(&frame, &mut buffer).is_ok() {
                // A few bytes into a new socket's empty buffer: never blocks
                // for long, and never longer than this.
                let _ = tokio::time::timeout(Duration::from_millis(100), stream.write_all(&buffer))
                    .await;
            }
            continue;
        };
        let shared = shared.clone();
        let stopped = stopped.clone();
        let telemetry = engine.telemetry().clone();
        telemetry.connection_opened();
        sessions.spawn(async move {
            // Counted closed even if the session task is aborted.
            let _open = OpenConnection(telemetry);
            session::serve(stream, peer, shared, stopped).await;
            drop(permit);
            drop(slot);
        });
        while sessions.try_join_next().is_some() {}
    }
    tracing::info!("shutting down: no new connections");
    let _ = stop.send(true);
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("sessions did not finish in 10 s; stopping anyway");
        sessions.abort_all();
    }
    tokio::task::spawn_blocking(move || engine.shutdown())
        .await
        .unwrap_or_else(|_| tracing::error!("engine shutdown panicked"));
    tracing::info!("stopped");
}
