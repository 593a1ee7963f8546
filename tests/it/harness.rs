//! Starts a real gateway in-process and talks to it over real HTTP.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use posgate::config::{Config, Env};
use posgate::{Gateway, Running};
use posgate_proto::MicroUsdc;
use posgate_sim::events::{self, Intent};
use posgate_sim::terminal::{Bundle, Identity, Terminal, connect_raw};
use rumqttc::{AsyncClient, Event, EventLoop, Packet};
use secrecy::ExposeSecret;
use serde_json::Value;
use tempfile::TempDir;

/// The webhook secret every test gateway accepts (the provider's documented test secret).
pub const SECRET: &str = "whsec_test_posgate";

static LOG: Once = Once::new();

/// Logs are opt-in: `TEST_LOG=1 cargo nextest run …`.
fn init_log() {
    LOG.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let log = posgate::config::LogConfig {
                format: posgate::config::LogFormat::Plain,
                level: "debug".into(),
            };
            posgate::telemetry::init(&log, false);
        }
    });
}

/// The environment of a test gateway: loopback port 0 everywhere, the test secret, `data_dir`.
pub fn test_env(data_dir: &Path, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("POSGATE__DATA_DIR".into(), data_dir.display().to_string()),
        ("POSGATE__INGRESS__LISTEN".into(), "127.0.0.1:0".into()),
        ("POSGATE__ADMIN__LISTEN".into(), "127.0.0.1:0".into()),
        ("POSGATE__MQTT__LISTEN".into(), "127.0.0.1:0".into()),
        ("POSGATE__PROVIDER__WEBHOOK_SECRETS".into(), SECRET.into()),
    ];
    for (k, v) in extra {
        env.retain(|(key, _)| key != k);
        env.push(((*k).into(), (*v).into()));
    }
    env
}

pub struct TestGateway {
    pub ingress: SocketAddr,
    pub admin: SocketAddr,
    pub mqtt: SocketAddr,
    pub admin_token: String,
    pub http: reqwest::Client,
    pub data_dir: TempDir,
    extra: Vec<(String, String)>,
    running: Running,
}

pub async fn spawn_gateway() -> TestGateway {
    spawn_with(&[]).await
}

pub async fn spawn_with(extra: &[(&str, &str)]) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let extra: Vec<(String, String)> = extra
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect();
    start(dir, extra).await
}

/// As [`spawn_with`], on a data dir the caller prepared (e.g. with `posgate broker-config`).
pub async fn spawn_in(data_dir: TempDir, extra: &[(&str, &str)]) -> TestGateway {
    let extra: Vec<(String, String)> = extra
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect();
    start(data_dir, extra).await
}

async fn start(data_dir: TempDir, extra: Vec<(String, String)>) -> TestGateway {
    init_log();
    let pairs: Vec<(&str, &str)> = extra
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let env = Env::from_pairs(test_env(data_dir.path(), &pairs));
    let config = Config::load(None, &env).expect("test config is valid");
    let running = Gateway::build(config)
        .await
        .expect("gateway builds")
        .spawn();
    TestGateway {
        ingress: running.ingress_addr,
        admin: running.admin_addr,
        mqtt: running.mqtt_addr,
        admin_token: running.admin_token().expose_secret().to_owned(),
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
        data_dir,
        extra,
        running,
    }
}

impl TestGateway {
    /// The MQTT over secure WebSocket listener, when configured.
    pub fn mqtt_ws(&self) -> Option<SocketAddr> {
        self.running.mqtt_ws_addr
    }

    /// The broker's loopback listener behind the MQTT front door.
    pub fn mqtt_behind(&self) -> Option<SocketAddr> {
        self.running.mqtt_behind_addr
    }

    pub fn webhook_url(&self) -> String {
        format!("http://{}{}", self.ingress, events::WEBHOOK_PATH)
    }

    /// POSTs `body` with exactly `headers`.
    pub async fn post_with(
        &self,
        body: impl Into<Vec<u8>>,
        headers: &[(&str, String)],
    ) -> reqwest::Response {
        let mut request = self
            .http
            .post(self.webhook_url())
            .header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        request.body(body.into()).send().await.unwrap()
    }

    /// POSTs `body` signed with the test secret at `ts`.
    pub async fn post_signed_at(&self, body: &str, ts: i64) -> reqwest::Response {
        let headers = events::signed_headers(SECRET, ts, body.as_bytes());
        self.post_with(body, &headers).await
    }

    /// POSTs `body` signed with the test secret now.
    pub async fn post_signed(&self, body: &str) -> reqwest::Response {
        self.post_signed_at(body, events::now_unix()).await
    }

    /// GET on the admin listener with the admin token.
    pub async fn admin_get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("http://{}{path}", self.admin))
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .unwrap()
    }

    /// POST on the admin listener with the admin token.
    pub async fn admin_post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.http
            .post(format!("http://{}{path}", self.admin))
            .bearer_auth(&self.admin_token)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Registers a terminal and returns its provisioning bundle.
    pub async fn provision(&self, id: &str) -> Bundle {
        let response = self
            .admin_post(
                "/v1/terminals",
                serde_json::json!({"id": id, "merchant_id": "mer_test"}),
            )
            .await;
        assert_eq!(response.status(), 201, "provisioning {id}");
        response.json().await.unwrap()
    }

    /// Provisions a terminal and connects it over MQTT/TLS.
    pub async fn terminal(&self, id: &str) -> Terminal {
        let bundle = self.provision(id).await;
        self.connect(bundle).await
    }

    /// Connects an already provisioned terminal over MQTT/TLS (again, after a reboot or restart).
    pub async fn connect(&self, bundle: Bundle) -> Terminal {
        Terminal::connect(bundle, self.mqtt).await.unwrap()
    }

    /// A bare MQTT/TLS connection as `identity`, driven to its CONNACK ([`connack`]); the caller
    /// drives the event loop from then on.
    pub async fn mqtt_connect(
        &self,
        identity: &Identity,
    ) -> Result<(AsyncClient, EventLoop), String> {
        let (client, mut eventloop) =
            connect_raw(self.mqtt, identity).map_err(|e| e.to_string())?;
        connack(&mut eventloop).await?;
        Ok((client, eventloop))
    }

    /// The provider confirms a 4.50 payment of `intent_id` made at `terminal_id`.
    pub async fn pay(&self, terminal_id: &str, intent_id: &str) {
        let intent = Intent::new(intent_id, MicroUsdc(4_500_000), terminal_id);
        let body = events::intent_event(&format!("evt_{intent_id}"), "confirmed", &intent);
        assert_eq!(self.post_signed(&body).await.status(), 200);
    }

    /// The `/metrics` text.
    pub async fn scrape(&self) -> String {
        let response = self
            .http
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    }

    /// The value of one sample of `/metrics` (see [`sample`]).
    pub async fn metric(&self, prefix: &str) -> Option<f64> {
        sample(&self.scrape().await, prefix)
    }

    /// Waits until the sample `prefix` of `/metrics` is at least `at_least` (a missing sample
    /// counts as 0), for at most `within`.
    pub async fn metric_reaches(&self, prefix: &str, at_least: f64, within: Duration) {
        eventually(within, || async {
            let value = self.metric(prefix).await.unwrap_or(0.0);
            (value >= at_least).then_some(())
        })
        .await;
    }

    /// The registry's view of a terminal.
    pub async fn terminal_view(&self, id: &str) -> Value {
        let response = self.admin_get(&format!("/v1/terminals/{id}")).await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// The admin view of an intent, if the gateway has it.
    pub async fn intent(&self, id: &str) -> Option<Value> {
        let response = self.admin_get(&format!("/v1/payment-intents/{id}")).await;
        match response.status().as_u16() {
            200 => Some(response.json().await.unwrap()),
            404 => None,
            other => panic!("admin answered {other}"),
        }
    }

    /// Shuts down within the default grace period; returns how long the drain took.
    pub async fn shutdown(self) -> Duration {
        self.running.shutdown(Duration::from_secs(10)).await
    }

    /// Stops (cleanly), keeping the data dir for [`Stopped::start`].
    pub async fn stop(self) -> Stopped {
        let TestGateway {
            data_dir,
            extra,
            running,
            ..
        } = self;
        running.shutdown(Duration::from_secs(10)).await;
        Stopped { data_dir, extra }
    }

    /// Stops (cleanly) and starts again on the same data dir.
    pub async fn restart(self) -> TestGateway {
        self.stop().await.start().await
    }
}

/// A gateway stopped by [`TestGateway::stop`]: its data dir and settings.
pub struct Stopped {
    data_dir: TempDir,
    extra: Vec<(String, String)>,
}

impl Stopped {
    /// Starts it again on the same data dir (new ports).
    pub async fn start(self) -> TestGateway {
        start(self.data_dir, self.extra).await
    }
}

/// Drives an MQTT event loop to its CONNACK; `Err` says why the broker refused the connection or
/// why it failed (nothing within 10 s included).
pub async fn connack(eventloop: &mut EventLoop) -> Result<(), String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                return if ack.code == rumqttc::ConnectReturnCode::Success {
                    Ok(())
                } else {
                    Err(format!("{:?}", ack.code))
                };
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("no CONNACK in time".into()),
        }
    }
}

/// Status and JSON body of a response.
pub async fn status_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"));
    (status, body)
}

/// Asserts the contract's error body: `{"error":{"code":"…","message":"…"}}`.
pub fn assert_error_body(body: &Value) {
    let error = &body["error"];
    assert!(
        error["code"].as_str().is_some_and(|c| !c.is_empty()),
        "no error.code in {body}"
    );
    assert!(
        error["message"].as_str().is_some(),
        "no error.message in {body}"
    );
}

/// Calls `method` with `params` over `terminal`'s RPC and returns the reply; panics if none comes
/// within 15 s.
pub async fn rpc(
    terminal: &mut Terminal,
    request_id: &str,
    method: &str,
    params: Value,
) -> posgate_proto::rpc::Response {
    terminal
        .rpc(request_id, method, params, Duration::from_secs(15))
        .await
        .unwrap()
}

/// Asks for an intent over `terminal`'s RPC (`create_intent` with `params`, 15 s to answer) and
/// returns its id; panics with the error if the gateway answers one. Tests of the reply itself
/// (errors, a repeated request id, the QR) call [`rpc`] directly.
pub async fn create_intent(terminal: &mut Terminal, request_id: &str, params: Value) -> String {
    let reply = rpc(terminal, request_id, "create_intent", params).await;
    let result = reply
        .result
        .unwrap_or_else(|| panic!("create_intent {request_id}: {:?}", reply.error));
    result["intent_id"].as_str().unwrap().to_owned()
}

/// Polls `check` until it returns `Some`, every 20 ms, for at most `within`.
pub async fn eventually<T, F, Fut>(within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A POST of `body` to `url`, signed with `secret` now, ready to send.
pub fn signed_post(
    http: &reqwest::Client,
    url: &str,
    secret: &str,
    body: String,
) -> reqwest::RequestBuilder {
    let mut request = http.post(url).header("content-type", "application/json");
    for (name, value) in events::signed_headers(secret, events::now_unix(), body.as_bytes()) {
        request = request.header(name, value);
    }
    request.body(body)
}

/// A provider simulator (time scale 0.01, `faults`) and a gateway wired to it both ways: webhooks
/// signed with `secret` to the gateway, the gateway's API base and key pointing at the simulator
/// (rate limit generous), plus `extra` settings.
pub async fn spawn_with_provider(
    secret: &str,
    faults: posgate_sim::provider::Faults,
    extra: &[(&str, &str)],
) -> (TestGateway, posgate_sim::provider::RunningProvider) {
    let mut config = sim_config(secret);
    config.faults = faults;
    spawn_with_sim(config, extra).await
}

/// The simulator settings [`spawn_with_provider`] starts from (time scale 0.01, no faults), for
/// tests that set more (REST faults, …) before [`spawn_with_sim`].
pub fn sim_config(secret: &str) -> posgate_sim::provider::ProviderConfig {
    let mut config =
        posgate_sim::provider::ProviderConfig::new("http://127.0.0.1:9/not-yet", secret);
    config.time_scale = 0.01;
    config
}

/// As [`spawn_with_provider`], with the simulator started from `config` (its first webhook
/// secret is the gateway's).
pub async fn spawn_with_sim(
    config: posgate_sim::provider::ProviderConfig,
    extra: &[(&str, &str)],
) -> (TestGateway, posgate_sim::provider::RunningProvider) {
    let secret = config
        .webhook_secrets
        .first()
        .map(|s| s.expose_secret().to_owned())
        .unwrap_or_default();
    let sim = posgate_sim::provider::ProviderSim::start(config)
        .await
        .unwrap();
    let api_base = sim.api_base();
    let mut env = vec![
        ("POSGATE__PROVIDER__WEBHOOK_SECRETS", secret.as_str()),
        ("POSGATE__PROVIDER__API_BASE", api_base.as_str()),
        ("POSGATE__PROVIDER__API_KEY", "sk_test_posgate"),
        ("POSGATE__PROVIDER__REQUESTS_PER_MINUTE", "6000"),
    ];
    env.extend_from_slice(extra);
    let gw = spawn_with(&env).await;
    sim.set_webhook_url(gw.webhook_url());
    (gw, sim)
}

/// The value of the sample named `prefix` (a name, or a name with its labels) in a `/metrics` text.
pub fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| {
            l.strip_prefix(prefix).is_some_and(|rest| {
                prefix.ends_with('{') || rest.starts_with(' ') || rest.starts_with('{')
            })
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// An HTTPS client trusting only `ca_pem`, presenting `cert_key` (PEM certificate, PEM key) if
/// given: a terminal on the TLS ingress (`ingress.tls`).
pub fn tls_client(ca_pem: &str, cert_key: Option<(&str, &str)>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap());
    if let Some((cert, key)) = cert_key {
        let pem = format!("{cert}\n{key}");
        builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

/// Sends `signal` (`"TERM"`, `"HUP"`, …) to the running `child` with kill(1).
pub fn signal(child: &tokio::process::Child, signal: &str) {
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap()
            .success()
    );
}

/// Appends every further line of a child's output to `log`, in a task, so the child never blocks
/// on a full pipe and its output is there for failure messages.
pub fn keep_reading<R>(mut lines: tokio::io::Lines<R>, log: Arc<Mutex<String>>)
where
    R: tokio::io::AsyncBufRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let mut log = log.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
}
