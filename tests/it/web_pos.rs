//! The reference web POS (`clients/web/`, served by `posgate-sim web-pos`) in a real headless
//! Chromium, against the real gateway and the provider simulator: the cashier types an amount,
//! the page creates the intent through the gateway (CORS, bearer token), shows the QR code,
//! receives the confirmation (SSE, WebSocket or polling, opened with single-use tickets),
//! verifies its signature with WebCrypto, shows the outcome and acks.
//!
//! Needs Debian's `chromium` and `chromium-driver`, and the page's npm package (`npm ci --prefix
//! clients/web`); `.ci/run` installs all three. Without them these tests fail and say what to
//! install.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use futures::StreamExt;
use posgate_proto::MicroUsdc;
use posgate_proto::confirmation::{self, Confirmation, ConfirmationStatus};
use posgate_sim::provider::RunningProvider;
use posgate_sim::terminal::Bundle;
use posgate_sim::web_pos::{self, PageChannel, WebPos, WebPosConfig};
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::harness::{self, SECRET, TestGateway, eventually};
use crate::webdriver::Browser;

const TERMINAL: &str = "pos_web";
const WAIT: Duration = Duration::from_secs(20);

/// A shop: the gateway and the provider simulator, the web POS served for one terminal, and a
/// browser showing it.
struct Shop {
    gw: TestGateway,
    sim: RunningProvider,
    bundle: Bundle,
    browser: Browser,
    proxy: Option<Arc<Proxy>>,
    server: CancellationToken,
}

struct Options {
    channels: Vec<PageChannel>,
    /// Multiplies the provider's delays (the intent's time to live among them).
    time_scale: f64,
    /// The page talks to the gateway through a proxy the test controls.
    proxy: bool,
    /// The proxy refuses the streams (SSE and WebSocket): the page must fall back to polling.
    block_streams: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            channels: vec![PageChannel::Sse, PageChannel::Ws, PageChannel::Poll],
            time_scale: 1.0,
            proxy: false,
            block_streams: false,
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

impl Shop {
    async fn open(options: Options) -> Shop {
        // The page's origin must be known before the gateway starts (it is in its CORS list).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = web_pos::origin(listener.local_addr().unwrap());
        let mut sim = harness::sim_config(SECRET);
        sim.time_scale = options.time_scale;
        // The webhook goes out as soon as the customer pays: "within 1 s" is measured from it.
        sim.confirm_delay = Duration::ZERO;
        let (gw, sim) = harness::spawn_with_sim(
            sim,
            &[
                ("POSGATE__INGRESS__CORS_ALLOWED_ORIGINS", origin.as_str()),
                ("POSGATE__DELIVERY__REPUBLISH_AFTER_SECS", "1"),
            ],
        )
        .await;
        let bundle = gw.provision(TERMINAL).await;
        let proxy = if options.proxy {
            Some(Proxy::start(gw.ingress, options.block_streams).await)
        } else {
            None
        };
        let gateway = match &proxy {
            Some(p) => format!("http://{}", p.addr),
            None => format!("http://{}", gw.ingress),
        };
        let web = WebPos::load(&WebPosConfig {
            dir: web_pos::DEFAULT_DIR.into(),
            gateway,
            bundle: bundle.clone(),
            channels: options.channels,
        })
        .unwrap_or_else(|e| panic!("the web POS cannot be served: {e}"));
        let server = CancellationToken::new();
        tokio::spawn(web_pos::serve(listener, web, server.clone()));
        let browser = Browser::start().await;
        browser.goto(&format!("{origin}/")).await;
        browser
            .wait_for(
                "the page ready for a sale",
                "return document.body.dataset.state === 'idle'",
                WAIT,
            )
            .await;
        Shop {
            gw,
            sim,
            bundle,
            browser,
            proxy,
            server,
        }
    }

    /// Waits until confirmations reach the page on `channel`.
    async fn channel_open(&self, channel: &str) {
        self.browser
            .wait_for(
                &format!("the {channel} channel open"),
                &format!(
                    "const c = document.getElementById('channel').dataset; \
                     return c.channel === '{channel}' && c.status === 'open'"
                ),
                WAIT,
            )
            .await;
    }

    /// The cashier charges `amount`; the page shows the QR code. Returns the intent id.
    async fn charge(&self, amount: &str) -> String {
        self.browser.type_into("#amount", amount).await;
        self.browser.click("#charge").await;
        self.browser
            .wait_for(
                "the QR code",
                "return document.body.dataset.state === 'awaiting' \
                 && document.querySelector('#qr svg path') !== null",
                WAIT,
            )
            .await;
        let intent_id = self.browser.text("#intent-id").await.unwrap();
        // The QR shows what the provider asked for (the gateway checked it before answering).
        let at_provider = self.sim.intent(&intent_id).unwrap();
        assert_eq!(
            self.browser.text("#qr-payload").await.as_deref(),
            at_provider["qr_payload"].as_str(),
        );
        intent_id
    }

    /// Waits for the page to show outcome `state` (`paid`, `underpaid`, …); returns when it
    /// showed it (ms since the epoch, the page's clock, which is this machine's).
    async fn outcome(&self, state: &str) -> u64 {
        self.browser
            .wait_for(
                &format!("the outcome {state}"),
                &format!("return document.body.dataset.state === '{state}'"),
                WAIT,
            )
            .await;
        let shown = self
            .browser
            .execute(
                "return document.getElementById('outcome').dataset.shownAt",
                json!([]),
            )
            .await;
        shown.as_str().unwrap().parse().unwrap()
    }

    async fn pending(&self) -> u64 {
        self.gw.terminal_view(TERMINAL).await["pending"]
            .as_u64()
            .unwrap()
    }

    async fn all_acked(&self) {
        eventually(WAIT, || async { (self.pending().await == 0).then_some(()) }).await;
    }

    async fn close(self) {
        self.browser.quit().await;
        self.server.cancel();
        self.gw.shutdown().await;
    }
}

#[tokio::test]
async fn a_paid_sale_shows_paid_within_a_second_of_the_webhook() {
    let shop = Shop::open(Options::default()).await;
    shop.channel_open("sse").await;
    let intent_id = shop.charge("4.40").await;
    assert_eq!(shop.browser.text("#due").await.as_deref(), Some("4.40"));
    // What a wallet's camera reads off the screen is the provider's payment request.
    let scanned = scan_qr(&shop.browser.screenshot().await);
    assert_eq!(
        Some(scanned.as_str()),
        shop.sim.intent(&intent_id).unwrap()["qr_payload"].as_str()
    );

    let paid_at = now_ms();
    shop.sim.pay(&intent_id, None, false).unwrap();
    let shown_at = shop.outcome("paid").await;
    let took = shown_at.saturating_sub(paid_at);
    assert!(took < 1000, "PAID shown {took} ms after the webhook");
    assert_eq!(shop.browser.text("#outcome").await.as_deref(), Some("PAID"));
    shop.all_acked().await;
    assert_eq!(shop.browser.body_data().await.get("rejected"), None);

    let png = shop.browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 5_000);
    // The screenshot in the docs: WEB_POS_SCREENSHOT=docs/img/web-pos-paid.png (relative to
    // the repository) when running this test.
    if let Some(path) = std::env::var_os("WEB_POS_SCREENSHOT") {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(path);
        std::fs::write(&path, &png).unwrap();
    }

    // The next sale starts from a clean screen, and is paid in turn.
    shop.browser.click("#next").await;
    shop.browser
        .wait_for(
            "a new sale",
            "return document.body.dataset.state === 'idle'",
            WAIT,
        )
        .await;
    let second = shop.charge("12.5").await;
    assert_ne!(second, intent_id);
    assert_eq!(shop.browser.text("#due").await.as_deref(), Some("12.50"));
    shop.sim.pay(&second, None, false).unwrap();
    shop.outcome("paid").await;
    shop.all_acked().await;
    shop.close().await;
}

#[tokio::test]
async fn an_underpaid_sale_shows_underpaid_over_a_websocket() {
    let shop = Shop::open(Options {
        channels: vec![PageChannel::Ws],
        ..Options::default()
    })
    .await;
    shop.channel_open("ws").await;
    let intent_id = shop.charge("4.40").await;
    shop.sim
        .pay(&intent_id, Some(MicroUsdc(4_000_000)), false)
        .unwrap();
    shop.outcome("underpaid").await;
    assert_eq!(
        shop.browser.text("#outcome").await.as_deref(),
        Some("UNDERPAID")
    );
    // Acked with a WebSocket frame.
    shop.all_acked().await;
    shop.close().await;
}

#[tokio::test]
async fn without_streams_the_page_falls_back_to_polling_and_shows_expired() {
    // Intents live 300 s × 0.01 = 3 s at the provider.
    let shop = Shop::open(Options {
        time_scale: 0.01,
        proxy: true,
        block_streams: true,
        ..Options::default()
    })
    .await;
    // SSE and WebSocket are refused (twice each), so the page ends up polling.
    shop.channel_open("poll").await;
    let proxy = shop.proxy.as_ref().unwrap();
    assert!(proxy.refused_streams.load(Ordering::SeqCst));
    shop.charge("1.00").await;
    shop.outcome("expired").await;
    assert_eq!(
        shop.browser.text("#outcome").await.as_deref(),
        Some("EXPIRED")
    );
    shop.all_acked().await;
    shop.close().await;
}

#[tokio::test]
async fn a_forged_confirmation_is_refused_never_shown_and_never_acked() {
    let shop = Shop::open(Options {
        proxy: true,
        ..Options::default()
    })
    .await;
    shop.channel_open("sse").await;
    let proxy = shop.proxy.clone().unwrap();
    let intent_id = shop.charge("4.40").await;

    // An attacker on the path injects "paid" for this very sale: signed with its own key under
    // the gateway's kid, and unsigned (alg none).
    let forged = Confirmation::new(
        TERMINAL,
        &intent_id,
        1,
        ConfirmationStatus::Confirmed,
        MicroUsdc(4_400_000),
        "2026-01-01T00:00:00Z",
    );
    let attacker = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    proxy.inject(confirmation::sign(
        &attacker,
        &shop.bundle.gateway_jwk.kid,
        &forged,
    ));
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap())
    );
    proxy.inject(unsigned);
    shop.browser
        .wait_for(
            "two refused messages",
            "return document.body.dataset.rejected === '2'",
            WAIT,
        )
        .await;

    // The customer underpays, and the attacker rewrites the gateway's genuine confirmation to
    // say "confirmed" (signature and header untouched).
    proxy.tamper.store(true, Ordering::SeqCst);
    shop.sim
        .pay(&intent_id, Some(MicroUsdc(4_000_000)), false)
        .unwrap();
    shop.browser
        .wait_for(
            "the rewritten confirmation refused",
            "return Number(document.body.dataset.rejected) >= 3",
            WAIT,
        )
        .await;
    assert_eq!(
        shop.browser.body_data().await["state"],
        "awaiting",
        "nothing forged is shown"
    );
    assert_eq!(shop.pending().await, 1, "nothing forged is acked");

    // Once the path is clean, the gateway's next republish (1 s) carries the genuine one.
    proxy.tamper.store(false, Ordering::SeqCst);
    shop.outcome("underpaid").await;
    shop.all_acked().await;
    let text = shop.browser.text("#rejected").await.unwrap();
    assert!(text.contains("failed verification"), "{text}");
    shop.close().await;
}

#[tokio::test]
async fn a_reload_mid_payment_recovers_the_sale_and_shows_paid() {
    let shop = Shop::open(Options::default()).await;
    let intent_id = shop.charge("7.25").await;
    shop.browser.refresh().await;
    shop.browser
        .wait_for(
            "the sale back after the reload",
            "return document.body.dataset.state === 'awaiting' \
             && document.querySelector('#qr svg path') !== null",
            WAIT,
        )
        .await;
    assert_eq!(
        shop.browser.text("#intent-id").await.as_deref(),
        Some(intent_id.as_str())
    );
    assert_eq!(shop.browser.text("#due").await.as_deref(), Some("7.25"));
    shop.channel_open("sse").await;
    shop.sim.pay(&intent_id, None, false).unwrap();
    shop.outcome("paid").await;
    shop.all_acked().await;
    // Reloaded again: the outcome stays, shown once (no second confirmation to ack).
    shop.browser.refresh().await;
    shop.browser
        .wait_for(
            "PAID after another reload",
            "return document.body.dataset.state === 'paid'",
            WAIT,
        )
        .await;
    assert_eq!(shop.pending().await, 0);
    // One intent at the provider: the reload did not start a second payment.
    let intents = shop.gw.admin_get("/v1/payment-intents").await;
    let intents: Value = intents.json().await.unwrap();
    assert_eq!(intents["data"].as_array().unwrap().len(), 1, "{intents}");
    shop.close().await;
}

/// The page's `verify.js`, as Chromium runs it (WebCrypto's Ed25519, the exact `seq` parse),
/// gives every case of the confirmation test vectors what the file says: the same cases
/// `npm test` runs on Node.
#[tokio::test]
async fn the_page_verifier_passes_every_confirmation_vector_in_chromium() {
    let shop = Shop::open(Options::default()).await;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../proto/testdata/confirmation-vectors.json"
    );
    let text = std::fs::read_to_string(path).unwrap();
    // Integers come back as decimal strings: WebDriver's JSON has no BigInt.
    let results = shop
        .browser
        .execute(
            "const text = arguments[0];
             return (async () => {
               const { MEMBERS, importGatewayKey, parseExact, verifyConfirmation } =
                 await import('/verify.js');
               const vectors = parseExact(text);
               const key = await importGatewayKey(vectors.key.jwk);
               const out = {};
               for (const c of vectors.cases) {
                 try {
                   const p = await verifyConfirmation(c.jws, key, c.terminal_id, c.min_seq);
                   const known = {};
                   for (const m of MEMBERS) {
                     if (m in p) known[m] = typeof p[m] === 'bigint' ? String(p[m]) : p[m];
                   }
                   out[c.name] = { outcome: 'ok', payload: known };
                 } catch (e) {
                   out[c.name] = { outcome: e.reason ?? String(e) };
                 }
               }
               return out;
             })();",
            json!([text]),
        )
        .await;
    let vectors: Value = serde_json::from_str(&text).unwrap();
    let cases = vectors["cases"].as_array().unwrap();
    assert_eq!(results.as_object().unwrap().len(), cases.len(), "{results}");
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let got = &results[name];
        let outcome = match got["outcome"].as_str().unwrap() {
            "malformed" => "Malformed",
            "bad_alg" => "BadAlg",
            "bad_signature" => "BadSignature",
            "bad_payload" => "BadPayload",
            "wrong_terminal" => "WrongTerminal",
            "old_seq" => "OldSeq",
            other => other,
        };
        assert_eq!(outcome, case["expect"], "{name}: {got}");
        if outcome == "ok" {
            let want: serde_json::Map<String, Value> = case["payload"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| match v {
                    Value::Number(n) => (k.clone(), Value::String(n.to_string())),
                    other => (k.clone(), other.clone()),
                })
                .collect();
            assert_eq!(got["payload"], Value::Object(want), "{name}");
        }
    }
    assert!(
        results["ok_seq_above_2_53"]["payload"]["seq"] == "9007199254740993",
        "{results}"
    );
    shop.close().await;
}

/// The text of the QR code in a PNG, read by zbarimg (Debian's zbar-tools).
fn scan_qr(png: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("screen.png");
    std::fs::write(&path, png).unwrap();
    let output = std::process::Command::new("zbarimg")
        .args(["-q", "--raw", "-Sdisable", "-Sqrcode.enable"])
        .arg(&path)
        .output()
        .expect("zbarimg not found: install Debian's zbar-tools (.ci/run does)");
    assert!(
        output.status.success(),
        "no QR code found on the screen: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .trim_end()
        .to_owned()
}

// === a proxy between the page and the gateway, as an attacker on the path would be ===

/// Forwards every request to the gateway; on the SSE stream it can inject events and rewrite
/// the confirmations' payloads. The WebSocket is not proxied.
struct Proxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    http: reqwest::Client,
    inject: broadcast::Sender<String>,
    tamper: AtomicBool,
    block_streams: bool,
    refused_streams: AtomicBool,
}

impl Proxy {
    async fn start(upstream: SocketAddr, block_streams: bool) -> Arc<Proxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Arc::new(Proxy {
            addr: listener.local_addr().unwrap(),
            upstream,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            inject: broadcast::channel(16).0,
            tamper: AtomicBool::new(false),
            block_streams,
            refused_streams: AtomicBool::new(false),
        });
        let router = axum::Router::new()
            .fallback(forward)
            .with_state(proxy.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        proxy
    }

    /// Sends `jws` as a confirmation event on every open SSE stream.
    fn inject(&self, jws: String) {
        self.inject.send(jws).unwrap();
    }
}

async fn forward(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let sse = path.starts_with("/v1/terminal/events");
    if proxy.block_streams && (sse || path.starts_with("/v1/terminal/ws")) {
        proxy.refused_streams.store(true, Ordering::SeqCst);
        return (StatusCode::SERVICE_UNAVAILABLE, "no streams here").into_response();
    }
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    let mut out = proxy
        .http
        .request(
            parts.method.clone(),
            format!("http://{}{path}", proxy.upstream),
        )
        .body(body);
    for (name, value) in &parts.headers {
        if ![header::HOST, header::CONNECTION, header::CONTENT_LENGTH].contains(name) {
            out = out.header(name, value);
        }
    }
    let Ok(upstream) = out.send().await else {
        return StatusCode::BAD_GATEWAY.into_response();
    };
    let mut response = Response::builder().status(upstream.status());
    for (name, value) in upstream.headers() {
        if ![
            header::CONNECTION,
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
        ]
        .contains(name)
        {
            response = response.header(name, value);
        }
    }
    let body = if sse && upstream.status().is_success() {
        Body::from_stream(sse_stream(proxy.clone(), upstream))
    } else {
        Body::from_stream(upstream.bytes_stream())
    };
    response.body(body).unwrap()
}

/// The gateway's SSE stream, block by block (rewritten while `tamper` is set), with the injected
/// events in between; it ends when the gateway's does.
fn sse_stream(
    proxy: Arc<Proxy>,
    upstream: reqwest::Response,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    let injected = proxy.inject.subscribe();
    let state = (proxy, upstream.bytes_stream(), injected, String::new());
    futures::stream::unfold(
        state,
        |(proxy, mut upstream, mut injected, mut buffer)| async move {
            loop {
                if let Some(end) = buffer.find("\n\n") {
                    let block: String = buffer.drain(..end + 2).collect();
                    let block = if proxy.tamper.load(Ordering::SeqCst) {
                        rewrite(&block)
                    } else {
                        block
                    };
                    return Some((Ok(Bytes::from(block)), (proxy, upstream, injected, buffer)));
                }
                tokio::select! {
                    chunk = upstream.next() => match chunk {
                        Some(Ok(chunk)) => buffer.push_str(std::str::from_utf8(&chunk).unwrap()),
                        _ => return None,
                    },
                    Ok(jws) = injected.recv() => {
                        let event = format!("event: confirmation\ndata: {jws}\n\n");
                        return Some((Ok(Bytes::from(event)), (proxy, upstream, injected, buffer)));
                    }
                }
            }
        },
    )
}

/// The block with each confirmation's payload changed to "confirmed", header and signature kept.
fn rewrite(block: &str) -> String {
    block
        .lines()
        .map(|line| match line.strip_prefix("data:") {
            Some(jws) => {
                let parts: Vec<&str> = jws.trim().split('.').collect();
                let mut payload: Value =
                    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
                payload["status"] = json!("confirmed");
                payload.as_object_mut().unwrap().remove("context");
                let payload = URL_SAFE_NO_PAD.encode(payload.to_string());
                format!("data: {}.{payload}.{}", parts[0], parts[2])
            }
            None => line.to_owned(),
        })
        .map(|line| line + "\n")
        .collect::<String>()
        + "\n"
}

// === `posgate-sim web-pos`, the binary ===

/// The exit code and stderr of `posgate-sim web-pos ARGS` run to its end.
async fn web_pos_exit(args: &[&str]) -> (Option<i32>, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_posgate-sim-under-test"))
        .arg("web-pos")
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, out).await.unwrap().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn posgate_sim_web_pos_serves_the_page_on_loopback_only() {
    let gw = harness::spawn_gateway().await;
    let response = gw
        .admin_post(
            "/v1/terminals",
            json!({"id": "pos_cli", "merchant_id": "mer_test"}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let bundle: Value = response.json().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bundle.json");
    std::fs::write(&file, bundle.to_string()).unwrap();
    let file = file.to_str().unwrap();

    // Beyond loopback it would hand the token to the network: refused, as bad usage.
    let (code, stderr) = web_pos_exit(&["--bundle", file, "--listen", "0.0.0.0:0"]).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("--allow-remote"), "{stderr}");
    // The page's files are read at start.
    let (code, stderr) = web_pos_exit(&["--bundle", file, "--dir", "/nonexistent"]).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("/nonexistent/index.html"), "{stderr}");

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_posgate-sim-under-test"))
        .args(["web-pos", "--bundle", file, "--listen", "127.0.0.1:0"])
        .args(["--gateway", &format!("http://{}", gw.ingress)])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stderr.take().unwrap()));
    let mut said = String::new();
    let base = loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap_or_else(|| panic!("web-pos ended: {said}"));
        said.push_str(&line);
        if let Some(rest) = line.strip_prefix("posgate-sim web-pos: ") {
            break rest.split('/').take(3).collect::<Vec<_>>().join("/");
        }
    };
    let next = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap();
    let origin_line = next.unwrap().unwrap();
    assert!(
        origin_line.ends_with(&format!("CORS_ALLOWED_ORIGINS={base}")),
        "{origin_line}"
    );

    let config = gw
        .http
        .get(format!("{base}/config.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(config.headers()["cache-control"], "no-store");
    let csp = config.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains(&format!(
            "connect-src 'self' http://{0} ws://{0};",
            gw.ingress
        )),
        "{csp}"
    );
    assert!(csp.contains("script-src 'self';"), "{csp}");
    let config: Value = config.json().await.unwrap();
    assert_eq!(config["terminal_id"], "pos_cli");
    assert_eq!(config["http_token"], bundle["http_token"]);
    assert_eq!(config["gateway_jwk"], bundle["gateway_jwk"]);
    assert_eq!(config["channels"], json!(["sse", "ws", "poll"]));
    assert!(config.get("key_pem").is_none(), "no private key for a page");

    let page = gw.http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("pos.js"));
    for path in [
        "/Cargo.toml",
        "/../README.md",
        "/node_modules/.package-lock.json",
    ] {
        let response = gw.http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }

    harness::signal(&child, "TERM");
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    gw.shutdown().await;
}
