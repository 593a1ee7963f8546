//! Black-box tests: the real daemon, in-process or as a process, on 127.0.0.1:0 ports with a
//! temporary data dir, over real HTTP.

// Test code: a panic is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin;
mod attacks;
mod chaos;
mod cli;
mod clients;
mod crash;
mod delivery;
mod demo;
mod disk;
mod external_broker;
mod external_common;
mod failover;
mod harness;
mod http_channels;
mod metrics;
mod nats_cluster;
mod postgres;
mod provider_sim;
mod provisioning;
mod reconcile;
mod replicas;
mod rpc;
mod security;
mod shutdown;
mod sim_cli;
mod systemd;
mod web_pos;
mod webdriver;
mod webhooks;
