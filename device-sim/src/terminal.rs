//! A simulated terminal: provisioned by the admin API, connected over mutual TLS with its own
//! certificate (rumqttc), it verifies each confirmation with `posgate_proto::confirmation::verify`,
//! deduplicates by intent and seq, and acks.
//!
//! [`connect_raw`] gives tests the bare client with any identity (or none), for the attacks.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use posgate_proto::confirmation::{self, Ack, Confirmation, Jwk, StatusMessage, VerifyError};
use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The provisioning bundle (interfaces.md).
#[derive(Clone, Debug, Deserialize)]
pub struct Bundle {
    pub terminal_id: String,
    pub tenant: String,
    pub mqtt_url: String,
    pub client_id: String,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub http_token: String,
    pub gateway_jwk: Jwk,
    pub topics: Topics,
}

/// The bundle's topics.
#[derive(Clone, Debug, Deserialize)]
pub struct Topics {
    pub payments: String,
    pub acks: String,
    pub status: String,
    pub rpc_req: String,
    pub rpc_res: String,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls client config trusting `ca_pem` and presenting `cert_key` (PEM cert, PEM key) if given.
///
/// # Errors
/// When a PEM does not parse.
pub fn tls_config(
    ca_pem: &str,
    cert_key: Option<(&str, &str)>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.context("CA PEM")?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match cert_key {
        Some((cert_pem, key_pem)) => {
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .context("client cert PEM")?;
            let key =
                PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("client key PEM")?;
            builder.with_client_auth_cert(certs, key)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// What to connect as.
#[derive(Clone, Debug)]
pub struct Identity {
    pub client_id: String,
    pub ca_pem: String,
    /// `(cert_pem, key_pem)`, or `None` to present no client certificate.
    pub cert_key: Option<(String, String)>,
    pub last_will: Option<(String, Vec<u8>)>,
}

impl Identity {
    /// A terminal's own identity from its bundle, with its last will (`offline` on its status topic).
    pub fn of(bundle: &Bundle) -> Identity {
        let offline = serde_json::to_vec(&StatusMessage::offline()).unwrap_or_default();
        Identity {
            client_id: bundle.client_id.clone(),
            ca_pem: bundle.ca_pem.clone(),
            cert_key: Some((bundle.cert_pem.clone(), bundle.key_pem.clone())),
            last_will: Some((bundle.topics.status.clone(), offline)),
        }
    }
}

/// A bare MQTT/TLS client for `identity`; the caller drives the event loop.
///
/// # Errors
/// When the identity's PEMs do not parse.
pub fn connect_raw(
    addr: SocketAddr,
    identity: &Identity,
) -> anyhow::Result<(AsyncClient, EventLoop)> {
    Ok(client(options(addr, identity)?, 256))
}

/// The MQTT options of a connection to `addr` as `identity`.
///
/// # Errors
/// When the identity's PEMs do not parse.
fn options(addr: SocketAddr, identity: &Identity) -> anyhow::Result<MqttOptions> {
    // The IP is both where to dial and the name checked in the server certificate (an IP SAN).
    let mut options = MqttOptions::new(
        identity.client_id.clone(),
        addr.ip().to_string(),
        addr.port(),
    );
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(true);
    let cert_key = identity
        .cert_key
        .as_ref()
        .map(|(c, k)| (c.as_str(), k.as_str()));
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        tls_config(&identity.ca_pem, cert_key)?,
    )));
    if let Some((topic, payload)) = &identity.last_will {
        options.set_last_will(LastWill::new(
            topic,
            payload.clone(),
            QoS::AtLeastOnce,
            true,
        ));
    }
    Ok(options)
}

/// An MQTT client with Nagle's algorithm off, as a terminal wanting its acks out at once should
/// have: its PUBACK and its ack are two small writes back to back, and with Nagle on the second
/// waits for the broker's delayed ACK of the first (up to 40 ms on Linux).
pub fn client(options: MqttOptions, cap: usize) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options, cap);
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    (client, eventloop)
}

/// What a [`Terminal`] saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// A new, verified confirmation (already acked).
    Confirmation(Confirmation),
    /// A verified confirmation it had already processed (acked again, not shown twice).
    Duplicate { intent_id: String, seq: u64 },
    /// A message on its payments topic that failed verification (never shown).
    Rejected(String),
    /// Connected and subscribed.
    Connected,
    /// The connection dropped (the terminal reconnects by itself).
    Disconnected(String),
    /// A reply on its RPC topic.
    Rpc(posgate_proto::rpc::Response),
}

/// Per-terminal deduplication: every seq below `min_seq` was processed; `seen` holds the ones above.
#[derive(Debug, Default)]
pub struct SeqTracker {
    pub min_seq: u64,
    seen: BTreeSet<u64>,
}

impl SeqTracker {
    /// Records `seq`; false when it was already processed.
    pub fn record(&mut self, seq: u64) -> bool {
        if seq < self.min_seq || !self.seen.insert(seq) {
            return false;
        }
        while self.seen.remove(&self.min_seq.max(1)) {
            self.min_seq = self.min_seq.max(1) + 1;
        }
        true
    }
}

/// What a session needs to check and ack a confirmation (the same on every channel).
pub(crate) struct Checker {
    pub(crate) key: ed25519_dalek::VerifyingKey,
    pub(crate) terminal_id: String,
    pub(crate) tracker: SeqTracker,
}

impl Checker {
    /// Verifies `jws`; the ack to send (if it verified) and what to report.
    ///
    /// Every confirmation that is genuinely ours is acked, also one already seen (a republish
    /// after an ack the gateway lost): the gateway sends a terminal's next confirmation only after
    /// the current one is acked, so a terminal silent on a repeat would stall its own queue. Only
    /// new seqs are shown; the tracker tells them apart.
    pub(crate) fn check(&mut self, jws: &str) -> (Option<Ack>, Seen) {
        match confirmation::verify(jws, &self.key, &self.terminal_id, 0) {
            Ok(c) => {
                let ack = Ack {
                    intent_id: c.intent_id.clone(),
                    seq: c.seq,
                };
                let seen = if self.tracker.record(c.seq) {
                    Seen::Confirmation(c)
                } else {
                    Seen::Duplicate {
                        intent_id: c.intent_id,
                        seq: c.seq,
                    }
                };
                (Some(ack), seen)
            }
            Err(e) => (None, Seen::Rejected(e.to_string())),
        }
    }
}

/// Where a session reports what it sees; returning `false` ends the session.
pub type Sink = Box<dyn FnMut(Seen) -> bool + Send>;

/// Starts a terminal session: connects with the bundle's identity (and last will), subscribes to
/// its payments and RPC replies after every (re)connect, announces itself online, verifies every
/// confirmation, acks it, and reports to `sink`. Reconnects by itself after an error; asks again
/// for a subscription the broker refused (from 0.5 s to 8 s later).
///
/// # Errors
/// When the bundle's key or PEMs do not parse.
pub fn spawn_session(
    bundle: &Bundle,
    addr: SocketAddr,
    sink: Sink,
) -> anyhow::Result<(AsyncClient, JoinHandle<()>)> {
    spawn_session_on(bundle, &[addr], sink)
}

/// [`spawn_session`] with several broker addresses (the nodes of a cluster): it connects to the
/// first, and after each error reconnects to the next one in turn, as a terminal configured
/// with a list of brokers does.
///
/// # Errors
/// When the bundle's key or PEMs do not parse, or `addrs` is empty.
pub fn spawn_session_on(
    bundle: &Bundle,
    addrs: &[SocketAddr],
    sink: Sink,
) -> anyhow::Result<(AsyncClient, JoinHandle<()>)> {
    spawn_session_pinned(bundle, addrs, Arc::new(AtomicBool::new(false)), sink)
}

/// [`spawn_session_on`] that reconnects to its first address only, as long as `pinned` is set:
/// once it is cleared, the next error moves the session on to the next address as usual. (The
/// failover bench pins terminals to a node it is going to kill, so that the kill hits a known
/// set of terminals; unpinned, some move on while the nodes still refuse them, before loading
/// the authorization file that names them.)
///
/// # Errors
/// When the bundle's key or PEMs do not parse, or `addrs` is empty.
pub fn spawn_session_pinned(
    bundle: &Bundle,
    addrs: &[SocketAddr],
    pinned: Arc<AtomicBool>,
    mut sink: Sink,
) -> anyhow::Result<(AsyncClient, JoinHandle<()>)> {
    let key = bundle
        .gateway_jwk
        .verifying_key()
        .map_err(|e| anyhow!("gateway_jwk: {e}"))?;
    let identity = Identity::of(bundle);
    let endpoints = addrs
        .iter()
        .map(|&addr| options(addr, &identity))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let Some(first) = endpoints.first() else {
        bail!("a terminal session needs at least one broker address");
    };
    let (client, mut eventloop) = self::client(first.clone(), 256);
    let mut current = 0;
    let addrs_of = addrs.to_vec();
    let mut refusals = 0u32;
    let retrying = Arc::new(AtomicBool::new(false));
    let (b, c) = (bundle.clone(), client.clone());
    let task = tokio::spawn(async move {
        let mut checker = Checker {
            key,
            terminal_id: b.terminal_id.clone(),
            tracker: SeqTracker::default(),
        };
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    refusals = 0;
                    // Clean session: subscribe again after every (re)connect.
                    let online = serde_json::to_vec(&StatusMessage::online()).unwrap_or_default();
                    let sub = c.subscribe(&b.topics.payments, QoS::AtLeastOnce).await;
                    let sub2 = c.subscribe(&b.topics.rpc_res, QoS::AtLeastOnce).await;
                    let status = c
                        .publish(&b.topics.status, QoS::AtLeastOnce, true, online)
                        .await;
                    if sub.is_err() || sub2.is_err() || status.is_err() {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|r| matches!(r, rumqttc::SubscribeReasonCode::Failure))
                    {
                        // A cluster refuses subscriptions while it elects new leaders after a
                        // node's loss (NATS's JetStream): ask again, later, as posgate's own
                        // client does, rather than stay connected and deaf.
                        // One retry at a time: each asks for both subscriptions, and two
                        // refusals answering one retry must not start two more (that doubled
                        // the requests at every round and buried the cluster).
                        if !retrying.swap(true, Ordering::SeqCst) {
                            refusals += 1;
                            let backoff = Duration::from_millis(250) * (1u32 << refusals.min(5));
                            let (c, b, retrying) = (c.clone(), b.clone(), retrying.clone());
                            tokio::spawn(async move {
                                tokio::time::sleep(backoff).await;
                                // Cleared before asking: a refusal in the answers starts the
                                // next retry.
                                retrying.store(false, Ordering::SeqCst);
                                drop(c.subscribe(&b.topics.payments, QoS::AtLeastOnce).await);
                                drop(c.subscribe(&b.topics.rpc_res, QoS::AtLeastOnce).await);
                            });
                        }
                        sink(Seen::Disconnected("subscription refused".into()));
                    } else if ack.return_codes.len() == 1 && !sink(Seen::Connected) {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if p.topic == b.topics.rpc_res {
                        let reply = serde_json::from_slice(&p.payload)
                            .map(Seen::Rpc)
                            .unwrap_or_else(|e| {
                                Seen::Rejected(format!("unreadable RPC reply: {e}"))
                            });
                        if !sink(reply) {
                            break;
                        }
                        continue;
                    }
                    if p.payload.is_empty()
                        || !p.topic.starts_with(b.topics.payments.trim_end_matches('+'))
                    {
                        continue;
                    }
                    let (ack, event) = match std::str::from_utf8(&p.payload) {
                        Ok(jws) => checker.check(jws),
                        Err(_) => (None, Seen::Rejected(VerifyError::Malformed.to_string())),
                    };
                    if let Some(ack) = ack {
                        let payload = serde_json::to_vec(&ack).unwrap_or_default();
                        if c.publish(&b.topics.acks, QoS::AtLeastOnce, false, payload)
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    if !sink(event) {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let mut why = e.to_string();
                    if endpoints.len() > 1 && !pinned.load(Ordering::SeqCst) {
                        // The event loop keeps its request queue (and so `client`) across
                        // the switch; only where it dials changes.
                        current = (current + 1) % endpoints.len();
                        eventloop.mqtt_options = endpoints[current].clone();
                        why = format!("{why}; next {}", addrs_of[current]);
                    }
                    if !sink(Seen::Disconnected(why)) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });

    Ok((client, task))
}

/// A connected simulated terminal.
pub struct Terminal {
    pub bundle: Bundle,
    pub client: AsyncClient,
    seen: mpsc::UnboundedReceiver<Seen>,
    /// Seen while waiting for an RPC reply; handed out first.
    held: std::collections::VecDeque<Seen>,
    task: JoinHandle<()>,
}

impl Terminal {
    /// Connects with the bundle's identity, subscribes to its payments and RPC replies, announces
    /// itself online, and returns once subscribed.
    ///
    /// # Errors
    /// When the connection is refused or not subscribed within 10 s.
    pub async fn connect(bundle: Bundle, addr: SocketAddr) -> anyhow::Result<Terminal> {
        let (tx, seen) = mpsc::unbounded_channel();
        let (client, task) =
            spawn_session(&bundle, addr, Box::new(move |event| tx.send(event).is_ok()))?;
        let mut terminal = Terminal {
            bundle,
            client,
            seen,
            held: Default::default(),
            task,
        };
        match tokio::time::timeout(Duration::from_secs(10), terminal.seen.recv()).await {
            Ok(Some(Seen::Connected)) => Ok(terminal),
            Ok(Some(other)) => {
                terminal.task.abort();
                bail!("{} did not connect: {other:?}", terminal.bundle.terminal_id)
            }
            _ => {
                terminal.task.abort();
                bail!(
                    "{} did not connect within 10 s",
                    terminal.bundle.terminal_id
                )
            }
        }
    }

    /// The next thing seen, if any within `timeout`.
    pub async fn next_seen(&mut self, timeout: Duration) -> Option<Seen> {
        if let Some(held) = self.held.pop_front() {
            return Some(held);
        }
        tokio::time::timeout(timeout, self.seen.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next new confirmation within `timeout` (skipping duplicates and reconnects; a rejected
    /// message is an error).
    ///
    /// # Errors
    /// When a message failed verification, or nothing arrived in time.
    pub async fn next_confirmation(&mut self, timeout: Duration) -> anyhow::Result<Confirmation> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_seen(left).await {
                Some(Seen::Confirmation(c)) => return Ok(c),
                Some(Seen::Rejected(why)) => bail!("a message failed verification: {why}"),
                Some(_) => continue,
                None => bail!("no confirmation within {timeout:?}"),
            }
        }
    }

    /// Sends an RPC request and waits for its reply (confirmations that arrive meanwhile are
    /// kept for [`Terminal::next_confirmation`]).
    ///
    /// # Errors
    /// When the request cannot be sent or no reply comes within `timeout`.
    pub async fn rpc(
        &mut self,
        id: &str,
        method: &str,
        params: serde_json::Value,
        timeout: Duration,
    ) -> anyhow::Result<posgate_proto::rpc::Response> {
        let request = posgate_proto::rpc::Request {
            id: id.to_owned(),
            method: method.to_owned(),
            params,
        };
        self.client
            .publish(
                &self.bundle.topics.rpc_req,
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&request)?,
            )
            .await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            // From the channel itself: what is held back stays for `next_seen`.
            match tokio::time::timeout(left, self.seen.recv())
                .await
                .ok()
                .flatten()
            {
                Some(Seen::Rpc(reply)) if reply.id == id => return Ok(reply),
                Some(other @ (Seen::Confirmation(_) | Seen::Rejected(_))) => {
                    self.held.push_back(other)
                }
                Some(_) => {}
                None => bail!("no reply to {method} {id} within {timeout:?}"),
            }
        }
    }

    /// Disconnects cleanly (no last will).
    pub async fn disconnect(self) {
        drop(self.client.disconnect().await);
        tokio::time::sleep(Duration::from_millis(0)).await;
        self.task.abort();
    }

    /// Drops the connection without DISCONNECT (the broker publishes the last will).
    pub fn kill(self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use posgate_proto::confirmation::{Confirmation, ConfirmationStatus};

    use super::*;

    #[test]
    fn a_repeated_confirmation_is_acked_again_but_not_shown_again() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let kid = confirmation::kid_for(&key.verifying_key().to_bytes());
        let jws = |seq: u64, terminal: &str| {
            confirmation::sign(
                &key,
                &kid,
                &Confirmation::new(
                    terminal,
                    &format!("pi_{seq}"),
                    seq,
                    ConfirmationStatus::Confirmed,
                    posgate_proto::MicroUsdc(4_400_000),
                    "2026-04-01T20:00:12Z",
                ),
            )
        };
        let mut checker = Checker {
            key: key.verifying_key(),
            terminal_id: "pos-1".into(),
            tracker: SeqTracker::default(),
        };
        let (ack, seen) = checker.check(&jws(1, "pos-1"));
        assert_eq!(ack.map(|a| a.seq), Some(1));
        assert!(matches!(seen, Seen::Confirmation(_)));
        // The gateway lost that ack and sends seq 1 again: acked again, shown once.
        let (ack, seen) = checker.check(&jws(1, "pos-1"));
        assert_eq!(ack.map(|a| (a.intent_id, a.seq)), Some(("pi_1".into(), 1)));
        assert!(matches!(seen, Seen::Duplicate { seq: 1, .. }));
        // Someone else's confirmation: neither acked nor shown.
        let (ack, seen) = checker.check(&jws(2, "pos-2"));
        assert!(ack.is_none());
        assert!(matches!(seen, Seen::Rejected(_)));
    }

    #[test]
    fn seq_tracker_dedupes_out_of_order() {
        let mut t = SeqTracker::default();
        assert!(t.record(2));
        assert!(t.record(1));
        assert_eq!(t.min_seq, 3);
        assert!(!t.record(1));
        assert!(!t.record(2));
        assert!(t.record(5));
        assert!(!t.record(5));
        assert!(t.record(3));
        assert_eq!(t.min_seq, 4);
    }
}
