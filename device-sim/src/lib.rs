//! posgate-sim: the provider simulator, simulated terminals, the demo and the benchmarks.
//!
//! A library first, so black-box tests reuse it.
//!
//! # Layout
//! - [`cli`]: the `posgate-sim` command line.
//! - [`events`]: provider event bodies exactly as the provider sends them, and their signed headers.
//! - [`terminal`]: a simulated terminal over MQTT/TLS: verifies, deduplicates, acks.
//! - [`http_terminal`]: the same terminal on the gateway's HTTP channels (SSE, WebSocket).
//! - [`fleet`]: N terminals and the fleet benchmarks (connect, storm, churn, e2e).
//! - [`provider`]: the payment provider simulator: REST API, signed webhooks with retries and faults.
//! - [`pos`]: the point-of-sale flow of the fleet, with chaos.
//! - [`demo`]: gateway + provider simulator + fleet in one process, and the report.
//! - [`chaos`]: `posgate-sim chaos`, the real `posgate` binary killed, stopped, starved of disk under
//!   load, and the checker that proves nothing was lost.
//! - [`attack`]: `posgate-sim attack <kind>`, a hostile client beside the honest load of `bench
//!   e2e`, and what it did to the honest terminals and the gateway.
//! - [`bench`](mod@bench): load generators and reports (`posgate-sim bench …`).
//! - [`store_size`]: `posgate-sim bench store`, the redb file's bytes per webhook and per table.
//! - [`remote`]: a provider simulator in another process, over its REST API and control endpoint.
//! - [`watch`]: `posgate-sim terminal`, one terminal a person can watch (QR code, then the outcome).
//! - [`web_pos`]: `posgate-sim web-pos`, the reference web POS of `clients/web/` and its configuration.
//! - [`fleet_cmd`]: `posgate-sim fleet`, the POS fleet against a running gateway and simulator.
//! - [`compare`]: the webhook bridge for another broker, and `bench e2e --broker … --plain`.

pub mod attack;
pub mod bench;
pub mod chaos;
pub mod cli;
pub mod compare;
pub mod demo;
pub mod events;
pub mod fleet;
pub mod fleet_cmd;
pub mod http_terminal;
pub mod pos;
pub mod provider;
pub mod remote;
pub mod store_size;
pub mod terminal;
pub mod watch;
pub mod web_pos;
