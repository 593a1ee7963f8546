//! The gateway under test: started as a child process (`posgate` next to this executable) or
//! given by address ([`Target`]), and terminals provisioned on it through its admin API
//! ([`provision`], [`provision_at`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};

use crate::bench::{CHILD_ADMIN_TOKEN, Child, cpu_secs, default_posgate_bin, rss_mib, start_child};
use crate::terminal::Bundle;

/// Where the gateway under test is.
#[derive(Clone, Debug)]
pub struct TargetOptions {
    /// `ingress,admin,mqtt` addresses of a running gateway; `None` starts a child.
    pub addrs: Option<(SocketAddr, SocketAddr, SocketAddr)>,
    pub admin_token: Option<String>,
    pub secret: String,
    pub posgate_bin: Option<PathBuf>,
    pub log_level: String,
    /// Process whose RSS is reported (default: the child).
    pub pid: Option<u32>,
    /// The started child keeps its store on PostgreSQL at this URL instead of redb.
    pub postgres_url: Option<String>,
}

/// A gateway under test.
pub struct Target {
    pub ingress: SocketAddr,
    pub admin: SocketAddr,
    pub mqtt: SocketAddr,
    pub token: String,
    pub secret: String,
    pub pid: Option<u32>,
    child: Option<Child>,
}

impl Target {
    /// Starts or attaches to the gateway.
    ///
    /// # Errors
    /// When the child cannot be started.
    pub async fn new(opts: &TargetOptions) -> anyhow::Result<Target> {
        match opts.addrs {
            Some((ingress, admin, mqtt)) => Ok(Target {
                ingress,
                admin,
                mqtt,
                token: opts
                    .admin_token
                    .clone()
                    .context("--admin-token is needed with a running gateway")?,
                secret: opts.secret.clone(),
                pid: opts.pid,
                child: None,
            }),
            None => {
                let bin = match &opts.posgate_bin {
                    Some(bin) => bin.clone(),
                    None => default_posgate_bin()?,
                };
                let mut env = Vec::new();
                if let Some(url) = &opts.postgres_url {
                    env.push(("POSGATE__STORE__BACKEND", "postgres"));
                    env.push(("POSGATE__STORE__POSTGRES_URL", url.as_str()));
                }
                let child = start_child(&bin, &opts.secret, &opts.log_level, &env).await?;
                Ok(Target {
                    ingress: child.ingress,
                    admin: child.admin,
                    mqtt: child.mqtt,
                    token: CHILD_ADMIN_TOKEN.to_owned(),
                    secret: opts.secret.clone(),
                    pid: opts.pid.or_else(|| child.process.id()),
                    child: Some(child),
                })
            }
        }
    }

    /// RSS of the gateway process, if known.
    pub fn rss_mib(&self) -> Option<f64> {
        self.pid.and_then(rss_mib)
    }

    /// CPU time the gateway process has used so far, in seconds, if known.
    pub fn cpu_secs(&self) -> Option<f64> {
        self.pid.and_then(cpu_secs)
    }

    /// The started gateway's data dir (`None` for a running one given by address).
    pub fn data_dir(&self) -> Option<PathBuf> {
        self.child.as_ref().map(Child::data_dir)
    }

    /// The file the started gateway logs to (`None` for a running one given by address).
    pub fn log_path(&self) -> Option<PathBuf> {
        self.child.as_ref().map(Child::log_path)
    }

    /// Stops a child gateway.
    pub async fn stop(mut self) {
        if let Some(child) = self.child.as_mut() {
            child.process.kill().await.ok();
        }
    }
}

/// Provisions `n` terminals `{prefix}{i}` through the admin API, `concurrency` at a time.
///
/// # Errors
/// When a provisioning call fails.
pub async fn provision(
    target: &Target,
    prefix: &str,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Bundle>> {
    provision_at(target.admin, &target.token, prefix, n, concurrency).await
}

/// As [`provision`], against the admin API at `admin` with `token`.
///
/// # Errors
/// When a provisioning call fails.
pub async fn provision_at(
    admin: SocketAddr,
    token: &str,
    prefix: &str,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Bundle>> {
    let http = reqwest::Client::builder().no_proxy().build()?;
    let url = format!("http://{admin}/v1/terminals");
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let out = Arc::new(Mutex::new(vec![None; n]));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (http, url, next, out, token, prefix) = (
            http.clone(),
            url.clone(),
            next.clone(),
            out.clone(),
            token.to_owned(),
            prefix.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                let response = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&serde_json::json!({"id": format!("{prefix}{i}"), "merchant_id": "mer_bench"}))
                    .send()
                    .await?;
                if response.status() != 201 {
                    bail!("provisioning {prefix}{i}: {}", response.status());
                }
                let bundle: Bundle = response.json().await?;
                if let Ok(mut out) = out.lock() {
                    out[i] = Some(bundle);
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let bundles = out
        .lock()
        .map(|mut v| v.drain(..).flatten().collect())
        .unwrap_or_default();
    Ok(bundles)
}
