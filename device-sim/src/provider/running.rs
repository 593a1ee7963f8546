//! The running simulator: [`ProviderSim::start`] binds, spawns the HTTP server and webhook
//! delivery, and returns a [`RunningProvider`], the handle tests, the demo and the binary drive it
//! through (create and pay intents, emit raw events, read counters and deliveries, shut down).
//! [`NewIntent`] is what a caller asks the handle to create.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use posgate_proto::MicroUsdc;
use secrecy::SecretString;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::delivery::{self, Deliverer, DeliveryRecord, Event};
use super::model::{self, Mode};
use super::state::{Core, State};
use super::stats::{ApiCounters, Stats};
use super::{ApiError, PayReceipt, ProviderConfig, api};
use crate::events;

/// The provider simulator. [`ProviderSim::start`] binds and spawns it.
pub struct ProviderSim;

impl ProviderSim {
    /// Validates `config`, binds `config.listen`, and starts the API, the control endpoints and
    /// webhook delivery.
    ///
    /// # Errors
    /// A bad config, or the address cannot be bound.
    pub async fn start(config: ProviderConfig) -> anyhow::Result<RunningProvider> {
        config.validate()?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding the provider simulator to {}", config.listen))?;
        let addr = listener.local_addr()?;
        let token = CancellationToken::new();
        let tracker = TaskTracker::new();
        let deliverer = Deliverer::spawn(
            delivery::Settings {
                url: config.webhook_url.clone(),
                secrets: config.webhook_secrets.clone(),
                faults: config.faults.clone(),
                time_scale: config.time_scale,
                timeout: config.delivery_timeout,
                reorder_window: config.reorder_window,
                clock: config.clock.clone(),
            },
            token.clone(),
            tracker.clone(),
        )?;
        let core = Arc::new(Core {
            api_base: format!("http://{addr}/v1"),
            config,
            state: Mutex::new(State::default()),
            deliverer,
            counters: ApiCounters::default(),
            token: token.clone(),
            tracker: tracker.clone(),
        });
        let router = api::router(Arc::clone(&core));
        let stop = token.clone().cancelled_owned();
        tracker.spawn(
            async move {
                if let Err(e) = axum::serve(listener, router)
                    .with_graceful_shutdown(stop)
                    .await
                {
                    tracing::error!(error = %e, "provider simulator server failed");
                }
            }
            .instrument(tracing::info_span!("provider_http", %addr)),
        );
        tracing::info!(%addr, webhook_url = %core.config.webhook_url, time_scale = core.config.time_scale,
            timeout_ms = core.deliverer.timeout().as_millis() as u64, "provider simulator listening");
        Ok(RunningProvider { addr, core })
    }
}

/// A started provider simulator.
pub struct RunningProvider {
    addr: SocketAddr,
    core: Arc<Core>,
}

/// Parameters of [`RunningProvider::create_intent`].
#[derive(Clone, Debug)]
pub struct NewIntent {
    /// Whole cents, 0.01 to 10 000.
    pub amount: MicroUsdc,
    /// `mer_…`.
    pub merchant_id: String,
    /// At most 10 string values (put `terminal_id` and `order_id` here).
    pub metadata: Map<String, Value>,
    /// Seconds, 60 to 3600 (scaled by the time scale); `None` is 300.
    pub ttl_secs: Option<u64>,
    /// The body field `idempotency_key`.
    pub idempotency_key: Option<String>,
    /// Test (`sk_test_`) or live (`sk_live_`) chain and contract.
    pub mode: Mode,
}

impl NewIntent {
    /// A test-mode intent of `amount` for `terminal_id`, with `order_id` = `ord-{random}`.
    pub fn for_terminal(amount: MicroUsdc, terminal_id: &str) -> Self {
        let mut metadata = Map::new();
        metadata.insert("terminal_id".into(), json!(terminal_id));
        metadata.insert(
            "order_id".into(),
            json!(format!("ord-{}", &model::new_id("x_")[2..])),
        );
        NewIntent {
            amount,
            merchant_id: "mer_sim".into(),
            metadata,
            ttl_secs: None,
            idempotency_key: None,
            mode: Mode::Test,
        }
    }

    /// The JSON body the REST API would receive.
    pub fn to_body(&self) -> Value {
        let mut body = json!({
            "amount": events::number(self.amount),
            "currency": "usd",
            "merchant_id": self.merchant_id,
            "metadata": self.metadata,
        });
        if let Some(ttl) = self.ttl_secs {
            body["ttl"] = json!(ttl);
        }
        if let Some(key) = &self.idempotency_key {
            body["idempotency_key"] = json!(key);
        }
        body
    }
}

impl RunningProvider {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR/v1`: the gateway's `provider.api_base`.
    pub fn api_base(&self) -> String {
        self.core.api_base.clone()
    }

    /// `http://ADDR`: where `/_sim/…` lives.
    pub fn control_base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates an intent exactly as `POST /v1/payment-intents` would (validation and idempotency
    /// included) and returns the intent object.
    ///
    /// # Errors
    /// The [`ApiError`] the REST API would answer (400, 409).
    pub fn create_intent(&self, intent: &NewIntent) -> Result<Value, ApiError> {
        self.core
            .create(intent.mode, &intent.to_body())
            .map(|(_, object)| object)
    }

    /// The intent object as `GET /v1/payment-intents/{id}` shows it.
    ///
    /// # Errors
    /// 404 for an unknown id.
    pub fn intent(&self, id: &str) -> Result<Value, ApiError> {
        self.core.intent(id)
    }

    /// Cancels an intent as `POST /v1/payment-intents/{id}/cancel` would.
    ///
    /// # Errors
    /// 404 for an unknown id, 409 when it is not awaiting payment.
    pub fn cancel_intent(&self, id: &str) -> Result<Value, ApiError> {
        self.core.cancel(id)
    }

    /// The customer pays `intent_id`: `amount` (default: exactly the intent's), confirmed after the
    /// scaled confirmation delay, or after `expires_at` when `late`.
    ///
    /// # Errors
    /// 404 for an unknown intent, 400 for a zero amount.
    pub fn pay(
        &self,
        intent_id: &str,
        amount: Option<MicroUsdc>,
        late: bool,
    ) -> Result<PayReceipt, ApiError> {
        self.core.pay(intent_id, amount, late)
    }

    /// A transfer of `amount` to an address no intent has (`payment_intent_id: null`), or to
    /// `address`.
    ///
    /// # Errors
    /// 400 for a zero amount.
    pub fn pay_unknown(
        &self,
        amount: MicroUsdc,
        address: Option<String>,
    ) -> Result<PayReceipt, ApiError> {
        self.core.pay_unknown(amount, address)
    }

    /// Sends `body` as an event exactly as given (through the same signing, retries and faults).
    /// Returns its `evt_…` id.
    ///
    /// # Errors
    /// When `body` is not an event envelope.
    pub fn emit_raw(&self, body: impl Into<String>) -> anyhow::Result<String> {
        let body: String = body.into();
        let envelope = posgate_proto::Envelope::parse(body.as_bytes())
            .context("the body is not an event envelope")?;
        let (id, kind) = (envelope.id.clone(), envelope.kind.clone());
        self.core.deliverer.emit(Event {
            id: id.clone(),
            kind,
            intent_id: None,
            body: Bytes::from(body),
        });
        Ok(id)
    }

    /// Points webhooks (pending retries included) at another URL.
    pub fn set_webhook_url(&self, url: impl Into<String>) {
        self.core.deliverer.set_url(url.into());
    }

    /// Replaces the webhook secrets; the last one signs from now on.
    pub fn set_webhook_secrets(&self, secrets: Vec<SecretString>) {
        self.core.deliverer.set_secrets(secrets);
    }

    /// Every counter.
    pub fn stats(&self) -> Stats {
        self.core.stats()
    }

    /// Every emitted event and what was sent for it, in emission order.
    pub fn deliveries(&self) -> Vec<DeliveryRecord> {
        self.core.deliverer.records()
    }

    /// The delivery records of the events about `intent_id`.
    pub fn deliveries_for(&self, intent_id: &str) -> Vec<DeliveryRecord> {
        self.deliveries()
            .into_iter()
            .filter(|d| d.intent_id.as_deref() == Some(intent_id))
            .collect()
    }

    /// Stops serving, cancels timers and pending retries, and waits at most `grace` for the tasks.
    pub async fn shutdown(self, grace: Duration) {
        self.core.token.cancel();
        self.core.tracker.close();
        if tokio::time::timeout(grace, self.core.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("provider simulator tasks still running after {grace:?}");
        }
        self.core.deliverer.abandon_pending();
    }
}

/// Dropping the handle stops the simulator's tasks too (without waiting for them).
impl Drop for RunningProvider {
    fn drop(&mut self) {
        self.core.token.cancel();
    }
}
