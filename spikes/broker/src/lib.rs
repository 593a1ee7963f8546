//! Shared helpers for the broker spike: certificate layout, TLS client configs, RSS readout.
//!
//! Certificate directory layout (written by the `certs` binary):
//! - `ca.pem`: the CA certificate (trust anchor for both sides)
//! - `server.pem` / `server.key`: server certificate for `localhost` and `127.0.0.1`
//! - `clients/{i}.pem`: client `i` certificate followed by its PKCS#8 key
//! - `clients.tsv`: `index<TAB>tenant(O)<TAB>terminal id(CN)<TAB>serial(hex)`

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

#[derive(Clone, Debug)]
pub struct ClientIdent {
    pub index: usize,
    pub tenant: String,
    pub cn: String,
    pub serial_hex: String,
}

pub fn read_index(dir: &Path) -> Result<Vec<ClientIdent>> {
    let text = std::fs::read_to_string(dir.join("clients.tsv")).context("clients.tsv")?;
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            if f.len() != 4 {
                return Err(anyhow!("bad line {l}"));
            }
            Ok(ClientIdent {
                index: f[0].parse()?,
                tenant: f[1].to_string(),
                cn: f[2].to_string(),
                serial_hex: f[3].to_string(),
            })
        })
        .collect()
}

pub fn client_pem_path(dir: &Path, i: usize) -> PathBuf {
    dir.join("clients").join(format!("{i}.pem"))
}

pub fn root_store(dir: &Path) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("ca.pem"))? {
        roots.add(c?)?;
    }
    Ok(roots)
}

/// rustls client config presenting client certificate `i`.
pub fn client_config(
    dir: &Path,
    roots: &rustls::RootCertStore,
    i: usize,
) -> Result<Arc<rustls::ClientConfig>> {
    let path = client_pem_path(dir, i);
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&path)?.collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&path)?;
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(certs, key)?;
    Ok(Arc::new(cfg))
}

/// rustls client config without a client certificate (to show it is refused).
pub fn anon_client_config(roots: &rustls::RootCertStore) -> Result<Arc<rustls::ClientConfig>> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// VmRSS of a process in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for l in s.lines() {
        if let Some(v) = l.strip_prefix("VmRSS:") {
            let n = v.trim().trim_end_matches("kB").trim();
            return Ok(n.parse()?);
        }
    }
    Err(anyhow!("no VmRSS"))
}

/// Number of open fds of a process.
pub fn fd_count(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
