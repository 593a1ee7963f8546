//! A headless Chromium driven over the W3C WebDriver protocol (Debian's `chromium` and
//! `chromium-driver`), spoken with reqwest: the handful of commands the web POS tests need
//! (navigate, find, click, type, run a script, screenshot) do not justify a WebDriver crate and
//! the dozens of crates it brings.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::harness::keep_reading;

/// W3C's key for an element reference in JSON.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A browser session: a chromedriver process and one headless Chromium.
pub struct Browser {
    http: reqwest::Client,
    /// `http://127.0.0.1:PORT/session/ID`.
    session: String,
    driver: Child,
    log: Arc<Mutex<String>>,
    _profile: TempDir,
}

/// The first of `names` found on `PATH` (or as given, when absolute).
fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .chain(std::iter::once(PathBuf::from(name)))
            .find(|p| p.is_absolute() && p.is_file())
    })
}

impl Browser {
    /// Starts chromedriver on a free loopback port and a headless Chromium under it. Panics with
    /// what to install when either is missing.
    pub async fn start() -> Browser {
        let driver_bin = find_program(&["chromedriver"]).expect(
            "chromedriver not found: install Debian's chromium and chromium-driver \
             (apt-get install chromium chromium-driver; .ci/run does)",
        );
        let chromium = find_program(&["chromium", "/usr/lib/chromium/chromium"]).expect(
            "chromium not found: install Debian's chromium and chromium-driver \
             (apt-get install chromium chromium-driver; .ci/run does)",
        );
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        // chromedriver cannot report a port it picked: reserve one, and try again if another
        // process took it in between.
        for _ in 0..5 {
            let port = {
                let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                probe.local_addr().unwrap().port()
            };
            let mut driver = Command::new(&driver_bin)
                .arg(format!("--port={port}"))
                // Its own process group, Chromium's processes with it: a test that fails midway
                // still takes them all down (Drop).
                .process_group(0)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("starting chromedriver");
            let log = Arc::new(Mutex::new(String::new()));
            keep_reading(
                BufReader::new(driver.stdout.take().unwrap()).lines(),
                log.clone(),
            );
            keep_reading(
                BufReader::new(driver.stderr.take().unwrap()).lines(),
                log.clone(),
            );
            let base = format!("http://127.0.0.1:{port}");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            let ready = loop {
                if let Ok(Some(_)) = driver.try_wait() {
                    break false;
                }
                if let Ok(r) = http.get(format!("{base}/status")).send().await
                    && let Ok(status) = r.json::<Value>().await
                    && status["value"]["ready"] == true
                {
                    break true;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "chromedriver not ready within 20 s:\n{}",
                    log.lock().unwrap()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            if !ready {
                continue; // the port was taken
            }
            let profile = tempfile::tempdir().unwrap();
            let capabilities = json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": chromium,
                    "args": [
                        "--headless=new",
                        // CI runs as root, where Chromium's sandbox cannot start.
                        "--no-sandbox",
                        "--disable-gpu",
                        "--disable-dev-shm-usage",
                        "--no-first-run",
                        "--window-size=900,1000",
                        format!("--user-data-dir={}", profile.path().display()),
                    ],
                },
            }}});
            let response = http
                .post(format!("{base}/session"))
                .json(&capabilities)
                .send()
                .await
                .unwrap();
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            assert!(
                status.is_success(),
                "no browser session ({status}): {body}\n{}",
                log.lock().unwrap()
            );
            let id = body["value"]["sessionId"].as_str().unwrap();
            return Browser {
                http,
                session: format!("{base}/session/{id}"),
                driver,
                log,
                _profile: profile,
            };
        }
        panic!("chromedriver did not start on any of 5 free ports");
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.http.request(method, format!("{}{path}", self.session));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert!(
            status.is_success(),
            "WebDriver {path}: {status} {body}\nchromedriver:\n{}",
            self.log.lock().unwrap()
        );
        body["value"].clone()
    }

    /// Opens `url` and waits for the page to load.
    pub async fn goto(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    /// Reloads the page, as F5 would.
    pub async fn refresh(&self) {
        self.command(reqwest::Method::POST, "/refresh", Some(json!({})))
            .await;
    }

    /// The element matching `css` (the test fails if there is none).
    async fn element(&self, css: &str) -> String {
        let found = self
            .command(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        found[ELEMENT].as_str().unwrap().to_owned()
    }

    /// Clicks the element matching `css`.
    pub async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// Types `text` into the element matching `css`, key by key.
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page; its return value.
    pub async fn execute(&self, script: &str, args: Value) -> Value {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Polls `script` every 20 ms until it returns something other than `null` or `false`, for
    /// at most `within`; then the test fails, naming `what` and the page's state.
    pub async fn wait_for(&self, what: &str, script: &str, within: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let value = self.execute(script, json!([])).await;
            if !(value.is_null() || value == false) {
                return value;
            }
            if tokio::time::Instant::now() >= deadline {
                let page = self
                    .execute("return document.body.innerText", json!([]))
                    .await;
                let state = self.body_data().await;
                panic!("{what}: not within {within:?}; body data {state}; page text:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The `<body>`'s data attributes (the web POS keeps its state there).
    pub async fn body_data(&self) -> Value {
        self.execute("return Object.assign({}, document.body.dataset)", json!([]))
            .await
    }

    /// The page's text content of the element matching `css` (`null` when there is none).
    pub async fn text(&self, css: &str) -> Option<String> {
        self.execute(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null",
            json!([css]),
        )
        .await
        .as_str()
        .map(str::to_owned)
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Vec<u8> {
        let b64 = self
            .command(reqwest::Method::GET, "/screenshot", None)
            .await;
        STANDARD.decode(b64.as_str().unwrap()).unwrap()
    }

    /// Ends the session (Chromium closes), then chromedriver.
    pub async fn quit(self) {
        drop(
            self.http
                .delete(self.session.clone())
                .timeout(Duration::from_secs(10))
                .send()
                .await,
        );
    }
}

impl Drop for Browser {
    /// Kills chromedriver's process group: chromedriver and whatever Chromium processes are left
    /// (all of them when a test failed before `quit`).
    fn drop(&mut self) {
        if let Some(pid) = self.driver.id() {
            drop(
                std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .stderr(Stdio::null())
                    .status(),
            );
        }
    }
}
