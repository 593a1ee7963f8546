//! Serving the HTTP listeners (ingress, admin): one accept loop per listener, one task per
//! connection in the gateway's `TaskTracker`, and a two-step stop.
//!
//! `axum::serve` spawns its connection tasks where nothing can reach them: a stuck request (a body
//! that never comes, a handler that never returns) outlived the daemon's shutdown. Here every
//! connection task watches two tokens: the shutdown token asks it to finish (hyper's graceful
//! shutdown: the request in flight completes, keep-alive ends), and the hard stop, cancelled when
//! the grace period is over, drops the connection with whatever it was doing.
//!
//! A client must send its request head within [`HEADER_READ_TIMEOUT`] (hyper's timer; without
//! it, a client sending a header byte now and then held its connection for ever), and a listener
//! holds at most `max_connections` at once: beyond that, new connections wait in the kernel's
//! backlog until one ends, so a flood of sockets costs a bounded number of descriptors.

use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Most time a client may take to send a request's head (request line and headers).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Most connections the ingress listener holds at once (webhooks, and the HTTP channels' streams
/// of terminals without MQTT: one or two each).
pub const INGRESS_MAX_CONNECTIONS: usize = 20_000;

/// Most connections the admin listener holds at once (an operator, a Prometheus scraper).
pub const ADMIN_MAX_CONNECTIONS: usize = 256;

/// The tokens a connection watches.
#[derive(Clone)]
pub struct Stop {
    /// Cancelled when shutdown begins: stop accepting, finish what is in flight.
    pub graceful: CancellationToken,
    /// Cancelled when the grace period is over: drop every connection now.
    pub hard: CancellationToken,
}

/// A listening socket with `SO_REUSEADDR`, so that a start on the same port right after a crash
/// or a stop is not refused for the `TIME_WAIT` connections the previous process left behind;
/// `nodelay` is inherited by the accepted sockets.
///
/// # Errors
/// The socket's: a port in use, an address not there.
pub fn listen(
    addr: std::net::SocketAddr,
    backlog: u32,
    nodelay: bool,
) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(nodelay)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Accepts on `listener` until `stop.graceful` is cancelled; serves each connection with `router`
/// in a task of `tracker`. Each request carries `ConnectInfo<L::Addr>` (for the TLS ingress: the
/// client's certificate).
pub async fn serve<L>(
    mut listener: L,
    router: Router,
    tracker: TaskTracker,
    stop: Stop,
    max_connections: usize,
) where
    L: Listener,
    L::Addr: Clone + Send + Sync + 'static,
{
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(max_connections));
    loop {
        let slot = tokio::select! {
            () = stop.graceful.cancelled() => return,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
        };
        let (io, peer) = tokio::select! {
            () = stop.graceful.cancelled() => return,
            // axum's `Listener::accept` retries failed accepts itself, with a pause.
            accepted = listener.accept() => accepted,
        };
        let service =
            TowerToHyperService::new(router.clone().layer(axum::Extension(ConnectInfo(peer))));
        let stop = stop.clone();
        tracker.spawn(async move {
            // Released when the connection ends.
            let _slot = slot;
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "HTTP connection ended with an error");
                    }
                    return;
                }
                () = stop.graceful.cancelled() => connection.as_mut().graceful_shutdown(),
                () = stop.hard.cancelled() => return,
            }
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stop.hard.cancelled() => {}
            }
        });
    }
}
