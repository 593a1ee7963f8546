//! Who is asking: a bearer token from the provisioning bundle, the terminal's client certificate
//! on the TLS ingress, or (streams only) a single-use ticket from [`super::tickets`]; revoked
//! terminals refused on every request.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, RwLock};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::broadcast;

use crate::http::error;
use crate::ingress::tls::TlsPeer;
use crate::pki::CertIdentity;
use crate::store::{StoreError, TerminalRecord};

use super::*;

/// Bearer token hashes → terminal ids, so a token is found without scanning the registry. Loaded
/// at startup and told about every new terminal; the store stays the truth (every request
/// re-reads the terminal).
#[derive(Clone, Default)]
pub struct TokenIndex {
    by_hash: Arc<RwLock<HashMap<[u8; 32], String>>>,
}

impl TokenIndex {
    /// An index of these terminals.
    pub fn of<'a>(terminals: impl IntoIterator<Item = &'a TerminalRecord>) -> Self {
        let index = TokenIndex::default();
        for t in terminals {
            index.insert(t);
        }
        index
    }

    /// Adds (or replaces) a terminal's token hash; a terminal without one is skipped.
    pub fn insert(&self, terminal: &TerminalRecord) {
        let mut hash = [0u8; 32];
        if hex::decode_to_slice(&terminal.http_token_sha256, &mut hash).is_err() {
            return;
        }
        if let Ok(mut map) = self.by_hash.write() {
            map.insert(hash, terminal.id.clone());
        }
    }

    pub(super) fn lookup(&self, token: &str) -> Option<String> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.by_hash.read().ok()?.get(&hash).cloned()
    }
}

/// The verified client certificate of the request's connection, if any (only a TLS listener,
/// `ingress.tls`, has one).
pub(super) struct Peer(Option<CertIdentity>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<TlsPeer>>()
                .and_then(|c| c.0.cert.clone()),
        ))
    }
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub(super) enum Refused {
    #[error("no credentials")]
    Missing,
    #[error("unknown bearer token")]
    UnknownToken,
    #[error("unknown, spent or expired ticket")]
    BadTicket,
    #[error("the bearer token, the client certificate and the ticket name different terminals")]
    Mismatch,
    #[error("terminal {0} is unknown or revoked, or its credentials do not match")]
    Terminal(String),
    #[error("reading the registry")]
    Store(#[source] StoreError),
    #[error("terminal {0} already has {MAX_STREAMS_PER_TERMINAL} streams open")]
    TooManyStreams(String),
}

static TOO_MANY_LOG: crate::telemetry::Throttle =
    crate::telemetry::Throttle::new(std::time::Duration::from_secs(1));

/// Most streams (SSE, WebSocket) and long polls one terminal holds open at once: a terminal needs
/// one (two while it replaces a broken one); a loop of reconnects without closing cannot pile up.
pub const MAX_STREAMS_PER_TERMINAL: usize = 4;

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Store(e) => {
                tracing::error!(error = %e, error_chain = ?e, "terminal authentication: store unavailable");
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "try again later",
                )
            }
            // An authenticated terminal: it may learn what is wrong.
            Refused::TooManyStreams(terminal_id) => {
                if let Some(left_out) = TOO_MANY_LOG.allow() {
                    tracing::warn!(%terminal_id, left_out, "too many streams open; refused (at most one line a second)");
                }
                error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_streams",
                    format!(
                        "at most {MAX_STREAMS_PER_TERMINAL} streams and long polls per terminal; close one"
                    ),
                )
            }
            // One generic answer: the caller learns nothing about which check failed.
            refused => {
                tracing::debug!(reason = %refused, "terminal request refused");
                let mut response = error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "missing, invalid or revoked terminal credentials",
                );
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                response
            }
        }
    }
}

pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// An authenticated terminal, with a subscription to its streams when asked for.
pub(super) struct Authenticated {
    pub(super) terminal: TerminalRecord,
    pub(super) signals: Option<broadcast::Receiver<Signal>>,
}

/// Who is asking: the terminal named by the bearer token, the client certificate and/or the
/// `ticket` (spent here, whatever the outcome), checked against the registry (not revoked, same
/// token hash in constant time, same certificate serial). Credentials that name different
/// terminals are refused.
///
/// With `subscribe`, the terminal's signals are subscribed to *before* the registry is read, so a
/// revocation committed after that read still reaches the stream.
pub(super) async fn authenticate(
    channels: &Channels,
    headers: &HeaderMap,
    peer: &Peer,
    ticket: Option<&str>,
    subscribe: bool,
) -> Result<Authenticated, Refused> {
    // First: a ticket presented is spent, whatever else is wrong with the request.
    let by_ticket = match ticket {
        Some(ticket) => Some(channels.tickets.redeem(ticket).ok_or(Refused::BadTicket)?),
        None => None,
    };
    let token = bearer(headers);
    let by_token = match token {
        Some(token) => Some(channels.tokens.lookup(token).ok_or(Refused::UnknownToken)?),
        None if headers.contains_key(header::AUTHORIZATION) => return Err(Refused::UnknownToken),
        None => None,
    };
    let by_cert = peer.0.as_ref().map(|c| c.cn.clone());
    let mut named = [by_token, by_cert, by_ticket].into_iter().flatten();
    let Some(id) = named.next() else {
        return Err(Refused::Missing);
    };
    if named.any(|other| other != id) {
        return Err(Refused::Mismatch);
    }
    let signals = subscribe.then(|| channels.hub.subscribe(&id));
    let terminal = channels
        .store
        .terminal(id.clone())
        .await
        .map_err(Refused::Store)?
        .filter(|t| t.revoked_at.is_none())
        .ok_or_else(|| Refused::Terminal(id.clone()))?;
    if let Some(token) = token {
        let hash = hex::encode(Sha256::digest(token.as_bytes()));
        if !bool::from(hash.as_bytes().ct_eq(terminal.http_token_sha256.as_bytes())) {
            return Err(Refused::Terminal(id));
        }
    }
    if let Some(cert) = &peer.0 {
        // Its current certificate, or the one a pending renewal replaced.
        if !terminal.accepts_serial(&cert.serial_hex) || cert.o != terminal.tenant {
            return Err(Refused::Terminal(id));
        }
        channels.renewals.seen(&id, &cert.serial_hex);
    }
    // Counted with this request's own subscription, which goes when it is refused.
    if signals.is_some() && channels.hub.open(&id) > MAX_STREAMS_PER_TERMINAL {
        return Err(Refused::TooManyStreams(id));
    }
    Ok(Authenticated { terminal, signals })
}
