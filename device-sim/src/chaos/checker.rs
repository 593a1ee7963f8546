//! The checker: what was sent and answered `200`, against what every terminal showed.
//!
//! Each terminal session reports into [`Checker::seen`] (the sessions already verified the JWS
//! against the terminal's id and the gateway's key). It proves: every event answered `200` has
//! its confirmation shown by its own terminal, with the amount sent; each terminal's `seq` rises
//! by one at a time (a repeat of a `seq` already shown, e.g. after a crash, is allowed and
//! counted); nothing is shown that was never sent. It also times restart → all terminals
//! reconnected, and delivery.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::bench::{Latency, new_histogram};
use crate::terminal::Seen;

/// Examples of each kind of problem kept for the report.
const EXAMPLES: usize = 10;

/// One event sent to the gateway (its intent has exactly one confirmation).
struct Sent {
    terminal: usize,
    amount_micros: u64,
    first_sent: Instant,
    answered: Option<Instant>,
    /// The `seq` it was shown with, and when.
    shown: Option<(u64, Instant)>,
}

#[derive(Default)]
struct TerminalState {
    /// The highest `seq` shown.
    last_seq: u64,
    /// How many `seq`s were shown.
    shown: u64,
    /// The reconnect round in which it last connected.
    connected_round: u64,
    /// When it was first shown a new confirmation after the last [`Checker::mark`].
    served: Option<Instant>,
}

/// What the checker counted; see [`Checker::summary`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct Confirmations {
    /// Events answered `200`.
    pub answered: u64,
    /// Confirmations shown (each intent once).
    pub delivered: u64,
    /// Answered `200`, never shown (after the drain).
    pub lost: u64,
    /// Shown, although it was never sent.
    pub never_sent: u64,
    /// Failed verification (bad signature, another terminal's, malformed).
    pub rejected: u64,
    /// Shown with another amount, on another terminal, or a repeat with another `seq`.
    pub mismatched: u64,
    /// `seq` numbers skipped: not yet shown when a higher one was shown.
    pub gaps: u64,
    /// Of those, the ones that came later (out of order, shown then).
    pub out_of_order: u64,
    /// Of those, the ones that never came (after the drain).
    pub never_filled: u64,
    /// Confirmations that came again with a `seq` already shown (acked again, not shown).
    pub repeats: u64,
    /// Connections that ended (by a fault, or otherwise).
    pub disconnects: u64,
    /// First examples of each problem.
    pub examples: Vec<String>,
}

impl Confirmations {
    /// Nothing lost, skipped, invented or failing verification.
    pub fn clean(&self) -> bool {
        self.lost == 0
            && self.never_sent == 0
            && self.rejected == 0
            && self.mismatched == 0
            && self.gaps == 0
    }
}

struct State {
    sent: HashMap<String, Sent>,
    terminals: Vec<TerminalState>,
    counts: Confirmations,
    round: u64,
    connected_in_round: usize,
    /// Answered `200`, not shown yet.
    pending: u64,
    /// When the current round started, and when all had connected.
    round_started: Instant,
    round_done: Option<Instant>,
    /// First webhook attempt → shown.
    e2e: Histogram<u64>,
    /// `200` → shown (0 when shown before the answer arrived).
    after_200: Histogram<u64>,
    /// The last [`Checker::mark`], and how many terminals have not been served since.
    mark: Option<Instant>,
    unserved: usize,
}

/// Shared by the webhook senders, the terminal sessions and the fault loop.
pub struct Checker {
    state: Mutex<State>,
    changed: Notify,
}

impl Checker {
    /// A checker for `terminals` terminals.
    ///
    /// # Errors
    /// Never in practice (fixed histogram bounds).
    pub fn new(terminals: usize) -> anyhow::Result<Checker> {
        Ok(Checker {
            state: Mutex::new(State {
                sent: HashMap::new(),
                terminals: (0..terminals).map(|_| TerminalState::default()).collect(),
                counts: Confirmations::default(),
                round: 0,
                connected_in_round: 0,
                pending: 0,
                round_started: Instant::now(),
                round_done: None,
                e2e: new_histogram()?,
                after_200: new_histogram()?,
                mark: None,
                unserved: 0,
            }),
            changed: Notify::new(),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // A panic while holding the lock is a bug in this module; keep counting regardless.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut state)
    }

    /// An event for `intent_id`, for `terminal`, is about to be sent for the first time.
    pub fn sent(&self, intent_id: &str, terminal: usize, amount_micros: u64) {
        self.with(|s| {
            s.sent.insert(
                intent_id.to_owned(),
                Sent {
                    terminal,
                    amount_micros,
                    first_sent: Instant::now(),
                    answered: None,
                    shown: None,
                },
            )
        });
    }

    /// The gateway answered `200` for `intent_id`'s event.
    pub fn answered(&self, intent_id: &str) {
        self.with(|s| {
            if let Some(sent) = s.sent.get_mut(intent_id)
                && sent.answered.is_none()
            {
                sent.answered = Some(Instant::now());
                s.counts.answered += 1;
                if sent.shown.is_none() {
                    s.pending += 1;
                }
            }
        });
        self.changed.notify_waiters();
    }

    /// What terminal `terminal` saw (its session's sink).
    pub fn seen(&self, terminal: usize, seen: Seen) {
        let now = Instant::now();
        self.with(|s| match seen {
            Seen::Confirmation(c) => {
                s.confirmation(terminal, &c.intent_id, c.seq, c.amount_micros, now)
            }
            Seen::Duplicate { intent_id, seq } => {
                s.counts.repeats += 1;
                s.check_repeat(terminal, &intent_id, seq);
            }
            Seen::Rejected(why) => {
                s.counts.rejected += 1;
                s.example(format!("terminal {terminal}: rejected: {why}"));
            }
            Seen::Connected => {
                let t = &mut s.terminals[terminal];
                if t.connected_round < s.round {
                    t.connected_round = s.round;
                    s.connected_in_round += 1;
                    if s.connected_in_round == s.terminals.len() {
                        s.round_done = Some(now);
                    }
                }
            }
            Seen::Disconnected(_) => s.counts.disconnects += 1,
            Seen::Rpc(_) => {}
        });
        self.changed.notify_waiters();
    }

    /// A (re)start begins now: every terminal must connect again.
    pub fn new_round(&self) {
        self.with(|s| {
            s.round += 1;
            s.connected_in_round = 0;
            s.round_started = Instant::now();
            s.round_done = None;
        });
    }

    /// Waits until every terminal has connected in this round; the time from
    /// [`Checker::new_round`] to the last connect, or `None` after `timeout`.
    pub async fn all_connected(&self, timeout: Duration) -> Option<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            if let Some(took) = self.with(|s| {
                let done = s.round_done?;
                Some(done.saturating_duration_since(s.round_started))
            }) {
                return Some(took);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }

    /// A fault happened now: from here on, each terminal's first newly shown confirmation counts
    /// as it being served again ([`Checker::served_since_mark`]). Returns the mark.
    pub fn mark(&self) -> Instant {
        let now = Instant::now();
        self.with(|s| {
            s.mark = Some(now);
            s.unserved = s.terminals.len();
            s.terminals.iter_mut().for_each(|t| t.served = None);
        });
        now
    }

    /// Waits until every terminal was served since the mark; false after `timeout`.
    pub async fn all_served(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            if self.with(|s| s.unserved == 0) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return false;
            }
        }
    }

    /// Mark → served again, per terminal served since the mark, and how many were not.
    pub fn served_since_mark(&self) -> (Vec<Duration>, usize) {
        self.with(|s| {
            let Some(mark) = s.mark else {
                return (Vec::new(), s.terminals.len());
            };
            let took = s
                .terminals
                .iter()
                .filter_map(|t| t.served.map(|at| at.saturating_duration_since(mark)))
                .collect();
            (took, s.unserved)
        })
    }

    /// Mark → served again for each of `which` terminals (`None`: not served since the mark).
    pub fn served_of(&self, which: &[usize]) -> Vec<Option<Duration>> {
        self.with(|s| {
            (which.iter())
                .map(|&i| {
                    let served = s.terminals.get(i)?.served?;
                    Some(served.saturating_duration_since(s.mark?))
                })
                .collect()
        })
    }

    /// The terminals that have not connected in this round.
    pub fn not_connected_list(&self) -> Vec<usize> {
        self.with(|s| {
            (s.terminals.iter().enumerate())
                .filter(|(_, t)| t.connected_round < s.round)
                .map(|(i, _)| i)
                .collect()
        })
    }

    /// How many terminals have not connected in this round.
    pub fn not_connected(&self) -> usize {
        self.with(|s| s.terminals.len() - s.connected_in_round)
    }

    /// Waits until every event answered `200` has been shown; false after `timeout`.
    pub async fn all_delivered(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            if self.with(|s| s.pending == 0) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return false;
            }
        }
    }

    /// The terminals with an event answered `200` and not shown yet, ascending.
    pub fn waiting_terminals(&self) -> Vec<usize> {
        self.with(|s| {
            let mut waiting: Vec<usize> = (s.sent.values())
                .filter(|e| e.answered.is_some() && e.shown.is_none())
                .map(|e| e.terminal)
                .collect();
            waiting.sort_unstable();
            waiting.dedup();
            waiting
        })
    }

    /// Answered `200` so far, and shown so far.
    pub fn progress(&self) -> (u64, u64) {
        self.with(|s| (s.counts.answered, s.counts.delivered))
    }

    /// The counts, with every event answered `200` and not shown counted lost.
    pub fn summary(&self) -> (Confirmations, Latency, Latency) {
        self.with(|s| {
            let mut counts = s.counts.clone();
            let mut lost: Vec<(&String, &Sent)> = s
                .sent
                .iter()
                .filter(|(_, e)| e.answered.is_some() && e.shown.is_none())
                .collect();
            lost.sort_by_key(|(_, e)| e.first_sent);
            counts.lost = lost.len() as u64;
            counts.never_filled = s
                .terminals
                .iter()
                .map(|t| t.last_seq.saturating_sub(t.shown))
                .sum();
            for (intent, e) in lost.iter().take(EXAMPLES) {
                counts
                    .examples
                    .push(format!("terminal {}: {intent} lost", e.terminal));
            }
            (counts, Latency::of(&s.e2e), Latency::of(&s.after_200))
        })
    }
}

// === impl State ===

impl State {
    fn example(&mut self, what: String) {
        if self.counts.examples.len() < EXAMPLES * 4 {
            self.counts.examples.push(what);
        }
    }

    fn confirmation(
        &mut self,
        terminal: usize,
        intent_id: &str,
        seq: u64,
        amount_micros: u64,
        now: Instant,
    ) {
        let last = self.terminals[terminal].last_seq;
        let first_time = self
            .sent
            .get(intent_id)
            .is_some_and(|e| e.shown.is_none() && e.terminal == terminal);
        if seq <= last && !first_time {
            // A new session (after a drop) sees again what the last one was shown.
            self.counts.repeats += 1;
            self.check_repeat(terminal, intent_id, seq);
            return;
        }
        if seq <= last {
            self.counts.out_of_order += 1;
        }
        if seq > last + 1 {
            self.counts.gaps += seq - last - 1;
            self.example(format!(
                "terminal {terminal}: seq {seq} shown after {last} ({intent_id})"
            ));
        }
        let t = &mut self.terminals[terminal];
        t.last_seq = t.last_seq.max(seq);
        t.shown += 1;
        let Some(sent) = self.sent.get_mut(intent_id) else {
            self.counts.never_sent += 1;
            self.example(format!(
                "terminal {terminal}: {intent_id} seq {seq} was never sent"
            ));
            return;
        };
        if sent.terminal != terminal || sent.amount_micros != amount_micros {
            let expected = (sent.terminal, sent.amount_micros);
            self.counts.mismatched += 1;
            self.example(format!(
                "terminal {terminal}: {intent_id} shown with {amount_micros} µ, sent to {} with {} µ",
                expected.0, expected.1
            ));
            return;
        }
        if let Some((first, _)) = sent.shown {
            self.counts.mismatched += 1;
            self.example(format!(
                "terminal {terminal}: {intent_id} shown as seq {seq} after seq {first}"
            ));
            return;
        }
        sent.shown = Some((seq, now));
        if sent.answered.is_some() {
            self.pending -= 1;
        }
        let t = &mut self.terminals[terminal];
        if self.mark.is_some() && t.served.is_none() {
            t.served = Some(now);
            self.unserved -= 1;
        }
        let e2e = now.saturating_duration_since(sent.first_sent);
        let after = sent
            .answered
            .map(|a| now.saturating_duration_since(a))
            .unwrap_or_default();
        self.counts.delivered += 1;
        self.e2e.saturating_record(e2e.as_micros().max(1) as u64);
        self.after_200
            .saturating_record(after.as_micros().max(1) as u64);
    }

    /// A repeat must carry the intent and `seq` it was first shown with.
    fn check_repeat(&mut self, terminal: usize, intent_id: &str, seq: u64) {
        let first = self.sent.get(intent_id).and_then(|e| e.shown);
        match first {
            Some((shown_seq, _)) if shown_seq == seq => {}
            Some((shown_seq, _)) => {
                self.counts.mismatched += 1;
                self.example(format!(
                    "terminal {terminal}: {intent_id} repeated as seq {seq}, shown as {shown_seq}"
                ));
            }
            None => {
                self.counts.mismatched += 1;
                self.example(format!(
                    "terminal {terminal}: {intent_id} seq {seq} came as a repeat, never shown"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confirmation(intent: &str, seq: u64, amount: u64) -> Seen {
        Seen::Confirmation(posgate_proto::confirmation::Confirmation::new(
            "pos-0",
            intent,
            seq,
            posgate_proto::confirmation::ConfirmationStatus::Confirmed,
            posgate_proto::MicroUsdc(amount),
            "2026-04-01T20:00:12Z",
        ))
    }

    #[tokio::test]
    async fn counts_loss_gaps_repeats_and_inventions() {
        let checker = Checker::new(1).unwrap();
        for (i, intent) in ["pi_1", "pi_2", "pi_3", "pi_4"].iter().enumerate() {
            checker.sent(intent, 0, 1_000 + i as u64);
            checker.answered(intent);
        }
        checker.seen(0, confirmation("pi_1", 1, 1_000));
        checker.seen(0, confirmation("pi_1", 1, 1_000)); // after a crash: allowed, counted
        checker.seen(0, confirmation("pi_3", 3, 1_002)); // seq 2 skipped
        checker.seen(0, confirmation("pi_x", 4, 1)); // never sent
        let (c, _, _) = checker.summary();
        assert_eq!(
            (c.delivered, c.repeats, c.gaps, c.never_sent, c.lost),
            (2, 1, 1, 1, 2)
        );
        assert_eq!((c.out_of_order, c.never_filled), (0, 1));
        // Seq 2 comes late: delivered, out of order, and the gap is filled.
        checker.seen(0, confirmation("pi_2", 2, 1_001));
        let (c, _, _) = checker.summary();
        assert_eq!((c.delivered, c.out_of_order, c.never_filled), (3, 1, 0));
        assert_eq!((c.gaps, c.lost, c.repeats), (1, 1, 1));
        assert!(!c.clean());
        assert!(!checker.all_delivered(Duration::from_millis(10)).await);
    }

    #[tokio::test]
    async fn served_again_counts_the_first_new_confirmation_after_the_mark() {
        let checker = Checker::new(2).unwrap();
        for intent in ["pi_1", "pi_2", "pi_3"] {
            checker.sent(intent, 0, 7);
            checker.answered(intent);
        }
        checker.seen(0, confirmation("pi_1", 1, 7));
        checker.mark();
        assert_eq!(checker.served_since_mark().1, 2);
        // A repeat after the mark is not service; a new confirmation is, once.
        checker.seen(0, confirmation("pi_1", 1, 7));
        assert_eq!(checker.served_since_mark().1, 2);
        checker.seen(0, confirmation("pi_2", 2, 7));
        checker.seen(0, confirmation("pi_3", 3, 7));
        let (took, unserved) = checker.served_since_mark();
        assert_eq!((took.len(), unserved), (1, 1));
        assert!(!checker.all_served(Duration::from_millis(10)).await);
    }

    #[tokio::test]
    async fn a_round_ends_when_every_terminal_connected_again() {
        let checker = Checker::new(2).unwrap();
        checker.new_round();
        checker.seen(0, Seen::Connected);
        checker.seen(0, Seen::Connected);
        assert_eq!(checker.not_connected(), 1);
        checker.seen(1, Seen::Connected);
        assert!(
            checker
                .all_connected(Duration::from_secs(1))
                .await
                .is_some()
        );
    }
}
