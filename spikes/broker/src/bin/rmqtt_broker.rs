//! rmqtt 0.24 embedded on our own tokio runtime, mutual TLS, tenant ACL in hooks,
//! revocation by certificate (CN / serial), kick, in-process retained QoS 1 publish.
//!
//! `rmqtt-broker --certs DIR [--addr 127.0.0.1:0] [--control 127.0.0.1:0]`
//! prints `LISTEN <addr>` and `CONTROL <addr>` on stdout once bound.
//!
//! Control port: one line per command, one line answer:
//!   stats | kick <client_id> | revoke-cn <cn> | revoke-serial <hex> | publish <topic> <payload> | clear <topic>

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use clap::Parser;
use rmqtt::codec::types::Publish as CodecPublish;
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use rmqtt::session::Session;
use rmqtt::types::{
    AuthResult, ClientId, ConnectInfo, From, Id, Publish, PublishAclResult, QoS, SubscribeAclResult,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::RwLock;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    certs: PathBuf,
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:0")]
    control: SocketAddr,
    /// TLS handshake + CONNECT timeout (rmqtt default is 30 s).
    #[arg(long, default_value_t = 10)]
    handshake_timeout: u64,
    /// Disable rmqtt's CPU-load "busy" check (refuses CONNECT with ServiceUnavailable when busy).
    #[arg(long)]
    no_busy_check: bool,
    #[arg(long, default_value_t = 1000)]
    max_handshaking: usize,
    /// listener message_expiry_interval in seconds (rmqtt default 300; 0 is tested on purpose)
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    message_expiry_secs: u64,
    /// experiment: do NOT check the last-will topic in the auth hook (shows wills skip the publish ACL)
    #[arg(long)]
    no_will_check: bool,
}

#[derive(Default)]
struct Stats {
    connected: AtomicU64,
    disconnected: AtomicU64,
    auth_ok: AtomicU64,
    auth_refused: AtomicU64,
    sub_denied: AtomicU64,
    pub_denied: AtomicU64,
    client_publishes: AtomicU64,
    acked: AtomicU64,
}

struct State {
    will_check: bool,
    revoked_cn: RwLock<HashSet<String>>,
    revoked_serial: RwLock<HashSet<String>>,
    stats: Stats,
}

fn cert_of(ci: &ConnectInfo) -> Option<&rmqtt::codec::cert::CertInfo> {
    match ci {
        ConnectInfo::V3(_, c) => c.cert.as_ref(),
        ConnectInfo::V5(_, c) => c.cert.as_ref(),
    }
}

fn will_topic(ci: &ConnectInfo) -> Option<String> {
    match ci {
        ConnectInfo::V3(_, c) => c.last_will.as_ref().map(|w| w.topic.to_string()),
        ConnectInfo::V5(_, c) => c.last_will.as_ref().map(|w| w.topic.to_string()),
    }
}

fn tenant_ok(t: &str) -> bool {
    !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric())
}

/// Tenant (certificate Subject O) of a connected session.
async fn session_tenant(s: &Session) -> Option<String> {
    let ci = s.connect_info().await.ok()?;
    cert_of(&ci)?.organization.clone().filter(|t| tenant_ok(t))
}

fn prefix(t: &str) -> String {
    format!("/tenants/{t}/")
}

struct Hooks {
    st: Arc<State>,
}

#[async_trait]
impl Handler for Hooks {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        let st = &self.st;
        match param {
            Parameter::ClientAuthenticate(ci) => {
                let refuse = |why: String| {
                    log::warn!("auth refused {:?}: {why}", ci.client_id());
                    st.stats.auth_refused.fetch_add(1, Ordering::Relaxed);
                    (
                        false,
                        Some(HookResult::AuthResult(AuthResult::NotAuthorized)),
                    )
                };
                let Some(cert) = cert_of(ci) else {
                    return refuse("no certificate info".into());
                };
                let (Some(cn), Some(org)) =
                    (cert.common_name.as_deref(), cert.organization.as_deref())
                else {
                    return refuse("certificate lacks CN or O".into());
                };
                if !tenant_ok(org) {
                    return refuse(format!("tenant {org:?} not alphanumeric"));
                }
                if AsRef::<str>::as_ref(ci.client_id()) != cn {
                    return refuse(format!("client id != certificate CN {cn}"));
                }
                if st.revoked_cn.read().await.contains(cn) {
                    return refuse(format!("CN {cn} revoked"));
                }
                if let Some(serial) = &cert.serial
                    && st.revoked_serial.read().await.contains(serial)
                {
                    return refuse(format!("serial {serial} revoked"));
                }
                if let Some(w) = will_topic(ci).filter(|_| st.will_check)
                    && !w.starts_with(&prefix(org))
                {
                    return refuse(format!("last will topic {w} outside tenant {org}"));
                }
                st.stats.auth_ok.fetch_add(1, Ordering::Relaxed);
                (
                    false,
                    Some(HookResult::AuthResult(AuthResult::Allow(false, None))),
                )
            }
            Parameter::ClientSubscribeCheckAcl(s, sub) => {
                let ok = match session_tenant(s).await {
                    Some(t) => sub.topic_filter.starts_with(&prefix(&t)),
                    None => false,
                };
                if ok {
                    (true, acc)
                } else {
                    st.stats.sub_denied.fetch_add(1, Ordering::Relaxed);
                    log::warn!("subscribe denied {:?} {}", s.id.client_id, sub.topic_filter);
                    (
                        false,
                        Some(HookResult::SubscribeAclResult(
                            SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized),
                        )),
                    )
                }
            }
            Parameter::MessagePublishCheckAcl(s, p) => {
                let ok = match session_tenant(s).await {
                    Some(t) => p.topic.starts_with(&prefix(&t)),
                    None => false,
                };
                if ok {
                    (true, acc)
                } else {
                    st.stats.pub_denied.fetch_add(1, Ordering::Relaxed);
                    log::warn!("publish denied {:?} {}", s.id.client_id, p.topic);
                    (
                        false,
                        Some(HookResult::PublishAclResult(PublishAclResult::rejected(
                            true, None,
                        ))),
                    )
                }
            }
            // Runs BEFORE MessagePublishCheckAcl (rmqtt session.rs `_publish`), and for last wills:
            // the daemon must check the tenant itself here.
            Parameter::MessagePublish(Some(s), from, p)
                if from.is_custom() || matches!(from.typ(), rmqtt::types::FromType::LastWill) =>
            {
                let own =
                    matches!(session_tenant(s).await, Some(t) if p.topic.starts_with(&prefix(&t)));
                if own {
                    st.stats.client_publishes.fetch_add(1, Ordering::Relaxed);
                    log::info!(
                        "client publish {:?} {} {} bytes",
                        s.id.client_id,
                        p.topic,
                        p.payload.len()
                    );
                } else {
                    log::warn!(
                        "client publish hook saw foreign topic {:?} {} (ignored)",
                        s.id.client_id,
                        p.topic
                    );
                }
                (true, acc)
            }
            Parameter::MessageAcked(s, _from, p) => {
                st.stats.acked.fetch_add(1, Ordering::Relaxed);
                log::info!("acked by {:?}: {}", s.id.client_id, p.topic);
                (true, acc)
            }
            Parameter::ClientConnected(_s) => {
                st.stats.connected.fetch_add(1, Ordering::Relaxed);
                (true, acc)
            }
            Parameter::ClientDisconnected(_s, _r) => {
                st.stats.disconnected.fetch_add(1, Ordering::Relaxed);
                (true, acc)
            }
            _ => (true, acc),
        }
    }
}

async fn kick(scx: &ServerContext, client_id: &str) -> String {
    let mut entry = scx
        .extends
        .shared()
        .await
        .entry(Id::from(scx.node.id(), ClientId::from(client_id)));
    if entry.session().is_none() {
        return "not-found".into();
    }
    match entry.kick(true, true, true).await {
        Ok(_) => "kicked".into(),
        Err(e) => format!("error {e}"),
    }
}

async fn publish_retained(scx: &ServerContext, topic: &str, payload: &str) -> Result<()> {
    let p = CodecPublish {
        dup: false,
        retain: true,
        qos: QoS::AtLeastOnce,
        topic: topic.into(),
        packet_id: None,
        payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
        properties: None,
    };
    let p = Publish::new(
        Box::new(p),
        None,
        None,
        Some(rmqtt::utils::timestamp_millis()),
    );
    let from = From::from_system(Id::from(scx.node.id(), ClientId::from("posgate")));
    // storage off, retained message without expiry
    rmqtt::session::SessionState::forwards(scx, from, p, false, None).await
}

async fn control(scx: ServerContext, st: Arc<State>, l: tokio::net::TcpListener) {
    loop {
        let Ok((sock, _)) = l.accept().await else {
            continue;
        };
        let scx = scx.clone();
        let st = st.clone();
        tokio::spawn(async move {
            let (r, mut w) = sock.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut it = line.splitn(3, ' ');
                let cmd = it.next().unwrap_or("");
                let a = it.next().unwrap_or("").to_string();
                let b = it.next().unwrap_or("").to_string();
                let out = match cmd {
                    "stats" => {
                        let s = &st.stats;
                        format!(
                            "connected={} disconnected={} auth_ok={} auth_refused={} sub_denied={} pub_denied={} client_publishes={} acked={} handshakings={} connections={} sessions={}",
                            s.connected.load(Ordering::Relaxed),
                            s.disconnected.load(Ordering::Relaxed),
                            s.auth_ok.load(Ordering::Relaxed),
                            s.auth_refused.load(Ordering::Relaxed),
                            s.sub_denied.load(Ordering::Relaxed),
                            s.pub_denied.load(Ordering::Relaxed),
                            s.client_publishes.load(Ordering::Relaxed),
                            s.acked.load(Ordering::Relaxed),
                            scx.handshakings.count(),
                            scx.connections.count(),
                            scx.sessions.count(),
                        )
                    }
                    "kick" => kick(&scx, &a).await,
                    "revoke-cn" => {
                        st.revoked_cn.write().await.insert(a.clone());
                        // our auth hook ties client id == CN, so the session to cut is the CN
                        kick(&scx, &a).await
                    }
                    "revoke-serial" => {
                        st.revoked_serial.write().await.insert(a.to_lowercase());
                        "revoked".into()
                    }
                    "publish" => match publish_retained(&scx, &a, &b).await {
                        Ok(()) => "ok".into(),
                        Err(e) => format!("error {e}"),
                    },
                    "clear" => match publish_retained(&scx, &a, "").await {
                        Ok(()) => "ok".into(),
                        Err(e) => format!("error {e}"),
                    },
                    _ => "unknown".into(),
                };
                if w.write_all(format!("{out}\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();

    let scx = ServerContext::new()
        .busy_check_enable(!args.no_busy_check)
        .build()
        .await;
    rmqtt_retainer::register(&scx, true, false).await?;

    let st = Arc::new(State {
        will_check: !args.no_will_check,
        revoked_cn: RwLock::new(HashSet::new()),
        revoked_serial: RwLock::new(HashSet::new()),
        stats: Stats::default(),
    });
    let register = scx.extends.hook_mgr().register();
    for typ in [
        Type::ClientAuthenticate,
        Type::ClientSubscribeCheckAcl,
        Type::MessagePublishCheckAcl,
        Type::MessagePublish,
        Type::MessageAcked,
        Type::ClientConnected,
        Type::ClientDisconnected,
    ] {
        register.add(typ, Box::new(Hooks { st: st.clone() })).await;
    }
    register.start().await;

    let certs = &args.certs;
    let path = |f: &str| Some(certs.join(f).to_string_lossy().into_owned());
    let listener = Builder::new()
        .name("external/tls")
        .laddr(args.addr)
        .backlog(4096)
        .allow_anonymous(false)
        .handshake_timeout(Duration::from_secs(args.handshake_timeout))
        .max_handshaking_limit(args.max_handshaking)
        .tls_cross_certificate(true) // require + verify a client certificate
        .tls_cert(path("server.pem"))
        .tls_key(path("server.key"))
        .tls_client_ca_certs(path("ca.pem"))
        .collect_cert_info(true) // CertInfo{common_name, organization, subject, serial} on Connect.cert
        .max_inflight(std::num::NonZeroU16::new(1).unwrap_or(std::num::NonZeroU16::MIN))
        .max_mqueue_len(1000)
        .session_expiry_interval(Duration::from_secs(7 * 24 * 3600))
        .message_expiry_interval(Duration::from_secs(args.message_expiry_secs))
        .bind()?
        .tls()?;
    let bound = listener.local_addr()?;
    let ctl = tokio::net::TcpListener::bind(args.control).await?;
    println!("LISTEN {bound}");
    println!("CONTROL {}", ctl.local_addr()?);
    println!("PID {}", std::process::id());
    tokio::spawn(control(scx.clone(), st.clone(), ctl));

    MqttServer::new(scx)
        .listener_by_id(listener, 1)
        .build()
        .run()
        .await?;
    Ok(())
}
