//! Mosquitto 2 as the external broker: its configuration (`posgate broker-config mosquitto`) and
//! the per-terminal ACL that [`super::external::Files`] keeps up to date.
//!
//! Why an ACL line per terminal rather than one `pattern` line: a terminal's topics are under its
//! tenant, `t` + the hex of its id (`posgate_proto::topics::tenant_for`), and Mosquitto's
//! patterns can only substitute the user name (`%u`, the certificate's CN) or the client id
//! (`%c`, which the client chooses) as they are. So posgate writes, for each registered and
//! unrevoked terminal, a `user` block granting exactly its own topics, and the broker re-reads
//! the file on SIGHUP (its `acl_file` and `crlfile` both, verified on Debian's 2.0.11).

use std::net::SocketAddr;
use std::path::Path;

use posgate_proto::topics;

use super::external::{BACKEND_CN, ExternalError, SHARE_GROUP, write_file};
use crate::pki::Pki;

/// The ACL file in the broker directory.
pub const ACL_FILE: &str = "acl";
/// The CRL file in the broker directory.
pub const CRL_FILE: &str = "crl.pem";
/// The configuration file `broker-config` writes.
pub const CONF_FILE: &str = "mosquitto.conf";

/// The ACL: posgate's own identity first, then one block per terminal in `terminal_ids`.
pub fn acl<'a>(terminal_ids: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::from(
        "# Written by posgate (mqtt.external_broker_dir); replaced whole after every provisioning,\n\
         # revocation and renewal. Do not edit: a change would be overwritten.\n\
         # User names are the client certificates' CN (use_identity_as_username).\n\n",
    );
    let root = topics::ROOT;
    out.push_str(&format!(
        "user {BACKEND_CN}\n\
         topic readwrite /{root}/#\n\
         topic read $share/{SHARE_GROUP}/#\n"
    ));
    for id in terminal_ids {
        // The store holds only valid ids; a line break in one would forge ACL lines, so check.
        if !topics::valid_terminal_id(id) {
            continue;
        }
        let t = topics::tenant_for(id);
        out.push_str(&format!(
            "\nuser {id}\n\
             topic read {payments}\n\
             topic read {rpc_res}\n\
             topic write {acks}\n\
             topic write {status}\n\
             topic write {rpc_req}\n",
            payments = topics::payments_filter(&t),
            rpc_res = topics::rpc_res(&t),
            acks = topics::acks(&t),
            status = topics::status(&t),
            rpc_req = topics::rpc_req(&t),
        ));
    }
    out
}

/// The broker's configuration: one mutual-TLS listener on `listen`, every file in `dir`.
pub fn conf(dir: &Path, listen: SocketAddr) -> String {
    let d = dir.display();
    format!(
        "# Written by `posgate broker-config mosquitto`: Mosquitto 2 as posgate's external broker.\n\
         # posgate (mqtt.mode = \"external\", mqtt.external_broker_dir = \"{d}\") keeps {ACL_FILE}\n\
         # and {CRL_FILE} up to date and runs mqtt.external_reload_command after each change;\n\
         # SIGHUP (systemctl reload mosquitto) makes Mosquitto re-read both.\n\
         per_listener_settings false\n\
         allow_anonymous false\n\
         # The outbox in posgate's store is the durable copy: posgate publishes a terminal's pending\n\
         # confirmations again whenever it announces itself online.\n\
         persistence false\n\
         acl_file {d}/{ACL_FILE}\n\
         # Messages queued for one client (posgate's backend takes every terminal's acks).\n\
         max_queued_messages 100000\n\
         \n\
         listener {port} {host}\n\
         protocol mqtt\n\
         cafile {d}/ca.pem\n\
         certfile {d}/server.pem\n\
         keyfile {d}/server.key\n\
         crlfile {d}/{CRL_FILE}\n\
         require_certificate true\n\
         use_identity_as_username true\n\
         tls_version tlsv1.2\n",
        port = listen.port(),
        host = listen.ip(),
    )
}

/// Writes a complete Mosquitto configuration into `dir`: `mosquitto.conf`, the gateway CA
/// (`ca.pem`: terminals' and posgate's certificates are issued by it), the server certificate and
/// key (`server.pem`, `server.key`: posgate's own, for `mqtt.server_names`, so terminals verify
/// the broker with the CA of their bundle), an ACL with posgate's identity only and an empty CRL
/// (the daemon fills both in at its start).
///
/// # Errors
/// When a file cannot be written or the CRL cannot be signed.
pub fn write_config(pki: &Pki, dir: &Path, listen: SocketAddr) -> Result<(), ExternalError> {
    write_common(pki, dir)?;
    write_file(&dir.join(ACL_FILE), &acl([]))?;
    write_file(&dir.join(CRL_FILE), &pki.crl_pem([])?)?;
    write_file(&dir.join(CONF_FILE), &conf(dir, listen))?;
    Ok(())
}

/// What every broker's directory has: `dir` itself, the gateway CA (`ca.pem`), the server
/// certificate and key (`server.pem`, `server.key`).
///
/// # Errors
/// When a file cannot be written.
pub fn write_common(pki: &Pki, dir: &Path) -> Result<(), ExternalError> {
    std::fs::create_dir_all(dir).map_err(|source| ExternalError::Write {
        path: dir.to_owned(),
        source,
    })?;
    write_file(&dir.join("ca.pem"), pki.ca_pem())?;
    write_file(&dir.join("server.pem"), pki.server_cert_pem())?;
    write_secret(&dir.join("server.key"), pki.server_key_pem())
}

/// The server key: readable by its owner only (chown it to the broker's user).
fn write_secret(path: &Path, contents: &str) -> Result<(), ExternalError> {
    use std::os::unix::fs::PermissionsExt as _;
    write_file(path, contents)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ExternalError::Write {
            path: path.to_owned(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_terminal_gets_only_its_own_topics() {
        let acl = acl(["pos-01", "bad\nuser x", "pos_02"]);
        let t1 = topics::tenant_for("pos-01");
        assert!(acl.contains(&format!(
            "user pos-01\ntopic read /tenants/{t1}/payments/+\ntopic read /tenants/{t1}/rpc/res\ntopic write /tenants/{t1}/acks\n"
        )));
        assert!(acl.contains("user pos_02\n"));
        assert!(
            !acl.contains("user x"),
            "an invalid id must not forge lines"
        );
        assert!(acl.starts_with("#") && acl.contains("user posgate:backend\n"));
        // No terminal is granted a wildcard above its own tenant.
        for line in acl.lines().filter(|l| l.starts_with("topic")) {
            if !acl.contains(&format!("user posgate:backend\n{line}")) && !line.contains("$share") {
                assert!(line.contains("/tenants/t"), "{line}");
                assert!(!line.contains('#'), "{line}");
            }
        }
    }
}
