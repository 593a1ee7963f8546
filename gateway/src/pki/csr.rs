//! Certificate signing requests (PKCS#10) from terminals whose key never leaves them (Android
//! Keystore, a secure element, a TPM): checked here, then signed by the CA with
//! [`Pki::issue_terminal_for_csr`](super::Pki::issue_terminal_for_csr).
//!
//! What posgate takes from a CSR is its **public key**, and only after the request's signature
//! verifies with that key (proof of possession: whoever sent it holds the private key). Nothing
//! else in it is trusted or copied: the subject, SANs, requested extensions and attributes are
//! ignored, and the certificate gets exactly what a gateway-made key gets (CN = terminal id, O =
//! tenant, EKU clientAuth, keyUsage digitalSignature, the gateway's serial and validity). So a
//! request cannot choose its identity, ask to be a CA, or gain serverAuth; the admin API's caller
//! decides which terminal id the key gets.
//!
//! Key types accepted ([`KeyKind`]) are those the gateway's TLS servers verify in a client
//! handshake (rustls with aws-lc-rs, on the MQTT front door and the TLS ingress), this module can
//! check a request's signature for (x509-parser's `verify`, built on ring) and rcgen can put in a
//! certificate: ECDSA P-256 and P-384, Ed25519, and RSA of 2048 to 4096 bits. P-521 is left out
//! (ring verifies no P-521 signature, and no keystore needs it), and so are requests signed with
//! SHA-1.

use std::fmt;

use rcgen::{PublicKeyData, SignatureAlgorithm};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
    OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer as _;
use x509_parser::public_key::PublicKey;

/// Largest `csr_pem` accepted (an RSA-4096 request is under 2 KiB).
pub const MAX_CSR_PEM_BYTES: usize = 16 * 1024;

/// Smallest and largest RSA modulus accepted, in bits.
pub const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=4096;

/// Why a CSR was refused. Each is the terminal developer's mistake, answered `400` with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("csr_pem is larger than {MAX_CSR_PEM_BYTES} bytes")]
    TooLarge,
    #[error("csr_pem is not PEM (expected -----BEGIN CERTIFICATE REQUEST-----)")]
    NotPem,
    #[error("csr_pem holds a {0:?} PEM block, not a CERTIFICATE REQUEST")]
    WrongType(String),
    #[error("csr_pem holds more than one PEM block; send the request alone")]
    Trailing,
    #[error("csr_pem is not a PKCS#10 certificate request: {0}")]
    Malformed(String),
    #[error(
        "the request is signed with {0}, which is not accepted (use ECDSA with SHA-256 or SHA-384, Ed25519, or RSA PKCS#1 v1.5 or PSS with SHA-256 or stronger)"
    )]
    UnsupportedSignature(String),
    #[error(
        "the request's key is {0}, which is not accepted (use ECDSA P-256 or P-384, Ed25519, or RSA of 2048 to 4096 bits)"
    )]
    UnsupportedKey(String),
    #[error(
        "the request's signature does not verify with its own public key (no proof of possession of the private key)"
    )]
    BadSignature,
}

/// The kind of a terminal's public key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    EcdsaP256,
    EcdsaP384,
    Ed25519,
    /// With its modulus size in bits.
    Rsa(usize),
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyKind::EcdsaP256 => f.write_str("ECDSA P-256"),
            KeyKind::EcdsaP384 => f.write_str("ECDSA P-384"),
            KeyKind::Ed25519 => f.write_str("Ed25519"),
            KeyKind::Rsa(bits) => write!(f, "RSA-{bits}"),
        }
    }
}

/// The public key of a verified CSR, ready to be certified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CsrKey {
    kind: KeyKind,
    /// The subjectPublicKey BIT STRING's content (an EC point, 32 Ed25519 bytes, an RSAPublicKey).
    raw: Vec<u8>,
    /// The SPKI exactly as the request carried it, to check the certificate against.
    spki_der: Vec<u8>,
}

impl CsrKey {
    /// What kind of key it is.
    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// Its SubjectPublicKeyInfo, DER, as the request carried it.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }
}

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    /// Only the key's half of this is used for the certificate's SPKI (algorithm OID and curve);
    /// the certificate is signed by the CA's own algorithm.
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        match self.kind {
            KeyKind::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyKind::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyKind::Ed25519 => &rcgen::PKCS_ED25519,
            KeyKind::Rsa(_) => &rcgen::PKCS_RSA_SHA256,
        }
    }
}

/// Parses a PEM PKCS#10 request, checks its key type and signature algorithm, and verifies its
/// signature with its own key. Returns only the key (see the module docs for why).
///
/// # Errors
/// [`CsrError`], naming what is wrong.
pub fn parse(pem: &str) -> Result<CsrKey, CsrError> {
    if pem.len() > MAX_CSR_PEM_BYTES {
        return Err(CsrError::TooLarge);
    }
    let (rest, block) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|_| CsrError::NotPem)?;
    // "NEW CERTIFICATE REQUEST" is what older OpenSSL and Netscape tools write.
    if block.label != "CERTIFICATE REQUEST" && block.label != "NEW CERTIFICATE REQUEST" {
        return Err(CsrError::WrongType(block.label));
    }
    if std::str::from_utf8(rest).is_ok_and(|r| r.contains("-----BEGIN")) {
        return Err(CsrError::Trailing);
    }
    let (trailing, csr) = X509CertificationRequest::from_der(&block.contents)
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !trailing.is_empty() {
        return Err(CsrError::Malformed(format!(
            "{} bytes after the request",
            trailing.len()
        )));
    }
    // The key first (the likelier mistake, and a P-521 key is refused for its curve, not for the
    // SHA-512 that comes with it), then the algorithm, so that neither is reported as a bad
    // signature.
    let spki = &csr.certification_request_info.subject_pki;
    let kind = key_kind(spki)?;
    let sig = &csr.signature_algorithm.algorithm;
    let sig_ok = [
        OID_SIG_ECDSA_WITH_SHA256,
        OID_SIG_ECDSA_WITH_SHA384,
        OID_SIG_ED25519,
        OID_PKCS1_SHA256WITHRSA,
        OID_PKCS1_SHA384WITHRSA,
        OID_PKCS1_SHA512WITHRSA,
        OID_PKCS1_RSASSAPSS,
    ]
    .contains(sig);
    if !sig_ok {
        return Err(CsrError::UnsupportedSignature(oid_name(sig)));
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    Ok(CsrKey {
        kind,
        raw: spki.subject_public_key.data.to_vec(),
        spki_der: spki.raw.to_vec(),
    })
}

fn key_kind(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<KeyKind, CsrError> {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 => Ok(KeyKind::EcdsaP256),
            Some(c) if c == OID_NIST_EC_P384 => Ok(KeyKind::EcdsaP384),
            Some(c) => Err(CsrError::UnsupportedKey(format!(
                "ECDSA on curve {}",
                oid_name(&c)
            ))),
            None => Err(CsrError::UnsupportedKey(
                "ECDSA without a named curve".into(),
            )),
        };
    }
    if *alg == OID_SIG_ED25519 {
        return Ok(KeyKind::Ed25519);
    }
    if *alg == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa.key_size(),
            _ => return Err(CsrError::Malformed("unreadable RSA public key".into())),
        };
        return if RSA_BITS.contains(&bits) {
            Ok(KeyKind::Rsa(bits))
        } else {
            Err(CsrError::UnsupportedKey(format!("RSA-{bits}")))
        };
    }
    Err(CsrError::UnsupportedKey(oid_name(alg)))
}

/// A readable name for an OID (the registry's short name when it has one).
fn oid_name(oid: &x509_parser::der_parser::oid::Oid<'_>) -> String {
    x509_parser::objects::oid2sn(oid, x509_parser::objects::oid_registry())
        .map(str::to_owned)
        .unwrap_or_else(|_| oid.to_id_string())
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};
    use x509_parser::certificate::X509Certificate;
    use x509_parser::extensions::ParsedExtension;

    use super::*;
    use crate::pki::Pki;

    fn pki() -> (tempfile::TempDir, Pki) {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path(), &["localhost".into()]).unwrap();
        (dir, pki)
    }

    /// A CSR as a terminal would make it, asking for everything it should not get.
    fn csr_for(key: &KeyPair) -> String {
        let mut params = CertificateParams::new(vec!["evil.example".into()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "pos_other");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "t0000000000");
        params
            .subject_alt_names
            .push(SanType::IpAddress([10, 0, 0, 1].into()));
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    fn issue(pki: &Pki, csr_pem: &str) -> (CsrKey, String) {
        let key = parse(csr_pem).unwrap();
        let tenant = posgate_proto::topics::tenant_for("pos_1");
        let signed = pki.issue_terminal_for_csr("pos_1", &tenant, &key).unwrap();
        (key, signed.cert_pem)
    }

    /// What a certificate says: (CN, O, SPKI DER, is CA, EKU clientAuth only, SANs other than
    /// the one naming its serial).
    fn inspect(cert_pem: &str, ca_pem: &str) -> (String, String, Vec<u8>, bool, bool, bool) {
        let der = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .unwrap()
            .1
            .contents;
        let ca_der = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes())
            .unwrap()
            .1
            .contents;
        let cert = X509Certificate::from_der(&der).unwrap().1;
        let ca = X509Certificate::from_der(&ca_der).unwrap().1;
        assert!(cert.verify_signature(Some(ca.public_key())).is_ok());
        let subject = cert.subject();
        let cn = subject.iter_common_name().next().unwrap().as_str().unwrap();
        let o = subject
            .iter_organization()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        let client_only = eku.client_auth && !eku.server_auth && !eku.code_signing && !eku.any;
        let own = crate::pki::cert_uri(&cert.raw_serial_as_string().replace(':', ""));
        let san = cert
            .extensions()
            .iter()
            .any(|e| match e.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(names) => names.general_names.iter().any(
                    |n| !matches!(n, x509_parser::extensions::GeneralName::URI(u) if *u == own),
                ),
                _ => false,
            });
        (
            cn.to_owned(),
            o.to_owned(),
            cert.public_key().raw.to_vec(),
            cert.is_ca(),
            client_only,
            san,
        )
    }

    #[test]
    fn certifies_the_requested_key_and_nothing_else_it_asks_for() {
        let (_dir, pki) = pki();
        for (alg, kind) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, KeyKind::EcdsaP256),
            (&rcgen::PKCS_ECDSA_P384_SHA384, KeyKind::EcdsaP384),
            (&rcgen::PKCS_ED25519, KeyKind::Ed25519),
        ] {
            let key = KeyPair::generate_for(alg).unwrap();
            let (parsed, cert_pem) = issue(&pki, &csr_for(&key));
            assert_eq!(parsed.kind(), kind);
            let (cn, o, spki, is_ca, client_only, san) = inspect(&cert_pem, pki.ca_pem());
            assert_eq!(cn, "pos_1", "{kind}: the gateway names the terminal");
            assert_eq!(o, posgate_proto::topics::tenant_for("pos_1"));
            assert_eq!(
                spki,
                key.subject_public_key_info(),
                "{kind}: the terminal's key"
            );
            assert_eq!(spki, parsed.spki_der());
            assert!(
                !is_ca && client_only && !san,
                "{kind}: requested extensions ignored"
            );
        }
    }

    #[test]
    fn rsa_and_foreign_extensions_from_openssl_are_accepted_and_ignored() {
        let (_dir, pki) = pki();
        for pem in [
            include_str!("testdata/rsa2048.csr"),
            include_str!("testdata/p256ext.csr"),
        ] {
            let (parsed, cert_pem) = issue(&pki, pem);
            let (cn, _, spki, is_ca, client_only, san) = inspect(&cert_pem, pki.ca_pem());
            assert_eq!(cn, "pos_1");
            assert_eq!(
                spki,
                parsed.spki_der(),
                "the SPKI round-trips byte for byte"
            );
            assert!(!is_ca && client_only && !san);
        }
        assert_eq!(
            parse(include_str!("testdata/rsa2048.csr")).unwrap().kind(),
            KeyKind::Rsa(2048)
        );
    }

    #[test]
    fn refuses_what_is_not_a_usable_request() {
        let key = KeyPair::generate().unwrap();
        let good = csr_for(&key);
        let (_dir, pki) = pki();

        assert_eq!(parse("hello"), Err(CsrError::NotPem));
        assert_eq!(parse(""), Err(CsrError::NotPem));
        assert_eq!(
            parse(pki.ca_pem()),
            Err(CsrError::WrongType("CERTIFICATE".into()))
        );
        assert_eq!(
            parse(&key.serialize_pem()),
            Err(CsrError::WrongType("PRIVATE KEY".into()))
        );
        assert_eq!(parse(&format!("{good}{good}")), Err(CsrError::Trailing));
        assert_eq!(
            parse(&format!("{good}{}", " ".repeat(MAX_CSR_PEM_BYTES))),
            Err(CsrError::TooLarge)
        );
        let junk = "-----BEGIN CERTIFICATE REQUEST-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE REQUEST-----\n";
        assert!(matches!(parse(junk), Err(CsrError::Malformed(_))));

        // Proof of possession: a request whose signature does not match its key.
        let mut der = x509_parser::pem::parse_x509_pem(good.as_bytes())
            .unwrap()
            .1
            .contents;
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let forged = pem_of(&der);
        assert_eq!(parse(&forged), Err(CsrError::BadSignature));

        // Another key's request info under this key's signature: same failure.
        let other = csr_for(&KeyPair::generate().unwrap());
        let spliced = splice(&other, &good);
        assert_eq!(parse(&spliced), Err(CsrError::BadSignature));

        for (pem, want) in [
            (include_str!("testdata/rsa1024.csr"), "RSA-1024"),
            (
                include_str!("testdata/p521.csr"),
                "ECDSA on curve secp521r1",
            ),
            (
                include_str!("testdata/k1.csr"),
                "ECDSA on curve 1.3.132.0.10",
            ),
        ] {
            assert_eq!(parse(pem), Err(CsrError::UnsupportedKey(want.into())));
        }
        assert!(matches!(
            parse(include_str!("testdata/p256sha1.csr")),
            Err(CsrError::UnsupportedSignature(_))
        ));
    }

    fn pem_of(der: &[u8]) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            lines.join("\n")
        )
    }

    /// `info_from`'s certificationRequestInfo with `sig_from`'s signature algorithm and value.
    fn splice(info_from: &str, sig_from: &str) -> String {
        let der = |pem: &str| {
            x509_parser::pem::parse_x509_pem(pem.as_bytes())
                .unwrap()
                .1
                .contents
        };
        let (a, b) = (der(info_from), der(sig_from));
        let a_csr = X509CertificationRequest::from_der(&a).unwrap().1;
        let b_csr = X509CertificationRequest::from_der(&b).unwrap().1;
        let info = a_csr.certification_request_info.raw;
        // The signature algorithm and value are everything after the info in the outer SEQUENCE.
        let b_info = b_csr.certification_request_info.raw;
        let start = b_info.as_ptr() as usize - b.as_ptr() as usize + b_info.len();
        let mut body = info.to_vec();
        body.extend_from_slice(&b[start..]);
        let mut out = vec![0x30];
        der_len(&mut out, body.len());
        out.extend_from_slice(&body);
        pem_of(&out)
    }

    fn der_len(out: &mut Vec<u8>, len: usize) {
        if len < 0x80 {
            out.push(len as u8);
        } else if len < 0x100 {
            out.extend_from_slice(&[0x81, len as u8]);
        } else {
            out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
        }
    }
}
