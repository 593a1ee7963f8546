//! posgate: gets payment confirmations from the payment provider's webhooks onto point-of-sale
//! terminals, fast and without ever losing one.
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
//! - [`ingress`] — `POST /webhooks/stablegenius`: verify the raw bytes, store durably, answer; and
//!   the HTTP channels of terminals without MQTT (polling, SSE, WebSocket, acks; optional TLS).
//! - [`broker`] — the embedded MQTT broker (rmqtt): mutual TLS, isolation, revocation; the only
//!   module that names the broker library.
//! - [`router`] — outbox → broker publish, acks → outbox clear, presence; tested over channels.
//! - [`provider`] — the provider's REST client: timeouts, retries with backoff, typed errors.
//! - [`reconcile`] — asks the provider what the webhooks left open; feeds it through the store.
//! - [`rpc`] — terminal RPC over MQTT: create, get and cancel intents; the API key stays here.
//! - [`store`] — redb tables, one writer thread with group commit, typed reads.
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
pub mod rpc;
pub mod serve;
pub mod shutdown;
pub mod store;
pub mod systemd;
pub mod telemetry;

pub use app::{BuildError, Gateway, Running};
pub use config::Config;
