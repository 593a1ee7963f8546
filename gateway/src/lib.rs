//! posgate: gets payment confirmations from the payment provider's webhooks onto point-of-sale
//! terminals, fast and without ever losing one.
//!
//! # The path of a webhook
//! 1. **Ingress** ([`ingress`], `webhook`): the raw body is verified (timestamp, HMAC against any
//!    configured secret) and parsed into a [`store::IncomingEvent`].
//! 2. **Store commit** ([`store::Store::ingest`]): in one group commit of the writer thread
//!    (`store/writer.rs`), the event is deduplicated, applied to its intent by the forward-only
//!    state machine ([`domain`]) and, when the terminal must hear of it, an outbox row with the
//!    terminal's next `seq` is written; the batch is answered only once its `fdatasync` completed
//!    (`store/barrier.rs`). Then the webhook is answered `200`.
//! 3. **Notice** ([`store::Store::subscribe_outbox`]): the new rows are handed to delivery, a hint
//!    only; the outbox is the truth.
//! 4. **Delivery** ([`delivery::Engine`]): one task keeps each terminal's unacked rows in `seq`
//!    order and puts the lowest (the head) on the wire, signed ([`delivery::Signer`]).
//! 5. **Broker and channels**: [`broker::Handle`] publishes it retained on the terminal's MQTT
//!    topic; [`channels`] carries the same bytes over SSE, WebSocket and long polls.
//! 6. **Ack**: the terminal verifies the JWS, shows it, and acks (MQTT `acks` topic, or
//!    `POST /v1/terminal/acks`); delivery moves the terminal on to its next row at once.
//! 7. **Outbox clear** ([`store::Store::ack_many`]): the ack is stored and the row leaves the
//!    outbox; only then is a confirmation done. Anything unacked is published again at startup,
//!    on reconnect and after `delivery.republish_after_secs`.
//!
//! Beside the path: [`reconcile`] asks the provider what webhooks left open and feeds the answers
//! through step 2; [`rpc`] lets terminals create, get and cancel intents without the API key.
//!
//! # Layout
//! - [`cli`] — the command line (`run`, `print-config`, `check-config`) and its exit codes.
//! - [`config`] — the file schema, layered loading, validation that reports every bad key.
//! - [`app`] — [`Gateway::build`] (opens the store, binds every listener), [`Gateway::spawn`] →
//!   [`Running`] (bound addresses, graceful shutdown).
//! - [`shutdown`] — SIGTERM/SIGINT.
//! - [`systemd`] — systemd's `sd_notify` protocol: `READY=1`, `STOPPING=1`, watchdog pings while
//!   healthy; a no-op outside systemd.
//! - [`telemetry`] — the tracing subscriber (plain or JSON); only the binary installs it.
//! - [`domain`] — the intent state machine, pure and forward-only.
//! - [`ingress`] — `POST /webhooks/stablegenius`: verify the raw bytes, store durably, answer;
//!   the ingress listener's optional TLS.
//! - [`channels`] — the HTTP channels of terminals without MQTT (polling, SSE, WebSocket, acks).
//! - [`broker`] — the embedded MQTT broker (rmqtt): mutual TLS, isolation, revocation; the only
//!   module that names the broker library. Also the external broker mode (`broker::external`,
//!   a rumqttc client of a Mosquitto that `broker::mosquitto` configures) and `broker::Link`,
//!   which is either.
//! - [`delivery`] — outbox → broker publish, acks → outbox clear, presence; tested over channels.
//! - [`provider`] — the provider's REST client: timeouts, retries with backoff, typed errors.
//! - [`reconcile`] — asks the provider what the webhooks left open; feeds it through the store.
//! - [`rpc`] — terminal RPC over MQTT: create, get and cancel intents; the API key stays here.
//! - [`store`] — redb tables (or PostgreSQL: `store.backend`), one writer thread with group
//!   commit, typed reads; the logic written once over a small key-value interface.
//! - [`admin`] — `/healthz`, `/readyz` and the admin API behind the bearer token.
//! - [`pki`] — the gateway CA, server and terminal certificates, the confirmation-signing key.
//! - [`metrics`] — the Prometheus registry served at `/metrics`.
//! - [`http`] — the shared error body.
//! - [`serve`] — the HTTP listeners' accept loops: a task per connection in the tracker, a
//!   header-read timeout, graceful then hard stop.

pub mod admin;
pub mod app;
pub mod broker;
pub mod channels;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod domain;
pub mod http;
pub mod ingress;
pub mod metrics;
pub mod pki;
pub mod provider;
pub mod reconcile;
pub mod replicas;
pub mod rpc;
pub mod serve;
pub mod shutdown;
pub mod store;
pub mod systemd;
pub mod telemetry;

pub use app::{BuildError, Gateway, Running};
pub use config::Config;
