//! rumqttd 0.20 baseline: one v4 listener with mutual TLS and the `validate-tenant-prefix`
//! feature (tenant = client certificate Subject O). rumqttd cannot report a port-0 bind,
//! so the port is fixed.
//!
//! `rumqttd-broker --certs DIR [--addr 127.0.0.1:18883]`

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    certs: PathBuf,
    #[arg(long, default_value = "127.0.0.1:18883")]
    addr: SocketAddr,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let p = |f: &str| args.certs.join(f).to_string_lossy().into_owned();
    let server = ServerSettings {
        name: "v4-tls".into(),
        listen: args.addr,
        tls: Some(TlsConfig::Rustls {
            capath: Some(p("ca.pem")),
            certpath: p("server.pem"),
            keypath: p("server.key"),
        }),
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 20_480,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 20_010,
            max_outgoing_packet_count: 200,
            max_segment_size: 104_857_600,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    let mut broker = Broker::new(config);
    println!("LISTEN {}", args.addr);
    println!("PID {}", std::process::id());
    broker.start()?;
    Ok(())
}
