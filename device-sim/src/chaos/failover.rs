//! `posgate-sim failover`: posgate past one server, measured. N replicas of the real `posgate`
//! binary on one PostgreSQL database, in external broker mode behind one Mosquitto or a 3-node
//! NATS cluster ([`Broker`]), on loopback ports; terminals on the broker, webhooks spread over the
//! replicas' ingresses (each retry to the next replica, as a load balancer does). One replica at
//! a time gets `SIGKILL` and is started again on the same ports and data dir after a while, as
//! systemd would; on NATS, broker nodes too, in turn with the replicas.
//!
//! On NATS, terminal `i` and replica `i` connect to node `i % 3` first and have the other nodes
//! as fallbacks (the next one after each error). A node kill reports, besides every terminal's
//! time to be served again, the terminals that were connected to the killed node (from its
//! `/connz` just before the kill) and their own times.
//!
//! At each kill every terminal is sent one more event (a probe), so each has something to be
//! served; the time from the kill to the first new confirmation each terminal is shown is its
//! "served again" time. The [`Checker`] of the chaos soak does the accounting: every event
//! answered `200` shown by its own terminal, no gaps in `seq`, nothing invented.
//!
//! The replicas share the PKI (the CA, the server and signing keys): replica 0's `pki/` is
//! copied into the others' data dirs before they first start, as an operator deploys them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::checker::{Checker, Confirmations};
use super::daemon::{ADMIN_TOKEN, Daemon};
use super::mosquitto::Mosquitto;
use super::nats::NatsCluster;
use super::terminals::Terminals;
use super::webhooks::{Senders, Webhooks};
use super::{Reconnects, say_if};
use crate::bench::Latency;

/// What to run.
#[derive(Clone, Debug)]
pub struct FailoverOptions {
    /// The `posgate` binary.
    pub posgate: PathBuf,
    /// An empty PostgreSQL database every replica uses (`store.postgres_url`).
    pub postgres_url: String,
    pub replicas: usize,
    /// `replicas.lease_secs` of every replica (`None`: its default).
    pub lease_secs: Option<u64>,
    pub terminals: usize,
    /// Webhooks (new events) per second, spread over the replicas.
    pub rate: f64,
    /// Load before the first kill.
    pub warmup: Duration,
    /// How many kills, one replica at a time, in turn.
    pub kills: usize,
    /// From one kill to the next.
    pub kill_every: Duration,
    /// How long a killed replica stays down before it is started again.
    pub restart_after: Duration,
    /// How long every terminal may take to be served again after a kill before it counts as
    /// not served.
    pub served_within: Duration,
    /// After the last kill: how long the provider keeps retrying, and delivery may take.
    pub drain: Duration,
    pub seed: u64,
    /// One line per step on stderr.
    pub verbose: bool,
    /// Which broker the replicas and terminals use.
    pub broker: BrokerKind,
    /// `SIGKILL`s of NATS nodes, one at a time, in turn, alternating with the replica kills.
    pub broker_kills: usize,
    /// The `nats-server` binary (`None`: [`super::nats::nats_server`] finds it).
    pub nats_server: Option<PathBuf>,
    /// NATS node kills hit a known set of terminals: the terminals whose first node is to be
    /// killed reconnect to that node only until its first kill, and the kill waits (at most
    /// [`PINNED_WITHIN`]) until each of them is connected there. Unpinned, some move on at the
    /// start, while the nodes refuse them before loading the authorization file that names
    /// them, and a node may have none of its terminals left when it is killed.
    pub pin_terminals: bool,
    /// A killed replica or node is started again as soon as every terminal is served again,
    /// when that comes before `restart_after`.
    pub restart_once_served: bool,
}

/// How long a node kill waits for its pinned terminals ([`FailoverOptions::pin_terminals`]) to
/// be connected to it; after that it kills the node all the same.
pub const PINNED_WITHIN: Duration = Duration::from_secs(30);

/// The external broker of the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// One Mosquitto 2 (no clustering: not killed).
    Mosquitto,
    /// A 3-node NATS cluster with JetStream (MQTT sessions and retained messages replicated).
    Nats,
}

/// Nodes of the NATS cluster.
pub const NATS_NODES: usize = 3;

/// The running broker.
pub enum Broker {
    Mosquitto(Mosquitto),
    Nats(NatsCluster),
}

impl Broker {
    /// Where terminals connect: every node.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        match self {
            Broker::Mosquitto(m) => vec![m.addr],
            Broker::Nats(n) => n.addrs(),
        }
    }

    /// The settings of replica `i`.
    fn env(&self, i: usize) -> Vec<(String, String)> {
        match self {
            Broker::Mosquitto(m) => m.env(),
            Broker::Nats(n) => n.env(i),
        }
    }
}

/// What a kill hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Replica(usize),
    BrokerNode(usize),
}

/// The kills in order: replicas and broker nodes alternating (a replica first), each kind in
/// turn, until both counts are used up.
fn schedule(replica_kills: usize, node_kills: usize, replicas: usize, nodes: usize) -> Vec<Target> {
    let (mut r, mut b) = (0, 0);
    let mut out = Vec::new();
    while r < replica_kills || b < node_kills {
        if r < replica_kills {
            out.push(Target::Replica(r % replicas.max(1)));
            r += 1;
        }
        if b < node_kills {
            out.push(Target::BrokerNode(b % nodes.max(1)));
            b += 1;
        }
    }
    out
}

impl FailoverOptions {
    /// The issue's figures: 3 replicas, 1,000 terminals, 500 webhooks/s, three kills 20 s apart,
    /// each replica down 15 s.
    pub fn new(posgate: PathBuf, postgres_url: String) -> FailoverOptions {
        FailoverOptions {
            posgate,
            postgres_url,
            replicas: 3,
            lease_secs: None,
            terminals: 1000,
            rate: 500.0,
            warmup: Duration::from_secs(10),
            kills: 3,
            kill_every: Duration::from_secs(20),
            restart_after: Duration::from_secs(15),
            served_within: Duration::from_secs(60),
            drain: Duration::from_secs(60),
            seed: 1,
            verbose: false,
            broker: BrokerKind::Mosquitto,
            broker_kills: 0,
            nats_server: None,
            pin_terminals: false,
            restart_once_served: false,
        }
    }
}

/// One kill and what followed.
#[derive(Debug, Serialize)]
pub struct Kill {
    /// The replica killed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<usize>,
    /// The broker node killed (0-based: node `n1` is 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_node: Option<usize>,
    /// Seconds after the load started.
    pub at_secs: f64,
    /// Kill → each terminal shown a new confirmation, in milliseconds.
    pub served_again_ms: Reconnects,
    /// Terminals not served again within `served_within`.
    pub not_served: usize,
    /// Kill → each terminal served again within `served_within`, in milliseconds (for the
    /// totals over every kill).
    #[serde(skip)]
    pub served: Vec<Duration>,
    /// Kill → the replica listening again, or the node accepting MQTT connections again.
    pub restarted_after_ms: f64,
    /// A broker node kill: who was connected to the node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_node: Option<OnNode>,
}

/// The clients a killed broker node had, and how its terminals fared.
#[derive(Debug, Serialize)]
pub struct OnNode {
    /// Terminals connected to the node just before the kill.
    pub terminals: usize,
    /// Kill → each of those terminals shown a new confirmation (through another node).
    pub served_again_ms: Reconnects,
    /// Those of them not served again within `served_within`.
    pub not_served: usize,
    /// Replicas whose broker connection was on the node.
    pub replicas: Vec<usize>,
    /// Terminals pinned to the node until the kill ([`FailoverOptions::pin_terminals`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned: Option<usize>,
    /// Of those, the ones connected to it at the kill.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned_on_node: Option<usize>,
}

/// The JSON report.
#[derive(Debug, Serialize)]
pub struct FailoverReport {
    pub scenario: &'static str,
    pub broker: BrokerKind,
    pub replicas: usize,
    /// `replicas.lease_secs` of every replica (`None`: its default).
    pub lease_secs: Option<u64>,
    pub terminals: usize,
    pub rate_per_sec: f64,
    pub duration_secs: f64,
    pub webhooks: Webhooks,
    pub confirmations: Confirmations,
    pub kills: Vec<Kill>,
    /// Over every kill and terminal: kill → served again, in milliseconds.
    pub served_again_ms: Reconnects,
    pub initial_connect_ms: f64,
    /// `200` → shown.
    pub delivery_ms: Latency,
    /// First webhook attempt → shown (retries through the kills included).
    pub webhook_to_shown_ms: Latency,
    /// Nothing lost, skipped, invented or failing verification, every event answered `200`,
    /// and every terminal served again after every kill.
    pub clean: bool,
    /// Delivery, lease and store counters of every replica, summed over the replicas and their
    /// lives (each is read just before its `SIGKILL` and at the end): where republishes and
    /// lease changes come from.
    pub replica_counters: BTreeMap<String, f64>,
}

/// The counters [`FailoverReport::replica_counters`] keeps (by name prefix).
const COUNTERS: &[&str] = &[
    "posgate_confirmations_published_total",
    "posgate_confirmations_republished_total",
    "posgate_confirmations_acked_total",
    "posgate_broker_publishes_total",
    "posgate_replica_lease_renewals_total",
    "posgate_replica_lease_failures_total",
    "posgate_replica_forwards_total",
    "posgate_replica_shard_changes_total",
    "posgate_webhooks_total",
    "posgate_store_commit_seconds_count",
    "posgate_store_commit_seconds_sum",
];

/// Adds the replica's [`COUNTERS`] (from its `/metrics`) to `into`. A replica that does not
/// answer adds nothing: the counters are a diagnosis, not the verdict.
async fn add_counters(admin: SocketAddr, into: &mut BTreeMap<String, f64>) {
    let text = match reqwest::get(format!("http://{admin}/metrics")).await {
        Ok(answer) => answer.text().await.unwrap_or_default(),
        Err(_) => return,
    };
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if COUNTERS.iter().any(|c| key.starts_with(c))
            && let Ok(value) = value.parse::<f64>()
        {
            *into.entry(key.to_owned()).or_default() += value;
        }
    }
}

/// Runs the failover bench and reports.
///
/// # Errors
/// When Mosquitto or a replica cannot be started, or the terminals cannot be provisioned or
/// connected (a loss is not an error; it is in the report).
pub async fn run(opts: &FailoverOptions) -> anyhow::Result<FailoverReport> {
    if opts.replicas == 0 || opts.terminals == 0 {
        bail!("failover needs at least one replica and one terminal");
    }
    if opts.broker_kills > 0 && opts.broker != BrokerKind::Nats {
        bail!("broker node kills need a clustered broker (NATS)");
    }
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    // `POSGATE_SIM_KEEP_DIR=1`: the replicas' data dirs and the broker's files (NATS: each
    // node's log) stay after the run, for a diagnosis.
    let dir_path = dir.path().to_owned();
    let _dir = if std::env::var_os("POSGATE_SIM_KEEP_DIR").is_some() {
        say_if(true, format_args!("keeping {}", dir.keep().display()));
        None
    } else {
        Some(dir)
    };
    let dir = &dir_path;
    let data_dirs: Vec<PathBuf> = (0..opts.replicas)
        .map(|i| dir.join(format!("replica-{i}")))
        .collect();
    let broker_dir = dir.join("broker");
    for d in data_dirs.iter().chain([&broker_dir]) {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    // `broker-config` makes replica 0's PKI; the others get a copy of it.
    let mut broker = match opts.broker {
        BrokerKind::Mosquitto => {
            Broker::Mosquitto(Mosquitto::start(&opts.posgate, &data_dirs[0], &broker_dir).await?)
        }
        BrokerKind::Nats => {
            let binary = match &opts.nats_server {
                Some(path) => path.clone(),
                None => super::nats::nats_server(&[])?,
            };
            Broker::Nats(
                NatsCluster::start(
                    &binary,
                    &opts.posgate,
                    &data_dirs[0],
                    &broker_dir,
                    NATS_NODES,
                )
                .await?,
            )
        }
    };
    for d in &data_dirs[1..] {
        copy_dir(&data_dirs[0].join("pki"), &d.join("pki"))?;
    }
    let mut daemons = Vec::new();
    for (i, d) in data_dirs.iter().enumerate() {
        let mut env = broker.env(i);
        if i > 0 {
            // One replica writes the broker's ACL and CRL (all would write the same files).
            env.retain(|(k, _)| !k.contains("EXTERNAL_BROKER_DIR") && !k.contains("RELOAD"));
        }
        env.extend([
            ("POSGATE__STORE__BACKEND".into(), "postgres".into()),
            (
                "POSGATE__STORE__POSTGRES_URL".into(),
                opts.postgres_url.clone(),
            ),
            // Each its own session on the broker (one client id would take over the other's).
            (
                "POSGATE__MQTT__EXTERNAL_CLIENT_ID".into(),
                format!("posgate-r{i}"),
            ),
        ]);
        if let Some(secs) = opts.lease_secs {
            env.push(("POSGATE__REPLICAS__LEASE_SECS".into(), secs.to_string()));
        }
        // `replicas.id` is left to its default (hostname, pid, a random suffix): a restarted
        // replica is a new one, as under systemd.
        daemons.push(Daemon::start_with(&opts.posgate, d, env).await?);
    }
    say_if(
        opts.verbose,
        format_args!(
            "{} replicas up, broker ({:?}) on {:?}",
            opts.replicas,
            opts.broker,
            broker.addrs()
        ),
    );
    let ingresses: Vec<SocketAddr> = daemons.iter().map(|d| d.listen.ingress).collect();

    let ids: Vec<String> = (0..opts.terminals).map(|i| format!("fo-{i}")).collect();
    let bundles = crate::fleet::provision_at(
        daemons[0].listen.admin,
        ADMIN_TOKEN,
        "fo-",
        opts.terminals,
        8,
    )
    .await
    .context("provisioning the terminals")?;
    let checker = Arc::new(Checker::new(opts.terminals)?);
    // Which terminal a client id on a broker node is.
    let index: BTreeMap<String, usize> = (bundles.iter().enumerate())
        .map(|(i, b)| (b.client_id.clone(), i))
        .collect();
    let mut terminals = Terminals::new(bundles, 0, broker.addrs(), ingresses[0], checker.clone());
    let plan = schedule(opts.kills, opts.broker_kills, opts.replicas, NATS_NODES);
    if opts.pin_terminals {
        for i in 0..terminals.len() {
            let first = terminals.first_node(i);
            terminals.pin(i, plan.contains(&Target::BrokerNode(first)));
        }
    }
    checker.new_round();
    terminals.start_all()?;
    // On NATS a refused subscription is the cluster being busy (JetStream creating sessions
    // and consumers for a thousand clients at once), and the terminals ask again by themselves:
    // starting their sessions again would only add to its load.
    let restart_missing = opts.broker == BrokerKind::Mosquitto;
    let initial = connect_all(&checker, &mut terminals, restart_missing, opts.verbose).await?;
    say_if(
        opts.verbose,
        format_args!("{} terminals connected in {initial:?}", opts.terminals),
    );

    let senders = Senders::spawn_over(
        &ingresses,
        Arc::new(ids),
        opts.rate,
        opts.seed,
        checker.clone(),
    )?;
    let load_started = Instant::now();
    tokio::time::sleep(opts.warmup).await;
    let mut all_served = Vec::new();
    let mut counters = BTreeMap::new();
    let mut kills = Vec::new();
    for (k, target) in plan.into_iter().enumerate() {
        let due = load_started + opts.warmup + opts.kill_every * k as u32;
        tokio::time::sleep_until(due).await;
        let kill = match target {
            Target::Replica(replica) => {
                kill_replica(
                    opts,
                    &checker,
                    &senders,
                    &mut daemons,
                    replica,
                    load_started,
                    &mut counters,
                )
                .await?
            }
            Target::BrokerNode(node) => {
                let Broker::Nats(cluster) = &mut broker else {
                    bail!("broker node kills need a clustered broker (NATS)");
                };
                kill_node(
                    opts,
                    &checker,
                    &senders,
                    cluster,
                    node,
                    (&index, &terminals),
                    load_started,
                )
                .await?
            }
        };
        all_served.extend_from_slice(&kill.served);
        kills.push(kill);
    }
    let duration = load_started.elapsed();
    let webhooks = senders.finish(opts.drain).await;
    let (answered, shown) = checker.progress();
    say_if(
        opts.verbose,
        format_args!("drain: {answered} answered 200, {shown} shown"),
    );
    checker.all_delivered(opts.drain).await;
    if opts.verbose {
        // What the replicas say about the first terminals still waiting (a diagnosis).
        for i in checker.waiting_terminals().into_iter().take(5) {
            let view = terminal_view(daemons[0].listen.admin, &format!("fo-{i}")).await;
            eprintln!("chaos: terminal fo-{i} still waiting; replica 0 says {view}");
        }
    }
    let (confirmations, e2e, delivery) = checker.summary();
    for d in &daemons {
        add_counters(d.listen.admin, &mut counters).await;
    }
    if opts.verbose {
        for (key, value) in &counters {
            eprintln!("chaos: {key} {value}");
        }
    }
    for d in &mut daemons {
        d.terminate(Duration::from_secs(30)).await?;
    }
    terminals.stop_all();
    drop(broker);
    let not_served: usize = kills.iter().map(|k| k.not_served).sum();
    let clean = confirmations.clean() && webhooks.unanswered == 0 && not_served == 0;
    Ok(FailoverReport {
        scenario: "failover",
        broker: opts.broker,
        replicas: opts.replicas,
        lease_secs: opts.lease_secs,
        terminals: opts.terminals,
        rate_per_sec: opts.rate,
        duration_secs: duration.as_secs_f64(),
        webhooks,
        confirmations,
        served_again_ms: Reconnects::of(&mut all_served, not_served as u64),
        kills,
        initial_connect_ms: initial.as_secs_f64() * 1000.0,
        delivery_ms: delivery,
        webhook_to_shown_ms: e2e,
        clean,
        replica_counters: counters,
    })
}

/// `SIGKILL` to `replica`, a probe to every terminal, the replica started again after
/// `restart_after`, and every terminal served again (or `served_within` over).
async fn kill_replica(
    opts: &FailoverOptions,
    checker: &Checker,
    senders: &Senders,
    daemons: &mut [Daemon],
    replica: usize,
    load_started: Instant,
    counters: &mut BTreeMap<String, f64>,
) -> anyhow::Result<Kill> {
    add_counters(daemons[replica].listen.admin, counters).await;
    let at = load_started.elapsed().as_secs_f64();
    daemons[replica].kill().await?;
    let mark = checker.mark();
    senders.probe_all();
    say_if(
        opts.verbose,
        format_args!("t={at:.1}s SIGKILL replica {replica}; probes sent"),
    );
    let daemon = &mut daemons[replica];
    let all_served = Notify::new();
    // Who was served is read when all were or `served_within` ended, whichever came first
    // (the restart may come later).
    let (restarted, (served, (mut took, not_served))) = tokio::join!(
        async {
            restart_due(opts, mark, &all_served).await;
            daemon.restart().await.map(|()| mark.elapsed())
        },
        async {
            let served = checker.all_served(opts.served_within).await;
            all_served.notify_one();
            (served, checker.served_since_mark())
        },
    );
    let restarted = restarted?;
    let summary = Reconnects::of(&mut took, 0);
    say_if(
        opts.verbose,
        format_args!(
            "replica {replica}: served again p50 {:.0} ms, p99 {:.0}, max {:.0}; {not_served} not served{}; restarted after {restarted:?}",
            summary.p50,
            summary.p99,
            summary.max,
            if served { "" } else { " in time" },
        ),
    );
    Ok(Kill {
        replica: Some(replica),
        broker_node: None,
        at_secs: at,
        served_again_ms: summary,
        not_served,
        served: took,
        restarted_after_ms: restarted.as_secs_f64() * 1000.0,
        on_node: None,
    })
}

/// When a killed replica or node is started again: `restart_after` after the kill, or (with
/// [`FailoverOptions::restart_once_served`]) once `all_served` is notified, if that is sooner.
async fn restart_due(opts: &FailoverOptions, mark: Instant, all_served: &Notify) {
    let due = tokio::time::sleep_until(mark + opts.restart_after);
    if opts.restart_once_served {
        tokio::select! {
            () = due => {}
            () = all_served.notified() => {}
        }
    } else {
        due.await;
    }
}

/// `SIGKILL` to NATS node `node` (its terminals and replicas listed from its `/connz` just
/// before; with [`FailoverOptions::pin_terminals`], once its pinned terminals are all connected
/// to it, or [`PINNED_WITHIN`] is over), a probe to every terminal, the node started again
/// after `restart_after`, and every terminal served again (or `served_within` over).
async fn kill_node(
    opts: &FailoverOptions,
    checker: &Checker,
    senders: &Senders,
    cluster: &mut NatsCluster,
    node: usize,
    (index, terminals): (&BTreeMap<String, usize>, &Terminals),
    load_started: Instant,
) -> anyhow::Result<Kill> {
    let pinned: Vec<usize> = (0..terminals.len())
        .filter(|&i| terminals.is_pinned(i) && terminals.first_node(i) == node)
        .collect();
    let deadline = Instant::now() + PINNED_WITHIN;
    let (listed, on_node) = loop {
        // A node too busy to list its clients in 30 s is killed all the same; its kill then
        // has no `on_node` figures.
        let listed = cluster.mqtt_clients(node).await;
        let on_node: Vec<usize> = (listed.as_deref().unwrap_or_default().iter())
            .filter_map(|id| index.get(id).copied())
            .collect();
        let missing = pinned.iter().filter(|&i| !on_node.contains(i)).count();
        if missing == 0 || listed.is_err() || Instant::now() > deadline {
            if missing > 0 {
                say_if(
                    opts.verbose,
                    format_args!(
                        "{missing} of the {} terminals pinned to node n{} not connected to it; killing it all the same",
                        pinned.len(),
                        node + 1
                    ),
                );
            }
            break (listed, on_node);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if let Err(e) = &listed {
        say_if(
            opts.verbose,
            format_args!("cannot list the clients of node n{}: {e:#}", node + 1),
        );
    }
    // Unpinned before the kill: the kill's disconnect moves them on to the next node.
    for &i in &pinned {
        terminals.pin(i, false);
    }
    let pinned_on = pinned.iter().filter(|&i| on_node.contains(i)).count();
    let clients = listed.as_deref().unwrap_or_default();
    let mut replicas: Vec<usize> = (clients.iter())
        .filter_map(|id| {
            id.strip_prefix("posgate-r")?
                .split(':')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    replicas.sort_unstable();
    let at = load_started.elapsed().as_secs_f64();
    cluster.kill(node).await?;
    let mark = checker.mark();
    senders.probe_all();
    say_if(
        opts.verbose,
        format_args!(
            "t={at:.1}s SIGKILL broker node n{} ({} terminals, replicas {replicas:?} on it); probes sent",
            node + 1,
            on_node.len()
        ),
    );
    let all_served = Notify::new();
    // As for a replica: who was served is read when all were or `served_within` ended.
    let (restarted, (served, (mut took, not_served), theirs)) = tokio::join!(
        async {
            restart_due(opts, mark, &all_served).await;
            let within = opts.served_within.max(Duration::from_secs(120));
            cluster.restart(node, within).await.map(|()| mark.elapsed())
        },
        async {
            let served = checker.all_served(opts.served_within).await;
            all_served.notify_one();
            (
                served,
                checker.served_since_mark(),
                checker.served_of(&on_node),
            )
        },
    );
    let restarted = restarted?;
    let summary = Reconnects::of(&mut took, 0);
    let node_not_served = theirs.iter().filter(|t| t.is_none()).count();
    let mut node_took: Vec<Duration> = theirs.into_iter().flatten().collect();
    let node_summary = Reconnects::of(&mut node_took, 0);
    say_if(
        opts.verbose,
        format_args!(
            "node n{}: its {} terminals served again p50 {:.0} ms, p99 {:.0}, max {:.0}, {node_not_served} not served; all terminals p50 {:.0} ms, p99 {:.0}, max {:.0}, {not_served} not served{}; node back after {restarted:?}",
            node + 1,
            on_node.len(),
            node_summary.p50,
            node_summary.p99,
            node_summary.max,
            summary.p50,
            summary.p99,
            summary.max,
            if served { "" } else { " in time" },
        ),
    );
    Ok(Kill {
        replica: None,
        broker_node: Some(node),
        at_secs: at,
        served_again_ms: summary,
        not_served,
        served: took,
        restarted_after_ms: restarted.as_secs_f64() * 1000.0,
        on_node: listed.is_ok().then_some(OnNode {
            terminals: on_node.len(),
            served_again_ms: node_summary,
            not_served: node_not_served,
            replicas,
            pinned: opts.pin_terminals.then_some(pinned.len()),
            pinned_on_node: opts.pin_terminals.then_some(pinned_on),
        }),
    })
}

/// The admin API's view of a terminal (`pending`, `online`, …), or why there is none.
async fn terminal_view(admin: SocketAddr, id: &str) -> String {
    let answer = reqwest::Client::new()
        .get(format!("http://{admin}/v1/terminals/{id}"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await;
    match answer {
        Ok(a) => a.text().await.unwrap_or_else(|e| e.to_string()),
        Err(e) => e.to_string(),
    }
}

/// Waits for every terminal to connect and subscribe; with `restart_missing`, sessions refused
/// while the broker had not yet reloaded the ACL naming them are started again every 5 s.
async fn connect_all(
    checker: &Checker,
    terminals: &mut Terminals,
    restart_missing: bool,
    verbose: bool,
) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let started = Instant::now();
    loop {
        if checker
            .all_connected(Duration::from_secs(5))
            .await
            .is_some()
        {
            return Ok(started.elapsed());
        }
        let missing = checker.not_connected_list();
        if Instant::now() > deadline {
            bail!(
                "{} of {} terminals not connected after 120 s",
                missing.len(),
                terminals.len()
            );
        }
        if !restart_missing {
            say_if(
                verbose,
                format_args!("{} terminals not connected yet", missing.len()),
            );
            continue;
        }
        say_if(
            verbose,
            format_args!(
                "{} terminals not connected yet; starting them again",
                missing.len()
            ),
        );
        for i in missing {
            terminals.start(i)?;
        }
    }
}

/// Copies the files of `from` into a new directory `to` (one level: the PKI has no subdirs).
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let target = to.join(entry.file_name());
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying to {}", target.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_and_node_kills_alternate_each_in_turn() {
        use Target::{BrokerNode as N, Replica as R};
        assert_eq!(schedule(3, 2, 3, 3), [R(0), N(0), R(1), N(1), R(2)]);
        assert_eq!(schedule(0, 4, 3, 3), [N(0), N(1), N(2), N(0)]);
        assert_eq!(schedule(2, 0, 1, 3), [R(0), R(0)]);
        assert!(schedule(0, 0, 3, 3).is_empty());
    }
}
