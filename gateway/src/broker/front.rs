//! The front door of the MQTT listeners (`mqtt.listen`, `mqtt.ws_listen`): posgate, not rmqtt,
//! accepts the terminals' sockets, so that what a client can hold is bounded here
//! (decision 0004).
//!
//! Each connection, in its own task:
//! 1. waits for a handshake slot (at most `mqtt.max_handshaking` at once; a listener holds at
//!    most `mqtt.max_connections` sockets, more are closed at once);
//! 2. does the TLS handshake within `mqtt.handshake_timeout_secs`; the client certificate must
//!    chain to the gateway CA and must not be revoked ([`RefuseRevoked`]): a stolen certificate
//!    fails here and never gets a socket past TLS;
//! 3. takes one of its terminal's `mqtt.max_connections_per_terminal` slots, counted from the end
//!    of the handshake; when they are all taken, the oldest connection is closed (as MQTT's session
//!    takeover would, so a terminal that reboots without closing its sockets still gets in);
//! 4. opens a loopback connection to rmqtt's internal plain listener and copies bytes both ways.
//!    The internal connection's source port names the verified certificate: the broker's
//!    CONNECT check looks the identity up by that port ([`Front::identity`]) and refuses a port
//!    it does not know, so a local process that dials the internal listener directly is refused;
//! 5. closes the connection unless the broker accepted an MQTT CONNECT within the handshake
//!    timeout (rmqtt itself waits for the first packet after TLS without a deadline).
//!
//! What it costs (measured in decision 0004): a loopback hop per packet, two more descriptors and
//! two small copy buffers per connection.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::FutureExt;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, oneshot};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Revoked;
use crate::pki::{self, CertIdentity, Serial};

/// Bytes an idle connection holds per direction for what it copies between the terminal and the
/// broker: acks and pings are a few bytes, and 10,000 connections must stay cheap.
const IDLE_BUFFER: usize = 256;
/// Most bytes copied in one write: a confirmation is about 1 KiB.
const COPY_BUFFER: usize = 4096;

/// The sockets of the front door and what it knows about them; shared by its listeners and the
/// broker's CONNECT check.
pub(super) struct Front {
    /// Internal source port → the verified certificate behind it, and who to tell when its
    /// CONNECT was accepted.
    admitted: Mutex<HashMap<u16, Admitted>>,
    /// Terminal id → its open connections (with their certificate's serial), oldest first.
    slots: Mutex<HashMap<String, VecDeque<Held>>>,
    next_slot: AtomicU64,
    per_terminal: usize,
    refused: prometheus::IntCounterVec,
}

/// One open connection of a terminal.
struct Held {
    id: u64,
    /// The serial of the certificate it was made with.
    serial: Serial,
    token: CancellationToken,
}

struct Admitted {
    /// Which connection holds the port now: loopback ports are reused at once (`tcp_tw_reuse`),
    /// so a closing connection must not remove its successor's entry.
    slot: u64,
    identity: CertIdentity,
    connected: Option<oneshot::Sender<()>>,
}

/// How one listener of the front door runs.
pub(super) struct Door {
    pub listener: TcpListener,
    /// rmqtt's plain listener on the loopback that this door feeds.
    pub internal: SocketAddr,
    pub tls: Arc<rustls::ServerConfig>,
    pub handshake_timeout: Duration,
    pub max_handshaking: usize,
    pub max_connections: usize,
}

impl Front {
    pub(super) fn new(per_terminal: usize, refused: prometheus::IntCounterVec) -> Front {
        Front {
            admitted: Mutex::default(),
            slots: Mutex::default(),
            next_slot: AtomicU64::new(0),
            per_terminal: per_terminal.max(1),
            refused,
        }
    }

    /// The verified certificate behind the internal connection from `port`, if it is one of ours.
    pub(super) fn identity(&self, port: u16) -> Option<CertIdentity> {
        let admitted = self.admitted.lock().unwrap_or_else(PoisonError::into_inner);
        admitted.get(&port).map(|a| a.identity.clone())
    }

    /// The broker accepted the CONNECT that came through `port`.
    pub(super) fn connected(&self, port: u16) {
        let mut admitted = self.admitted.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = admitted.get_mut(&port).and_then(|a| a.connected.take()) {
            // The connection may be gone already: nothing to tell then.
            tx.send(()).ok();
        }
    }

    /// Closes every connection of `terminal_id`, whether or not it has connected yet.
    pub(super) fn close_all(&self, terminal_id: &str) {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        for held in slots.get(terminal_id).into_iter().flatten() {
            held.token.cancel();
        }
    }

    /// Closes the connections of `terminal_id` made with the certificate `serial` (one a renewal
    /// replaced), leaving those made with its other certificate.
    pub(super) fn close_serial(&self, terminal_id: &str, serial: &Serial) -> usize {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let mut closed = 0;
        for held in slots
            .get(terminal_id)
            .into_iter()
            .flatten()
            .filter(|held| held.serial == *serial)
        {
            held.token.cancel();
            closed += 1;
        }
        closed
    }

    /// Accepts on `door` until `token` is cancelled, each connection in a task of `tracker`.
    pub(super) async fn run(
        self: Arc<Front>,
        door: Door,
        tracker: TaskTracker,
        token: CancellationToken,
    ) {
        let acceptor = TlsAcceptor::from(door.tls.clone());
        let handshakes = Arc::new(Semaphore::new(door.max_handshaking));
        let open = Arc::new(AtomicUsize::new(0));
        loop {
            let permit = tokio::select! {
                () = token.cancelled() => break,
                permit = handshakes.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let (tcp, peer) = tokio::select! {
                () = token.cancelled() => break,
                accepted = door.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors and the like: back off, don't spin.
                        if let Some(left_out) = super::ACCEPT_FAILED_LOG.allow() {
                            tracing::warn!(error = %e, left_out, "MQTT accept failed (at most one line a second)");
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Some(open) = Open::claim(&open, door.max_connections) else {
                self.refuse("capacity");
                continue;
            };
            let conn = Connection {
                front: self.clone(),
                acceptor: acceptor.clone(),
                internal: door.internal,
                timeout: door.handshake_timeout,
                shutdown: token.clone(),
            };
            tracker.spawn(async move {
                let _open = open;
                conn.serve(tcp, peer, permit).await;
            });
        }
    }

    fn refuse(&self, reason: &str) {
        self.refused.with_label_values(&[reason]).inc();
    }

    /// A slot for one more connection of `identity`'s terminal; the oldest is closed if all are
    /// taken.
    fn claim(self: &Arc<Self>, identity: &CertIdentity, shutdown: &CancellationToken) -> Slot {
        let terminal_id = identity.cn.as_str();
        let id = self.next_slot.fetch_add(1, Ordering::Relaxed);
        let token = shutdown.child_token();
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let held = slots.entry(terminal_id.to_owned()).or_default();
        held.push_back(Held {
            id,
            serial: Serial::parse(&identity.serial_hex),
            token: token.clone(),
        });
        while held.len() > self.per_terminal {
            if let Some(oldest) = held.pop_front() {
                oldest.token.cancel();
                self.refuse("replaced");
            }
        }
        Slot {
            front: self.clone(),
            terminal_id: terminal_id.to_owned(),
            id,
            token,
        }
    }

    fn admit(
        self: &Arc<Self>,
        slot: u64,
        port: u16,
        identity: CertIdentity,
    ) -> (Ticket, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let mut admitted = self.admitted.lock().unwrap_or_else(PoisonError::into_inner);
        admitted.insert(
            port,
            Admitted {
                slot,
                identity,
                connected: Some(tx),
            },
        );
        (
            Ticket {
                front: self.clone(),
                port,
                slot,
            },
            rx,
        )
    }
}

/// One connection through the front door.
struct Connection {
    front: Arc<Front>,
    acceptor: TlsAcceptor,
    internal: SocketAddr,
    timeout: Duration,
    shutdown: CancellationToken,
}

impl Connection {
    async fn serve(
        self,
        tcp: TcpStream,
        peer: SocketAddr,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let front = &self.front;
        let handshake = tokio::time::timeout(self.timeout, self.acceptor.accept(tcp));
        let tls = tokio::select! {
            () = self.shutdown.cancelled() => return,
            done = handshake => match done {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    // A revoked certificate was counted by the verifier already.
                    if !is_revoked(&e) {
                        front.refuse("handshake");
                    }
                    tracing::debug!(%peer, error = %e, "MQTT TLS handshake failed");
                    return;
                }
                Err(_) => {
                    front.refuse("handshake");
                    tracing::debug!(%peer, "MQTT TLS handshake timed out");
                    return;
                }
            },
        };
        drop(permit);
        let connected_by = tokio::time::Instant::now() + self.timeout;
        // The verifier checked the chain and revocation; the identity was parsed there once.
        let identity = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|der| pki::identity_of(der));
        let Some(Ok(identity)) = identity else {
            front.refuse("identity");
            return;
        };
        let slot = front.claim(&identity, &self.shutdown);
        let upstream = match TcpStream::connect(self.internal).await {
            Ok(upstream) => upstream,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the broker's internal listener");
                return;
            }
        };
        drop(upstream.set_nodelay(true));
        let Ok(port) = upstream.local_addr().map(|a| a.port()) else {
            return;
        };
        let (ticket, connected) = front.admit(slot.id, port, identity);
        let (from_terminal, to_terminal) = tokio::io::split(tls);
        let (from_broker, to_broker) = upstream.into_split();
        let up = pump(from_terminal, to_broker);
        let down = pump(from_broker, to_terminal);
        tokio::pin!(up, down);
        let first_connect = tokio::time::timeout_at(connected_by, connected);
        tokio::pin!(first_connect);
        let (mut waiting, mut up_open) = (true, true);
        loop {
            tokio::select! {
                () = slot.token.cancelled() => break,
                done = &mut first_connect, if waiting => match done {
                    Ok(Ok(())) => waiting = false,
                    // No accepted CONNECT in time (or the broker refused it and closed).
                    _ => {
                        front.refuse("first_packet");
                        break;
                    }
                },
                // The terminal closed its side: the broker is told (it ends the session and
                // closes, which ends `down`).
                _ = &mut up, if up_open => up_open = false,
                // The broker closed (a DISCONNECT, a kick, a keep-alive timeout): so does the
                // terminal's socket, whether or not the terminal closes its side.
                _ = &mut down => break,
            }
        }
        // The port's entry goes before the loopback socket closes (the halves, dropped next).
        drop(ticket);
    }
}

/// Copies `from` to `to` until `from` ends, then closes `to`'s sending side. Each read is written
/// and flushed at once: a confirmation must not wait in a buffer.
///
/// An idle connection holds only [`IDLE_BUFFER`] bytes per direction: most of what passes is a
/// few bytes (acks, pings). A read that fills it is followed by what else is ready at once, up
/// to [`COPY_BUFFER`], in a buffer that lives only until it is written, so that a confirmation
/// reaches the terminal in one TLS record.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
) -> std::io::Result<()> {
    let mut idle = [0u8; IDLE_BUFFER];
    loop {
        let n = from.read(&mut idle).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        let mut ended = false;
        if n < idle.len() {
            to.write_all(&idle[..n]).await?;
        } else {
            let mut more = Vec::with_capacity(COPY_BUFFER);
            more.extend_from_slice(&idle);
            while more.len() < COPY_BUFFER {
                match from.read_buf(&mut more).now_or_never() {
                    Some(Ok(0)) => {
                        ended = true;
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e),
                    // Nothing more ready now.
                    None => break,
                }
            }
            to.write_all(&more).await?;
        }
        if ended {
            return to.shutdown().await;
        }
        to.flush().await?;
    }
}

fn is_revoked(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::InvalidCertificate(CertificateError::Revoked)
            )
        })
}

/// One of a listener's `max_connections`, given back on drop.
struct Open(Arc<AtomicUsize>);

impl Open {
    fn claim(open: &Arc<AtomicUsize>, max: usize) -> Option<Open> {
        let taken = open.fetch_add(1, Ordering::AcqRel);
        let claimed = Open(open.clone());
        (taken < max).then_some(claimed)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A terminal's claim on one of its connections; given back on drop.
struct Slot {
    front: Arc<Front>,
    terminal_id: String,
    id: u64,
    token: CancellationToken,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut slots = self
            .front
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = slots.get_mut(&self.terminal_id) {
            held.retain(|held| held.id != self.id);
            if held.is_empty() {
                slots.remove(&self.terminal_id);
            }
        }
    }
}

/// The internal port's entry in [`Front::admitted`], removed on drop (if it is still this
/// connection's).
struct Ticket {
    front: Arc<Front>,
    port: u16,
    slot: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut admitted = self
            .front
            .admitted
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if admitted
            .get(&self.port)
            .is_some_and(|a| a.slot == self.slot)
        {
            admitted.remove(&self.port);
        }
    }
}

/// The gateway CA's verifier, plus revocation: a revoked certificate (by serial or terminal id)
/// fails the TLS handshake.
pub(super) struct RefuseRevoked {
    pub inner: Arc<dyn ClientCertVerifier>,
    pub revoked: Arc<Revoked>,
    pub refused: prometheus::IntCounterVec,
}

impl fmt::Debug for RefuseRevoked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefuseRevoked").finish_non_exhaustive()
    }
}

impl ClientCertVerifier for RefuseRevoked {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        // Signed by our CA yet naming no terminal: not a terminal certificate.
        let identity = pki::identity_of(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
        })?;
        if self
            .revoked
            .contains(&identity.cn, Some(&identity.serial_hex))
        {
            self.refused.with_label_values(&["revoked"]).inc();
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// A sink that keeps each write apart.
    #[derive(Default)]
    struct Writes {
        writes: Vec<Vec<u8>>,
        shut: bool,
    }

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.shut = true;
            Poll::Ready(Ok(()))
        }
    }

    /// What `pump` writes when `sent` is waiting in its source, which then ends.
    async fn copied(sent: &[u8]) -> Writes {
        let (mut source, from) = tokio::io::duplex(64 * 1024);
        source.write_all(sent).await.unwrap();
        drop(source);
        let mut sink = Writes::default();
        pump(from, &mut sink).await.unwrap();
        assert!(sink.shut, "the end is passed on");
        assert!(sink.writes.concat() == sent, "the same bytes");
        sink
    }

    #[tokio::test]
    async fn a_confirmation_is_written_whole_and_an_ack_as_it_is() {
        let confirmation: Vec<u8> = (0..1500u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(copied(&confirmation).await.writes.len(), 1);
        let ack = b"\x40\x02\x00\x01";
        assert_eq!(copied(ack).await.writes.len(), 1);
    }

    #[tokio::test]
    async fn one_write_holds_at_most_the_copy_buffer() {
        let sizes: Vec<usize> = copied(&[7u8; 2 * COPY_BUFFER + 100])
            .await
            .writes
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, [COPY_BUFFER, COPY_BUFFER, 100]);
    }
}
