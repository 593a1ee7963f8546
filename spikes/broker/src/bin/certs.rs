//! Generate a CA, a server certificate (localhost, 127.0.0.1) and N client certificates
//! (Subject O = alphanumeric tenant, CN = terminal id) into a directory.
//!
//! `cargo run --release --bin certs -- --dir /tmp/spike-certs --clients 10100`

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value_t = 10_100)]
    clients: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(args.dir.join("clients"))?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "posgate spike CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    std::fs::write(args.dir.join("ca.pem"), ca_cert.pem())?;
    let issuer = Issuer::new(ca_params, ca_key);

    let srv_key = KeyPair::generate()?;
    let mut srv = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    srv.distinguished_name.push(DnType::CommonName, "localhost");
    srv.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let srv_cert = srv.signed_by(&srv_key, &issuer)?;
    std::fs::write(args.dir.join("server.pem"), srv_cert.pem())?;
    std::fs::write(args.dir.join("server.key"), srv_key.serialize_pem())?;

    let mut index = std::fs::File::create(args.dir.join("clients.tsv"))?;
    for i in 0..args.clients {
        let tenant = format!("t{i}");
        let cn = format!("pos_{i}");
        let serial: u64 = 0x1000 + i as u64;
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, tenant.clone());
        p.distinguished_name.push(DnType::CommonName, cn.clone());
        let bytes: Vec<u8> = serial
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|b| *b == 0)
            .collect();
        p.serial_number = Some(SerialNumber::from(bytes));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &issuer)?;
        let mut pem = cert.pem();
        pem.push_str(&key.serialize_pem());
        std::fs::write(args.dir.join("clients").join(format!("{i}.pem")), pem)?;
        writeln!(index, "{i}\t{tenant}\t{cn}\t{serial:x}")?;
    }
    println!(
        "wrote CA, server cert and {} client certs to {}",
        args.clients,
        args.dir.display()
    );
    Ok(())
}
