//! Intent records and [`apply`].

use std::collections::BTreeSet;

use posgate_proto::MicroUsdc;
use posgate_proto::event::{PaymentIntent, Transaction, metadata_str};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Our view of an intent's status (provider-api.md §6.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntentStatus {
    AwaitingPayment,
    Expired,
    Cancelled,
    Unresolved,
    Confirmed,
    Settled,
}

impl IntentStatus {
    /// Forward-only order; equal ranks never replace each other.
    pub fn rank(self) -> u8 {
        match self {
            IntentStatus::AwaitingPayment => 0,
            IntentStatus::Expired | IntentStatus::Cancelled => 1,
            IntentStatus::Unresolved => 2,
            IntentStatus::Confirmed => 3,
            IntentStatus::Settled => 4,
        }
    }

    /// The wire name (`awaiting_payment`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            IntentStatus::AwaitingPayment => "awaiting_payment",
            IntentStatus::Expired => "expired",
            IntentStatus::Cancelled => "cancelled",
            IntentStatus::Unresolved => "unresolved",
            IntentStatus::Confirmed => "confirmed",
            IntentStatus::Settled => "settled",
        }
    }

    /// Parses the wire name.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "awaiting_payment" => IntentStatus::AwaitingPayment,
            "expired" => IntentStatus::Expired,
            "cancelled" => IntentStatus::Cancelled,
            "unresolved" => IntentStatus::Unresolved,
            "confirmed" => IntentStatus::Confirmed,
            "settled" => IntentStatus::Settled,
            _ => return None,
        })
    }
}

/// Why money does not fit an intent. Ordered by how pressing it is for the terminal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnresolvedContext {
    Late,
    Underpaid,
    Overpaid,
    Multiple,
}

/// The gateway's durable view of one payment intent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentRecord {
    pub id: String,
    pub status: IntentStatus,
    /// `late` and `multiple` are sticky facts; `underpaid`/`overpaid` describe `received` now.
    pub contexts: BTreeSet<UnresolvedContext>,
    pub expected_micros: MicroUsdc,
    /// Sum of the matched transfers.
    pub received_micros: MicroUsdc,
    /// Matched transfer ids, in arrival order.
    pub txns: Vec<String>,
    pub terminal_id: Option<String>,
    pub order_id: Option<String>,
    pub merchant_id: Option<String>,
    pub currency: Option<String>,
    pub payment_address: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    pub tx_hash: Option<String>,
}

/// One thing that happened to an intent.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// A `payment_intent.*` snapshot whose status the provider asserts.
    Snapshot(&'a PaymentIntent),
    /// A `transaction.created` matched to this intent.
    Transfer(&'a Transaction),
    /// A `settlement.completed` listing this intent.
    Settled,
}

/// What [`apply`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Effect {
    pub from: IntentStatus,
    pub to: IntentStatus,
    /// The terminal must be told (a new status, or a new unresolved context).
    pub notify: bool,
}

impl IntentRecord {
    /// A new record from a provider snapshot, before its status is applied.
    pub fn from_snapshot(pi: &PaymentIntent) -> Self {
        let mut record = IntentRecord {
            id: pi.id.clone(),
            status: IntentStatus::AwaitingPayment,
            contexts: BTreeSet::new(),
            expected_micros: pi.amount,
            received_micros: MicroUsdc(0),
            txns: Vec::new(),
            terminal_id: None,
            order_id: None,
            merchant_id: None,
            currency: None,
            payment_address: None,
            expires_at: None,
            tx_hash: None,
        };
        record.fill_from(pi);
        record
    }

    /// Fills fields we do not know yet; what we recorded first stays.
    fn fill_from(&mut self, pi: &PaymentIntent) {
        let meta = pi.metadata.as_ref();
        fill(&mut self.terminal_id, metadata_str(meta, "terminal_id"));
        fill(&mut self.order_id, metadata_str(meta, "order_id"));
        fill(&mut self.merchant_id, pi.merchant_id.as_deref());
        fill(&mut self.currency, pi.currency.as_deref());
        fill(&mut self.payment_address, pi.payment_address.as_deref());
        fill(&mut self.tx_hash, pi.tx_hash.as_deref());
        if self.expires_at.is_none() {
            self.expires_at = pi.expires_at;
        }
    }

    /// The context a terminal is shown for `unresolved`: the most pressing one.
    pub fn primary_context(&self) -> Option<UnresolvedContext> {
        self.contexts.iter().next().copied()
    }
}

fn fill(slot: &mut Option<String>, value: Option<&str>) {
    if slot.is_none() {
        *slot = value.map(str::to_owned);
    }
}

/// Applies one input to `record`, forward-only.
///
/// `event_at` is when the provider says the input happened (a transfer's `confirmed_at`, else the
/// event's `created_at`): lateness is judged by the provider's clock, never by when a retry reached
/// us.
pub fn apply(
    record: &mut IntentRecord,
    input: Input<'_>,
    event_at: Option<OffsetDateTime>,
) -> Effect {
    let from = record.status;
    let context_before = record.primary_context();
    let candidate = match input {
        Input::Snapshot(pi) => {
            record.fill_from(pi);
            match pi.status.as_str() {
                "confirmed" => Some(IntentStatus::Confirmed),
                "expired" => Some(IntentStatus::Expired),
                "cancelled" => Some(IntentStatus::Cancelled),
                "settled" => Some(IntentStatus::Settled),
                _ => None,
            }
        }
        Input::Transfer(tx) => transfer(record, tx, event_at),
        Input::Settled => Some(IntentStatus::Settled),
    };
    if let Some(candidate) = candidate
        && candidate.rank() > record.status.rank()
    {
        record.status = candidate;
    }
    let to = record.status;
    let notify = match to {
        IntentStatus::AwaitingPayment => false,
        // The provider settles only what it confirmed: the terminal shows `settled` as paid, so
        // it hears of it unless it already saw the confirmation (webhooks lost, the intent first
        // seen settled by a lookup or a settlement event).
        IntentStatus::Settled => !matches!(from, IntentStatus::Confirmed | IntentStatus::Settled),
        IntentStatus::Unresolved => from != to || record.primary_context() != context_before,
        _ => from != to,
    };
    Effect { from, to, notify }
}

/// Records a transfer (provider-api.md §6.4) and returns the candidate status.
fn transfer(
    record: &mut IntentRecord,
    tx: &Transaction,
    event_at: Option<OffsetDateTime>,
) -> Option<IntentStatus> {
    if record.txns.iter().any(|t| t == &tx.id) {
        return None;
    }
    if !record.txns.is_empty() {
        record.contexts.insert(UnresolvedContext::Multiple);
    }
    let at = tx.confirmed_at.or(event_at);
    let after_expiry = matches!((at, record.expires_at), (Some(at), Some(exp)) if at > exp);
    if after_expiry
        || matches!(
            record.status,
            IntentStatus::Expired | IntentStatus::Cancelled
        )
    {
        record.contexts.insert(UnresolvedContext::Late);
    }
    record.txns.push(tx.id.clone());
    record.received_micros = record.received_micros.saturating_add(tx.amount);
    record.contexts.remove(&UnresolvedContext::Underpaid);
    record.contexts.remove(&UnresolvedContext::Overpaid);
    if record.received_micros < record.expected_micros {
        record.contexts.insert(UnresolvedContext::Underpaid);
    } else if record.received_micros > record.expected_micros {
        record.contexts.insert(UnresolvedContext::Overpaid);
    }
    if record.tx_hash.is_none() {
        record.tx_hash = tx.tx_hash.clone();
    }
    (!record.contexts.is_empty() && record.status.rank() < IntentStatus::Confirmed.rank())
        .then_some(IntentStatus::Unresolved)
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::IntentStatus::*;
    use super::UnresolvedContext::*;
    use super::*;

    const EXPIRES: OffsetDateTime = datetime!(2026-04-01 20:04:21 UTC);
    const ON_TIME: OffsetDateTime = datetime!(2026-04-01 20:00:07 UTC);
    const LATE: OffsetDateTime = datetime!(2026-04-01 20:10:00 UTC);

    fn snapshot(status: &str) -> PaymentIntent {
        serde_json::from_value(serde_json::json!({
            "id": "pi_1", "status": status, "amount": 4.5, "currency": "usd",
            "payment_address": "0xAbC", "expires_at": "2026-04-01T20:04:21Z",
            "metadata": {"terminal_id": "pos-1", "order_id": "ord-1"}
        }))
        .unwrap()
    }

    fn tx(id: &str, amount: &str, at: OffsetDateTime) -> Transaction {
        serde_json::from_str(&format!(
            r#"{{"id":"{id}","payment_intent_id":"pi_1","amount":{amount},"confirmed_at":"{}"}}"#,
            at.format(&time::format_description::well_known::Rfc3339)
                .unwrap()
        ))
        .unwrap()
    }

    fn record(status: IntentStatus) -> IntentRecord {
        let mut r = IntentRecord::from_snapshot(&snapshot("awaiting_payment"));
        r.status = status;
        r
    }

    fn ctx(list: &[UnresolvedContext]) -> BTreeSet<UnresolvedContext> {
        list.iter().copied().collect()
    }

    #[test]
    fn snapshot_fills_record() {
        let r = IntentRecord::from_snapshot(&snapshot("confirmed"));
        assert_eq!(r.status, AwaitingPayment, "status is applied separately");
        assert_eq!(r.expected_micros, MicroUsdc(4_500_000));
        assert_eq!(r.terminal_id.as_deref(), Some("pos-1"));
        assert_eq!(r.order_id.as_deref(), Some("ord-1"));
        assert_eq!(r.expires_at, Some(EXPIRES));
    }

    /// Every (state, provider status) pair: the result is the higher rank, and only a change notifies.
    #[test]
    fn snapshots_only_move_forward() {
        let all = [
            AwaitingPayment,
            Expired,
            Cancelled,
            Unresolved,
            Confirmed,
            Settled,
        ];
        for current in all {
            for (status, candidate) in [
                ("confirmed", Some(Confirmed)),
                ("expired", Some(Expired)),
                ("cancelled", Some(Cancelled)),
                ("settled", Some(Settled)),
                ("awaiting_payment", None),
                ("something_new", None),
            ] {
                let mut r = record(current);
                let effect = apply(&mut r, Input::Snapshot(&snapshot(status)), None);
                let want = match candidate {
                    Some(c) if c.rank() > current.rank() => c,
                    _ => current,
                };
                assert_eq!(r.status, want, "{current:?} + {status}");
                // Settled is shown as paid: news unless the terminal already saw `confirmed`.
                let notify = want != current && !(want == Settled && current == Confirmed);
                assert_eq!(
                    effect,
                    Effect {
                        from: current,
                        to: want,
                        notify
                    },
                    "{current:?} + {status}"
                );
            }
        }
    }

    #[test]
    fn expired_and_cancelled_never_flip() {
        let mut r = record(Expired);
        apply(&mut r, Input::Snapshot(&snapshot("cancelled")), None);
        assert_eq!(r.status, Expired);
        let mut r = record(Cancelled);
        apply(&mut r, Input::Snapshot(&snapshot("expired")), None);
        assert_eq!(r.status, Cancelled);
    }

    #[test]
    fn exact_on_time_transfer_waits_for_the_provider() {
        let mut r = record(AwaitingPayment);
        let e = apply(&mut r, Input::Transfer(&tx("txn_1", "4.5", ON_TIME)), None);
        assert_eq!(
            e,
            Effect {
                from: AwaitingPayment,
                to: AwaitingPayment,
                notify: false
            }
        );
        assert_eq!(r.received_micros, MicroUsdc(4_500_000));
        assert!(r.contexts.is_empty());
        assert_eq!(r.txns, ["txn_1"]);
    }

    #[test]
    fn underpaid_then_topped_up_is_multiple() {
        let mut r = record(AwaitingPayment);
        let e = apply(&mut r, Input::Transfer(&tx("txn_1", "4.4", ON_TIME)), None);
        assert_eq!((r.status, e.notify), (Unresolved, true));
        assert_eq!(r.contexts, ctx(&[Underpaid]));
        let e = apply(&mut r, Input::Transfer(&tx("txn_2", "0.1", ON_TIME)), None);
        assert_eq!(
            r.contexts,
            ctx(&[Multiple]),
            "underpaid cleared by the total"
        );
        assert_eq!(r.received_micros, MicroUsdc(4_500_000));
        assert!(e.notify, "a new context is news for the terminal");
        // The provider then confirms.
        let e = apply(&mut r, Input::Snapshot(&snapshot("confirmed")), None);
        assert_eq!((e.from, e.to, e.notify), (Unresolved, Confirmed, true));
    }

    #[test]
    fn overpayment_after_confirmation_stays_confirmed() {
        let mut r = record(Confirmed);
        let e = apply(&mut r, Input::Transfer(&tx("txn_1", "5.00", ON_TIME)), None);
        assert_eq!((r.status, e.notify), (Confirmed, false));
        assert_eq!(r.contexts, ctx(&[Overpaid]));
    }

    #[test]
    fn late_transfers() {
        for current in [Expired, Cancelled] {
            let mut r = record(current);
            apply(&mut r, Input::Transfer(&tx("txn_1", "4.4", ON_TIME)), None);
            assert_eq!(r.status, Unresolved);
            assert_eq!(r.contexts, ctx(&[Late, Underpaid]));
            assert_eq!(r.primary_context(), Some(Late));
        }
        // Judged by the transfer's own time, not arrival: still awaiting, but paid after expiry.
        let mut r = record(AwaitingPayment);
        apply(&mut r, Input::Transfer(&tx("txn_1", "4.5", LATE)), None);
        assert_eq!((r.status, r.contexts.clone()), (Unresolved, ctx(&[Late])));
    }

    #[test]
    fn the_same_transfer_twice_is_one_transfer() {
        let mut r = record(AwaitingPayment);
        apply(&mut r, Input::Transfer(&tx("txn_1", "4.4", ON_TIME)), None);
        let before = r.clone();
        let e = apply(&mut r, Input::Transfer(&tx("txn_1", "4.4", ON_TIME)), None);
        assert_eq!(r, before);
        assert!(!e.notify);
    }

    #[test]
    fn settlement_is_final_and_silent() {
        let mut r = record(Confirmed);
        let e = apply(&mut r, Input::Settled, None);
        assert_eq!(
            e,
            Effect {
                from: Confirmed,
                to: Settled,
                notify: false
            }
        );
        apply(&mut r, Input::Snapshot(&snapshot("expired")), None);
        assert_eq!(r.status, Settled);
    }

    /// All orders of {transfer, confirmed, expired(stale)} end confirmed with the transfer recorded.
    #[test]
    fn order_does_not_matter() {
        let inputs = [0, 1, 2];
        let perms = [
            [0, 1, 2],
            [0, 2, 1],
            [1, 0, 2],
            [1, 2, 0],
            [2, 0, 1],
            [2, 1, 0],
        ];
        let t = tx("txn_1", "4.5", ON_TIME);
        let (c, x) = (snapshot("confirmed"), snapshot("expired"));
        let mut finals = Vec::new();
        for p in perms {
            let mut r = record(AwaitingPayment);
            for i in p.iter().map(|&i| inputs[i]) {
                let input = match i {
                    0 => Input::Transfer(&t),
                    1 => Input::Snapshot(&c),
                    _ => Input::Snapshot(&x),
                };
                apply(&mut r, input, None);
            }
            finals.push((r.status, r.received_micros));
        }
        // Expired-before-confirmed still ends confirmed; the on-time transfer adds no context
        // unless it arrived after the expiry was recorded (then it is marked late, but confirmed wins).
        assert!(
            finals
                .iter()
                .all(|f| *f == (Confirmed, MicroUsdc(4_500_000))),
            "{finals:?}"
        );
    }

    /// One generated input: a snapshot with a status, a transfer (a few ids, so some repeat;
    /// amounts around the expected 4.5; on time or late), or a settlement.
    #[derive(Clone, Debug)]
    enum Step {
        Snapshot(&'static str),
        Transfer(u8, u32, bool),
        Settled,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            proptest::sample::select(vec![
                "awaiting_payment",
                "confirmed",
                "expired",
                "cancelled",
                "settled",
                "requires_action",
            ])
            .prop_map(Step::Snapshot),
            (0u8..4, 1_000_000u32..8_000_000, any::<bool>())
                .prop_map(|(id, micros, late)| Step::Transfer(id, micros, late)),
            Just(Step::Settled),
        ]
    }

    proptest::proptest! {
        /// Any sequence of inputs, each possibly delivered twice: the status never moves back;
        /// a repeated input changes nothing and tells the terminal nothing; every change of
        /// status is told (except settled after confirmed, which the terminal already shows as
        /// paid), and the terminal is never told the same (status, context) twice in a row; the
        /// amount received is the sum of the distinct transfers.
        #[test]
        fn the_state_machine_only_moves_forward_and_tells_each_change_once(
            steps in proptest::collection::vec((step(), proptest::bool::ANY), 1..24)
        ) {
            let mut r = record(AwaitingPayment);
            let mut told: Option<(IntentStatus, Option<UnresolvedContext>)> = None;
            let mut distinct = std::collections::BTreeMap::new();
            for (step, twice) in steps {
                let snapshot_value;
                let transfer_value;
                let (input, at) = match &step {
                    Step::Snapshot(status) => {
                        snapshot_value = snapshot(status);
                        (Input::Snapshot(&snapshot_value), None)
                    }
                    Step::Transfer(id, micros, late) => {
                        let at = if *late { LATE } else { ON_TIME };
                        let amount = format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000);
                        transfer_value = tx(&format!("txn_{id}"), &amount, at);
                        distinct.entry(*id).or_insert(u64::from(*micros));
                        (Input::Transfer(&transfer_value), Some(at))
                    }
                    Step::Settled => (Input::Settled, None),
                };
                let before = r.clone();
                let effect = apply(&mut r, input, at);
                proptest::prop_assert_eq!(effect.from, before.status);
                proptest::prop_assert_eq!(effect.to, r.status);
                proptest::prop_assert!(r.status.rank() >= before.status.rank(), "{:?} -> {:?}", before.status, r.status);
                if effect.from != effect.to && !(effect.from == Confirmed && effect.to == Settled) {
                    proptest::prop_assert!(effect.notify, "{:?} -> {:?} untold", effect.from, effect.to);
                }
                if effect.notify {
                    let now = (r.status, (r.status == Unresolved).then(|| r.primary_context()).flatten());
                    proptest::prop_assert_ne!(Some(now), told, "told twice");
                    told = Some(now);
                }
                if twice {
                    let once = r.clone();
                    let again = apply(&mut r, input, at);
                    proptest::prop_assert!(!again.notify, "a repeated {:?} told again", step);
                    proptest::prop_assert_eq!(&r, &once);
                }
            }
            let sum: u64 = distinct.values().sum();
            proptest::prop_assert_eq!(r.received_micros, MicroUsdc(sum));
        }
    }
}
