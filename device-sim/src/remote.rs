//! A provider simulator reached over HTTP (`posgate-sim provider` in another process): its REST API
//! (`POST /v1/payment-intents`, bearer `sk_test_…`) for the cashier, and its control endpoint
//! (`POST /_sim/pay/{id}`) for the customer.
//!
//! The in-process [`crate::provider::RunningProvider`] does the same without sockets; both
//! implement [`crate::pos::Checkout`], so the POS flow runs against either.

use anyhow::{Context, bail};
use futures::future::BoxFuture;
use posgate_proto::MicroUsdc;
use serde_json::{Value, json};

use crate::events;
use crate::pos::Checkout;
use crate::provider::NewIntent;

/// The API key used when none is given: any `sk_test_…` key is a test-mode key for the simulator.
pub const DEFAULT_API_KEY: &str = "sk_test_posgate_sim";

/// A provider (simulator) over HTTP.
#[derive(Clone, Debug)]
pub struct RemoteProvider {
    http: reqwest::Client,
    /// `http://ADDR/v1`.
    api_base: String,
    /// `http://ADDR`, where `/_sim/…` lives.
    control_base: String,
    api_key: String,
}

impl RemoteProvider {
    /// A client for the API at `api_base` (`http://ADDR/v1`); the control endpoint is
    /// `control_base`, or `api_base` without its `/v1` when not given.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(
        api_base: &str,
        control_base: Option<&str>,
        api_key: &str,
    ) -> anyhow::Result<RemoteProvider> {
        let api_base = api_base.trim_end_matches('/').to_owned();
        let control_base = match control_base {
            Some(c) => c.trim_end_matches('/').to_owned(),
            None => api_base
                .strip_suffix("/v1")
                .unwrap_or(api_base.as_str())
                .to_owned(),
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(64)
            .build()
            .context("building the HTTP client")?;
        Ok(RemoteProvider {
            http,
            api_base,
            control_base,
            api_key: api_key.to_owned(),
        })
    }

    /// `http://ADDR/v1`.
    pub fn api_base(&self) -> &str {
        &self.api_base
    }

    /// `http://ADDR`.
    pub fn control_base(&self) -> &str {
        &self.control_base
    }

    /// `POST /v1/payment-intents`; returns the intent object.
    ///
    /// # Errors
    /// When the call fails or is not answered 200/201.
    pub async fn create_intent(&self, intent: &NewIntent) -> anyhow::Result<Value> {
        let url = format!("{}/payment-intents", self.api_base);
        let request = self
            .http
            .post(&url)
            .bearer_auth(&self.api_key)
            .json(&intent.to_body());
        post(&url, request).await
    }

    /// `POST /_sim/pay/{id}`: the customer pays `amount` (default: exactly what is due), `late`
    /// pays after expiry.
    ///
    /// # Errors
    /// When the call fails or is not answered 202.
    pub async fn pay(
        &self,
        intent_id: &str,
        amount: Option<MicroUsdc>,
        late: bool,
    ) -> anyhow::Result<Value> {
        let url = format!("{}/_sim/pay/{intent_id}", self.control_base);
        let mut body = json!({ "late": late });
        if let Some(amount) = amount {
            body["amount"] = events::number(amount);
        }
        post(&url, self.http.post(&url).json(&body)).await
    }

    /// `GET /_sim/stats`: the simulator's counters.
    ///
    /// # Errors
    /// When the call fails.
    pub async fn stats(&self) -> anyhow::Result<Value> {
        let url = format!("{}/_sim/stats", self.control_base);
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        response.json().await.context("the stats are not JSON")
    }
}

impl Checkout for RemoteProvider {
    fn new_intent<'a>(
        &'a self,
        amount: MicroUsdc,
        terminal_id: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<String>> {
        Box::pin(async move {
            let intent = self
                .create_intent(&NewIntent::for_terminal(amount, terminal_id))
                .await?;
            intent["id"]
                .as_str()
                .map(str::to_owned)
                .context("the intent has no id")
        })
    }

    fn customer_pays<'a>(
        &'a self,
        intent_id: &'a str,
        amount: MicroUsdc,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move { self.pay(intent_id, Some(amount), false).await.map(drop) })
    }
}

/// Sends `request`, a `POST` to `url`, and returns its JSON body (`null` when it has none).
///
/// # Errors
/// When the call fails or is not answered 2xx.
async fn post(url: &str, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
    let response = request
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("POST {url} answered {status}: {body}");
    }
    Ok(body)
}

/// Parses an address given as `HOST:PORT`, `IP:PORT` or `http://HOST:PORT[/]` (the admin API's
/// address, for flags that take either form). Names resolve, IPv4 first.
///
/// # Errors
/// When it does not resolve.
pub async fn resolve(text: &str) -> anyhow::Result<std::net::SocketAddr> {
    let bare = text
        .trim()
        .trim_start_matches("http://")
        .trim_start_matches("mqtts://")
        .trim_start_matches("mqtt://")
        .trim_end_matches('/');
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host(bare)
        .await
        .with_context(|| format!("resolving {text:?}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .map(|a| {
            // A wildcard listen address names this machine.
            if a.ip().is_unspecified() {
                std::net::SocketAddr::from(([127, 0, 0, 1], a.port()))
            } else {
                *a
            }
        })
        .with_context(|| format!("{text:?} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_base_defaults_to_the_api_root() {
        let p = RemoteProvider::new("http://127.0.0.1:8090/v1/", None, DEFAULT_API_KEY).unwrap();
        assert_eq!(p.api_base(), "http://127.0.0.1:8090/v1");
        assert_eq!(p.control_base(), "http://127.0.0.1:8090");
    }

    #[tokio::test]
    async fn addresses_resolve_in_every_form() {
        for text in [
            "127.0.0.1:8081",
            "http://127.0.0.1:8081/",
            "localhost:8081",
            "mqtts://0.0.0.0:8081",
        ] {
            assert_eq!(
                resolve(text).await.unwrap(),
                "127.0.0.1:8081".parse().unwrap(),
                "{text}"
            );
        }
    }
}
