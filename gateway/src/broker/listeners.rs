//! Binding the broker's listeners: the front door's own TCP listeners, and rmqtt's (the plain
//! one, and the loopback ones behind the front door or the TLS ones without it).

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::time::Duration;

use rmqtt::net::Builder;

use super::{BrokerError, MAX_SUBSCRIPTIONS, MAX_TOPIC_LEVELS, Settings};
use crate::pki::Pki;

pub(super) enum Kind {
    Tcp,
    Ws,
    Tls,
    Wss,
}

/// A front-door listener (accepted sockets inherit its `TCP_NODELAY`).
pub(super) fn bind_front(
    name: &'static str,
    addr: SocketAddr,
) -> Result<tokio::net::TcpListener, BrokerError> {
    crate::serve::listen(addr, 4096, true).map_err(|source| BrokerError::Bind {
        name,
        addr,
        source,
    })
}

/// One of rmqtt's listeners: the plain one (`mqtt.plain_listen`) or one behind the front door.
pub(super) fn bind(
    settings: &Settings,
    pki: &Pki,
    name: &'static str,
    addr: SocketAddr,
    kind: Kind,
) -> Result<rmqtt::net::Listener, BrokerError> {
    let err = |e: rmqtt::Error| {
        // rmqtt's errors are `anyhow`; a socket error inside keeps its kind (a port in use is
        // worth a restart).
        let kind = e
            .downcast_ref::<std::io::Error>()
            .map_or(std::io::ErrorKind::InvalidInput, std::io::Error::kind);
        BrokerError::Bind {
            name,
            addr,
            source: std::io::Error::new(kind, format!("{e:#}")),
        }
    };
    let builder = Builder::new()
        .name(name)
        .laddr(addr)
        .backlog(4096)
        .reuseaddr(Some(true))
        .nodelay(true)
        .max_connections(settings.max_connections)
        .max_handshaking_limit(settings.max_handshaking)
        .handshake_timeout(settings.handshake_timeout)
        .allow_anonymous(false)
        .max_inflight(NonZeroU16::new(64).unwrap_or(NonZeroU16::MIN))
        .max_mqueue_len(10_000)
        .max_packet_size(64 * 1024)
        // A terminal needs two subscriptions (its payments and its RPC answers); a session holds
        // at most MAX_SUBSCRIPTIONS, so a flood of distinct filters is refused, not stored.
        .max_subscriptions(MAX_SUBSCRIPTIONS)
        .max_topic_levels(MAX_TOPIC_LEVELS)
        // Retained confirmations must not expire inside the broker (0 would expire retained client
        // messages at once in rmqtt 0.24); the outbox republishes anyway.
        .message_expiry_interval(Duration::from_secs(7 * 24 * 3600))
        // Delivery never depends on a broker session (the outbox is republished on connect), and an
        // offline session keeps its closed socket's descriptor in rmqtt: keep them short.
        .session_expiry_interval(Duration::from_secs(3600))
        .max_session_expiry_interval(Duration::from_secs(3600));
    let path = |file: &str| Some(pki.dir().join(file).to_string_lossy().into_owned());
    let builder = match kind {
        Kind::Tcp | Kind::Ws => builder,
        Kind::Tls | Kind::Wss => builder
            .tls_cross_certificate(true)
            .tls_cert(path(crate::pki::SERVER_CERT_FILE))
            .tls_key(path(crate::pki::SERVER_KEY_FILE))
            .tls_client_ca_certs(path(crate::pki::CA_CERT_FILE))
            .collect_cert_info(true),
    };
    let bound = builder.bind().map_err(err)?;
    match kind {
        Kind::Tcp => bound.tcp().map_err(err),
        Kind::Ws => bound.ws().map_err(err),
        Kind::Tls => bound.tls().map_err(err),
        Kind::Wss => bound.wss().map_err(err),
    }
}

pub(super) fn local_std(listener: &tokio::net::TcpListener, configured: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(configured)
}

pub(super) fn local(listener: &rmqtt::net::Listener, configured: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(configured)
}
