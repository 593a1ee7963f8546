//! A simulated terminal on one of the gateway's HTTP channels (Server-Sent Events or WebSocket on
//! the ingress listener, bearer token from its bundle) instead of MQTT: it verifies every
//! confirmation with `posgate_proto::confirmation::verify`, deduplicates by seq, acks (SSE: `POST
//! /v1/terminal/acks`; WebSocket: a text frame) and reports what it saw to a [`Sink`], exactly
//! like [`crate::terminal::spawn_session`], so the fleet benchmarks can compare the channels.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail};
use futures::{SinkExt, StreamExt};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::terminal::{Bundle, Checker, Seen, SeqTracker, Sink};

/// How a terminal gets its confirmations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// MQTT over mutual TLS (the default).
    Mqtt,
    /// Server-Sent Events on the ingress listener.
    Sse,
    /// WebSocket on the ingress listener.
    Ws,
}

/// Starts a terminal session on `channel` (`Sse` or `Ws`) against the ingress at `ingress`; it
/// reconnects by itself after an error, and ends when `sink` returns `false`.
///
/// # Errors
/// When the bundle's key does not parse, or `channel` is `Mqtt`.
pub fn spawn_http_session(
    bundle: &Bundle,
    ingress: SocketAddr,
    channel: Channel,
    mut sink: Sink,
) -> anyhow::Result<JoinHandle<()>> {
    let key = bundle
        .gateway_jwk
        .verifying_key()
        .map_err(|e| anyhow!("gateway_jwk: {e}"))?;
    let mut checker = Checker {
        key,
        terminal_id: bundle.terminal_id.clone(),
        tracker: SeqTracker::default(),
    };
    let token = bundle.http_token.clone();
    let http = reqwest::Client::builder().no_proxy().build()?;
    let task = match channel {
        Channel::Mqtt => bail!("an MQTT session is crate::terminal::spawn_session"),
        Channel::Sse => tokio::spawn(async move {
            loop {
                let ended = sse(&http, ingress, &token, &mut checker, &mut sink).await;
                match ended {
                    Ok(()) => break,
                    Err(e) => {
                        if !sink(Seen::Disconnected(e.to_string())) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }),
        Channel::Ws => tokio::spawn(async move {
            loop {
                match ws(ingress, &token, &mut checker, &mut sink).await {
                    Ok(()) => break,
                    Err(e) => {
                        if !sink(Seen::Disconnected(e.to_string())) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }),
    };
    Ok(task)
}

/// One SSE connection; `Ok` when the sink asked to stop, `Err` when the connection ended.
async fn sse(
    http: &reqwest::Client,
    ingress: SocketAddr,
    token: &str,
    checker: &mut Checker,
    sink: &mut Sink,
) -> anyhow::Result<()> {
    let response = http
        .get(format!("http://{ingress}/v1/terminal/events"))
        .bearer_auth(token)
        .send()
        .await?;
    if response.status() != 200 {
        bail!("events answered {}", response.status());
    }
    if !sink(Seen::Connected) {
        return Ok(());
    }
    let acks = format!("http://{ingress}/v1/terminal/acks");
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    while let Some(chunk) = stream.next().await {
        buffer.push_str(std::str::from_utf8(&chunk?)?);
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) else {
                continue; // a keep-alive comment
            };
            let (ack, seen) = checker.check(data.trim_start());
            if let Some(ack) = ack {
                // Off the read loop, as an MQTT client queues its ack: the next confirmation
                // (stop-and-wait) follows the ack.
                let request = http.post(&acks).bearer_auth(token).json(&ack);
                tokio::spawn(async move { drop(request.send().await) });
            }
            if !sink(seen) {
                return Ok(());
            }
        }
    }
    bail!("the event stream ended")
}

/// One WebSocket connection; `Ok` when the sink asked to stop, `Err` when the connection ended.
async fn ws(
    ingress: SocketAddr,
    token: &str,
    checker: &mut Checker,
    sink: &mut Sink,
) -> anyhow::Result<()> {
    let mut request = format!("ws://{ingress}/v1/terminal/ws").into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
    if !sink(Seen::Connected) {
        return Ok(());
    }
    while let Some(message) = socket.next().await {
        let Message::Text(text) = message? else {
            continue; // pings are answered by the library
        };
        // The gateway's answer to an ack it could not take (the house error body, e.g. while it
        // shuts down) is not a confirmation: the row stays and comes again.
        if let Some(error) = error_frame(text.as_str()) {
            tracing::debug!(%error, "the gateway did not take an ack");
            continue;
        }
        let (ack, seen) = checker.check(text.as_str());
        if let Some(ack) = ack {
            socket
                .send(Message::text(serde_json::to_string(&ack)?))
                .await?;
        }
        if !sink(seen) {
            return Ok(());
        }
    }
    bail!("the WebSocket closed")
}

/// The `error` object of a WebSocket frame that carries the house error body
/// (`{"error":{"code","message"}}`) rather than a confirmation (a JWS never starts with `{`).
fn error_frame(text: &str) -> Option<serde_json::Value> {
    if !text.starts_with('{') {
        return None;
    }
    let mut body: serde_json::Value = serde_json::from_str(text).ok()?;
    body.get_mut("error").map(serde_json::Value::take)
}

#[cfg(test)]
mod frame_tests {
    use super::error_frame;

    #[test]
    fn an_error_frame_is_told_from_a_confirmation() {
        let frame =
            r#"{"error":{"code":"unavailable","message":"shutting down; ack again later"}}"#;
        assert_eq!(error_frame(frame).unwrap()["code"], "unavailable");
        assert!(error_frame("eyJhbGciOiJFZERTQSJ9.e30.c2ln").is_none());
        assert!(error_frame("{not json").is_none());
    }
}
