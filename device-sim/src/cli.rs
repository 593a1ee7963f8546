//! The `posgate-sim` command line (in the library, so tests can run it as a process).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::{bench, chaos, compare, demo, fleet, fleet_cmd, pos, provider, remote, watch};
use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "posgate-sim",
    version,
    about = "posgate's simulator: provider, terminals, demo, benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole system on one machine: gateway + provider simulator + N terminals, live progress,
    /// final report; exit 0 only if nothing was lost.
    Demo {
        /// Simulated terminals.
        #[arg(long, default_value_t = 200)]
        terminals: usize,
        /// Seconds during which payments are started.
        #[arg(long, default_value_t = 20)]
        duration: u64,
        /// Write the report as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Multiplies the provider's delays (3 s on-chain confirmation at 1.0).
        #[arg(long, default_value_t = 0.01)]
        time_scale: f64,
        /// No disconnects, reboots, underpayments or faulty webhooks.
        #[arg(long)]
        no_chaos: bool,
        /// No live progress bar.
        #[arg(long)]
        quiet: bool,
        /// Seconds a paid intent may take to reach its terminal before it counts as lost.
        #[arg(long, default_value_t = 20)]
        grace: u64,
        /// The provider drops every webhook (shows that the demo reports loss; for tests).
        #[arg(long, hide = true)]
        drop_all_webhooks: bool,
    },
    /// The payment provider simulator: REST API under http://ADDR/v1, signed webhooks, faults.
    Provider(ProviderArgs),
    /// One terminal a person can watch: shows the amount and the QR code, waits for the signed
    /// confirmation, shows PAID, EXPIRED, UNDERPAID or CANCELLED.
    Terminal(TerminalArgs),
    /// N terminals running the POS flow against a running gateway and provider simulator; exit
    /// 0 only if nothing was lost.
    Fleet(FleetArgs),
    /// A minimal webhook -> MQTT bridge (HMAC check, retained QoS 1 publish, no durable write),
    /// to put another broker (e.g. Mosquitto) side by side with posgate in `bench e2e --broker`.
    Bridge(BridgeArgs),
    /// A chaos soak of the real `posgate` binary: terminals on MQTT, SSE and WebSocket, webhooks
    /// retried until 200, SIGKILL/SIGTERM restarts on the same ports, terminal drops, a full disk;
    /// exit 0 only if nothing was lost, skipped or invented.
    Chaos(ChaosArgs),
    /// Measurements; each prints a table and can write a JSON report.
    Bench {
        #[command(subcommand)]
        scenario: Scenario,
    },
}

/// `posgate-sim chaos`.
#[derive(clap::Args)]
struct ChaosArgs {
    /// The `posgate` binary (default: `posgate` next to this executable).
    #[arg(long)]
    posgate: Option<PathBuf>,
    /// Simulated terminals.
    #[arg(long, default_value_t = 200)]
    terminals: usize,
    /// How many of them use SSE or WebSocket (half each) instead of MQTT (default: 10 %).
    #[arg(long)]
    http_terminals: Option<usize>,
    /// New webhooks per second (each retried until 200).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Seconds of faults and new webhooks.
    #[arg(long, default_value_t = 300)]
    duration: u64,
    /// Seconds between two SIGKILLs, MIN..MAX; each is followed by a restart on the same ports.
    #[arg(long, default_value = "10..30")]
    kill_every: chaos::Every,
    /// No SIGKILLs.
    #[arg(long, conflicts_with = "kill_every")]
    no_kills: bool,
    /// Seconds between two SIGTERM restarts, MIN..MAX (default: none).
    #[arg(long)]
    term_every: Option<chaos::Every>,
    /// Seconds between two drops of 5 % of the terminals' connections, MIN..MAX (default: none).
    #[arg(long)]
    drop_every: Option<chaos::Every>,
    /// Disk-full periods, spread over the soak: the data dir is a tmpfs (needs root), filled
    /// for a while, then freed.
    #[arg(long, default_value_t = 0)]
    disk_full: usize,
    /// Seconds each disk-full period lasts.
    #[arg(long, default_value_t = 10)]
    disk_full_secs: u64,
    /// Size of the tmpfs data dir in MiB (with --disk-full).
    #[arg(long, default_value_t = 2048)]
    tmpfs_mib: u64,
    /// Seconds after the soak for the last retries and deliveries.
    #[arg(long, default_value_t = 60)]
    drain: u64,
    /// Write the report as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Seed of every random choice (terminals, intervals).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// No line per fault on stderr.
    #[arg(long)]
    quiet: bool,
}

impl ChaosArgs {
    fn options(self) -> anyhow::Result<chaos::ChaosOptions> {
        let posgate = match self.posgate {
            Some(path) => path,
            None => {
                let exe = std::env::current_exe().context("locating this executable")?;
                let bin = exe.with_file_name("posgate");
                if !bin.exists() {
                    anyhow::bail!(UsageError(format!(
                        "{} not found: build it (cargo build -p posgate) or pass --posgate PATH",
                        bin.display()
                    )));
                }
                bin
            }
        };
        if !(self.rate > 0.0 && self.rate.is_finite()) {
            anyhow::bail!(UsageError("--rate must be above 0".into()));
        }
        Ok(chaos::ChaosOptions {
            terminals: self.terminals,
            http_terminals: self.http_terminals.unwrap_or(self.terminals / 10),
            rate: self.rate,
            kill_every: (!self.no_kills).then_some(self.kill_every),
            term_every: self.term_every,
            drop_every: self.drop_every,
            disk_full: self.disk_full,
            disk_full_for: Duration::from_secs(self.disk_full_secs),
            tmpfs_mib: self.tmpfs_mib,
            drain: Duration::from_secs(self.drain),
            seed: self.seed,
            verbose: !self.quiet,
            ..chaos::ChaosOptions::new(posgate, Duration::from_secs(self.duration))
        })
    }
}

/// `posgate-sim provider` (interfaces.md, "Simulator contract").
#[derive(clap::Args)]
struct ProviderArgs {
    /// Address to listen on; the API lives under http://ADDR/v1.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Where webhooks go, e.g. http://127.0.0.1:8080/webhooks/stablegenius.
    #[arg(long)]
    webhook_url: String,
    /// Webhook signing secret; give it twice (old, then new) for a rotation overlap.
    #[arg(long = "webhook-secret", required = true)]
    webhook_secrets: Vec<String>,
    /// The only API key accepted (default: any sk_test_… or sk_live_… key).
    #[arg(long)]
    api_key: Option<String>,
    /// Multiplies every provider delay (confirmation, ttl, retry schedule).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// On-chain confirmation delay in milliseconds, before scaling.
    #[arg(long, default_value_t = 3000)]
    confirm_delay_ms: u64,
    /// Probability of sending a delivery twice.
    #[arg(long, default_value_t = 0.0)]
    duplicate_rate: f64,
    /// Send duplicates at the same instant, with identical headers.
    #[arg(long)]
    simultaneous_duplicates: bool,
    /// Hold events back and send them shuffled.
    #[arg(long)]
    reorder: bool,
    /// How long --reorder holds events back, in milliseconds (not scaled).
    #[arg(long, default_value_t = 500)]
    reorder_window_ms: u64,
    /// Probability that an event is never delivered (dropped after the final attempt).
    #[arg(long, default_value_t = 0.0)]
    drop_rate: f64,
    /// Probability of first sending a copy with a 400 s old timestamp.
    #[arg(long, default_value_t = 0.0)]
    stale_rate: f64,
    /// Probability of first sending a copy with a wrong signature.
    #[arg(long, default_value_t = 0.0)]
    bad_signature_rate: f64,
    /// Probability of first sending a copy with an empty signature (`sha256=`).
    #[arg(long, default_value_t = 0.0)]
    empty_signature_rate: f64,
    /// Sign some retries and duplicates with the older secret (needs two --webhook-secret).
    #[arg(long)]
    rotate_secret: bool,
    /// Probability that a /v1 request is answered with an injected 5xx.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Probability that a create is answered 500 after the intent was created.
    #[arg(long, default_value_t = 0.0)]
    fail_after_rate: f64,
    /// Answer 429 beyond this many /v1 requests per minute.
    #[arg(long)]
    rate_limit_per_minute: Option<u32>,
    /// Send `Retry-After: 1` with a 429.
    #[arg(long)]
    retry_after: bool,
    /// Answer a repeated idempotency key (same body) 409 with the original intent, not 200.
    #[arg(long)]
    replay_409: bool,
    /// Give intents a qr_payload for the wrong chain (the gateway must refuse it).
    #[arg(long)]
    bad_qr: bool,
    /// Merchant of transfers to unknown addresses.
    #[arg(long, default_value = "mer_sim")]
    merchant_id: String,
}

impl ProviderArgs {
    fn config(self) -> provider::ProviderConfig {
        let mut config = provider::ProviderConfig::new(self.webhook_url, String::new());
        config.listen = self.listen;
        config.webhook_secrets = self
            .webhook_secrets
            .into_iter()
            .map(secrecy::SecretString::from)
            .collect();
        config.api_key = self.api_key.map(secrecy::SecretString::from);
        config.time_scale = self.time_scale;
        config.confirm_delay = Duration::from_millis(self.confirm_delay_ms);
        config.reorder_window = Duration::from_millis(self.reorder_window_ms);
        config.merchant_id = self.merchant_id;
        config.faults = provider::Faults {
            duplicate_rate: self.duplicate_rate,
            simultaneous_duplicates: self.simultaneous_duplicates,
            reorder: self.reorder,
            drop_rate: self.drop_rate,
            stale_rate: self.stale_rate,
            bad_signature_rate: self.bad_signature_rate,
            empty_signature_rate: self.empty_signature_rate,
            rotate_secret: self.rotate_secret,
        };
        config.api_faults = provider::ApiFaults {
            fail_rate: self.fail_rate,
            fail_after_rate: self.fail_after_rate,
            rate_limit_per_minute: self.rate_limit_per_minute,
            retry_after: self.retry_after,
            replay_409: self.replay_409,
            bad_qr: self.bad_qr,
        };
        config
    }
}

/// `posgate-sim terminal`: one terminal a person can watch.
#[derive(clap::Args)]
struct TerminalArgs {
    /// The terminal's id (provisioned with it; the intent's `metadata.terminal_id`).
    #[arg(long)]
    id: String,
    /// The gateway's admin API, HOST:PORT or http://HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:8081")]
    admin: String,
    /// The admin token.
    #[arg(long, env = "POSGATE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// The gateway's MQTT/TLS listener (default: the bundle's mqtt_url).
    #[arg(long)]
    mqtt: Option<String>,
    /// A provisioning bundle: used when the file exists, written (mode 0600) after provisioning
    /// when it does not.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Merchant the terminal is registered under.
    #[arg(long, default_value = "mer_sim")]
    merchant_id: String,
    /// The provider (simulator) API.
    #[arg(long, default_value = "http://127.0.0.1:8090/v1")]
    provider_api: String,
    /// The simulator's control endpoint (default: --provider-api without /v1).
    #[arg(long)]
    provider_control: Option<String>,
    /// API key for the provider's REST API.
    #[arg(long, default_value = remote::DEFAULT_API_KEY)]
    api_key: String,
    /// The amount to charge, in USD (exact decimal).
    #[arg(long, default_value = "4.40")]
    amount: String,
    /// Intent time to live in seconds, before the provider's time scale (default: 300).
    #[arg(long)]
    ttl: Option<u64>,
    /// The customer pays by themselves after --pay-after-ms (through POST /_sim/pay/{id}).
    #[arg(long)]
    pay: bool,
    /// How long the customer takes to pay with --pay.
    #[arg(long, default_value_t = 3000)]
    pay_after_ms: u64,
    /// What the customer pays with --pay (default: the amount due; less shows UNDERPAID).
    #[arg(long)]
    pay_amount: Option<String>,
    /// Seconds to wait for the outcome.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

/// `posgate-sim fleet`: the POS fleet against a running gateway and provider simulator.
#[derive(clap::Args)]
struct FleetArgs {
    /// The gateway's admin API, HOST:PORT or http://HOST:PORT.
    #[arg(long)]
    admin: String,
    /// The admin token.
    #[arg(long, env = "POSGATE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// The gateway's MQTT/TLS listener.
    #[arg(long)]
    mqtt: String,
    /// The provider (simulator) API.
    #[arg(long)]
    provider_api: String,
    /// The simulator's control endpoint (default: --provider-api without /v1).
    #[arg(long)]
    provider_control: Option<String>,
    /// API key for the provider's REST API.
    #[arg(long, default_value = remote::DEFAULT_API_KEY)]
    api_key: String,
    /// Simulated terminals.
    #[arg(long, default_value_t = 200)]
    terminals: usize,
    /// Seconds during which payments are started.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Seconds a paid intent may take to reach its terminal before it counts as lost.
    #[arg(long, default_value_t = 20)]
    grace: u64,
    /// Probability per payment that the terminal drops its connection while waiting.
    #[arg(long, default_value_t = 0.0)]
    disconnect_rate: f64,
    /// Probability per payment that the terminal reboots while waiting (same intent id).
    #[arg(long, default_value_t = 0.0)]
    reboot_rate: f64,
    /// Probability per payment that the terminal goes offline for 2 to 6 s while waiting.
    #[arg(long, default_value_t = 0.0)]
    offline_rate: f64,
    /// A connection storm every SECS seconds: all terminals drop and reconnect at once.
    #[arg(long, value_name = "SECS")]
    storm_every: Option<u64>,
    /// Terminal ids are PREFIX0, PREFIX1, … (default: fleet-XXXX- with a random XXXX, so runs
    /// against the same gateway never collide).
    #[arg(long)]
    prefix: Option<String>,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No live progress bar.
    #[arg(long)]
    quiet: bool,
}

/// `posgate-sim bridge`: webhooks in, retained QoS 1 MQTT messages out.
#[derive(clap::Args)]
struct BridgeArgs {
    /// Where webhooks are accepted (POST /webhooks/stablegenius); port 0 picks one. The bound
    /// address is the first line on stdout.
    #[arg(long, default_value = "127.0.0.1:8085")]
    listen: SocketAddr,
    /// The MQTT broker, HOST:PORT (plain TCP, or mutual TLS with --certs).
    #[arg(long)]
    broker: String,
    /// Mutual TLS to the broker: a directory with ca.pem, client.pem and client.key.
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Accepted webhook secret (repeat while rotating).
    #[arg(long = "webhook-secret", required = true)]
    webhook_secrets: Vec<String>,
    /// Clear a message's retained copy when its terminal acks on terminals/{id}/acks.
    #[arg(long)]
    clear_on_ack: bool,
}

/// Where the gateway under test is (default: start `posgate` from next to this binary).
#[derive(clap::Args)]
struct TargetArgs {
    /// Ingress address of a running gateway (with --admin, --mqtt and --admin-token).
    #[arg(long, requires_all = ["admin", "mqtt", "admin_token"])]
    ingress: Option<SocketAddr>,
    #[arg(long)]
    admin: Option<SocketAddr>,
    #[arg(long)]
    mqtt: Option<SocketAddr>,
    #[arg(long)]
    admin_token: Option<String>,
    /// Webhook secret the gateway accepts.
    #[arg(long, default_value = "whsec_bench")]
    secret: String,
    /// The posgate binary to start (default: next to this one).
    #[arg(long)]
    posgate_bin: Option<PathBuf>,
    /// Log level of the started gateway.
    #[arg(long, default_value = "warn")]
    log_level: String,
    /// Report the RSS of this process (default: the started gateway).
    #[arg(long)]
    pid: Option<u32>,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

impl TargetArgs {
    fn options(&self) -> fleet::TargetOptions {
        let addrs = match (self.ingress, self.admin, self.mqtt) {
            (Some(i), Some(a), Some(m)) => Some((i, a, m)),
            _ => None,
        };
        fleet::TargetOptions {
            addrs,
            admin_token: self.admin_token.clone(),
            secret: self.secret.clone(),
            posgate_bin: self.posgate_bin.clone(),
            log_level: self.log_level.clone(),
            pid: self.pid,
        }
    }
}

#[derive(Subcommand)]
enum Scenario {
    /// Connect rate: N new mutual-TLS terminals, C connecting at a time.
    Connect {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 2000)]
        terminals: usize,
        #[arg(long, default_value_t = 500)]
        concurrency: usize,
    },
    /// Reconnect storms: all N drop, each gets a confirmation while offline, all reconnect at once.
    Storm {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 1000)]
        terminals: usize,
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Seconds a round may take before it counts as failed.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// RSS at N connected terminals and its drift over cycles of K reconnecting.
    Churn {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 1000)]
        terminals: usize,
        #[arg(long, default_value_t = 1000)]
        reconnect: usize,
        #[arg(long, default_value_t = 20)]
        cycles: usize,
    },
    /// Webhook sent -> confirmation verified at the terminal, at N terminals and R webhooks/s.
    E2e {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 1000)]
        terminals: usize,
        #[command(flatten)]
        pacing: crate::fleet::Pacing,
        /// Measured seconds.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// How the terminals get their confirmations: MQTT/TLS, or the ingress listener's
        /// Server-Sent Events or WebSocket (bearer token).
        #[arg(long, value_enum, default_value = "mqtt", conflicts_with = "broker")]
        channel: crate::http_terminal::Channel,
        /// Measure another MQTT broker instead (HOST:PORT), fed by `posgate-sim bridge`; --pid
        /// then names the broker's process.
        #[arg(long)]
        broker: Option<String>,
        /// Terminals connect to --broker without TLS.
        #[arg(long, requires = "broker", conflicts_with = "certs")]
        plain: bool,
        /// Terminals (and the bridge) connect to --broker over mutual TLS: a directory with
        /// ca.pem (the broker's CA), client.pem and client.key.
        #[arg(long, requires = "broker")]
        certs: Option<PathBuf>,
        /// A running bridge in front of --broker (default: start one as a child process).
        #[arg(long, requires = "broker")]
        bridge: Option<SocketAddr>,
        /// The started bridge clears retained messages when terminals ack.
        #[arg(long, requires = "broker")]
        clear_on_ack: bool,
    },
    /// Sustained durable webhooks/s and answer times over real HTTP on 127.0.0.1.
    Ingest {
        /// Ingress address of a running gateway (default: start `posgate` as a child process).
        #[arg(long)]
        target: Option<SocketAddr>,
        /// Admin address of that gateway, for the /healthz baseline.
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// Webhook secret the gateway accepts.
        #[arg(long, default_value = "whsec_bench")]
        secret: String,
        /// Concurrent senders, one keep-alive connection each.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Measured seconds per phase.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Unmeasured warm-up seconds per phase.
        #[arg(long, default_value_t = 2)]
        warmup: u64,
        /// The posgate binary to start (default: next to this one).
        #[arg(long)]
        posgate_bin: Option<PathBuf>,
        /// Log level of the started gateway.
        #[arg(long, default_value = "info")]
        log_level: String,
        /// Skip the /healthz baseline phase.
        #[arg(long)]
        no_baseline: bool,
        /// Report the RSS of this process (default: the started gateway).
        #[arg(long)]
        pid: Option<u32>,
        /// Write the report as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

/// Entry point of the `posgate-sim` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("posgate-sim: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("posgate-sim: {e:#}");
            if e.is::<UsageError>() {
                ExitCode::from(64)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo {
            terminals,
            duration,
            json,
            time_scale,
            no_chaos,
            quiet,
            grace,
            drop_all_webhooks,
        } => {
            let options = demo::DemoOptions {
                terminals,
                duration: Duration::from_secs(duration),
                grace: Duration::from_secs(grace),
                time_scale,
                chaos: !no_chaos,
                drop_all_webhooks,
                progress: !quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            let report = demo::run(&options).await?;
            demo::print(&report);
            save(&report, json.as_deref(), report.pos.clean())
        }
        Command::Provider(args) => {
            // Before anything listens, so a SIGTERM right after start stops cleanly.
            let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?;
            let running = provider::ProviderSim::start(args.config())
                .await
                .map_err(|e| anyhow::anyhow!(UsageError(format!("{e:#}"))))?;
            eprintln!(
                "posgate-sim provider: API at {}, control at {}/_sim",
                running.api_base(),
                running.control_base()
            );
            wait_for_signal(term).await?;
            let stats = running.stats();
            running.shutdown(Duration::from_secs(5)).await;
            println!("{}", serde_json::to_string_pretty(&stats)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Terminal(args) => {
            let options = watch::WatchOptions {
                amount: watch::parse_amount(&args.amount)
                    .map_err(|e| anyhow::anyhow!(UsageError(format!("--amount: {e:#}"))))?,
                pay_amount: args
                    .pay_amount
                    .as_deref()
                    .map(watch::parse_amount)
                    .transpose()
                    .map_err(|e| anyhow::anyhow!(UsageError(format!("--pay-amount: {e:#}"))))?,
                id: args.id,
                admin: args.admin,
                admin_token: args.admin_token,
                mqtt: args.mqtt,
                bundle: args.bundle,
                merchant_id: args.merchant_id,
                provider_api: args.provider_api,
                provider_control: args.provider_control,
                api_key: args.api_key,
                ttl_secs: args.ttl,
                pay: args.pay,
                pay_after: Duration::from_millis(args.pay_after_ms),
                timeout: Duration::from_secs(args.timeout),
            };
            watch::run(&options).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Fleet(args) => {
            let prefix = args
                .prefix
                .unwrap_or_else(|| format!("fleet-{:04x}-", rand::random::<u16>()));
            let options = fleet_cmd::FleetOptions {
                admin: args.admin,
                admin_token: args.admin_token,
                mqtt: args.mqtt,
                provider_api: args.provider_api,
                provider_control: args.provider_control,
                api_key: args.api_key,
                terminals: args.terminals,
                prefix,
                pos: pos::PosOptions {
                    duration: Duration::from_secs(args.duration),
                    grace: Duration::from_secs(args.grace),
                    disconnect_rate: args.disconnect_rate,
                    reboot_rate: args.reboot_rate,
                    underpay_rate: 0.0,
                    offline_rate: args.offline_rate,
                    storm_every: args.storm_every.map(Duration::from_secs),
                },
                progress: !args.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            let report = fleet_cmd::run(&options).await?;
            fleet_cmd::print(&report);
            save(&report, args.json.as_deref(), report.clean())
        }
        Command::Bridge(args) => {
            let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?;
            let broker = remote::resolve(&args.broker)
                .await
                .map_err(|e| anyhow::anyhow!(UsageError(format!("--broker: {e:#}"))))?;
            let bridge = compare::start_bridge(compare::BridgeOptions {
                listen: args.listen,
                broker,
                secrets: args
                    .webhook_secrets
                    .into_iter()
                    .map(secrecy::SecretString::from)
                    .collect(),
                clear_on_ack: args.clear_on_ack,
                certs: args.certs,
            })
            .await
            .map_err(|e| anyhow::anyhow!(UsageError(format!("{e:#}"))))?;
            // The first line on stdout: what `bench e2e --broker` reads.
            println!("posgate-sim bridge: listening on {}", bridge.addr);
            std::io::Write::flush(&mut std::io::stdout()).ok();
            wait_for_signal(term).await?;
            bridge.stop().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Chaos(args) => {
            let json = args.report.clone();
            let report = chaos::run(&args.options()?).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            save(&report, json.as_deref(), report.clean)
        }
        Command::Bench { scenario } => match scenario {
            Scenario::Ingest {
                target,
                admin,
                secret,
                concurrency,
                duration,
                warmup,
                posgate_bin,
                log_level,
                no_baseline,
                pid,
                json,
            } => {
                let opts = bench::IngestOptions {
                    target,
                    admin,
                    secret,
                    concurrency,
                    duration: Duration::from_secs(duration),
                    warmup: Duration::from_secs(warmup),
                    posgate_bin,
                    log_level,
                    no_baseline,
                    pid,
                };
                let report = bench::ingest(&opts).await?;
                bench::print_ingest(&report);
                if let Some(path) = json {
                    write_json(&path, &report)?;
                }
                Ok(ExitCode::SUCCESS)
            }
            Scenario::Connect {
                target,
                terminals,
                concurrency,
            } => {
                let t = fleet::Target::new(&target.options()).await?;
                let report = fleet::connect_rate(&t, terminals, concurrency).await;
                finish(t, report, target.json.as_deref()).await
            }
            Scenario::Storm {
                target,
                terminals,
                rounds,
                timeout,
            } => {
                let t = fleet::Target::new(&target.options()).await?;
                let report =
                    fleet::storm(&t, terminals, rounds, Duration::from_secs(timeout)).await;
                finish(t, report, target.json.as_deref()).await
            }
            Scenario::Churn {
                target,
                terminals,
                reconnect,
                cycles,
            } => {
                let t = fleet::Target::new(&target.options()).await?;
                let report = fleet::churn(&t, terminals, reconnect, cycles).await;
                finish(t, report, target.json.as_deref()).await
            }
            Scenario::E2e {
                target,
                terminals,
                pacing,
                duration,
                broker: Some(broker),
                plain,
                certs,
                bridge,
                clear_on_ack,
                ..
            } => {
                if !plain && certs.is_none() {
                    anyhow::bail!(UsageError("--broker needs --plain or --certs DIR".into()));
                }
                let plain = compare::PlainTarget {
                    certs,
                    broker: remote::resolve(&broker).await?,
                    bridge,
                    secret: target.secret.clone(),
                    broker_pid: target.pid,
                    clear_on_ack,
                };
                let report =
                    compare::e2e_plain(&plain, terminals, pacing, Duration::from_secs(duration))
                        .await;
                report_only(report, target.json.as_deref())
            }
            Scenario::E2e {
                target,
                terminals,
                pacing,
                duration,
                channel,
                broker: None,
                ..
            } => {
                let t = fleet::Target::new(&target.options()).await?;
                let report = fleet::e2e(
                    &t,
                    terminals,
                    pacing,
                    Duration::from_secs(duration),
                    channel,
                )
                .await;
                finish(t, report, target.json.as_deref()).await
            }
        },
    }
}

/// Prints and saves a fleet report, stops a started gateway; non-zero exit when anything was lost.
async fn finish(
    target: fleet::Target,
    report: anyhow::Result<fleet::FleetReport>,
    json: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    target.stop().await;
    conclude(&report?, fleet::print, json)
}

/// Prints and saves a report measured against another broker; non-zero exit when anything was
/// lost.
fn report_only(
    report: anyhow::Result<fleet::FleetReport>,
    json: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    conclude(&report?, compare::print, json)
}

/// Prints a fleet report with `print` and saves it to `json`; non-zero exit when anything was
/// lost or rejected.
fn conclude(
    report: &fleet::FleetReport,
    print: fn(&fleet::FleetReport),
    json: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    print(report);
    save(report, json, report.lost == 0 && report.rejected == 0)
}

/// Saves a printed report to `json` when given; non-zero exit unless the run was `clean`.
fn save(
    report: &impl serde::Serialize,
    json: Option<&std::path::Path>,
    clean: bool,
) -> anyhow::Result<ExitCode> {
    if let Some(path) = json {
        write_json(path, report)?;
    }
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Writes a report as pretty JSON to `path`.
fn write_json(path: &std::path::Path, report: &impl serde::Serialize) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(report)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// A problem before serving starts (bad flags, address in use): exit 64.
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Waits for SIGINT or SIGTERM.
async fn wait_for_signal(mut term: tokio::signal::unix::Signal) -> anyhow::Result<()> {
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}
