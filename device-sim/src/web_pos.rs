//! `posgate-sim web-pos`: serves the reference web POS of `clients/web/` and its configuration.
//!
//! The page is static (HTML, CSS, JavaScript modules, and the QR code module from its npm
//! package); what this server adds is `config.json`, made from the terminal's provisioning
//! bundle: the gateway's URL as the browser reaches it, the terminal id, the gateway's public key
//! and the terminal's bearer token. It is meant to run on the POS device itself, on loopback: whoever
//! can load `config.json` holds the terminal's token (clients/web/README.md weighs this), so a
//! listener beyond loopback needs `--allow-remote`.
//!
//! Only the files of [`FILES`] are served, read once at start (a missing one, typically the
//! npm package before `npm ci`, is an error then, not a broken page later), with a
//! Content-Security-Policy that lets the page run its own scripts and talk to the gateway only.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::terminal::Bundle;

/// `clients/web/` of the source tree this binary was built from.
pub const DEFAULT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../clients/web");

/// A module of lossless-json's ES build, as [`FILES`] lists it.
macro_rules! lossless_json {
    ($file:literal) => {
        (
            concat!("/node_modules/lossless-json/lib/esm/", $file),
            concat!("node_modules/lossless-json/lib/esm/", $file),
            "text/javascript; charset=utf-8",
        )
    };
}

/// What is served: the path, the file under the directory, its content type.
pub const FILES: &[(&str, &str, &str)] = &[
    ("/", "index.html", "text/html; charset=utf-8"),
    ("/index.html", "index.html", "text/html; charset=utf-8"),
    ("/style.css", "style.css", "text/css; charset=utf-8"),
    ("/pos.js", "pos.js", "text/javascript; charset=utf-8"),
    (
        "/gateway.js",
        "gateway.js",
        "text/javascript; charset=utf-8",
    ),
    ("/verify.js", "verify.js", "text/javascript; charset=utf-8"),
    (
        "/node_modules/qrcode-generator/dist/qrcode.mjs",
        "node_modules/qrcode-generator/dist/qrcode.mjs",
        "text/javascript; charset=utf-8",
    ),
    // lossless-json's parser (verify.js reads seq, a u64, exactly) and the modules it imports.
    lossless_json!("parse.js"),
    lossless_json!("numberParsers.js"),
    lossless_json!("LosslessNumber.js"),
    lossless_json!("utils.js"),
    lossless_json!("revive.js"),
];

/// How the page receives confirmations, in the order it tries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PageChannel {
    /// Server-Sent Events (`EventSource`).
    Sse,
    /// WebSocket.
    Ws,
    /// Long polling of the current intent.
    Poll,
}

/// The page's settings.
pub struct WebPosConfig {
    /// Where the page's files are (`clients/web/`, with `node_modules` installed).
    pub dir: PathBuf,
    /// The gateway's ingress listener as the browser reaches it, `http(s)://host:port`.
    pub gateway: String,
    /// The terminal's provisioning bundle.
    pub bundle: Bundle,
    /// The channels the page tries, in order.
    pub channels: Vec<PageChannel>,
}

/// Why the page cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum WebPosError {
    #[error("reading {}{}", .path.display(), npm_hint(.path))]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--gateway {0:?}: must be http(s)://host[:port], without a path")]
    Gateway(String),
    #[error("no channel to receive confirmations on")]
    NoChannel,
}

/// What to do when a file of the npm package is missing.
fn npm_hint(path: &Path) -> &'static str {
    if path.components().any(|c| c.as_os_str() == "node_modules") {
        " (the page's npm dependencies are not installed: npm ci --prefix clients/web)"
    } else {
        ""
    }
}

/// The page's bytes and its configuration, ready to serve.
pub struct WebPos {
    files: HashMap<&'static str, (Bytes, &'static str)>,
    config_json: Bytes,
    csp: HeaderValue,
}

#[derive(Serialize)]
struct PageConfig<'a> {
    gateway: &'a str,
    terminal_id: &'a str,
    http_token: &'a str,
    gateway_jwk: &'a posgate_proto::confirmation::Jwk,
    channels: &'a [PageChannel],
}

impl WebPos {
    /// Reads the page's files and makes its configuration.
    ///
    /// # Errors
    /// A file is missing or unreadable, the gateway URL is not an origin, or no channel is given.
    pub fn load(config: &WebPosConfig) -> Result<WebPos, WebPosError> {
        let gateway = config.gateway.trim_end_matches('/');
        let ws = match gateway.split_once("://") {
            Some(("http", rest)) if valid_authority(rest) => format!("ws://{rest}"),
            Some(("https", rest)) if valid_authority(rest) => format!("wss://{rest}"),
            _ => return Err(WebPosError::Gateway(config.gateway.clone())),
        };
        if config.channels.is_empty() {
            return Err(WebPosError::NoChannel);
        }
        let mut files = HashMap::new();
        for (path, file, content_type) in FILES {
            let full = config.dir.join(file);
            let bytes = std::fs::read(&full).map_err(|source| WebPosError::Read {
                path: full.clone(),
                source,
            })?;
            files.insert(*path, (Bytes::from(bytes), *content_type));
        }
        let page = PageConfig {
            gateway,
            terminal_id: &config.bundle.terminal_id,
            http_token: &config.bundle.http_token,
            gateway_jwk: &config.bundle.gateway_jwk,
            channels: &config.channels,
        };
        let config_json = Bytes::from(serde_json::to_vec(&page).unwrap_or_default());
        // The page runs its own scripts only and talks to this server and the gateway only; the
        // QR code is an inline SVG. No framing (clickjacking a cashier's screen), no referrer.
        let csp = format!(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self' {gateway} {ws}; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'"
        );
        let csp = HeaderValue::from_str(&csp).map_err(|_| WebPosError::Gateway(gateway.into()))?;
        Ok(WebPos {
            files,
            config_json,
            csp,
        })
    }

    /// The routes: the files of [`FILES`] and `config.json`.
    pub fn router(self) -> Router {
        Router::new()
            .fallback(serve_file)
            .with_state(Arc::new(self))
    }
}

/// `host[:port]` with nothing after it.
fn valid_authority(rest: &str) -> bool {
    !rest.is_empty()
        && !rest.contains(['/', '?', '#', '@'])
        && !rest.chars().any(|c| c.is_whitespace() || c.is_control())
}

async fn serve_file(State(web): State<Arc<WebPos>>, uri: Uri) -> Response {
    let (body, content_type, cache) = if uri.path() == "/config.json" {
        // Holds the terminal's token: never stored by the browser or a cache.
        (web.config_json.clone(), "application/json", "no-store")
    } else if let Some((body, content_type)) = web.files.get(uri.path()) {
        (body.clone(), *content_type, "no-cache")
    } else {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    };
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    headers.insert(header::CONTENT_SECURITY_POLICY, web.csp.clone());
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// Serves `web` on `listener` until `shutdown` is cancelled.
///
/// # Errors
/// When the server fails.
pub async fn serve(
    listener: TcpListener,
    web: WebPos,
    shutdown: CancellationToken,
) -> io::Result<()> {
    axum::serve(listener, web.router())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// The origin a browser gives a page served on `addr` (what the gateway's
/// `ingress.cors_allowed_origins` must list).
pub fn origin(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// Reads a provisioning bundle from a JSON file.
///
/// # Errors
/// When the file cannot be read or is not a bundle.
pub fn read_bundle(path: &Path) -> anyhow::Result<Bundle> {
    use anyhow::Context;
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{} is not a bundle", path.display()))
}
