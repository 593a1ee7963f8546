//! The fan-out of the delivery engine's publishes to each terminal's open streams.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::delivery::Published;

/// What a terminal's streams are told.
#[derive(Clone, Debug)]
pub(super) enum Signal {
    Published(Arc<Published>),
    /// Something may have been missed: read the head from the store again.
    Resync,
    /// The terminal was revoked: end the stream.
    Revoked,
}

/// Per-terminal fan-out of the delivery engine's publishes to the open streams and long polls.
#[derive(Clone, Default)]
pub struct Hub {
    terminals: Arc<Mutex<HashMap<String, broadcast::Sender<Signal>>>>,
}

impl Hub {
    /// Capacity of one terminal's channel (stop-and-wait: one confirmation in flight at a time).
    const PER_TERMINAL: usize = 16;

    pub(super) fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, broadcast::Sender<Signal>>> {
        self.terminals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn subscribe(&self, terminal_id: &str) -> broadcast::Receiver<Signal> {
        self.lock()
            .entry(terminal_id.to_owned())
            .or_insert_with(|| broadcast::channel(Self::PER_TERMINAL).0)
            .subscribe()
    }

    /// How many streams and long polls of the terminal are open.
    pub(super) fn open(&self, terminal_id: &str) -> usize {
        self.lock()
            .get(terminal_id)
            .map_or(0, broadcast::Sender::receiver_count)
    }

    /// Sends to the terminal's streams; forgets the terminal when none is left.
    pub(super) fn send(&self, terminal_id: &str, signal: Signal) {
        let mut map = self.lock();
        if let Some(tx) = map.get(terminal_id)
            && tx.send(signal).is_err()
        {
            map.remove(terminal_id);
        }
    }

    /// Ends the terminal's open streams (called right after its revocation is committed).
    pub fn revoke(&self, terminal_id: &str) {
        if let Some(tx) = self.lock().remove(terminal_id) {
            drop(tx.send(Signal::Revoked));
        }
    }

    /// Forwards the delivery engine's publishes until `token` is cancelled or the delivery engine is gone.
    pub async fn run(
        self,
        mut published: broadcast::Receiver<Published>,
        token: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = token.cancelled() => break,
                item = published.recv() => match item {
                    Ok(p) => {
                        let id = p.terminal_id.clone();
                        self.send(&id, Signal::Published(Arc::new(p)));
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "HTTP channels fell behind the delivery engine; every stream re-reads the store");
                        let ids: Vec<String> = self.lock().keys().cloned().collect();
                        for id in ids {
                            self.send(&id, Signal::Resync);
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
            }
        }
    }
}
