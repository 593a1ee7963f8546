//! Terminal RPC requests and the MQTT topic/tenant helpers (proto/src/topics.rs).
//!
//! Input: `json\ntopic\nstring` (missing parts are empty); all of it is also tried as a request.
//! `string` is used as a terminal id, a tenant and a topic filter.
//!
//! Properties: nothing panics, and the documented inverses hold:
//! - `parse(topic) == Some((t, k))` implies `build(&t, &k) == topic`, `valid_tenant(&t)` and
//!   `under_tenant(topic, &t)`;
//! - `tenant_for` is always a valid tenant and `terminal_for(tenant_for(id)) == Some(id)`;
//! - `terminal_for(t) == Some(id)` implies `tenant_for(&id) == t` (one spelling per tenant);
//! - `under_tenant(x, t)` implies `valid_tenant(t)` and `x` starts with `/tenants/{t}/`;
//! - a request that parses serialises and parses back to itself;
//! - the ACL (`acl.rs`) never crosses tenants: a terminal may subscribe only to its own payments
//!   (the filter, or one intent without wildcards) and RPC answers, and publish only to exactly
//!   its own acks, status and RPC request topics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use posgate_proto::acl;
use posgate_proto::rpc::{CreateIntent, IntentRef, Request, Response};
use posgate_proto::topics::{self, TerminalTopics};

fuzz_target!(|data: &[u8]| {
    request(data);
    let mut parts = data.splitn(3, |&b| b == b'\n');
    let json = parts.next().unwrap_or_default();
    let topic = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let string = String::from_utf8_lossy(parts.next().unwrap_or_default());
    request(json);
    topic_helpers(&topic, &string);
    topic_helpers(&string, &topic);
    acl_rules(&string, &topic);
    acl_rules(&topic, &string);
});

fn acl_rules(terminal_id: &str, topic: &str) {
    let tenant = topics::tenant_for(terminal_id);
    if acl::may_subscribe(terminal_id, topic) {
        let own = topic == topics::payments_filter(&tenant)
            || topic == topics::rpc_res(&tenant)
            || matches!(topics::parse(topic), Some((t, topics::TopicKind::Payment { intent_id }))
                if t == tenant && !intent_id.contains(['+', '#']));
        assert!(own, "{terminal_id:?} may subscribe to {topic:?}");
        assert!(topics::under_tenant(topic, &tenant));
    }
    if let Some(kind) = acl::may_publish(terminal_id, topic) {
        assert_eq!(topics::build(&tenant, &kind), topic, "{terminal_id:?}");
        assert!(matches!(
            kind,
            topics::TopicKind::Acks | topics::TopicKind::Status | topics::TopicKind::RpcReq
        ));
    }
    // The own topics are allowed.
    assert!(acl::may_subscribe(terminal_id, &topics::payments_filter(&tenant)));
    assert!(acl::may_subscribe(terminal_id, &topics::rpc_res(&tenant)));
    assert!(acl::may_publish(terminal_id, &topics::acks(&tenant)).is_some());
}

fn request(bytes: &[u8]) {
    let Ok(req) = serde_json::from_slice::<Request>(bytes) else {
        return;
    };
    let again = serde_json::to_vec(&req).map(|v| serde_json::from_slice::<Request>(&v));
    assert!(
        matches!(&again, Ok(Ok(r)) if *r == req),
        "request does not round-trip"
    );
    let _ = serde_json::from_value::<CreateIntent>(req.params.clone());
    let _ = serde_json::from_value::<IntentRef>(req.params.clone());
    let _ = serde_json::to_vec(&Response::err(&req.id, "bad_request", req.method.clone()));
    let _ = serde_json::from_slice::<Response>(bytes);
}

fn topic_helpers(topic: &str, string: &str) {
    if let Some((tenant, kind)) = topics::parse(topic) {
        assert!(topics::valid_tenant(&tenant));
        assert_eq!(
            topics::build(&tenant, &kind),
            topic,
            "parse does not invert build"
        );
        assert!(topics::under_tenant(topic, &tenant));
    }

    let tenant = topics::tenant_for(string);
    assert!(topics::valid_tenant(&tenant));
    assert_eq!(topics::terminal_for(&tenant).as_deref(), Some(string));
    if let Some(id) = topics::terminal_for(string) {
        assert_eq!(
            topics::tenant_for(&id),
            string,
            "two spellings of one tenant"
        );
    }
    let _ = topics::valid_terminal_id(string);

    for t in [string, tenant.as_str()] {
        if topics::under_tenant(topic, t) {
            assert!(topics::valid_tenant(t));
            assert!(topic.starts_with(&format!("/tenants/{t}/")));
        }
    }
    let all = TerminalTopics::new(&tenant);
    for built in [
        &all.payments,
        &all.acks,
        &all.status,
        &all.rpc_req,
        &all.rpc_res,
    ] {
        assert!(topics::under_tenant(built, &tenant));
    }
    for kind in [
        topics::TopicKind::Acks,
        topics::TopicKind::Status,
        topics::TopicKind::RpcReq,
    ] {
        let built = topics::build(&tenant, &kind);
        assert_eq!(topics::parse(&built), Some((tenant.clone(), kind)));
    }
    // A payments topic with a fuzzed intent id: parses back exactly when the id is one level.
    let built = topics::payments(&tenant, topic);
    let parsed = topics::parse(&built);
    let plain = !topic.is_empty() && !topic.contains(['/', '+', '#']);
    assert_eq!(parsed.is_some(), plain, "{built:?}");
}
