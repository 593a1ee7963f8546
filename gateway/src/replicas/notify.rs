//! PostgreSQL notifications between replicas: wake-ups, forwarded broker events, published
//! confirmations for the HTTP channels, lease changes.
//!
//! Every one is a wake-up or a shortcut, never the only way: a notification is lost when nobody
//! listens at that moment (a replica reconnecting), and the design survives it. New outbox rows
//! are found again by the engine's periodic read of its terminals' outbox; a forwarded ack that
//! is lost leaves the head unacked until `delivery.republish_after`, when the owner publishes it
//! again and the terminal acks again (terminals deduplicate by intent and `seq`); a lost lease
//! change waits for the next renewal.
//!
//! Channels (payloads are JSON unless said otherwise, at most 8,000 bytes, PostgreSQL's limit):
//! - `posgate_outbox`: `"terminal_id seq"`, sent by the outbox trigger at COMMIT (migration 0002);
//! - `posgate_events`: `{"r": replica, "t": terminal, "k": "ack"|"connected"|"disconnected", "p": payload}`,
//!   a broker event read by a replica that does not own the terminal;
//! - `posgate_published`: `{"r", "t", "i": intent, "s": seq, "j": jws}`, a confirmation the
//!   owner published, for a terminal on the HTTP channels of another replica;
//! - `posgate_leases`: the id of a replica that joined, released shards or stopped.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use posgate_proto::topics::TopicKind;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;

use super::Input;
use crate::delivery::{BrokerEvent, Published};
use crate::metrics::Metrics;
use crate::store::PgTls;

/// PostgreSQL refuses longer payloads.
const MAX_PAYLOAD: usize = 7_900;

const CHANNELS: &str = "LISTEN posgate_outbox; LISTEN posgate_events; \
                        LISTEN posgate_published; LISTEN posgate_leases";

/// What this replica tells the others.
#[derive(Clone, Debug)]
pub enum Outgoing {
    /// A broker event about a terminal this replica does not own.
    Event(BrokerEvent),
    /// A confirmation this replica published (for HTTP channels elsewhere).
    Published(Published),
}

#[derive(Serialize, Deserialize)]
struct EventWire {
    r: String,
    t: String,
    k: String,
    #[serde(default)]
    p: String,
}

#[derive(Serialize, Deserialize)]
struct PublishedWire {
    r: String,
    t: String,
    i: String,
    s: u64,
    j: String,
}

fn encode(replica: &str, out: &Outgoing) -> Option<(&'static str, String)> {
    match out {
        Outgoing::Event(event) => {
            let (t, k, p) = match event {
                BrokerEvent::Connected { terminal_id } => (terminal_id, "connected", ""),
                BrokerEvent::Disconnected { terminal_id } => (terminal_id, "disconnected", ""),
                BrokerEvent::Message {
                    terminal_id,
                    kind: TopicKind::Acks,
                    payload,
                } => (terminal_id, "ack", std::str::from_utf8(payload).ok()?),
                _ => return None,
            };
            let wire = EventWire {
                r: replica.into(),
                t: t.clone(),
                k: k.into(),
                p: p.into(),
            };
            Some(("posgate_events", serde_json::to_string(&wire).ok()?))
        }
        Outgoing::Published(p) => {
            let wire = PublishedWire {
                r: replica.into(),
                t: p.terminal_id.clone(),
                i: p.intent_id.clone(),
                s: p.seq,
                j: String::from_utf8(p.jws.to_vec()).ok()?,
            };
            Some(("posgate_published", serde_json::to_string(&wire).ok()?))
        }
    }
}

fn decode_event(payload: &str) -> Option<(String, BrokerEvent)> {
    let wire: EventWire = serde_json::from_str(payload).ok()?;
    let event = match wire.k.as_str() {
        "connected" => BrokerEvent::Connected {
            terminal_id: wire.t,
        },
        "disconnected" => BrokerEvent::Disconnected {
            terminal_id: wire.t,
        },
        "ack" => BrokerEvent::Message {
            terminal_id: wire.t,
            kind: TopicKind::Acks,
            payload: Bytes::from(wire.p),
        },
        _ => return None,
    };
    Some((wire.r, event))
}

/// The `LISTEN` side: one connection, re-established when it breaks.
pub struct Listener {
    pub url: String,
    pub tls: PgTls,
    /// This replica's id: its own forwarded events and publishes are not for itself.
    pub id: String,
    pub engine: mpsc::UnboundedSender<Input>,
    pub leases: Arc<Notify>,
    /// The HTTP channels' feed, for confirmations published by the owner elsewhere.
    pub published: Option<broadcast::Sender<Published>>,
}

impl Listener {
    pub async fn run(self, token: CancellationToken) {
        let mut pause = Duration::from_millis(100);
        loop {
            match tokio_postgres::connect(&self.url, self.tls.connector()).await {
                Ok((client, mut connection)) => {
                    let (tx, mut rx) = mpsc::unbounded_channel();
                    let driver = tokio::spawn(async move {
                        let mut messages =
                            futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                        while let Some(message) = messages.next().await {
                            match message {
                                Ok(AsyncMessage::Notification(n)) => {
                                    if tx.send(n).is_err() {
                                        return;
                                    }
                                }
                                Ok(_) => {}
                                Err(e) => {
                                    tracing::warn!(error = %e, "the LISTEN connection broke");
                                    return;
                                }
                            }
                        }
                    });
                    match client.batch_execute(CHANNELS).await {
                        Ok(()) => {
                            pause = Duration::from_millis(100);
                            // Whatever was notified while nobody listened is read now.
                            drop(self.engine.send(Input::Reread));
                            loop {
                                tokio::select! {
                                    () = token.cancelled() => {
                                        driver.abort();
                                        return;
                                    }
                                    n = rx.recv() => match n {
                                        Some(n) => self.handle(n.channel(), n.payload()),
                                        None => break,
                                    },
                                }
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "LISTEN failed"),
                    }
                    driver.abort();
                }
                Err(e) => tracing::warn!(error = %e, "cannot connect to PostgreSQL to LISTEN"),
            }
            tokio::select! {
                () = token.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    fn handle(&self, channel: &str, payload: &str) {
        match channel {
            "posgate_outbox" => {
                let Some((terminal_id, seq)) = payload.rsplit_once(' ') else {
                    return;
                };
                let Ok(seq) = seq.parse() else { return };
                drop(self.engine.send(Input::Wake {
                    terminal_id: terminal_id.to_owned(),
                    seq,
                }));
            }
            "posgate_events" => {
                if let Some((from, event)) = decode_event(payload)
                    && from != self.id
                {
                    drop(self.engine.send(Input::Event(event)));
                }
            }
            "posgate_published" => {
                let Some(published) = &self.published else {
                    return;
                };
                if let Ok(wire) = serde_json::from_str::<PublishedWire>(payload)
                    && wire.r != self.id
                {
                    drop(published.send(Published {
                        terminal_id: wire.t,
                        intent_id: wire.i,
                        seq: wire.s,
                        jws: Bytes::from(wire.j),
                    }));
                }
            }
            "posgate_leases" if payload != self.id => self.leases.notify_one(),
            _ => {}
        }
    }
}

/// The `NOTIFY` side: what the delivery engine hands over for other replicas.
pub struct Forwarder {
    pub url: String,
    pub tls: PgTls,
    pub id: String,
    pub metrics: Option<Metrics>,
}

impl Forwarder {
    pub async fn run(self, mut rx: mpsc::UnboundedReceiver<Outgoing>, token: CancellationToken) {
        let mut client: Option<Client> = None;
        let mut batch = Vec::new();
        loop {
            // Whatever queued up meanwhile goes in one statement (one round trip).
            let n = tokio::select! {
                () = token.cancelled() => return,
                n = rx.recv_many(&mut batch, 512) => n,
            };
            if n == 0 {
                return;
            }
            let (mut channels, mut payloads) = (Vec::new(), Vec::new());
            for out in batch.drain(..) {
                let Some((channel, payload)) = encode(&self.id, &out) else {
                    continue;
                };
                if payload.len() > MAX_PAYLOAD {
                    tracing::debug!(
                        channel,
                        bytes = payload.len(),
                        "too long to notify; left to republishing"
                    );
                    continue;
                }
                channels.push(channel);
                payloads.push(payload);
            }
            if channels.is_empty() {
                continue;
            }
            if client.as_ref().is_none_or(Client::is_closed) {
                client = match tokio_postgres::connect(&self.url, self.tls.connector()).await {
                    Ok((c, connection)) => {
                        tokio::spawn(async move {
                            drop(connection.await);
                        });
                        Some(c)
                    }
                    Err(e) => {
                        // Lost: the owner's republish timer covers it.
                        tracing::warn!(error = %e, "cannot connect to PostgreSQL to forward");
                        None
                    }
                };
            }
            let Some(c) = &client else { continue };
            match c
                .execute(
                    "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS x(c, p)",
                    &[
                        &channels as &(dyn tokio_postgres::types::ToSql + Sync),
                        &payloads,
                    ],
                )
                .await
            {
                Ok(_) => {
                    if let Some(m) = &self.metrics {
                        for channel in &channels {
                            m.replica_forwards.with_label_values(&[channel]).inc();
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not notify the other replicas"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip() {
        let ack = BrokerEvent::Message {
            terminal_id: "pos-01".into(),
            kind: TopicKind::Acks,
            payload: Bytes::from_static(br#"{"intent_id":"pi_1","seq":3}"#),
        };
        let (channel, payload) = encode("a", &Outgoing::Event(ack.clone())).unwrap();
        assert_eq!(channel, "posgate_events");
        assert_eq!(decode_event(&payload), Some(("a".into(), ack)));
        let rpc = BrokerEvent::Message {
            terminal_id: "pos-01".into(),
            kind: TopicKind::RpcReq,
            payload: Bytes::new(),
        };
        assert!(
            encode("a", &Outgoing::Event(rpc)).is_none(),
            "RPC stays local"
        );
    }
}
