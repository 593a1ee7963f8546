//! MQTT topic names: the tenant of a terminal, the topic builders, and the parser.
//!
//! Every topic of a terminal lives under `/tenants/{t}/`, where `{t}` is the terminal's MQTT tenant.
//! The embedded broker's tenant isolation only accepts alphanumeric tenants, while terminal ids such
//! as `pos_01` or `store-12-lane-3` carry `_`, `-` and `.`. So the tenant is derived, not chosen:
//! `"t"` followed by the lowercase hex of the id's UTF-8 bytes ([`tenant_for`]). That is
//! alphanumeric, deterministic and injective (hex is a bijection on byte strings), so two different
//! ids never share a tenant and [`terminal_for`] gives the id back.
//!
//! | builder | topic |
//! |---|---|
//! | [`payments`] | `/tenants/{t}/payments/{intent_id}` (gateway → terminal, retained) |
//! | [`payments_filter`] | `/tenants/{t}/payments/+` (the terminal's subscription) |
//! | [`acks`] | `/tenants/{t}/acks` |
//! | [`status`] | `/tenants/{t}/status` |
//! | [`rpc_req`] · [`rpc_res`] | `/tenants/{t}/rpc/req` · `/tenants/{t}/rpc/res` |
//!
//! Pure string functions: no I/O. The broker's ACL uses [`under_tenant`]; the router uses [`parse`].

use serde::{Deserialize, Serialize};

/// The first level of every terminal topic (after the leading `/`).
pub const ROOT: &str = "tenants";

/// Longest terminal id accepted by [`valid_terminal_id`], in bytes.
pub const MAX_TERMINAL_ID_LEN: usize = 64;

/// The MQTT tenant of a terminal: `"t"` + the lowercase hex of the id's UTF-8 bytes.
///
/// Alphanumeric, deterministic and injective: `pos_01` → `t706f735f3031`. The leading `t` keeps
/// the tenant a name (never all digits) and non-empty.
pub fn tenant_for(terminal_id: &str) -> String {
    let mut tenant = String::with_capacity(1 + 2 * terminal_id.len());
    tenant.push('t');
    tenant.push_str(&hex::encode(terminal_id.as_bytes()));
    tenant
}

/// The terminal id a tenant was derived from: the inverse of [`tenant_for`].
///
/// `None` for anything [`tenant_for`] never produces: a missing `t`, odd-length or uppercase
/// hex, bytes that are not UTF-8.
pub fn terminal_for(tenant: &str) -> Option<String> {
    let hex_part = tenant.strip_prefix('t')?;
    // Only lowercase hex: `hex::decode` also accepts uppercase, which would give a second
    // spelling of the same tenant.
    if !hex_part
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let bytes = hex::decode(hex_part).ok()?;
    String::from_utf8(bytes).ok()
}

/// Whether `id` is an acceptable terminal id: 1–64 characters of `[A-Za-z0-9_.-]`.
pub fn valid_terminal_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_TERMINAL_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Whether `tenant` has the form of a tenant: non-empty ASCII letters and digits.
///
/// This is the broker's rule; [`terminal_for`] is the stricter "did we issue it" check.
pub fn valid_tenant(tenant: &str) -> bool {
    !tenant.is_empty() && tenant.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// `/tenants/{tenant}/payments/{intent_id}`: one retained confirmation per payment intent.
pub fn payments(tenant: &str, intent_id: &str) -> String {
    format!("/{ROOT}/{tenant}/payments/{intent_id}")
}

/// `/tenants/{tenant}/payments/+`: the terminal's subscription filter for its confirmations.
pub fn payments_filter(tenant: &str) -> String {
    format!("/{ROOT}/{tenant}/payments/+")
}

/// `/tenants/{tenant}/acks`: the terminal acknowledges a confirmation here.
pub fn acks(tenant: &str) -> String {
    format!("/{ROOT}/{tenant}/acks")
}

/// `/tenants/{tenant}/status`: `{"state":"online"|"offline"}`, retained, last will `offline`.
pub fn status(tenant: &str) -> String {
    format!("/{ROOT}/{tenant}/status")
}

/// `/tenants/{tenant}/rpc/req`: RPC requests.
pub fn rpc_req(tenant: &str) -> String {
    format!("/{ROOT}/{tenant}/rpc/req")
}

/// `/tenants/{tenant}/rpc/res`: RPC replies.
pub fn rpc_res(tenant: &str) -> String {
    format!("/{ROOT}/{tenant}/rpc/res")
}

/// All topics of one terminal, as the provisioning bundle's `topics` object lists them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TerminalTopics {
    /// The subscription filter for confirmations, `/tenants/{t}/payments/+`.
    pub payments: String,
    /// `/tenants/{t}/acks`.
    pub acks: String,
    /// `/tenants/{t}/status`.
    pub status: String,
    /// `/tenants/{t}/rpc/req`.
    pub rpc_req: String,
    /// `/tenants/{t}/rpc/res`.
    pub rpc_res: String,
}

impl TerminalTopics {
    /// Every topic of `tenant`.
    pub fn new(tenant: &str) -> TerminalTopics {
        TerminalTopics {
            payments: payments_filter(tenant),
            acks: acks(tenant),
            status: status(tenant),
            rpc_req: rpc_req(tenant),
            rpc_res: rpc_res(tenant),
        }
    }
}

/// What a topic under `/tenants/{t}/` carries.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// `payments/{intent_id}`: a signed confirmation (or the empty publish clearing it).
    Payment {
        /// The payment intent the confirmation is about.
        intent_id: String,
    },
    /// `acks`.
    Acks,
    /// `status`.
    Status,
    /// `rpc/req`.
    RpcReq,
    /// `rpc/res`.
    RpcRes,
}

/// Splits a concrete topic into its tenant and kind.
///
/// `None` for anything the builders above never produce: another root, a tenant that is not
/// alphanumeric, an unknown suffix, an empty intent id, or a wildcard (`+`, `#`) anywhere (a
/// filter is not a topic).
pub fn parse(topic: &str) -> Option<(String, TopicKind)> {
    if topic.contains(['+', '#']) {
        return None;
    }
    let rest = topic
        .strip_prefix('/')?
        .strip_prefix(ROOT)?
        .strip_prefix('/')?;
    let (tenant, rest) = rest.split_once('/')?;
    if !valid_tenant(tenant) {
        return None;
    }
    let kind = match rest {
        "acks" => TopicKind::Acks,
        "status" => TopicKind::Status,
        "rpc/req" => TopicKind::RpcReq,
        "rpc/res" => TopicKind::RpcRes,
        _ => {
            let intent_id = rest.strip_prefix("payments/")?;
            if intent_id.is_empty() || intent_id.contains('/') {
                return None;
            }
            TopicKind::Payment {
                intent_id: intent_id.to_owned(),
            }
        }
    };
    Some((tenant.to_owned(), kind))
}

/// The topic of `kind` for `tenant`: the inverse of [`parse`].
pub fn build(tenant: &str, kind: &TopicKind) -> String {
    match kind {
        TopicKind::Payment { intent_id } => payments(tenant, intent_id),
        TopicKind::Acks => acks(tenant),
        TopicKind::Status => status(tenant),
        TopicKind::RpcReq => rpc_req(tenant),
        TopicKind::RpcRes => rpc_res(tenant),
    }
}

/// Whether a topic or subscription filter stays inside `tenant`'s subtree.
///
/// True only when it starts with exactly `/tenants/{tenant}/` and `tenant` is a valid (alphanumeric)
/// tenant, so no wildcard can stand in the tenant's place: `#`, `/tenants/+/…` and `/tenants/#` are
/// false for everyone. Wildcards after the tenant (`/tenants/{t}/payments/+`, `/tenants/{t}/#`) stay
/// inside the subtree and are allowed; which of those a terminal may use is the ACL's business.
pub fn under_tenant(topic_or_filter: &str, tenant: &str) -> bool {
    if !valid_tenant(tenant) {
        return false;
    }
    topic_or_filter
        .strip_prefix('/')
        .and_then(|s| s.strip_prefix(ROOT))
        .and_then(|s| s.strip_prefix('/'))
        .and_then(|s| s.strip_prefix(tenant))
        .is_some_and(|s| s.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn tenant_example_and_form() {
        assert_eq!(tenant_for("pos_01"), "t706f735f3031");
        for id in ["pos_01", "store-12-lane-3", "a.b", "Z", "ünïcode", ""] {
            let t = tenant_for(id);
            assert!(valid_tenant(&t), "{t}");
            assert_eq!(t, tenant_for(id), "deterministic");
        }
    }

    #[test]
    fn tenant_is_injective_on_tricky_ids() {
        // Ids that any lossy mapping (dropping or replacing non-alphanumerics, case folding,
        // truncation) would merge.
        let ids = [
            "pos_01", "pos-01", "pos.01", "pos01", "POS01", "Pos01", "pos__01", "pos_0_1",
            "p_os01", "t", "t0", "00", "0", "a-b_c", "a_b-c", "ab-c", "a-bc", "x", "X", "-", "_",
            ".", "..",
        ];
        let mut seen = HashSet::new();
        for id in ids {
            assert!(seen.insert(tenant_for(id)), "collision for {id}");
        }
        // A long id is not truncated.
        let long_a = "a".repeat(64);
        let mut long_b = "a".repeat(63);
        long_b.push('b');
        assert_ne!(tenant_for(&long_a), tenant_for(&long_b));
    }

    #[test]
    fn terminal_for_inverts_tenant_for() {
        for id in ["pos_01", "store-12-lane-3", "ünïcode", "x"] {
            assert_eq!(terminal_for(&tenant_for(id)).as_deref(), Some(id));
        }
        assert_eq!(terminal_for("706f73"), None, "no leading t");
        assert_eq!(terminal_for("t706F73"), None, "uppercase hex");
        assert_eq!(terminal_for("t706"), None, "odd length");
        assert_eq!(terminal_for("tzz"), None, "not hex");
        assert_eq!(terminal_for("tff"), None, "not UTF-8");
    }

    #[test]
    fn terminal_id_rules() {
        for ok in ["pos_01", "store-12-lane-3", "a", "A.b-c_9", &"x".repeat(64)] {
            assert!(valid_terminal_id(ok), "{ok}");
        }
        for bad in [
            "",
            &"x".repeat(65),
            "pos 01",
            "pos/01",
            "pos+",
            "pos#",
            "pös",
            "a:b",
        ] {
            assert!(!valid_terminal_id(bad), "{bad}");
        }
    }

    #[test]
    fn builders() {
        let t = tenant_for("pos_01");
        assert_eq!(payments(&t, "pi_1"), "/tenants/t706f735f3031/payments/pi_1");
        assert_eq!(payments_filter(&t), "/tenants/t706f735f3031/payments/+");
        assert_eq!(acks(&t), "/tenants/t706f735f3031/acks");
        assert_eq!(status(&t), "/tenants/t706f735f3031/status");
        assert_eq!(rpc_req(&t), "/tenants/t706f735f3031/rpc/req");
        assert_eq!(rpc_res(&t), "/tenants/t706f735f3031/rpc/res");
        let topics = TerminalTopics::new(&t);
        assert_eq!(topics.payments, payments_filter(&t));
        let json = serde_json::to_value(&topics).unwrap();
        for key in ["payments", "acks", "status", "rpc_req", "rpc_res"] {
            assert!(json.get(key).is_some(), "{key}");
        }
    }

    #[test]
    fn parse_inverts_build() {
        let t = tenant_for("store-12-lane-3");
        let kinds = [
            TopicKind::Payment {
                intent_id: "pi_8Zx3RqV1mN6p".into(),
            },
            TopicKind::Acks,
            TopicKind::Status,
            TopicKind::RpcReq,
            TopicKind::RpcRes,
        ];
        for kind in kinds {
            let topic = build(&t, &kind);
            assert_eq!(parse(&topic), Some((t.clone(), kind)), "{topic}");
        }
    }

    #[test]
    fn parse_rejects_foreign_topics() {
        for bad in [
            "",
            "/",
            "tenants/t1/acks",
            "/tenant/t1/acks",
            "/tenants//acks",
            "/tenants/t_1/acks",
            "/tenants/+/acks",
            "/tenants/t1/+",
            "/tenants/t1/#",
            "/tenants/t1/payments/+",
            "/tenants/t1/payments/",
            "/tenants/t1/payments/pi/x",
            "/tenants/t1/acks/",
            "/tenants/t1/rpc",
            "/tenants/t1/rpc/other",
            "/tenants/t1",
            "/tenants/t1/",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn under_tenant_acl() {
        let t = tenant_for("pos_01");
        assert!(under_tenant(&payments(&t, "pi_1"), &t));
        assert!(under_tenant(&payments_filter(&t), &t));
        assert!(under_tenant(&acks(&t), &t));
        assert!(under_tenant(&format!("/tenants/{t}/#"), &t));

        let other = tenant_for("pos_011");
        assert!(!under_tenant(&acks(&other), &t), "prefix of another tenant");
        assert!(!under_tenant(&acks(&t), &other));
        for bad in [
            "#".to_owned(),
            "+".to_owned(),
            "/#".to_owned(),
            "/tenants/#".to_owned(),
            "/tenants/+/acks".to_owned(),
            "/tenants/+/#".to_owned(),
            format!("/tenants/{t}"),
            format!("tenants/{t}/acks"),
            format!("/tenants/{t}x/acks"),
            format!("//tenants/{t}/acks"),
        ] {
            assert!(!under_tenant(&bad, &t), "{bad}");
        }
        // A wildcard or empty "tenant" never owns anything.
        for tenant in ["+", "#", "", "t_1", "t/1"] {
            assert!(!under_tenant("/tenants/+/acks", tenant), "{tenant}");
            assert!(
                !under_tenant(&format!("/tenants/{tenant}/acks"), tenant),
                "{tenant}"
            );
        }
    }
}
