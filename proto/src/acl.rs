//! The topic ACL: what one terminal may subscribe to and publish, as pure functions of its id and
//! the topic. The embedded broker's hooks apply them; the fuzz target `rpc_request` and the
//! property test below check that they never cross tenants.

use crate::topics::{self, TopicKind};

/// May this terminal subscribe to `filter`? Only its confirmations and its RPC replies.
pub fn may_subscribe(terminal_id: &str, filter: &str) -> bool {
    let tenant = topics::tenant_for(terminal_id);
    if filter == topics::payments_filter(&tenant) {
        return true;
    }
    matches!(topics::parse(filter), Some((t, TopicKind::Payment { ref intent_id }))
        if t == tenant && !intent_id.contains(['+', '#']))
        || matches!(topics::parse(filter), Some((t, TopicKind::RpcRes)) if t == tenant)
}

/// May this terminal publish to `topic`? Only its acks, status and RPC requests.
pub fn may_publish(terminal_id: &str, topic: &str) -> Option<TopicKind> {
    let tenant = topics::tenant_for(terminal_id);
    match topics::parse(topic) {
        Some((t, kind @ (TopicKind::Acks | TopicKind::Status | TopicKind::RpcReq)))
            if t == tenant =>
        {
            Some(kind)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_allows_only_own_topics() {
        let a = topics::tenant_for("pos_a");
        let b = topics::tenant_for("pos_b");
        assert!(may_subscribe("pos_a", &topics::payments_filter(&a)));
        assert!(may_subscribe("pos_a", &topics::payments(&a, "pi_1")));
        assert!(may_subscribe("pos_a", &topics::rpc_res(&a)));
        for filter in [
            topics::payments_filter(&b),
            topics::payments(&b, "pi_1"),
            "#".to_owned(),
            "/tenants/#".to_owned(),
            "/tenants/+/payments/+".to_owned(),
            format!("/tenants/{a}/#"),
            format!("/tenants/{a}/payments/#"),
            topics::acks(&a),
            topics::status(&a),
            "$SYS/#".to_owned(),
        ] {
            assert!(!may_subscribe("pos_a", &filter), "{filter}");
        }
        assert_eq!(
            may_publish("pos_a", &topics::acks(&a)),
            Some(TopicKind::Acks)
        );
        assert_eq!(
            may_publish("pos_a", &topics::status(&a)),
            Some(TopicKind::Status)
        );
        assert_eq!(
            may_publish("pos_a", &topics::rpc_req(&a)),
            Some(TopicKind::RpcReq)
        );
        for topic in [
            topics::acks(&b),
            topics::payments(&a, "pi_1"),
            topics::payments(&b, "pi_1"),
            topics::rpc_res(&a),
            "x".into(),
        ] {
            assert_eq!(may_publish("pos_a", &topic), None, "{topic}");
        }
    }

    proptest::proptest! {
        /// Whatever a terminal asks for, it may subscribe only to its own payments and RPC
        /// answers, and publish only to its own acks, status and RPC requests: wildcards, other
        /// tenants and odd shapes never get through.
        #[test]
        fn the_acl_never_crosses_tenants(
            own in "[a-z0-9_.-]{1,12}",
            other in "[a-z0-9_.-]{1,12}",
            lead in proptest::sample::select(vec!["/tenants/", "tenants/", "/tenants//", "/", ""]),
            tenant in 0..5usize,
            tail in proptest::sample::select(vec![
                "payments/+", "payments/#", "payments/pi_1", "payments/+/x", "payments/pi+",
                "payments", "rpc/res", "rpc/req", "rpc/#", "acks", "status", "#", "+", "",
            ]),
            noise in "[a-z0-9_+#/]{0,6}",
        ) {
            proptest::prop_assume!(own != other);
            let (mine, theirs) = (topics::tenant_for(&own), topics::tenant_for(&other));
            let tenant = [mine.as_str(), theirs.as_str(), "+", "#", noise.as_str()][tenant];
            let topic = format!("{lead}{tenant}/{tail}");
            let own_prefix = format!("/tenants/{mine}/");
            if may_subscribe(&own, &topic) {
                let rest = topic.strip_prefix(&own_prefix);
                proptest::prop_assert!(
                    matches!(rest, Some("payments/+" | "payments/pi_1" | "rpc/res")),
                    "{}", topic
                );
            }
            if let Some(kind) = may_publish(&own, &topic) {
                let expected = match kind {
                    TopicKind::Acks => topics::acks(&mine),
                    TopicKind::Status => topics::status(&mine),
                    TopicKind::RpcReq => topics::rpc_req(&mine),
                    _ => String::new(),
                };
                proptest::prop_assert_eq!(&topic, &expected);
            }
            // The generator does reach the allowed shapes: the own tenant's canonical topics.
            if lead == "/tenants/" && tenant == mine {
                proptest::prop_assert_eq!(
                    may_subscribe(&own, &topic),
                    matches!(tail, "payments/+" | "payments/pi_1" | "rpc/res")
                );
                proptest::prop_assert_eq!(
                    may_publish(&own, &topic).is_some(),
                    matches!(tail, "acks" | "status" | "rpc/req")
                );
            }
        }
    }
}
