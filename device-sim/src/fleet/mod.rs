//! A fleet of simulated terminals, and the benchmarks that need one: connect rate, reconnect
//! storms, RSS and churn, webhook → terminal latency.
//!
//! The gateway runs as a separate process (one process may hold about 20,000 open files here):
//! started by the benchmark (`posgate` next to this executable) or given by address.
//!
//! - [`Fleet`] (here): N terminal sessions reporting what they see into one channel.
//! - `target`: the gateway under test, and provisioning terminals on it.
//! - `scenarios`: the benchmarks (`connect_rate`, `storm`, `churn`, `e2e`).
//! - `paced`: paced webhook senders and the latencies of what they sent.
//! - `webhooks`: keep-alive connections posting signed webhooks.
//! - `report`: [`FleetReport`] and how it is printed.

mod paced;
mod report;
mod scenarios;
mod target;
mod webhooks;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use anyhow::bail;
use rumqttc::AsyncClient;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub(crate) use paced::Paced;
pub use paced::{Arrivals, Pacing, SendLog, Sent, spawn_paced_senders};
pub(crate) use report::print_measured;
pub use report::{FleetReport, print};
pub use scenarios::{Honest, churn, connect_rate, e2e, storm};
pub use target::{Target, TargetOptions, provision, provision_at};

use crate::http_terminal::{Channel, spawn_http_session};
use crate::terminal::{Bundle, Seen, spawn_session};

/// What a fleet member saw, and when.
#[derive(Debug)]
pub struct FleetEvent {
    pub terminal: usize,
    pub seen: Seen,
    pub at: Instant,
}

/// N terminal sessions reporting into one channel, read with [`Fleet::next_event`].
pub struct Fleet {
    pub bundles: Vec<Bundle>,
    sessions: Vec<Option<(Option<AsyncClient>, JoinHandle<()>)>>,
    tx: mpsc::UnboundedSender<FleetEvent>,
    events: mpsc::UnboundedReceiver<FleetEvent>,
    /// Events [`Fleet::wait_connected`] read but was not waiting for, handed out first by
    /// [`Fleet::next_event`]. Terminals may already be paying while others still connect (the
    /// POS flow starts each terminal at once): a confirmation read here must still be counted.
    held: VecDeque<FleetEvent>,
    addr: SocketAddr,
    /// `Mqtt` (to `addr`), or an HTTP channel of the ingress at `ingress`.
    channel: Channel,
    ingress: Option<SocketAddr>,
}

impl Fleet {
    pub fn new(bundles: Vec<Bundle>, addr: SocketAddr) -> Fleet {
        let (tx, events) = mpsc::unbounded_channel();
        let sessions = bundles.iter().map(|_| None).collect();
        Fleet {
            bundles,
            sessions,
            tx,
            events,
            held: VecDeque::new(),
            addr,
            channel: Channel::Mqtt,
            ingress: None,
        }
    }

    /// A fleet whose terminals use `channel`: MQTT at `mqtt`, or an HTTP channel of the ingress
    /// listener at `ingress`.
    pub fn over(
        bundles: Vec<Bundle>,
        channel: Channel,
        mqtt: SocketAddr,
        ingress: SocketAddr,
    ) -> Fleet {
        Fleet {
            channel,
            ingress: Some(ingress),
            ..Fleet::new(bundles, mqtt)
        }
    }

    pub fn len(&self) -> usize {
        self.bundles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }

    /// The next thing a terminal saw: first what [`Fleet::wait_connected`] held back, then the
    /// channel, in the order the sessions reported it; `None` when the channel is closed.
    ///
    /// Cancel-safe (for `select!`): an event is only taken from the queue or the channel when it
    /// is returned.
    pub async fn next_event(&mut self) -> Option<FleetEvent> {
        match self.held.pop_front() {
            Some(event) => Some(event),
            None => self.events.recv().await,
        }
    }

    /// Starts terminal `i`'s session (it connects, retrying by itself).
    ///
    /// # Errors
    /// When its bundle does not parse.
    pub fn start(&mut self, i: usize) -> anyhow::Result<()> {
        // One session per terminal: a start while one runs replaces it.
        self.kill(i);
        let tx = self.tx.clone();
        let sink = Box::new(move |seen| {
            tx.send(FleetEvent {
                terminal: i,
                seen,
                at: Instant::now(),
            })
            .is_ok()
        });
        self.sessions[i] = Some(match (self.channel, self.ingress) {
            (Channel::Sse | Channel::Ws, Some(ingress)) => (
                None,
                spawn_http_session(&self.bundles[i], ingress, self.channel, sink)?,
            ),
            _ => {
                let (client, task) = spawn_session(&self.bundles[i], self.addr, sink)?;
                (Some(client), task)
            }
        });
        Ok(())
    }

    /// Drops terminal `i`'s connection without DISCONNECT (a crash, a cable pulled).
    pub fn kill(&mut self, i: usize) {
        if let Some((_, task)) = self.sessions[i].take() {
            task.abort();
        }
    }

    /// Starts every terminal, `wave` at a time, each wave connected before the next starts.
    ///
    /// # Errors
    /// When a wave does not connect within `timeout`.
    pub async fn connect_all(&mut self, wave: usize, timeout: Duration) -> anyhow::Result<()> {
        let all: Vec<usize> = (0..self.len()).collect();
        for chunk in all.chunks(wave.max(1)) {
            for &i in chunk {
                self.start(i)?;
            }
            self.wait_connected(chunk, timeout).await?;
        }
        Ok(())
    }

    /// Waits until every terminal in `which` has reported `Connected`; returns the time taken.
    /// Every other event read meanwhile (other terminals' confirmations, duplicates, rejections,
    /// disconnects, extra `Connected`s) is kept, in order, for [`Fleet::next_event`]: nothing a
    /// terminal saw is dropped here.
    ///
    /// # Errors
    /// When not all connect within `timeout`.
    pub async fn wait_connected(
        &mut self,
        which: &[usize],
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut waiting: std::collections::HashSet<usize> = which.iter().copied().collect();
        while !waiting.is_empty() {
            let left = timeout.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, self.events.recv()).await {
                Ok(Some(FleetEvent {
                    terminal,
                    seen: Seen::Connected,
                    ..
                })) => {
                    waiting.remove(&terminal);
                }
                Ok(Some(other)) => self.held.push_back(other),
                Ok(None) | Err(_) => bail!(
                    "{} of {} terminals not connected after {timeout:?}",
                    waiting.len(),
                    which.len()
                ),
            }
        }
        Ok(started.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use posgate_proto::confirmation::{Confirmation, ConfirmationStatus};

    use super::*;

    fn confirmation(terminal_id: &str, intent_id: &str, seq: u64) -> Confirmation {
        Confirmation::new(
            terminal_id,
            intent_id,
            seq,
            ConfirmationStatus::Confirmed,
            posgate_proto::MicroUsdc(4_500_000),
            "2026-11-25T00:00:00Z",
        )
    }

    /// The demo's intermittent loss: terminal 0 connected, paid and got its confirmation while
    /// terminal 1 was still connecting; waiting for terminal 1 threw the confirmation away, so
    /// the POS flow counted a delivered (and acked) confirmation as lost.
    #[tokio::test]
    async fn what_arrives_while_waiting_for_connections_is_kept_in_order() {
        let mut fleet = Fleet::new(Vec::new(), SocketAddr::from(([127, 0, 0, 1], 1)));
        let conf = confirmation("pos-0", "pi_early", 1);
        let seen = [
            (0, Seen::Connected),
            (0, Seen::Confirmation(conf.clone())),
            (
                0,
                Seen::Duplicate {
                    intent_id: "pi_early".into(),
                    seq: 1,
                },
            ),
            (1, Seen::Disconnected("connection refused".into())),
            (1, Seen::Connected),
        ];
        for (terminal, seen) in seen {
            let at = Instant::now();
            fleet.tx.send(FleetEvent { terminal, seen, at }).unwrap();
        }
        fleet
            .wait_connected(&[0, 1], Duration::from_secs(10))
            .await
            .unwrap();
        // After the connect phase, in the order the sessions reported them, then the channel.
        let late = confirmation("pos-1", "pi_late", 1);
        let at = Instant::now();
        fleet
            .tx
            .send(FleetEvent {
                terminal: 1,
                seen: Seen::Confirmation(late.clone()),
                at,
            })
            .unwrap();
        // Up to the last event sent (so a dropped one fails the comparison instead of hanging).
        let mut next = Vec::new();
        loop {
            let event = fleet.next_event().await.unwrap();
            let last = event.seen == Seen::Confirmation(late.clone());
            next.push((event.terminal, event.seen));
            if last {
                break;
            }
        }
        assert_eq!(
            next,
            [
                (0, Seen::Confirmation(conf)),
                (
                    0,
                    Seen::Duplicate {
                        intent_id: "pi_early".into(),
                        seq: 1
                    }
                ),
                (1, Seen::Disconnected("connection refused".into())),
                (1, Seen::Confirmation(late)),
            ]
        );
    }
}
