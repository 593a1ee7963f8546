//! The provider's REST API, as the gateway calls it (provider-api.md §2).
//!
//! Timeouts (connect 2 s, request 10 s), retries on 5xx, 429 and connection errors with backoff
//! (0.5 s, 1 s, 2 s, jittered; `Retry-After` honoured on 429), and every error mapped to a
//! [`ProviderError`] that keeps the status, the provider's `error.type`/`error.code` and the path.
//! The API key is a secret: it is sent as a bearer token and never logged.

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
    },
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
}

impl ProviderClient {
    /// A client for `api_base` (e.g. `https://api.stablegenius.co/v1`) with the API key.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(api_base: &str, key: SecretString) -> Result<ProviderClient, ProviderError> {
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
        })
    }

    /// The same client with other retry delays (tests).
    pub fn with_backoff(mut self, backoff: Vec<Duration>) -> ProviderClient {
        self.backoff = backoff;
        self
    }

    /// `GET /payment-intents/{id}`: the intent object's raw JSON.
    ///
    /// # Errors
    /// [`ProviderError`] after the retries, or at once for a 4xx other than 429.
    pub async fn get_intent(&self, id: &str) -> Result<Bytes, ProviderError> {
        self.call(
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
        self.call(reqwest::Method::POST, "/payment-intents", Some(body))
            .await
    }

    /// `POST /payment-intents/{id}/cancel`.
    ///
    /// # Errors
    /// As [`ProviderClient::get_intent`]; a 409 when the intent is no longer awaiting payment.
    pub async fn cancel_intent(&self, id: &str) -> Result<Bytes, ProviderError> {
        let empty = serde_json::json!({});
        self.call(
            reqwest::Method::POST,
            &format!("/payment-intents/{id}/cancel"),
            Some(&empty),
        )
        .await
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Bytes, ProviderError> {
        let url = format!("{}{path}", self.base);
        let mut attempt = 0;
        loop {
            let mut request = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(self.key.expose_secret());
            if let Some(body) = body {
                request = request.json(body);
            }
            let result = request.send().await;
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
                    let body: serde_json::Value = response.json().await.unwrap_or_default();
                    let error = ProviderError::Status {
                        status: status.as_u16(),
                        path: path.to_owned(),
                        error_type: body["error"]["type"].as_str().map(str::to_owned),
                        code: body["error"]["code"].as_str().map(str::to_owned),
                    };
                    let transient =
                        status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
                    if !transient || attempt >= self.backoff.len() {
                        return Err(error);
                    }
                    tracing::debug!(%error, attempt, "provider call failed; retrying");
                    retry_after
                }
                Err(source) => {
                    if attempt >= self.backoff.len() {
                        return Err(ProviderError::Transport {
                            path: path.to_owned(),
                            source,
                        });
                    }
                    tracing::debug!(error = %source, attempt, "provider unreachable; retrying");
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
