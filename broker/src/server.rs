//! The accept loop: bounded connections, one task per session, graceful
//! shutdown (stop accepting, tell sessions, let appends in flight finish,
//! then make every ack durable).
//!
//! Connection metrics: every accepted connection is counted opened when its
//! session starts and closed when it ends (`dmq_connections` is the
//! difference); a connection refused by a limit is counted as rejected
//! with reason `too_many_connections` or `too_many_from_address`. Sessions count their own
//! handshake rejections.
//!
//! Limits before authentication: at most `max_connections` in all and
//! `max_connections_per_address` from one IP address
//! ([`crate::connection_limits`], shared with the admin listener); refusals
//! are logged at most once per interval (with how many were not), so a
//! flood of connections cannot flood the log.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use dmq_protocol::{encode_frame, ErrorCode, Frame};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::connection_limits::{log_refusal, ConnectionLimits, QuietWarning, REFUSAL_LOG_INTERVAL};
use crate::services::Services;
use crate::session::{self, Shared};
use crate::telemetry::Telemetry;

/// Counts its connection closed when dropped.
struct OpenConnection(Telemetry);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

/// Serves `listener` until `shutdown` completes, then drains and stops.
pub async fn run(listener: TcpListener, services: Services, shutdown: impl Future<Output = ()>) {
    let engine = services.engine.clone();
    let config = Arc::clone(&services.config);
    let shared = Shared::new(services);
    let limits = Arc::new(ConnectionLimits::new(
        config.max_connections,
        config.max_connections_per_address,
    ));
    let mut refusals = QuietWarning::new(REFUSAL_LOG_INTERVAL);
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
        let slot = match limits.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                log_refusal(&mut refusals, "protocol", peer, refusal);
                engine.telemetry().connection_rejected(refusal.reason());
                let mut buffer = bytes::BytesMut::new();
                let frame = Frame::error(0, ErrorCode::Overloaded, "too many connections");
                if encode_frame(&frame, &mut buffer).is_ok() {
                    // A few bytes into a new socket's empty buffer: never blocks
                    // for long, and never longer than this.
                    let _ =
                        tokio::time::timeout(Duration::from_millis(100), stream.write_all(&buffer))
                            .await;
                }
                continue;
            }
        };
        let shared = shared.clone();
        let stopped = stopped.clone();
        let telemetry = engine.telemetry().clone();
        telemetry.connection_opened();
        sessions.spawn(async move {
            // Counted closed even if the session task is aborted.
            let _open = OpenConnection(telemetry);
            session::serve(stream, peer, shared, stopped).await;
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
