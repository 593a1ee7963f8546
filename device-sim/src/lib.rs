//! posgate-sim: the provider simulator, simulated terminals, the demo and the benchmarks.
//!
//! A library first, so black-box tests reuse it.
//!
//! # Layout
//! - [`cli`]: the `posgate-sim` command line.
//! - [`events`]: provider event bodies exactly as the provider sends them, and their signed headers.
//! - [`terminal`]: a simulated terminal over MQTT/TLS: verifies, deduplicates, acks.
//! - [`fleet`]: N terminals and the fleet benchmarks (connect, storm, churn, e2e).
//! - [`provider`]: the payment provider simulator: REST API, signed webhooks with retries and faults.
//! - [`pos`]: the point-of-sale flow of the fleet, with chaos.
//! - [`demo`]: gateway + provider simulator + fleet in one process, and the report.
//! - [`bench`]: load generators and reports (`posgate-sim bench …`).

pub mod bench;
pub mod cli;
pub mod demo;
pub mod events;
pub mod fleet;
pub mod pos;
pub mod provider;
pub mod terminal;
