//! rmqtt's hooks: the checks at CONNECT (certificate identity, tenant, revocation, suspension,
//! last will), SUBSCRIBE and PUBLISH (the ACL of `posgate_proto::acl`), and the terminals' own publishes and
//! connection changes turned into [`BrokerEvent`]s for the delivery engine.

use std::sync::Arc;

use async_trait::async_trait;
use posgate_proto::topics::{self, TopicKind};
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType};
use rmqtt::session::Session;
use rmqtt::types::{AuthResult, ConnectInfo, FromType, PublishAclResult, SubscribeAclResult};
use tokio::sync::mpsc;

use super::front::Front;
use super::{
    CONNECT_REFUSED_LOG, PLAIN_LISTENER, PUBLISH_REFUSED_LOG, RPC_DROPPED_LOG, Revoked,
    SUBSCRIBE_REFUSED_LOG, Seen, TLS_LISTENER, WSS_LISTENER, may_publish, may_subscribe,
};
use crate::delivery::BrokerEvent;
use crate::pki::CertIdentity;

pub(super) struct Hooks {
    pub(super) revoked: Arc<Revoked>,
    /// Who came through the front door, by the internal connection's port.
    pub(super) front: Arc<Front>,
    pub(super) front_door: bool,
    pub(super) events: mpsc::UnboundedSender<BrokerEvent>,
    pub(super) seen: Seen,
    pub(super) plain_allowed: bool,
    /// `posgate_mqtt_refused_total{reason}`.
    pub(super) refused: prometheus::IntCounterVec,
}

pub(super) fn cert_of(ci: &ConnectInfo) -> Option<&rmqtt::codec::cert::CertInfo> {
    match ci {
        ConnectInfo::V3(_, c) => c.cert.as_ref(),
        ConnectInfo::V5(_, c) => c.cert.as_ref(),
    }
}

/// rmqtt wants an owned handler per hook type.
pub(super) struct HookRef(pub(super) Arc<Hooks>);

pub(super) fn will_topic(ci: &ConnectInfo) -> Option<String> {
    match ci {
        ConnectInfo::V3(_, c) => c.last_will.as_ref().map(|w| w.topic.to_string()),
        ConnectInfo::V5(_, c) => c.last_will.as_ref().map(|w| w.topic.to_string()),
    }
}

/// The terminal id of a session: its client id, which authentication tied to the certificate's CN.
pub(super) fn terminal_of(s: &Session) -> String {
    s.id.client_id.to_string()
}

impl Hooks {
    /// `Err((reason, detail))`: `reason` is the metric label (`identity`, `no_certificate`,
    /// `revoked`, `last_will`), `detail` the log's.
    fn authenticate(&self, ci: &ConnectInfo) -> Result<(), (&'static str, String)> {
        let client_id = ci.client_id().to_string();
        let id = ci.id();
        let cert = match id.lid {
            TLS_LISTENER | WSS_LISTENER if self.front_door => Some(
                id.remote_addr
                    .and_then(|addr| self.front.identity(addr.port()))
                    // A local process dialling the loopback listener behind the front door.
                    .ok_or(("no_certificate", "not through the front door".to_owned()))?,
            ),
            TLS_LISTENER | WSS_LISTENER => {
                let cert =
                    cert_of(ci).ok_or(("no_certificate", "no client certificate".to_owned()))?;
                Some(CertIdentity {
                    cn: cert
                        .common_name
                        .clone()
                        .ok_or(("identity", "certificate has no CN".to_owned()))?,
                    o: cert.organization.clone().unwrap_or_default(),
                    serial_hex: cert.serial.clone().unwrap_or_default(),
                    not_after: time::OffsetDateTime::UNIX_EPOCH,
                })
            }
            PLAIN_LISTENER if self.plain_allowed => None,
            _ => return Err(("no_certificate", "no client certificate".into())),
        };
        let serial = cert.as_ref().map(|c| c.serial_hex.as_str());
        if let Some(cert) = &cert {
            if cert.cn != client_id {
                return Err((
                    "identity",
                    format!(
                        "client id {client_id:?} is not the certificate's CN {:?}",
                        cert.cn
                    ),
                ));
            }
            if cert.o != topics::tenant_for(&cert.cn) {
                return Err((
                    "identity",
                    format!(
                        "certificate O {:?} is not the tenant of {:?}",
                        cert.o, cert.cn
                    ),
                ));
            }
        }
        if !topics::valid_terminal_id(&client_id) {
            return Err(("identity", format!("{client_id:?} is not a terminal id")));
        }
        if self.revoked.contains(&client_id, serial) {
            return Err(("revoked", format!("terminal {client_id:?} is revoked")));
        }
        if self.revoked.suspended.contains(&client_id) {
            return Err((
                "suspended",
                format!("terminal {client_id:?} is suspended for flooding RPC"),
            ));
        }
        if let Some(will) = will_topic(ci)
            && will != topics::status(&topics::tenant_for(&client_id))
        {
            return Err((
                "last_will",
                format!("last will topic {will:?} is not the terminal's own status topic"),
            ));
        }
        if let Some(serial) = serial {
            (self.seen)(&client_id, serial);
        }
        Ok(())
    }
}

#[async_trait]
impl Handler for HookRef {
    #[allow(elided_lifetimes_in_paths)] // the trait's own signature
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        let hooks = &self.0;
        match param {
            Parameter::ClientAuthenticate(ci) => match hooks.authenticate(ci) {
                Ok(()) => {
                    if let Some(addr) = ci.id().remote_addr
                        && ci.id().lid != PLAIN_LISTENER
                    {
                        hooks.front.connected(addr.port());
                    }
                    (
                        false,
                        Some(HookResult::AuthResult(AuthResult::Allow(false, None))),
                    )
                }
                Err((reason, why)) => {
                    hooks.refused.with_label_values(&[reason]).inc();
                    if let Some(left_out) = CONNECT_REFUSED_LOG.allow() {
                        tracing::warn!(client_id = %ci.client_id(), remote = ?ci.id().remote_addr, reason = %why, left_out, "MQTT connect refused (at most one line a second)");
                    }
                    (
                        false,
                        Some(HookResult::AuthResult(AuthResult::NotAuthorized)),
                    )
                }
            },
            Parameter::ClientSubscribeCheckAcl(s, sub) => {
                let terminal_id = terminal_of(s);
                if may_subscribe(&terminal_id, &sub.topic_filter) {
                    (true, acc)
                } else {
                    if let Some(left_out) = SUBSCRIBE_REFUSED_LOG.allow() {
                        tracing::warn!(%terminal_id, filter = %sub.topic_filter, left_out, "subscribe refused (at most one line a second)");
                    }
                    let refused =
                        SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized);
                    (false, Some(HookResult::SubscribeAclResult(refused)))
                }
            }
            Parameter::MessagePublishCheckAcl(s, p) => {
                let terminal_id = terminal_of(s);
                if may_publish(&terminal_id, &p.topic).is_some() {
                    (true, acc)
                } else {
                    if let Some(left_out) = PUBLISH_REFUSED_LOG.allow() {
                        tracing::warn!(%terminal_id, topic = %p.topic, left_out, "publish refused; disconnecting (at most one line a second)");
                    }
                    (
                        false,
                        Some(HookResult::PublishAclResult(PublishAclResult::rejected(
                            true, None,
                        ))),
                    )
                }
            }
            // Runs before the publish ACL (and for last wills): forward only what the ACL allows.
            Parameter::MessagePublish(Some(s), from, p)
                if from.is_custom() || matches!(from.typ(), FromType::LastWill) =>
            {
                let terminal_id = terminal_of(s);
                if let Some(kind) = may_publish(&terminal_id, &p.topic) {
                    // Suspended for flooding RPC: it is cut off in a moment (`SUSPEND_GRACE`);
                    // until then its requests are dropped unanswered, as in external mode.
                    if kind == TopicKind::RpcReq && hooks.revoked.suspended.contains(&terminal_id) {
                        if let Some(skipped) = RPC_DROPPED_LOG.allow() {
                            tracing::info!(%terminal_id, skipped, "RPC request of a suspended terminal dropped (at most one line a second)");
                        }
                        return (true, acc);
                    }
                    drop(hooks.events.send(BrokerEvent::Message {
                        terminal_id,
                        kind,
                        payload: p.payload.clone(),
                    }));
                }
                (true, acc)
            }
            Parameter::ClientConnected(s) => {
                drop(hooks.events.send(BrokerEvent::Connected {
                    terminal_id: terminal_of(s),
                }));
                (true, acc)
            }
            Parameter::ClientDisconnected(s, _reason) => {
                drop(hooks.events.send(BrokerEvent::Disconnected {
                    terminal_id: terminal_of(s),
                }));
                (true, acc)
            }
            _ => (true, acc),
        }
    }
}
