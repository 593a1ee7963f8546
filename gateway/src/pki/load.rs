//! The files of `data_dir/pki/` at start: what is there is loaded and checked (an operator's CA
//! or server certificate is used as it is, after checks that turn a TLS failure at every terminal
//! into an error at start), what is missing is created, and a managed server certificate is
//! reissued when its names, key or CA changed or it is about to expire.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use rand::RngCore as _;
use rcgen::{DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::GeneralName;

use super::files::{read_opt, warn_if_loose, write_atomic};
use super::issue::{ca_params, leaf_params};
use super::{
    CA_CERT_FILE, CA_KEY_FILE, PRIVATE_MODE, PUBLIC_MODE, PkiError, SERVER_CERT_FILE,
    SERVER_KEY_FILE, SERVER_MANAGED_FILE, SERVER_RENEW_DAYS, SERVER_VALIDITY_DAYS, parse_der,
    pem_to_der,
};

pub(super) struct Ca {
    pub(super) pem: String,
    der: Vec<u8>,
    pub(super) not_after: OffsetDateTime,
    pub(super) issuer: Issuer<'static, KeyPair>,
}

pub(super) fn load_or_create_signing_key(path: &Path) -> Result<SigningKey, PkiError> {
    if let Some(pem) = read_opt(path)? {
        warn_if_loose(path);
        return SigningKey::from_pkcs8_pem(&pem).map_err(|source| PkiError::BadSigningKey {
            path: path.to_owned(),
            source,
        });
    }
    // ed25519-dalek 2 wants rand_core 0.6; the workspace has rand 0.9. Drawing the 32 seed
    // bytes ourselves avoids a second rand in the build.
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    let key = SigningKey::from_bytes(&seed);
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(PkiError::EncodeSigningKey)?;
    write_atomic(path, pem.as_bytes(), PRIVATE_MODE)?;
    tracing::info!(path = %path.display(), "created the confirmation-signing key");
    Ok(key)
}

pub(super) fn load_or_create_ca(dir: &Path, now: OffsetDateTime) -> Result<Ca, PkiError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let cert_pem = read_opt(&cert_path)?;
    let key_pem = read_opt(&key_path)?;
    let key = match (&cert_pem, key_pem) {
        (Some(_), None) => {
            return Err(PkiError::Incomplete {
                present: cert_path,
                missing: key_path,
            });
        }
        (_, Some(pem)) => {
            warn_if_loose(&key_path);
            KeyPair::from_pem(&pem).map_err(|source| PkiError::BadKey {
                path: key_path.clone(),
                source,
            })?
        }
        (None, None) => {
            let key = KeyPair::generate().map_err(|source| PkiError::Generate {
                what: "the CA key".to_owned(),
                source,
            })?;
            write_atomic(&key_path, key.serialize_pem().as_bytes(), PRIVATE_MODE)?;
            key
        }
    };

    let Some(pem) = cert_pem else {
        // No certificate (first start, or a crash right after the key was written).
        let params = ca_params(now);
        let cert = params
            .self_signed(&key)
            .map_err(|source| PkiError::Generate {
                what: "the CA certificate".to_owned(),
                source,
            })?;
        let pem = cert.pem();
        write_atomic(&cert_path, pem.as_bytes(), PUBLIC_MODE)?;
        tracing::info!(path = %cert_path.display(), "created the gateway CA");
        return Ok(Ca {
            pem,
            der: cert.der().to_vec(),
            not_after: params.not_after,
            issuer: Issuer::new(params, key),
        });
    };

    let der = pem_to_der(&pem, &cert_path.display().to_string())?;
    let (not_after, key_matches, is_ca) = {
        let cert = parse_der(&der, &cert_path.display().to_string())?;
        (
            cert.validity().not_after.to_datetime(),
            cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw(),
            cert.is_ca(),
        )
    };
    if !is_ca {
        return Err(PkiError::NotCa { path: cert_path });
    }
    if !key_matches {
        return Err(PkiError::KeyMismatch {
            cert: cert_path,
            key: key_path,
        });
    }
    if not_after < now {
        tracing::warn!(path = %cert_path.display(), %not_after, "the CA certificate has expired");
    }
    let issuer = Issuer::from_ca_cert_der(&der.as_slice().into(), key).map_err(|source| {
        PkiError::Generate {
            what: format!("an issuer from {}", cert_path.display()),
            source,
        }
    })?;
    Ok(Ca {
        pem,
        der,
        not_after,
        issuer,
    })
}

/// Returns (certificate PEM, key PEM) of the server identity.
pub(super) fn load_or_create_server(
    dir: &Path,
    ca: &Ca,
    server_names: &[String],
    now: OffsetDateTime,
) -> Result<(String, String), PkiError> {
    let cert_path = dir.join(SERVER_CERT_FILE);
    let key_path = dir.join(SERVER_KEY_FILE);
    let marker_path = dir.join(SERVER_MANAGED_FILE);
    let cert_pem = read_opt(&cert_path)?;
    let key_pem = read_opt(&key_path)?;
    let managed = marker_path.exists();

    if let (Some(cert_pem), false) = (&cert_pem, managed) {
        // The operator's certificate: used as it is, after checks that turn a TLS failure at
        // every terminal into an error at start.
        let Some(key_pem) = key_pem else {
            return Err(PkiError::Incomplete {
                present: cert_path,
                missing: key_path,
            });
        };
        warn_if_loose(&key_path);
        let key = KeyPair::from_pem(&key_pem).map_err(|source| PkiError::BadKey {
            path: key_path.clone(),
            source,
        })?;
        let der = pem_to_der(cert_pem, &cert_path.display().to_string())?;
        let check = check_server(&der, &key, ca, &wanted_sans(server_names))?;
        if !check.key_matches {
            return Err(PkiError::KeyMismatch {
                cert: cert_path,
                key: key_path,
            });
        }
        if !check.chains {
            return Err(PkiError::ServerWithoutCa {
                server: cert_path,
                ca_cert: dir.join(CA_CERT_FILE),
                ca_key: dir.join(CA_KEY_FILE),
            });
        }
        if !check.names_match {
            tracing::warn!(
                path = %cert_path.display(),
                "the supplied server certificate's names differ from mqtt.server_names; using it as is"
            );
        }
        return Ok((cert_pem.clone(), key_pem));
    }

    // Ours to manage. Mark it so before the first certificate is written.
    if !managed {
        write_atomic(
            &marker_path,
            b"posgate issued server.pem and reissues it when mqtt.server_names change.\n\
              Delete this file to manage server.pem and server.key yourself.\n",
            PUBLIC_MODE,
        )?;
    }
    // The key is kept across reissues: only server.pem changes, in one rename.
    let (key, key_pem) = match key_pem {
        Some(pem) => {
            warn_if_loose(&key_path);
            let key = KeyPair::from_pem(&pem).map_err(|source| PkiError::BadKey {
                path: key_path.clone(),
                source,
            })?;
            (key, pem)
        }
        None => {
            let key = KeyPair::generate().map_err(|source| PkiError::Generate {
                what: "the server key".to_owned(),
                source,
            })?;
            let pem = key.serialize_pem();
            write_atomic(&key_path, pem.as_bytes(), PRIVATE_MODE)?;
            (key, pem)
        }
    };
    let wanted = wanted_sans(server_names);
    if let Some(cert_pem) = cert_pem {
        let reason = match pem_to_der(&cert_pem, &cert_path.display().to_string())
            .and_then(|der| check_server(&der, &key, ca, &wanted))
        {
            Err(_) => Some("unreadable"),
            Ok(check) if !check.key_matches => Some("key changed"),
            Ok(check) if !check.chains => Some("CA changed"),
            Ok(check) if !check.names_match => Some("server names changed"),
            Ok(check) if check.not_after - now < Duration::days(SERVER_RENEW_DAYS) => {
                Some("expiring")
            }
            Ok(_) => None,
        };
        let Some(reason) = reason else {
            return Ok((cert_pem, key_pem));
        };
        tracing::info!(path = %cert_path.display(), reason, "reissuing the server certificate");
    }

    let (mut params, _serial) = leaf_params(now, SERVER_VALIDITY_DAYS, ca.not_after);
    params.distinguished_name.push(
        DnType::CommonName,
        server_names.first().map(String::as_str).unwrap_or_default(),
    );
    params.subject_alt_names = server_names
        .iter()
        .map(|name| match name.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => name.clone().try_into().map(SanType::DnsName),
        })
        .collect::<Result<_, _>>()
        .map_err(|source| PkiError::Generate {
            what: "the server certificate's names".to_owned(),
            source,
        })?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params
        .signed_by(&key, &ca.issuer)
        .map_err(|source| PkiError::Generate {
            what: "the server certificate".to_owned(),
            source,
        })?;
    let cert_pem = cert.pem();
    write_atomic(&cert_path, cert_pem.as_bytes(), PUBLIC_MODE)?;
    tracing::info!(path = %cert_path.display(), names = ?server_names, "issued the server certificate");
    Ok((cert_pem, key_pem))
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum San {
    Dns(String),
    Ip(IpAddr),
}

fn wanted_sans(server_names: &[String]) -> BTreeSet<San> {
    server_names
        .iter()
        .map(|name| match name.parse::<IpAddr>() {
            Ok(ip) => San::Ip(ip),
            Err(_) => San::Dns(name.to_ascii_lowercase()),
        })
        .collect()
}

struct ServerCheck {
    key_matches: bool,
    chains: bool,
    names_match: bool,
    not_after: OffsetDateTime,
}

fn check_server(
    der: &[u8],
    key: &KeyPair,
    ca: &Ca,
    wanted: &BTreeSet<San>,
) -> Result<ServerCheck, PkiError> {
    let cert = parse_der(der, SERVER_CERT_FILE)?;
    let ca_cert = parse_der(&ca.der, CA_CERT_FILE)?;
    let chains = cert.issuer() == ca_cert.subject()
        && cert.verify_signature(Some(ca_cert.public_key())).is_ok();
    let mut sans = BTreeSet::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(dns) => {
                    sans.insert(San::Dns(dns.to_ascii_lowercase()));
                }
                GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        sans.insert(San::Ip(ip));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(ServerCheck {
        key_matches: cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw(),
        chains,
        names_match: &sans == wanted,
        not_after: cert.validity().not_after.to_datetime(),
    })
}
