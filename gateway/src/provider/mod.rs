//! The provider's REST API, as the gateway calls it (provider-api.md §2).
//!
//! Timeouts (connect 2 s, request 10 s), retries on 5xx, 429 and connection errors with backoff
//! (0.5 s, 1 s, 2 s, jittered; `Retry-After` honoured on 429), and every error mapped to a
//! [`ProviderError`] that keeps the status, the provider's `error.type`/`error.code` and the path.
//! The API key is a secret: it is sent as a bearer token and never logged.
//!
//! Every attempt (retries included) first takes a token from the one [`Budget`] that all callers
//! share (provider-api.md §2.6): a client made for terminal RPC is [`Priority::Interactive`], the
//! one reconciliation uses ([`ProviderClient::background`]) is [`Priority::Background`].

mod budget;
mod list;

pub use budget::{Budget, Exhausted, Priority, Rates};
pub use list::{ListPage, parse_list};

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};

/// Why a call to the provider failed.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("provider answered {status} to {path} (type {error_type:?}, code {code:?})")]
    Status {
        status: u16,
        path: String,
        error_type: Option<String>,
        code: Option<String>,
        /// The answer's body, as sent (a 409 on create may carry the original intent, §2.5).
        body: Bytes,
    },
    #[error("no request budget left for {path}")]
    Budget {
        path: String,
        #[source]
        source: Exhausted,
    },
    #[error("the provider's answer to {path} is not what the API promises: {reason}")]
    Unexpected { path: String, reason: String },
    #[error("calling the provider at {path}")]
    Transport {
        path: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("building the HTTP client")]
    Client(#[source] reqwest::Error),
}

/// The provider's REST client.
#[derive(Clone)]
pub struct ProviderClient {
    http: reqwest::Client,
    base: String,
    key: SecretString,
    /// Delays before the retries (3 retries by default).
    backoff: Vec<Duration>,
    /// The request budget shared by every client of this provider.
    budget: Arc<Budget>,
    priority: Priority,
    /// The terminal the calls are made for: its own share of the budget is spent too.
    terminal: Option<Arc<str>>,
    metrics: Option<CallMetrics>,
}

/// The metrics of calls to the provider.
#[derive(Clone)]
pub struct CallMetrics {
    /// `posgate_provider_requests_total{endpoint,outcome}`: every attempt (retries included);
    /// `outcome` is `ok`, the status (`404`, `409`, `429`, `5xx`, …) or `unreachable`.
    pub requests: prometheus::IntCounterVec,
    /// `posgate_provider_request_seconds{endpoint}`: each attempt's time to the answer's head.
    pub seconds: prometheus::HistogramVec,
}

/// The endpoints the gateway calls, as metric labels.
pub const ENDPOINTS: [&str; 4] = [
    "get_intent",
    "create_intent",
    "cancel_intent",
    "list_transactions",
];

impl ProviderClient {
    /// An interactive client for `api_base` (e.g. `https://api.stablegenius.co/v1`) with the API
    /// key, taking its tokens from `budget`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(
        api_base: &str,
        key: SecretString,
        budget: Arc<Budget>,
    ) -> Result<ProviderClient, ProviderError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(ProviderError::Client)?;
        let backoff = [500, 1000, 2000]
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect();
        Ok(ProviderClient {
            http,
            base: api_base.trim_end_matches('/').to_owned(),
            key,
            backoff,
            budget,
            priority: Priority::Interactive,
            terminal: None,
            metrics: None,
        })
    }

    /// The same client, for background work (reconciliation): a quarter of the budget at most,
    /// and it yields to interactive calls.
    pub fn background(&self) -> ProviderClient {
        ProviderClient {
            priority: Priority::Background,
            ..self.clone()
        }
    }

    /// The same client, for calls a terminal asked for: they also spend that terminal's share of
    /// the budget (a quarter at most), so one terminal cannot starve the others.
    pub fn for_terminal(&self, terminal_id: &str) -> ProviderClient {
        ProviderClient {
            terminal: Some(Arc::from(terminal_id)),
            ..self.clone()
        }
    }

    /// Counts every attempt in `metrics` (`posgate_provider_requests_total{endpoint,outcome}`,
    /// `posgate_provider_request_seconds{endpoint}`).
    pub fn with_metrics(mut self, metrics: CallMetrics) -> ProviderClient {
        self.metrics = Some(metrics);
        self
    }

    /// `GET /payment-intents/{id}`: the intent object's raw JSON.
    ///
    /// # Errors
    /// [`ProviderError`] after the retries, or at once for a 4xx other than 429.
    pub async fn get_intent(&self, id: &str) -> Result<Bytes, ProviderError> {
        self.call(
            "get_intent",
            reqwest::Method::GET,
            &format!("/payment-intents/{id}"),
            None,
        )
        .await
    }

    /// `POST /payment-intents` with `body` (which carries its `idempotency_key`: a retry of the
    /// same request never creates a second intent).
    ///
    /// # Errors
    /// As [`ProviderClient::get_intent`].
    pub async fn create_intent(&self, body: &serde_json::Value) -> Result<Bytes, ProviderError> {
        self.call(
            "create_intent",
            reqwest::Method::POST,
            "/payment-intents",
            Some(body),
        )
        .await
    }

    /// `POST /payment-intents/{id}/cancel`.
    ///
    /// # Errors
    /// As [`ProviderClient::get_intent`]; a 409 when the intent is no longer awaiting payment.
    pub async fn cancel_intent(&self, id: &str) -> Result<Bytes, ProviderError> {
        let empty = serde_json::json!({});
        self.call(
            "cancel_intent",
            reqwest::Method::POST,
            &format!("/payment-intents/{id}/cancel"),
            Some(&empty),
        )
        .await
    }

    /// `GET /transactions` with `query` (`date_from`, `limit`, `starting_after`, …): one page,
    /// parsed strictly (a shape we do not expect is an error, never an empty list).
    ///
    /// # Errors
    /// As [`ProviderClient::get_intent`], or [`ProviderError::Unexpected`] for a body that is not
    /// a list.
    pub async fn list_transactions(
        &self,
        query: &[(&str, String)],
    ) -> Result<ListPage, ProviderError> {
        let mut path = String::from("/transactions");
        for (i, (name, value)) in query.iter().enumerate() {
            path.push(if i == 0 { '?' } else { '&' });
            path.push_str(name);
            path.push('=');
            path.push_str(&encode_query(value));
        }
        let raw = self
            .call("list_transactions", reqwest::Method::GET, &path, None)
            .await?;
        parse_list(&raw).map_err(|reason| ProviderError::Unexpected {
            path: "/transactions".into(),
            reason,
        })
    }

    /// Counts one attempt at `endpoint`.
    fn observe(&self, endpoint: &str, outcome: &str, started: tokio::time::Instant) {
        if let Some(m) = &self.metrics {
            m.requests.with_label_values(&[endpoint, outcome]).inc();
            m.seconds
                .with_label_values(&[endpoint])
                .observe(started.elapsed().as_secs_f64());
        }
    }

    async fn call(
        &self,
        endpoint: &'static str,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Bytes, ProviderError> {
        let url = format!("{}{path}", self.base);
        let mut attempt = 0;
        let mut last_error: Option<ProviderError> = None;
        loop {
            // Every attempt is a request the provider counts.
            if let Err(source) = self
                .budget
                .acquire(self.priority, self.terminal.as_deref())
                .await
            {
                // A retry that finds no budget reports what made it retry: the outcome of the
                // earlier attempt is unknown, which is not the same as "never sent".
                return Err(last_error.unwrap_or(ProviderError::Budget {
                    path: path.to_owned(),
                    source,
                }));
            }
            let mut request = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(self.key.expose_secret());
            if let Some(body) = body {
                request = request.json(body);
            }
            let started = tokio::time::Instant::now();
            let result = request.send().await;
            let outcome = match &result {
                Ok(r) if r.status().is_success() => "ok".to_owned(),
                Ok(r) if r.status().is_server_error() => "5xx".to_owned(),
                Ok(r) => r.status().as_u16().to_string(),
                Err(_) => "unreachable".to_owned(),
            };
            self.observe(endpoint, &outcome, started);
            let retry_after = match result {
                Ok(response) if response.status().is_success() => {
                    return response
                        .bytes()
                        .await
                        .map_err(|source| ProviderError::Transport {
                            path: path.to_owned(),
                            source,
                        });
                }
                Ok(response) => {
                    let status = response.status();
                    let retry_after = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let raw = response.bytes().await.unwrap_or_default();
                    let body: serde_json::Value = serde_json::from_slice(&raw).unwrap_or_default();
                    let error = ProviderError::Status {
                        status: status.as_u16(),
                        path: path.to_owned(),
                        error_type: body["error"]["type"].as_str().map(str::to_owned),
                        code: body["error"]["code"].as_str().map(str::to_owned),
                        body: raw,
                    };
                    let transient =
                        status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
                    if !transient || attempt >= self.backoff.len() {
                        return Err(error);
                    }
                    tracing::debug!(%error, attempt, "provider call failed; retrying");
                    last_error = Some(error);
                    retry_after
                }
                Err(source) => {
                    let error = ProviderError::Transport {
                        path: path.to_owned(),
                        source,
                    };
                    if attempt >= self.backoff.len() {
                        return Err(error);
                    }
                    tracing::debug!(%error, attempt, "provider unreachable; retrying");
                    last_error = Some(error);
                    None
                }
            };
            let base = self.backoff[attempt];
            let jitter = base.mul_f64(rand::rng().random_range(0.0..0.25));
            tokio::time::sleep(retry_after.unwrap_or(base + jitter)).await;
            attempt += 1;
        }
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay).
fn encode_query(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(
            encode_query("2026-04-01T20:00:12+00:00"),
            "2026-04-01T20%3A00%3A12%2B00%3A00"
        );
        assert_eq!(encode_query("txn_3Jm7Qe1VbY9s"), "txn_3Jm7Qe1VbY9s");
    }
}
