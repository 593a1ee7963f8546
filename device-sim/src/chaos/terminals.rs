//! The simulated terminals: most on MQTT/TLS, some on SSE or WebSocket; each session verifies,
//! acks and reports to the [`Checker`], and reconnects by itself when the daemon goes away. A
//! session can be dropped (no DISCONNECT: a crash, a cable pulled) and started again.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use serde::Serialize;
use tokio::task::JoinHandle;

use super::checker::Checker;
use crate::http_terminal::{Channel, spawn_http_session};
use crate::terminal::{Bundle, spawn_session_pinned};

/// How many terminals use which channel.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Mix {
    pub mqtt: usize,
    pub sse: usize,
    pub ws: usize,
}

/// Every terminal's session.
pub struct Terminals {
    bundles: Vec<Bundle>,
    channels: Vec<Channel>,
    sessions: Vec<Option<JoinHandle<()>>>,
    /// Per terminal: while set, its MQTT session reconnects to its first node only.
    pins: Vec<Arc<AtomicBool>>,
    /// The broker's nodes (one, unless it is a cluster).
    mqtt: Vec<SocketAddr>,
    ingress: SocketAddr,
    checker: Arc<Checker>,
}

impl Terminals {
    /// Terminals for `bundles`; the last `http` of them alternate between SSE and WebSocket.
    /// MQTT terminals are spread over the broker's nodes `mqtt`: terminal `i` connects to node
    /// `i % n` first and fails over to the next ones in turn. Nothing connects before
    /// [`Terminals::start`].
    pub fn new(
        bundles: Vec<Bundle>,
        http: usize,
        mqtt: Vec<SocketAddr>,
        ingress: SocketAddr,
        checker: Arc<Checker>,
    ) -> Terminals {
        let first_http = bundles.len().saturating_sub(http);
        let channels = (0..bundles.len())
            .map(|i| match i.checked_sub(first_http) {
                None => Channel::Mqtt,
                Some(k) if k % 2 == 0 => Channel::Sse,
                Some(_) => Channel::Ws,
            })
            .collect();
        let sessions = bundles.iter().map(|_| None).collect();
        let pins = bundles.iter().map(|_| Arc::default()).collect();
        Terminals {
            bundles,
            channels,
            sessions,
            pins,
            mqtt,
            ingress,
            checker,
        }
    }

    pub fn len(&self) -> usize {
        self.bundles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }

    /// How many use each channel.
    pub fn mix(&self) -> Mix {
        let count = |c| self.channels.iter().filter(|&&x| x == c).count();
        Mix {
            mqtt: count(Channel::Mqtt),
            sse: count(Channel::Sse),
            ws: count(Channel::Ws),
        }
    }

    /// Starts terminal `i`'s session (replacing one that runs).
    ///
    /// # Errors
    /// When its bundle does not parse.
    pub fn start(&mut self, i: usize) -> anyhow::Result<()> {
        self.drop_session(i);
        let checker = self.checker.clone();
        let sink = Box::new(move |seen: crate::terminal::Seen| {
            if let Some(log) = &*TERMINAL_LOG {
                log_seen(log, i, &seen);
            }
            checker.seen(i, seen);
            true
        });
        let task = match self.channels[i] {
            Channel::Mqtt => {
                let pin = self.pins[i].clone();
                spawn_session_pinned(&self.bundles[i], &self.nodes_of(i), pin, sink)?.1
            }
            channel => spawn_http_session(&self.bundles[i], self.ingress, channel, sink)?,
        };
        self.sessions[i] = Some(task);
        Ok(())
    }

    /// Terminal `i`'s broker addresses, its first node first.
    pub fn nodes_of(&self, i: usize) -> Vec<SocketAddr> {
        let mut nodes = self.mqtt.clone();
        nodes.rotate_left(self.first_node(i));
        nodes
    }

    /// The index (in the broker's addresses) of the node terminal `i` connects to first.
    pub fn first_node(&self, i: usize) -> usize {
        i % self.mqtt.len().max(1)
    }

    /// Pins terminal `i`'s MQTT session to its first node (`true`): after an error it dials
    /// that node again, not the next one. Unpinned (`false`, the default), the next error moves
    /// it on. Takes effect at once, also on a running session.
    pub fn pin(&self, i: usize, pinned: bool) {
        self.pins[i].store(pinned, Ordering::SeqCst);
    }

    /// Whether terminal `i` is pinned to its first node ([`Terminals::pin`]).
    pub fn is_pinned(&self, i: usize) -> bool {
        self.pins[i].load(Ordering::SeqCst)
    }

    /// Starts every terminal.
    ///
    /// # Errors
    /// When a bundle does not parse.
    pub fn start_all(&mut self) -> anyhow::Result<()> {
        (0..self.len()).try_for_each(|i| self.start(i))
    }

    /// Ends terminal `i`'s connection without a goodbye.
    pub fn drop_session(&mut self, i: usize) {
        if let Some(task) = self.sessions[i].take() {
            task.abort();
        }
    }

    /// Ends every session.
    pub fn stop_all(&mut self) {
        (0..self.len()).for_each(|i| self.drop_session(i));
    }
}

impl Drop for Terminals {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// With `POSGATE_SIM_TERMINAL_LOG` set to a file name, every terminal's connects, disconnects
/// (with the reason and, on a cluster, the next node it dials) and confirmations are appended
/// there, one line each with the milliseconds since the first line: where a terminal was and
/// what it saw, for a diagnosis.
static TERMINAL_LOG: LazyLock<Option<(Mutex<std::fs::File>, tokio::time::Instant)>> =
    LazyLock::new(|| {
        let path = std::env::var_os("POSGATE_SIM_TERMINAL_LOG")?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()?;
        Some((Mutex::new(file), tokio::time::Instant::now()))
    });

fn log_seen(
    (file, start): &(Mutex<std::fs::File>, tokio::time::Instant),
    i: usize,
    seen: &crate::terminal::Seen,
) {
    use crate::terminal::Seen;
    let what = match seen {
        Seen::Confirmation(c) => format!("shown {} seq {}", c.intent_id, c.seq),
        Seen::Duplicate { intent_id, seq } => format!("repeat {intent_id} seq {seq}"),
        Seen::Rejected(why) => format!("rejected: {why}"),
        Seen::Connected => "connected".to_owned(),
        Seen::Disconnected(why) => format!("disconnected: {why}"),
        Seen::Rpc(_) => return,
    };
    if let Ok(mut file) = file.lock() {
        let ms = start.elapsed().as_millis();
        drop(writeln!(file, "{ms} terminal {i}: {what}"));
    }
}
