//! The admin listener's accept loop (hyper's HTTP/1 server under the axum
//! router), with the limits `axum::serve` does not have
//! (docs/admin-api.md, "Limits"):
//!
//! - at most `admin_max_connections` connections open at once, and at most
//!   `admin_max_connections_per_address` from one IP address; a connection
//!   over either is closed as soon as it is accepted, counted in
//!   `dmq_admin_connections_rejected_total{reason}`, and logged at most
//!   once per [`REFUSAL_LOG_INTERVAL`] (with how many were refused since);
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

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Refusals and accept errors are logged at most once per this.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How long the loop pauses after an accept error (e.g. out of
/// descriptors) before accepting again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Connections still finishing their request at shutdown get this long.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(4);

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `admin_max_connections` are open.
    TooManyConnections,
    /// `admin_max_connections_per_address` are open from its address.
    TooManyFromAddress,
}

impl Refusal {
    /// The `reason` label of the refusal counter.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::TooManyConnections => "too_many_connections",
            Refusal::TooManyFromAddress => "too_many_from_address",
        }
    }
}

/// The admin listener's open connections and refusals.
#[derive(Debug)]
pub struct AdminConnections {
    max_total: usize,
    max_per_address: usize,
    open: Mutex<OpenConnections>,
    refused_total: AtomicU64,
    refused_per_address: AtomicU64,
}

#[derive(Debug, Default)]
struct OpenConnections {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// One admitted connection; frees its place when dropped.
#[derive(Debug)]
pub struct Slot {
    connections: Arc<AdminConnections>,
    address: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.connections.lock_open();
        open.total = open.total.saturating_sub(1);
        if let Some(count) = open.by_address.get_mut(&self.address) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.by_address.remove(&self.address);
            }
        }
    }
}

impl AdminConnections {
    /// Limits of `max_total` connections, `max_per_address` per address.
    pub fn new(max_total: usize, max_per_address: usize) -> AdminConnections {
        AdminConnections {
            max_total,
            max_per_address,
            open: Mutex::new(OpenConnections::default()),
            refused_total: AtomicU64::new(0),
            refused_per_address: AtomicU64::new(0),
        }
    }

    fn lock_open(&self) -> std::sync::MutexGuard<'_, OpenConnections> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place for a connection from `address`, or says which limit
    /// refuses it (and counts the refusal).
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Result<Slot, Refusal> {
        let mut open = self.lock_open();
        let from_address = open.by_address.get(&address).copied().unwrap_or(0);
        let refusal = if open.total >= self.max_total {
            Some((Refusal::TooManyConnections, &self.refused_total))
        } else if from_address >= self.max_per_address {
            Some((Refusal::TooManyFromAddress, &self.refused_per_address))
        } else {
            None
        };
        if let Some((refusal, counter)) = refusal {
            counter.fetch_add(1, Ordering::Relaxed);
            return Err(refusal);
        }
        open.total += 1;
        *open.by_address.entry(address).or_insert(0) += 1;
        Ok(Slot {
            connections: Arc::clone(self),
            address,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.lock_open().total
    }

    /// Connections refused so far because of `refusal`'s limit.
    pub fn refused(&self, refusal: Refusal) -> u64 {
        match refusal {
            Refusal::TooManyConnections => self.refused_total.load(Ordering::Relaxed),
            Refusal::TooManyFromAddress => self.refused_per_address.load(Ordering::Relaxed),
        }
    }
}

/// A warning that is logged at most once per interval, with the number of
/// occurrences it stands for.
#[derive(Debug)]
struct QuietWarning {
    interval: Duration,
    last: Option<Instant>,
    unlogged: u64,
}

impl QuietWarning {
    fn new(interval: Duration) -> QuietWarning {
        QuietWarning {
            interval,
            last: None,
            unlogged: 0,
        }
    }

    /// Counts one occurrence; true when it is time to log (the count is
    /// then in [`take`](Self::take)).
    fn note(&mut self, now: Instant) -> bool {
        self.unlogged += 1;
        let due = self
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
        if due {
            self.last = Some(now);
        }
        due
    }

    /// Occurrences since the last log line.
    fn take(&mut self) -> u64 {
        std::mem::take(&mut self.unlogged)
    }
}

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
    connections: Arc<AdminConnections>,
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
                        if refusals.note(Instant::now()) {
                            tracing::warn!(
                                %peer,
                                reason = refusal.reason(),
                                refused = refusals.take(),
                                "admin listener: connections refused (a connection limit is \
                                 reached); logged at most every {} s",
                                REFUSAL_LOG_INTERVAL.as_secs()
                            );
                        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_hold_per_address_and_in_all() {
        let connections = Arc::new(AdminConnections::new(3, 2));
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let first = connections.admit(a).unwrap();
        let _second = connections.admit(a).unwrap();
        assert_eq!(
            connections.admit(a).unwrap_err(),
            Refusal::TooManyFromAddress
        );
        let _third = connections.admit(b).unwrap();
        assert_eq!(
            connections.admit(b).unwrap_err(),
            Refusal::TooManyConnections
        );
        assert_eq!(connections.open(), 3);
        drop(first);
        assert_eq!(connections.open(), 2);
        let _again = connections.admit(a).unwrap();
        assert_eq!(connections.refused(Refusal::TooManyFromAddress), 1);
        assert_eq!(connections.refused(Refusal::TooManyConnections), 1);
    }

    #[test]
    fn warnings_are_logged_once_per_interval_with_their_count() {
        let mut warning = QuietWarning::new(Duration::from_secs(10));
        let start = Instant::now();
        assert!(warning.note(start));
        assert_eq!(warning.take(), 1);
        for i in 1..1000 {
            assert!(!warning.note(start + Duration::from_millis(i)));
        }
        assert!(warning.note(start + Duration::from_secs(10)));
        assert_eq!(warning.take(), 1000);
    }
}
