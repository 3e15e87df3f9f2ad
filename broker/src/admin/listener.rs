//! The admin listener's accept loop (hyper's HTTP/1 server under the axum
//! router), with the limits `axum::serve` does not have
//! (docs/admin-api.md, "Limits"):
//!
//! - at most `admin_max_connections` connections open at once, and at most
//!   `admin_max_connections_per_address` from one IP address; a connection
//!   over either is closed as soon as it is accepted, counted in
//!   `dmq_admin_connections_rejected_total{reason}`, and logged at most
//!   once per `REFUSAL_LOG_INTERVAL` (with how many were refused since);
//!   the limits are `crate::connection_limits`, shared with the protocol
//!   listener;
//! - a request's head must arrive within `admin_header_timeout_ms`, and an
//!   idle keep-alive connection is closed after it too (hyper's header
//!   read timeout), so half-sent requests cannot hold descriptors;
//! - the body timeout is the router's (`guard::json_body`);
//! - an accept error (such as running out of descriptors) is logged at
//!   most once per interval too, and the loop backs off briefly instead of
//!   spinning.
//!
//! At shutdown the listener stops accepting and asks every connection to
//! finish its request in flight; the caller bounds how long that takes.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::connection_limits::{
    log_refusal, ConnectionLimits, QuietWarning, Slot, REFUSAL_LOG_INTERVAL,
};

/// How long the loop pauses after an accept error (e.g. out of
/// descriptors) before accepting again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Connections still finishing their request at shutdown get this long.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(4);

/// Timeouts of each connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionTimeouts {
    /// A request's head must arrive within this.
    pub header: Duration,
}

/// Accepts on `listener` and serves `app` on each admitted connection
/// until `shutdown` completes; then lets connections finish for a bounded
/// time.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    connections: Arc<ConnectionLimits>,
    timeouts: ConnectionTimeouts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut shutdown = pin!(shutdown);
    let (closing, closing_seen) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut refusals = QuietWarning::new(REFUSAL_LOG_INTERVAL);
    let mut accept_errors = QuietWarning::new(REFUSAL_LOG_INTERVAL);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match connections.admit(peer.ip()) {
                    Ok(slot) => {
                        tasks.spawn(serve_connection(
                            stream,
                            peer,
                            slot,
                            app.clone(),
                            timeouts,
                            closing_seen.clone(),
                        ));
                    }
                    Err(refusal) => {
                        // Closed at once: the kernel drops whatever it sent.
                        drop(stream);
                        log_refusal(&mut refusals, "admin", peer, refusal);
                    }
                },
                Err(error) => {
                    if accept_errors.note(Instant::now()) {
                        tracing::warn!(
                            %error,
                            errors = accept_errors.take(),
                            "admin listener: accepting failed; logged at most every {} s",
                            REFUSAL_LOG_INTERVAL.as_secs()
                        );
                    }
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }
    drop(listener);
    let _ = closing.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = tasks.len(),
            "admin listener: closing connections still busy at shutdown"
        );
        tasks.abort_all();
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    app: Router,
    timeouts: ConnectionTimeouts,
    mut closing: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let app = TowerToHyperService::new(app);
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        hyper::service::Service::call(&app, request)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header)
        .keep_alive(true);
    let mut connection = pin!(builder.serve_connection(TokioIo::new(stream), service));
    let mut closing_asked = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "admin connection ended");
                }
                break;
            }
            changed = closing.wait_for(|closing| *closing), if !closing_asked => {
                closing_asked = true;
                if changed.is_ok() {
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
    drop(slot);
}
