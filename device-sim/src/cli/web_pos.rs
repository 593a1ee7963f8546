//! `posgate-sim web-pos`: its flags, and serving the reference web POS ([`crate::web_pos`]) until
//! SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::{UsageError, wait_for_signal};
use crate::web_pos::{self, PageChannel, WebPos, WebPosConfig};

/// `posgate-sim web-pos`: the reference web POS of `clients/web/`.
#[derive(clap::Args)]
pub(super) struct WebPosArgs {
    /// The terminal's provisioning bundle (the JSON that POST /v1/terminals answered).
    #[arg(long)]
    bundle: PathBuf,
    /// The gateway's ingress listener as the browser reaches it.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    gateway: String,
    /// Address to serve the page on. Its origin (http://ADDR) must be in the gateway's
    /// ingress.cors_allowed_origins.
    #[arg(long, default_value = "127.0.0.1:8480")]
    listen: SocketAddr,
    /// The page's files (clients/web with its npm dependencies installed).
    #[arg(long, default_value = web_pos::DEFAULT_DIR)]
    dir: PathBuf,
    /// How the page receives confirmations, in the order it tries them.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "sse,ws,poll")]
    channels: Vec<PageChannel>,
    /// Serve beyond loopback. The page's config.json carries the terminal's bearer token: anyone
    /// who can reach this address can act as the terminal.
    #[arg(long)]
    allow_remote: bool,
}

impl WebPosArgs {
    /// Runs `posgate-sim web-pos`.
    pub(super) async fn run(self) -> anyhow::Result<ExitCode> {
        let usage = |e: String| anyhow::anyhow!(UsageError(e));
        if !self.listen.ip().is_loopback() && !self.allow_remote {
            return Err(usage(format!(
                "--listen {}: not a loopback address; the page hands out the terminal's bearer \
                 token, so serving it beyond this machine needs --allow-remote",
                self.listen
            )));
        }
        let bundle = web_pos::read_bundle(&self.bundle).map_err(|e| usage(format!("{e:#}")))?;
        let terminal_id = bundle.terminal_id.clone();
        let web = WebPos::load(&WebPosConfig {
            dir: self.dir,
            gateway: self.gateway.clone(),
            bundle,
            channels: self.channels,
        })
        .map_err(|e| usage(format!("{e:#}")))?;
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .map_err(|e| usage(format!("--listen {}: {e}", self.listen)))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "posgate-sim web-pos: http://{addr}/ for terminal {terminal_id}, gateway {}\n\
             the gateway must allow this origin: POSGATE__INGRESS__CORS_ALLOWED_ORIGINS={}",
            self.gateway,
            web_pos::origin(addr)
        );
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(web_pos::serve(listener, web, shutdown.clone()));
        wait_for_signal(term).await?;
        shutdown.cancel();
        server.await.context("the web server task")??;
        Ok(ExitCode::SUCCESS)
    }
}
