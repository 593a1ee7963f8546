//! The PKI over a temporary `data_dir`: first and later starts, an operator's own CA and server
//! certificate, crashes between files, and what the issued certificates say.

use std::collections::BTreeSet;
use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;

use ed25519_dalek::pkcs8::DecodePrivateKey as _;
use posgate_proto::confirmation::kid_for;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use x509_parser::extensions::{GeneralName, ParsedExtension};

use super::load::San;
use super::*;

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn der(pem: &str) -> Vec<u8> {
    pem_to_der(pem, "test").unwrap()
}

/// Whether `cert_pem` is signed by `ca_pem`'s key and names it as issuer.
fn chains_to(cert_pem: &str, ca_pem: &str) -> bool {
    let (cert_der, ca_der) = (der(cert_pem), der(ca_pem));
    let cert = parse_der(&cert_der, "cert").unwrap();
    let ca = parse_der(&ca_der, "ca").unwrap();
    cert.issuer() == ca.subject() && cert.verify_signature(Some(ca.public_key())).is_ok()
}

fn ekus(cert_pem: &str) -> (bool, bool) {
    let cert_der = der(cert_pem);
    let cert = parse_der(&cert_der, "cert").unwrap();
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    (eku.server_auth, eku.client_auth)
}

fn sans(cert_pem: &str) -> BTreeSet<San> {
    let cert_der = der(cert_pem);
    let cert = parse_der(&cert_der, "cert").unwrap();
    let mut out = BTreeSet::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                match name {
                    GeneralName::DNSName(d) => {
                        out.insert(San::Dns((*d).to_owned()));
                    }
                    GeneralName::IPAddress(b) if b.len() == 4 => {
                        out.insert(San::Ip(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap())));
                    }
                    other => panic!("unexpected SAN {other:?}"),
                }
            }
        }
    }
    out
}

#[test]
fn pki_is_shareable() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Pki>();
}

#[test]
fn first_start_creates_private_files() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::load_or_create(tmp.path(), &names(&["localhost", "127.0.0.1"])).unwrap();
    let dir = tmp.path().join("pki");
    assert_eq!(pki.dir(), dir);
    assert_eq!(mode(&dir), 0o700);
    for key in [CA_KEY_FILE, SERVER_KEY_FILE, SIGNING_KEY_FILE] {
        assert_eq!(mode(&dir.join(key)), 0o600, "{key}");
    }
    for public in [CA_CERT_FILE, SERVER_CERT_FILE, SERVER_MANAGED_FILE] {
        assert!(dir.join(public).exists(), "{public}");
    }
    let leftovers: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    assert_eq!(
        fs::read_to_string(dir.join(CA_CERT_FILE)).unwrap(),
        pki.ca_pem()
    );
    assert!(pki.server_key_pem().contains("BEGIN PRIVATE KEY"));
    let signing = fs::read_to_string(dir.join(SIGNING_KEY_FILE)).unwrap();
    assert!(signing.starts_with("-----BEGIN PRIVATE KEY-----"));

    // The CA is a CA; the server certificate chains to it and names both SANs.
    let ca_der = der(pki.ca_pem());
    assert!(parse_der(&ca_der, "ca").unwrap().is_ca());
    assert!(chains_to(pki.server_cert_pem(), pki.ca_pem()));
    assert_eq!(ekus(pki.server_cert_pem()), (true, false));
    assert_eq!(
        sans(pki.server_cert_pem()),
        BTreeSet::from([
            San::Dns("localhost".into()),
            San::Ip("127.0.0.1".parse().unwrap())
        ])
    );

    // The JWK is the signing key's, named by its thumbprint.
    let jwk = pki.jwk();
    assert_eq!(
        jwk.verifying_key().unwrap(),
        pki.signing_key().verifying_key()
    );
    assert_eq!(
        pki.kid(),
        kid_for(&pki.signing_key().verifying_key().to_bytes())
    );
    assert_eq!(jwk.kid, pki.kid());
    // Debug never shows key material.
    assert!(!format!("{pki:?}").contains("PRIVATE"));
}

#[test]
fn second_start_loads_the_same_material() {
    let tmp = tempfile::tempdir().unwrap();
    let server_names = names(&["localhost", "127.0.0.1"]);
    let first = Pki::load_or_create(tmp.path(), &server_names).unwrap();
    let second = Pki::load_or_create(tmp.path(), &server_names).unwrap();
    assert_eq!(first.kid(), second.kid());
    assert_eq!(
        first.signing_key().to_bytes(),
        second.signing_key().to_bytes()
    );
    assert_eq!(first.ca_pem(), second.ca_pem());
    assert_eq!(first.server_cert_pem(), second.server_cert_pem());
    assert_eq!(first.server_key_pem(), second.server_key_pem());
    // A certificate issued after the restart chains to the same CA.
    let cert = second.issue_terminal("pos_01", "t706f735f3031").unwrap();
    assert!(chains_to(&cert.cert_pem, first.ca_pem()));
}

#[test]
fn changed_names_reissue_a_managed_server_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let first = Pki::load_or_create(tmp.path(), &names(&["localhost"])).unwrap();
    let second = Pki::load_or_create(tmp.path(), &names(&["gw.example", "10.0.0.7"])).unwrap();
    assert_ne!(first.server_cert_pem(), second.server_cert_pem());
    assert_eq!(first.server_key_pem(), second.server_key_pem(), "key kept");
    assert_eq!(first.ca_pem(), second.ca_pem());
    assert_eq!(
        sans(second.server_cert_pem()),
        BTreeSet::from([
            San::Dns("gw.example".into()),
            San::Ip("10.0.0.7".parse().unwrap())
        ])
    );
    // Same names (another order, another case): no reissue.
    let third = Pki::load_or_create(tmp.path(), &names(&["10.0.0.7", "GW.example"])).unwrap();
    assert_eq!(second.server_cert_pem(), third.server_cert_pem());
}

#[test]
fn terminal_certificate_chains_and_names_the_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::load_or_create(tmp.path(), &names(&["localhost"])).unwrap();
    let tenant = posgate_proto::topics::tenant_for("store-12-lane-3");
    let issued = pki.issue_terminal("store-12-lane-3", &tenant).unwrap();
    assert!(chains_to(&issued.cert_pem, pki.ca_pem()));
    assert_eq!(ekus(&issued.cert_pem), (false, true));

    let id = identity_of_pem(&issued.cert_pem).unwrap();
    assert_eq!(id.cn, "store-12-lane-3");
    assert_eq!(id.o, tenant);
    assert_eq!(id.serial_hex, issued.serial_hex);
    assert_eq!(id.serial_hex.len(), 32);
    assert_eq!(id.not_after, issued.not_after);
    let years = (issued.not_after - OffsetDateTime::now_utc()).whole_days();
    assert!((1820..=1827).contains(&years), "{years} days");
    assert_eq!(identity_of(&der(&issued.cert_pem)).unwrap(), id);

    // The private key belongs to the certificate and is a P-256 PKCS#8 key.
    let key = KeyPair::from_pem(&issued.key_pem).unwrap();
    assert_eq!(key.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
    let cert_der = der(&issued.cert_pem);
    let cert = parse_der(&cert_der, "cert").unwrap();
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    assert!(!format!("{issued:?}").contains("PRIVATE"));
    // It names its serial: in the subject (serialNumber) and as its only SAN, a URI.
    let named: Vec<&str> = cert
        .subject()
        .iter_attributes()
        .filter(|a| a.attr_type().to_id_string() == "2.5.4.5")
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(named, [issued.serial_hex.as_str()]);
    let sans = &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert_eq!(
        format!("{sans:?}"),
        format!("[URI(\"urn:posgate:cert:{}\")]", issued.serial_hex)
    );
    assert_eq!(
        crate::pki::cert_uri(&issued.serial_hex),
        format!("urn:posgate:cert:{}", issued.serial_hex)
    );

    let again = pki.issue_terminal("store-12-lane-3", &tenant).unwrap();
    assert_ne!(again.serial_hex, issued.serial_hex);
    assert_ne!(again.key_pem, issued.key_pem);
}

#[test]
fn bad_identities_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::load_or_create(tmp.path(), &names(&["localhost"])).unwrap();
    for (id, tenant) in [("", "t1"), ("pos 1", "t1"), ("pos_1", "t_1"), ("pos_1", "")] {
        assert!(
            matches!(
                pki.issue_terminal(id, tenant),
                Err(PkiError::BadIdentity { .. })
            ),
            "{id:?} {tenant:?}"
        );
    }
    assert!(matches!(
        identity_of(b"not a certificate"),
        Err(PkiError::BadCert { .. })
    ));
    assert!(matches!(
        identity_of_pem("nothing here"),
        Err(PkiError::BadPem { .. })
    ));
    // The server certificate has a CN but no O.
    assert!(matches!(
        identity_of_pem(pki.server_cert_pem()),
        Err(PkiError::MissingField { field: "O" })
    ));
}

/// An operator's CA, made the way `openssl` would: its own DN, its own key.
fn operator_ca(dir: &Path) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "Example Retail Root");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).unwrap();
    let pki = dir.join("pki");
    fs::create_dir_all(&pki).unwrap();
    fs::set_permissions(&pki, fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(pki.join(CA_CERT_FILE), cert.pem()).unwrap();
    fs::write(pki.join(CA_KEY_FILE), key.serialize_pem()).unwrap();
    fs::set_permissions(pki.join(CA_KEY_FILE), fs::Permissions::from_mode(0o600)).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[test]
fn operator_ca_is_used_as_is() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca_pem, ca_key) = operator_ca(tmp.path());
    let pki = Pki::load_or_create(tmp.path(), &names(&["localhost"])).unwrap();
    assert_eq!(pki.ca_pem(), ca_pem);
    let dir = tmp.path().join("pki");
    assert_eq!(fs::read_to_string(dir.join(CA_CERT_FILE)).unwrap(), ca_pem);
    assert_eq!(fs::read_to_string(dir.join(CA_KEY_FILE)).unwrap(), ca_key);
    assert!(chains_to(pki.server_cert_pem(), &ca_pem));
    let issued = pki.issue_terminal("pos_01", "t706f735f3031").unwrap();
    assert!(chains_to(&issued.cert_pem, &ca_pem));
}

#[test]
fn operator_server_certificate_is_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca_pem, ca_key) = operator_ca(tmp.path());
    // The operator's server certificate, signed by their CA, names of their choosing.
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, KeyPair::from_pem(&ca_key).unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(names(&["mqtt.example"])).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let dir = tmp.path().join("pki");
    fs::write(dir.join(SERVER_CERT_FILE), cert.pem()).unwrap();
    fs::write(dir.join(SERVER_KEY_FILE), key.serialize_pem()).unwrap();

    let pki = Pki::load_or_create(tmp.path(), &names(&["localhost"])).unwrap();
    assert_eq!(
        pki.server_cert_pem(),
        cert.pem(),
        "not reissued for other names"
    );
    assert!(!dir.join(SERVER_MANAGED_FILE).exists());

    // Without the CA that issued it, it is refused rather than served to terminals that
    // could never verify it.
    let other = tempfile::tempdir().unwrap();
    let other_dir = other.path().join("pki");
    fs::create_dir_all(&other_dir).unwrap();
    fs::write(other_dir.join(SERVER_CERT_FILE), cert.pem()).unwrap();
    fs::write(other_dir.join(SERVER_KEY_FILE), key.serialize_pem()).unwrap();
    assert!(matches!(
        Pki::load_or_create(other.path(), &names(&["localhost"])),
        Err(PkiError::ServerWithoutCa { .. })
    ));
}

#[test]
fn half_pairs_and_mismatches_are_refused() {
    // A CA certificate without its key.
    let tmp = tempfile::tempdir().unwrap();
    let (_, _) = operator_ca(tmp.path());
    fs::remove_file(tmp.path().join("pki").join(CA_KEY_FILE)).unwrap();
    assert!(matches!(
        Pki::load_or_create(tmp.path(), &names(&["localhost"])),
        Err(PkiError::Incomplete { .. })
    ));

    // A CA certificate with somebody else's key.
    let tmp = tempfile::tempdir().unwrap();
    operator_ca(tmp.path());
    let stranger = KeyPair::generate().unwrap().serialize_pem();
    fs::write(tmp.path().join("pki").join(CA_KEY_FILE), stranger).unwrap();
    assert!(matches!(
        Pki::load_or_create(tmp.path(), &names(&["localhost"])),
        Err(PkiError::KeyMismatch { .. })
    ));

    // A key that is not PKCS#8 PEM.
    let tmp = tempfile::tempdir().unwrap();
    operator_ca(tmp.path());
    fs::write(tmp.path().join("pki").join(CA_KEY_FILE), "garbage").unwrap();
    assert!(matches!(
        Pki::load_or_create(tmp.path(), &names(&["localhost"])),
        Err(PkiError::BadKey { .. })
    ));

    // A leaf certificate where the CA should be.
    let tmp = tempfile::tempdir().unwrap();
    let first = Pki::load_or_create(tmp.path(), &names(&["localhost"])).unwrap();
    let dir = tmp.path().join("pki");
    fs::write(dir.join(CA_CERT_FILE), first.server_cert_pem()).unwrap();
    fs::write(dir.join(CA_KEY_FILE), first.server_key_pem()).unwrap();
    assert!(matches!(
        Pki::load_or_create(tmp.path(), &names(&["localhost"])),
        Err(PkiError::NotCa { .. })
    ));

    assert!(matches!(
        Pki::load_or_create(tmp.path(), &[]),
        Err(PkiError::NoServerNames)
    ));
}

#[test]
fn a_crash_between_files_is_repaired() {
    let tmp = tempfile::tempdir().unwrap();
    let first = Pki::load_or_create(tmp.path(), &names(&["localhost"])).unwrap();
    let dir = tmp.path().join("pki");
    // Crash after the CA key, before its certificate; and after the server key, before its
    // certificate; with a stale temp file left behind.
    fs::remove_file(dir.join(CA_CERT_FILE)).unwrap();
    fs::remove_file(dir.join(SERVER_CERT_FILE)).unwrap();
    fs::write(dir.join("ca.pem.tmp"), "half").unwrap();
    let second = Pki::load_or_create(tmp.path(), &names(&["localhost"])).unwrap();
    assert!(chains_to(second.server_cert_pem(), second.ca_pem()));
    assert_eq!(first.server_key_pem(), second.server_key_pem());
    assert_eq!(first.kid(), second.kid());
    // The old server certificate still chains: same CA key, same name.
    assert!(chains_to(first.server_cert_pem(), second.ca_pem()));

    // A managed server certificate whose key vanished gets a new key and certificate.
    fs::remove_file(dir.join(SERVER_KEY_FILE)).unwrap();
    let third = Pki::load_or_create(tmp.path(), &names(&["localhost"])).unwrap();
    assert_ne!(third.server_key_pem(), second.server_key_pem());
    assert!(chains_to(third.server_cert_pem(), third.ca_pem()));
    let cert_der = der(third.server_cert_pem());
    let cert = parse_der(&cert_der, "cert").unwrap();
    let key = KeyPair::from_pem(third.server_key_pem()).unwrap();
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
}

#[test]
fn signing_key_survives_as_pkcs8() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::load_or_create(tmp.path(), &names(&["localhost"])).unwrap();
    let pem = fs::read_to_string(tmp.path().join("pki").join(SIGNING_KEY_FILE)).unwrap();
    let key = SigningKey::from_pkcs8_pem(&pem).unwrap();
    assert_eq!(key.to_bytes(), pki.signing_key().to_bytes());
    // A signature made with it verifies with the published JWK.
    let c = posgate_proto::Confirmation::new(
        "pos_01",
        "pi_1",
        1,
        posgate_proto::ConfirmationStatus::Confirmed,
        posgate_proto::MicroUsdc(4_400_000),
        "2026-04-01T20:00:12Z",
    );
    let jws = posgate_proto::confirmation::sign(pki.signing_key(), pki.kid(), &c);
    let vk = pki.jwk().verifying_key().unwrap();
    assert_eq!(
        posgate_proto::confirmation::verify(&jws, &vk, "pos_01", 1),
        Ok(c)
    );
}
