//! NATS (its MQTT gateway, sessions and retained messages in JetStream) as the external broker:
//! its configuration (`posgate broker-config nats`) and the authorization include file that
//! [`super::external::Files`] keeps up to date.
//!
//! How NATS tells terminals apart: `mqtt { tls { verify_and_map: true } }` makes the client
//! certificate a user name: NATS looks up, in this order, its email SANs, DNS SANs and URI SANs,
//! then its subject (as a distinguished name, in any attribute order, all attributes compared).
//! Every terminal certificate posgate issues names its own serial twice, as the URI
//! `urn:posgate:cert:{serial}` ([`cert_uri`]) and as the subject's serialNumber, so posgate
//! writes one user per live certificate, named by that URI: a terminal's current certificate and,
//! while a renewal is pending, the one it replaces. Each has publish and subscribe permissions on
//! its own tenant's subjects only (the MQTT topic `/tenants/t…/acks` is the NATS subject
//! `/.tenants.t….acks`). A certificate with no user is refused at CONNECT: a revoked terminal's,
//! a replaced one once its renewal completes, any revoked serial. The serialNumber keeps a
//! retired certificate from matching by subject instead: its subject is no user's. A certificate
//! issued before posgate named serials ([`TerminalRecord::cert_names_serial`] false) is matched by
//! its subject `O=<tenant>,CN=<terminal id>`, listed only while such a certificate is live.
//!
//! What NATS does not do (see docs/decisions/0005-past-one-server.md): it reads no CRL (hence a
//! user per certificate); it speaks MQTT 3.1.1 only, and delivers nothing to `$share/…`
//! subscriptions (posgate subscribes plainly); it does not tie the MQTT client id to the
//! certificate. Any terminal may connect under another's client id (its terminal id). What that
//! gives, tested from the attacker's side: NATS hands it the other terminal's session (sessions
//! are per account, and every user is in the global account) and restores that session's
//! subscriptions under the new connection's permissions, so each is refused and nothing of the
//! other terminal's reaches it (queued or retained); but the other terminal, if connected, is
//! disconnected (MQTT's session takeover), and if it comes back within a second NATS holds its
//! CONNECT for a second and closes it. A denial of service for as long as the attacker keeps
//! reconnecting, which loses nothing (confirmations stay retained and in the outbox) and shows in
//! NATS's log ("Replacing old client … since both have the same client ID"): revoke the
//! attacking terminal. posgate's own client id (`{external_client_id}:{12 random hex}`, new at
//! each start) cannot be guessed. NATS has no setting that ties the client id to the user. An
//! account per terminal would separate the sessions, but NATS stores a QoS 1 or retained MQTT
//! message in the publishing account's JetStream: a terminal in another account would get
//! posgate's confirmations only live, at QoS 0 through an import, and nothing sent while away.
//! Every user is `allowed_connection_types: ["MQTT"]`: a user named by a certificate has no
//! password, and without that a plain NATS client could claim its name on the core port.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;

use posgate_proto::topics;

use super::external::{BACKEND_CN, ExternalError, write_file};
use crate::pki::{Pki, Serial, cert_uri};
use crate::store::TerminalRecord;

/// The authorization include file in the broker directory.
pub const AUTH_FILE: &str = "authorization.conf";

/// posgate's own user: the subject of its client certificate (`Pki::issue_backend`).
pub fn backend_user() -> String {
    format!("O=posgate,CN={BACKEND_CN}")
}

/// A terminal's user for a certificate that does not name its serial (issued before posgate
/// did): its subject (CN = terminal id, O = tenant), in the order Go renders it (RFC 4514, last
/// attribute first). Every certificate of the terminal without a serial in its subject matches
/// it.
pub fn terminal_user(terminal_id: &str) -> String {
    format!("O={},CN={terminal_id}", topics::tenant_for(terminal_id))
}

/// The users of one terminal: one per live certificate, named by the URI that certificate
/// carries ([`cert_uri`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Users<'a> {
    pub terminal_id: &'a str,
    /// The serials of its live certificates that name their serial: its current one and, while
    /// a renewal is pending, the one it replaces.
    pub serials: Vec<String>,
    /// Whether one of its live certificates names no serial (issued before posgate did): NATS
    /// then knows it by its subject alone, [`terminal_user`], which cannot tell it from the
    /// terminal's other certificates with that subject.
    pub by_subject: bool,
}

impl<'a> Users<'a> {
    /// The users of a registered terminal: none once it is revoked; a serial in `revoked` has
    /// none either.
    pub fn of(record: &'a TerminalRecord, revoked: &BTreeSet<Serial>) -> Users<'a> {
        let mut users = Users {
            terminal_id: &record.id,
            serials: Vec::new(),
            by_subject: false,
        };
        if record.revoked_at.is_some() {
            return users;
        }
        let live = std::iter::once((record.cert_serial.as_str(), record.cert_names_serial)).chain(
            record
                .previous_cert
                .as_ref()
                .map(|p| (p.serial.as_str(), p.names_serial)),
        );
        for (serial, named) in live {
            let serial = Serial::parse(serial);
            if revoked.contains(&serial) {
                continue;
            }
            if named {
                users.serials.push(serial.to_string());
            } else {
                users.by_subject = true;
            }
        }
        users
    }
}

/// The NATS subject of an MQTT topic or filter, as NATS's MQTT gateway maps them: levels become
/// tokens, an empty level (the leading `/`) becomes `/`, `+` is `*` and `#` is `>`.
pub fn subject(topic: &str) -> String {
    topic
        .split('/')
        .map(|level| match level {
            "" => "/",
            "+" => "*",
            "#" => ">",
            other => other,
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// The authorization include file: posgate's user first, then the users of each terminal in
/// `terminals`, each with that terminal's permissions.
pub fn authorization<'a>(terminals: impl IntoIterator<Item = Users<'a>>) -> String {
    let mut out = String::from(
        "# Written by posgate (mqtt.external_broker_dir); replaced whole after every provisioning,\n\
         # revocation and renewal, then mqtt.external_reload_command makes NATS re-read it.\n\
         # Do not edit: a change would be overwritten. Users are client certificates\n\
         # (mqtt.tls.verify_and_map): by the URI naming the certificate's serial (one user per\n\
         # live certificate), or by subject for certificates older than that; each is allowed on\n\
         # the MQTT port only.\n\
         authorization {\n  users = [\n",
    );
    let everything = subject(&format!("/{}/#", topics::ROOT));
    out.push_str(&format!(
        "    {{ user: \"{}\", allowed_connection_types: [\"MQTT\"],\n      permissions: {{ publish: [\"{everything}\"], subscribe: [\"{everything}\"] }} }}\n",
        backend_user()
    ));
    for users in terminals {
        let id = users.terminal_id;
        // The store holds only valid ids and hex serials; a quote or a line break in one would
        // forge users.
        if !topics::valid_terminal_id(id) {
            continue;
        }
        let t = topics::tenant_for(id);
        let permissions = format!(
            "permissions: {{\n        publish: [\"{acks}\", \"{status}\", \"{rpc_req}\"],\n        subscribe: [\"{payments}\", \"{rpc_res}\"] }}",
            acks = subject(&topics::acks(&t)),
            status = subject(&topics::status(&t)),
            rpc_req = subject(&topics::rpc_req(&t)),
            payments = subject(&topics::payments_filter(&t)),
            rpc_res = subject(&topics::rpc_res(&t)),
        );
        let names = users
            .serials
            .iter()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(|s| cert_uri(s))
            .chain(users.by_subject.then(|| terminal_user(id)));
        for name in names {
            out.push_str(&format!(
                "    {{ user: \"{name}\", allowed_connection_types: [\"MQTT\"],\n      {permissions} }}\n"
            ));
        }
    }
    out.push_str("  ]\n}\n");
    out
}

/// One node of the cluster, as `broker-config nats` is told.
#[derive(Clone, Debug)]
pub struct Node {
    /// `server_name`, unique in the cluster; also the name of its file (`{name}.conf`).
    pub name: String,
    /// The MQTT listener (TLS) terminals and posgate connect to.
    pub mqtt: SocketAddr,
    /// The core NATS port (no user may use it: every user is MQTT-only).
    pub client: SocketAddr,
    /// The cluster listener and the routes to every node (this one included), if clustered.
    pub cluster: Option<(SocketAddr, Vec<String>)>,
    /// The monitoring port (`/healthz`, `/jsz`), if any.
    pub monitor: Option<SocketAddr>,
}

/// Consumers a stream may have (`jetstream.limits.default_max_consumers`): 100,000 terminals'
/// two subscriptions each, and room for posgate's and for sessions being replaced.
pub const MAX_CONSUMERS: u32 = 250_000;

/// A node's configuration: every shared file in `dir`, JetStream's store in `dir/{name}-js`.
pub fn conf(dir: &Path, node: &Node) -> String {
    let d = dir.display();
    let name = &node.name;
    let cluster = match &node.cluster {
        Some((listen, routes)) => format!(
            "# Routes are unauthenticated here: across machines, add a tls {{}} block with a\n\
             # certificate both ends verify (and firewall the port to the other nodes).\n\
             cluster {{\n  name: posgate\n  listen: \"{listen}\"\n  routes: [{}]\n}}\n",
            routes
                .iter()
                .map(|r| format!("\"{r}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => String::new(),
    };
    let monitor = match node.monitor {
        Some(addr) => format!("http: \"{addr}\"\n"),
        None => String::new(),
    };
    format!(
        "# Written by `posgate broker-config nats`: a NATS node (MQTT gateway, JetStream) as\n\
         # posgate's external broker. posgate (mqtt.mode = \"external\", mqtt.external_broker =\n\
         # \"nats\", mqtt.external_broker_dir = \"{d}\") keeps {AUTH_FILE} up to date and runs\n\
         # mqtt.external_reload_command after each change; `nats-server --signal reload=<pid>`\n\
         # (or SIGHUP) makes NATS re-read it. Every node needs the same {AUTH_FILE}.\n\
         server_name: \"{name}\"\n\
         listen: \"{client}\"\n\
         {monitor}\
         # Sessions, their queued QoS 1 messages and the retained messages live in JetStream,\n\
         # replicated across the cluster (MQTT streams get min(3, cluster size) replicas).\n\
         # Every QoS 1 subscription is a consumer of one stream ($MQTT_msgs), two per terminal;\n\
         # NATS 2.15 allows a stream 1,000 unless told otherwise, about 500 terminals.\n\
         jetstream {{\n  store_dir: \"{d}/{name}-js\"\n  limits {{ default_max_consumers: {MAX_CONSUMERS} }}\n}}\n\
         {cluster}\
         mqtt {{\n  listen: \"{mqtt}\"\n  \
           # A subscription's consumer is created (a raft group across the nodes) at every\n  \
           # terminal's connect: in memory rather than in files, and with more time than the\n  \
           # default 5 s: a busy cluster, or one electing leaders after a node's loss, refused\n  \
           # subscriptions, every refused terminal asked again, and consumers piled up to the\n  \
           # limit (docs/performance.md, runs K).\n  \
           # Clean sessions, as posgate's and its terminals' are, lose nothing when every node\n  \
           # stops at once; a persistent session would lose which queued messages were acked.\n  \
           consumer_memory_storage: true\n  \
           js_api_timeout: \"20s\"\n  \
           # The client certificate, issued by the gateway CA, is the identity: its URI\n  \
           # urn:posgate:cert:SERIAL (a certificate issued before it: its subject) is the user\n  \
           # name in {AUTH_FILE}.\n  \
           tls {{ cert_file: \"{d}/server.pem\", key_file: \"{d}/server.key\", ca_file: \"{d}/ca.pem\", verify_and_map: true, timeout: 5 }}\n\
         }}\n\
         include \"{AUTH_FILE}\"\n",
        client = node.client,
        mqtt = node.mqtt,
    )
}

/// Writes a node's configuration into `dir`: `{name}.conf`, the gateway CA, the server
/// certificate and key (posgate's own, as for Mosquitto) and an authorization file with posgate's
/// user only (the daemon fills it in at its start). Run once per node with the same `dir`.
///
/// # Errors
/// When a file cannot be written.
pub fn write_config(pki: &Pki, dir: &Path, node: &Node) -> Result<(), ExternalError> {
    super::mosquitto::write_common(pki, dir)?;
    write_file(&dir.join(AUTH_FILE), &authorization([]))?;
    write_file(&dir.join(format!("{}.conf", node.name)), &conf(dir, node))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_map_to_the_subjects_nats_uses() {
        assert_eq!(
            subject("/tenants/t706f732d31/payments/pi_1"),
            "/.tenants.t706f732d31.payments.pi_1"
        );
        assert_eq!(subject("/tenants/+/acks"), "/.tenants.*.acks");
        assert_eq!(subject("/tenants/#"), "/.tenants.>");
    }

    #[test]
    fn each_live_certificate_is_a_user_with_its_terminals_subjects_only() {
        let users = |terminal_id, serials: &[&str], by_subject| Users {
            terminal_id,
            serials: serials.iter().map(|s| s.to_string()).collect(),
            by_subject,
        };
        let auth = authorization([
            users("pos-1", &["4abc"], false),
            users("bad\"id", &["4ab1"], true),
            users("pos_2", &["4def", "4d\"ef", "4fed"], true),
        ]);
        assert!(auth.contains(
            "{ user: \"urn:posgate:cert:4abc\", allowed_connection_types: [\"MQTT\"],\n      permissions: {\n        publish: [\"/.tenants.t706f732d31.acks\", \"/.tenants.t706f732d31.status\", \"/.tenants.t706f732d31.rpc.req\"],\n        subscribe: [\"/.tenants.t706f732d31.payments.*\", \"/.tenants.t706f732d31.rpc.res\"] } }"
        ), "{auth}");
        assert!(!auth.contains("CN=pos-1"), "{auth}");
        for name in [
            "urn:posgate:cert:4def\"",
            "urn:posgate:cert:4fed\"",
            "\"O=t706f735f32,CN=pos_2\"",
        ] {
            assert!(auth.contains(name), "{name} missing:\n{auth}");
        }
        assert!(!auth.contains("bad"), "an invalid id must not forge users");
        assert!(
            !auth.contains("4d\""),
            "an invalid serial must not forge users"
        );
        assert!(auth.contains("user: \"O=posgate,CN=posgate:backend\""));
        // Only posgate's user has a wildcard above a tenant.
        let wide = auth.matches("/.tenants.>").count();
        assert_eq!(wide, 2, "{auth}");
        assert_eq!(
            auth.matches("allowed_connection_types: [\"MQTT\"]").count(),
            5
        );
    }

    /// A record as the store keeps it; `names_serial` absent as in records written before
    /// certificates named their serial.
    fn record(extra: serde_json::Value) -> TerminalRecord {
        let mut value = serde_json::json!({
            "id": "pos-1", "tenant": "t706f732d31", "merchant_id": "m", "label": null,
            "cert_serial": "4abc", "created_at": "2026-01-01T00:00:00Z", "revoked_at": null,
            "next_seq": 1,
        });
        for (k, v) in extra.as_object().unwrap() {
            value[k] = v.clone();
        }
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn users_are_the_live_certificates_by_serial_and_older_ones_by_subject() {
        let none = BTreeSet::new();
        let previous = |names_serial| serde_json::json!({"serial": "00:4D:EF", "revoke_at": "2026-02-01T00:00:00Z", "names_serial": names_serial});
        // Written before: known by subject only.
        let old = record(serde_json::json!({}));
        assert!(!old.cert_names_serial);
        let u = Users::of(&old, &none);
        assert_eq!((u.serials.len(), u.by_subject), (0, true));
        // Renewed from such a certificate: the new one by serial, the old one by subject.
        let renewed = record(
            serde_json::json!({"cert_names_serial": true, "previous_cert": previous(false)}),
        );
        let u = Users::of(&renewed, &none);
        assert_eq!((u.serials, u.by_subject), (vec!["4abc".to_owned()], true));
        // Both name their serial: two users, and a revoked serial has none.
        let both =
            record(serde_json::json!({"cert_names_serial": true, "previous_cert": previous(true)}));
        let u = Users::of(&both, &none);
        assert_eq!(
            (u.serials, u.by_subject),
            (vec!["4abc".to_owned(), "4def".to_owned()], false)
        );
        let revoked: BTreeSet<Serial> = [Serial::parse("4DEF")].into();
        let u = Users::of(&both, &revoked);
        assert_eq!((u.serials, u.by_subject), (vec!["4abc".to_owned()], false));
        // A revoked terminal: none.
        let gone = record(
            serde_json::json!({"cert_names_serial": true, "previous_cert": previous(false), "revoked_at": "2026-01-02T00:00:00Z"}),
        );
        let u = Users::of(&gone, &none);
        assert_eq!((u.serials.len(), u.by_subject), (0, false));
    }
}
