//! NATS (its MQTT gateway, sessions and retained messages in JetStream) as the external broker:
//! its configuration (`posgate broker-config nats`) and the authorization include file that
//! [`super::external::Files`] keeps up to date.
//!
//! How NATS tells terminals apart: `mqtt { tls { verify_and_map: true } }` makes the client
//! certificate's subject the user name (NATS matches it against each `user` as a distinguished
//! name, in any attribute order), so posgate writes one user per registered and unrevoked
//! terminal, `O=<tenant>,CN=<terminal id>` as the gateway issues it, with publish and subscribe
//! permissions on its own tenant's subjects only (the MQTT topic `/tenants/t…/acks` is the NATS
//! subject `/.tenants.t….acks`). A certificate whose subject is no user is refused at CONNECT.
//!
//! What NATS does not do (see docs/decisions/0005-past-one-server.md): it reads no CRL, so a
//! renewal's replaced certificate (same subject) is accepted until it expires, and revocation
//! works by removing the user; it does not tie the MQTT client id to the certificate; it speaks
//! MQTT 3.1.1 only, and delivers nothing to `$share/…` subscriptions (posgate subscribes plainly).
//! Every user is `allowed_connection_types: ["MQTT"]`: a user listed by subject has no password,
//! and without that a plain NATS client could claim its name on the core port.

use std::net::SocketAddr;
use std::path::Path;

use posgate_proto::topics;

use super::external::{BACKEND_CN, ExternalError, write_file};
use crate::pki::Pki;

/// The authorization include file in the broker directory.
pub const AUTH_FILE: &str = "authorization.conf";

/// posgate's own user: the subject of its client certificate (`Pki::issue_backend`).
pub fn backend_user() -> String {
    format!("O=posgate,CN={BACKEND_CN}")
}

/// A terminal's user: the subject of its certificate (CN = terminal id, O = tenant), in the
/// order Go renders it (RFC 4514, last attribute first).
pub fn terminal_user(terminal_id: &str) -> String {
    format!("O={},CN={terminal_id}", topics::tenant_for(terminal_id))
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

/// The authorization include file: posgate's user first, then one user per terminal in
/// `terminal_ids`.
pub fn authorization<'a>(terminal_ids: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::from(
        "# Written by posgate (mqtt.external_broker_dir); replaced whole after every provisioning,\n\
         # revocation and renewal, then mqtt.external_reload_command makes NATS re-read it.\n\
         # Do not edit: a change would be overwritten. Users are client certificate subjects\n\
         # (mqtt.tls.verify_and_map), each allowed on the MQTT port only.\n\
         authorization {\n  users = [\n",
    );
    let everything = subject(&format!("/{}/#", topics::ROOT));
    out.push_str(&format!(
        "    {{ user: \"{}\", allowed_connection_types: [\"MQTT\"],\n      permissions: {{ publish: [\"{everything}\"], subscribe: [\"{everything}\"] }} }}\n",
        backend_user()
    ));
    for id in terminal_ids {
        // The store holds only valid ids; a quote or a line break in one would forge users.
        if !topics::valid_terminal_id(id) {
            continue;
        }
        let t = topics::tenant_for(id);
        out.push_str(&format!(
            "    {{ user: \"{user}\", allowed_connection_types: [\"MQTT\"],\n      permissions: {{\n        publish: [\"{acks}\", \"{status}\", \"{rpc_req}\"],\n        subscribe: [\"{payments}\", \"{rpc_res}\"] }} }}\n",
            user = terminal_user(id),
            acks = subject(&topics::acks(&t)),
            status = subject(&topics::status(&t)),
            rpc_req = subject(&topics::rpc_req(&t)),
            payments = subject(&topics::payments_filter(&t)),
            rpc_res = subject(&topics::rpc_res(&t)),
        ));
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
         jetstream {{ store_dir: \"{d}/{name}-js\" }}\n\
         {cluster}\
         mqtt {{\n  listen: \"{mqtt}\"\n  \
           # The client certificate, issued by the gateway CA, is the identity: its subject is\n  \
           # the user name in {AUTH_FILE}.\n  \
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
    fn each_terminal_gets_only_its_own_subjects() {
        let auth = authorization(["pos-1", "bad\"id", "pos_2"]);
        assert!(auth.contains(
            "{ user: \"O=t706f732d31,CN=pos-1\", allowed_connection_types: [\"MQTT\"],\n      permissions: {\n        publish: [\"/.tenants.t706f732d31.acks\", \"/.tenants.t706f732d31.status\", \"/.tenants.t706f732d31.rpc.req\"],\n        subscribe: [\"/.tenants.t706f732d31.payments.*\", \"/.tenants.t706f732d31.rpc.res\"] } }"
        ), "{auth}");
        assert!(auth.contains("CN=pos_2\""));
        assert!(!auth.contains("bad"), "an invalid id must not forge users");
        assert!(auth.contains("user: \"O=posgate,CN=posgate:backend\""));
        // Only posgate's user has a wildcard above a tenant.
        let wide = auth.matches("/.tenants.>").count();
        assert_eq!(wide, 2, "{auth}");
        assert_eq!(
            auth.matches("allowed_connection_types: [\"MQTT\"]").count(),
            3
        );
    }
}
