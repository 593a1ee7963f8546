//! One terminal's stream of confirmations: its head from the store, then what is published.

use prometheus::IntGauge;
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::delivery::Published;

use super::*;

/// Why a stream ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum End {
    ShuttingDown,
    Revoked,
    Failed,
}

/// One terminal's confirmations as the delivery engine puts them on the wire: first its head from the
/// store, then every publish. `next` is cancel-safe (a store read that is cut is done again).
pub(super) struct Feed {
    pub(super) channels: Arc<Channels>,
    pub(super) terminal_id: String,
    pub(super) signals: broadcast::Receiver<Signal>,
    pub(super) resync: bool,
    /// After a store read: the seq it sent, and how many signals were already queued then. A
    /// publish of that same row among those is the one the read already carried (skipped); a
    /// later one is a republish (sent, as MQTT sends it).
    pub(super) just_read: Option<(u64, usize)>,
    /// Its `posgate_http_streams` gauge, decremented when the feed is dropped.
    pub(super) open: IntGauge,
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl Feed {
    /// The feed of one stream on `channel` (`"sse"` or `"ws"`).
    pub(super) fn new(
        channels: Arc<Channels>,
        terminal_id: String,
        signals: broadcast::Receiver<Signal>,
        channel: &'static str,
    ) -> Feed {
        let open = channels.streams.with_label_values(&[channel]);
        open.inc();
        Feed {
            channels,
            terminal_id,
            signals,
            resync: true,
            just_read: None,
            open,
        }
    }

    pub(super) async fn next(&mut self) -> Result<Arc<Published>, End> {
        loop {
            if self.channels.shutdown.is_cancelled() {
                return Err(End::ShuttingDown);
            }
            if self.resync {
                let rows = self
                    .channels
                    .store
                    .outbox(Some(self.terminal_id.clone()))
                    .await
                    .map_err(|e| {
                        tracing::warn!(terminal_id = %self.terminal_id, error = %e, "cannot read the outbox for a stream");
                        End::Failed
                    })?;
                self.resync = false;
                self.just_read = None;
                // Stop-and-wait, as on MQTT: only the head is on the wire.
                if let Some(head) = rows.first() {
                    self.just_read = Some((head.seq, self.signals.len()));
                    return Ok(Arc::new(Published {
                        terminal_id: head.terminal_id.clone(),
                        intent_id: head.intent_id.clone(),
                        seq: head.seq,
                        jws: self.channels.signer.sign(head),
                    }));
                }
            }
            tokio::select! {
                biased;
                () = self.channels.shutdown.cancelled() => return Err(End::ShuttingDown),
                signal = self.signals.recv() => match signal {
                    Ok(Signal::Published(p)) => {
                        if let Some((seq, n)) = self.just_read.take()
                            && n > 0
                        {
                            self.just_read = Some((seq, n - 1));
                            if p.seq == seq {
                                continue;
                            }
                        }
                        return Ok(p);
                    }
                    Ok(Signal::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.resync = true;
                    }
                    Ok(Signal::Revoked) | Err(broadcast::error::RecvError::Closed) => {
                        return Err(End::Revoked);
                    }
                },
            }
        }
    }
}
