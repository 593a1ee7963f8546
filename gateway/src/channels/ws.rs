//! `GET /v1/terminal/ws`: the WebSocket session (confirmations out, acks in).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, rejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use crate::http::error;

use super::*;

/// `GET /v1/terminal/ws[?ticket=…]`.
pub(super) async fn ws(
    State(channels): State<Arc<Channels>>,
    peer: Peer,
    headers: HeaderMap,
    Query(query): Query<TicketQuery>,
    upgrade: Result<WebSocketUpgrade, rejection::WebSocketUpgradeRejection>,
) -> Response {
    let ticket = query.ticket.as_deref();
    let auth = match authenticate(&channels, &headers, &peer, ticket, true).await {
        Ok(auth) => auth,
        Err(refused) => return refused.into_response(),
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(e) => {
            return error(
                StatusCode::UPGRADE_REQUIRED,
                "websocket_required",
                e.body_text(),
            );
        }
    };
    let Some(signals) = auth.signals else {
        return Refused::Missing.into_response();
    };
    let terminal_id = auth.terminal.id;
    // Held for the session's life: the drain waits for its close frame.
    let held = channels.tracker.token();
    let span = tracing::info_span!("ws", %terminal_id);
    upgrade
        .max_message_size(ACK_LIMIT_BYTES)
        .on_upgrade(move |socket| {
            async move {
                let feed = Feed::new(channels.clone(), terminal_id.clone(), signals, "ws");
                session(channels, terminal_id, feed, socket).await;
                drop(held);
            }
            .instrument(span)
        })
}

/// One WebSocket session: confirmations out, acks in, pings both ways, a close frame at the end.
pub(super) async fn session(
    channels: Arc<Channels>,
    terminal_id: String,
    mut feed: Feed,
    mut socket: WebSocket,
) {
    tracing::info!("WebSocket opened");
    let mut ping = tokio::time::interval(channels.keepalive);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let close = loop {
        tokio::select! {
            next = feed.next() => match next {
                Ok(p) => {
                    let text = String::from_utf8_lossy(&p.jws).into_owned();
                    if socket.send(Message::text(text)).await.is_err() {
                        break None;
                    }
                }
                Err(End::ShuttingDown) => break Some((1001, "shutting down")),
                Err(End::Revoked) => break Some((1008, "revoked")),
                Err(End::Failed) => break Some((1011, "internal error")),
            },
            message = socket.recv() => match message {
                Some(Ok(Message::Text(text))) => {
                    if let Err(e) = forward_ack(&channels, &terminal_id, text.as_bytes())
                        && socket.send(Message::text(e.frame())).await.is_err()
                    {
                        break None;
                    }
                }
                Some(Ok(Message::Binary(body))) => {
                    if let Err(e) = forward_ack(&channels, &terminal_id, &body)
                        && socket.send(Message::text(e.frame())).await.is_err()
                    {
                        break None;
                    }
                }
                // Pongs to the client's pings are sent by the WebSocket layer itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_)) | Err(_)) | None => break None,
            },
            _ = ping.tick() => {
                if socket.send(Message::Ping(Bytes::new())).await.is_err() {
                    break None;
                }
            }
        }
    };
    if let Some((code, reason)) = close {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        // A client that does not read is not waited for.
        let sent = tokio::time::timeout(
            Duration::from_secs(1),
            socket.send(Message::Close(Some(frame))),
        )
        .await;
        tracing::info!(
            reason,
            sent = matches!(sent, Ok(Ok(()))),
            "WebSocket closed by the gateway"
        );
    } else {
        tracing::info!("WebSocket closed");
    }
}
