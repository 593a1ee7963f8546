//! The `posgate` process under test: first started on `127.0.0.1:0`, then restarted on the ports it
//! bound, as systemd restarts a crashed unit; killed with `SIGKILL` or stopped with `SIGTERM`. Its
//! output is drained all the time (a full pipe would block it) and its last lines kept for errors.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader, Lines};
use tokio::process::{Child, Command};

use crate::bench::find_addr;

/// The admin token the daemon under test is given.
pub const ADMIN_TOKEN: &str = "chaos-admin-token-0123456789";
/// The webhook secret the daemon under test accepts.
pub const SECRET: &str = "whsec_chaos_0123456789";

/// Exit status of a start that failed for a reason that may pass (`EX_TEMPFAIL`): the unit
/// restarts it after `RestartSec`.
const EX_TEMPFAIL: i32 = 75;
/// Tries of a start that keeps exiting 75 before giving up.
const START_TRIES: u32 = 20;
/// How long a start may take to log its addresses.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Lines of output kept for an error message.
const LOG_LINES: usize = 200;

/// Where the daemon listens.
#[derive(Clone, Copy, Debug)]
pub struct Listen {
    pub ingress: SocketAddr,
    pub admin: SocketAddr,
    pub mqtt: SocketAddr,
}

/// The `posgate` process and how to start it again.
pub struct Daemon {
    bin: PathBuf,
    data_dir: PathBuf,
    child: Option<Child>,
    /// The addresses it bound at its first start; every restart uses them again.
    pub listen: Listen,
    /// Starts that exited 75 and were tried again.
    pub transient_failures: u64,
    log: Arc<Mutex<VecDeque<String>>>,
    /// Settings of this daemon (`POSGATE__…`), over the soak's environment.
    env: Vec<(String, String)>,
}

impl Daemon {
    /// Starts `bin` on `127.0.0.1:0` with `data_dir`.
    ///
    /// # Errors
    /// When it cannot be started or does not log its addresses in time.
    pub async fn start(bin: &Path, data_dir: &Path) -> anyhow::Result<Daemon> {
        Daemon::start_with(bin, data_dir, Vec::new()).await
    }

    /// As [`Daemon::start`], with settings of its own (`POSGATE__…` variables) over those of the
    /// soak's environment, e.g. the store and broker of one replica among several.
    ///
    /// # Errors
    /// When it cannot be started or does not log its addresses in time.
    pub async fn start_with(
        bin: &Path,
        data_dir: &Path,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<Daemon> {
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        let mut daemon = Daemon {
            bin: bin.to_owned(),
            data_dir: data_dir.to_owned(),
            child: None,
            listen: Listen {
                ingress: any,
                admin: any,
                mqtt: any,
            },
            transient_failures: 0,
            log: Arc::default(),
            env,
        };
        daemon.spawn().await?;
        Ok(daemon)
    }

    /// Starts it again on the same ports and data dir; a start that exits 75 is tried again after
    /// a pause, as the unit's `RestartSec` would.
    ///
    /// # Errors
    /// When a start fails otherwise, or keeps failing.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("restart while the daemon still runs");
        }
        self.spawn().await
    }

    /// `SIGKILL`, and waits for the process to be gone.
    ///
    /// # Errors
    /// When it is not running or cannot be waited for.
    pub async fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .context("kill: the daemon is not running")?;
        child.start_kill().context("sending SIGKILL")?;
        child.wait().await.context("waiting for the killed daemon")
    }

    /// `SIGTERM`, and waits for the exit (at most `grace`, then `SIGKILL`).
    ///
    /// # Errors
    /// When it is not running or cannot be signalled.
    pub async fn terminate(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .context("terminate: the daemon is not running")?;
        let pid = child.id().context("the daemon has no pid")?;
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .context("running kill -TERM")?;
        if !sent.success() {
            bail!("kill -TERM {pid}: {sent}");
        }
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => status.context("waiting for the stopped daemon"),
            Err(_) => {
                child.start_kill().ok();
                child.wait().await.context("waiting for the killed daemon")
            }
        }
    }

    /// The last lines it wrote, for an error message.
    pub fn log_tail(&self) -> String {
        self.log
            .lock()
            .map(|l| l.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// Starts the process until it logs its addresses, trying again after an exit 75.
    async fn spawn(&mut self) -> anyhow::Result<()> {
        for _ in 0..START_TRIES {
            match self.spawn_once().await? {
                Some(child) => {
                    self.child = Some(child);
                    return Ok(());
                }
                None => {
                    self.transient_failures += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        bail!(
            "posgate exited {EX_TEMPFAIL} on {START_TRIES} starts in a row:\n{}",
            self.log_tail()
        )
    }

    /// One start: the running child, or `None` when it exited 75.
    async fn spawn_once(&mut self) -> anyhow::Result<Option<Child>> {
        let mut child = Command::new(&self.bin)
            .arg("run")
            .env_clear()
            // The soak's own `POSGATE__…` settings (e.g. `POSGATE__STORE__QUICK_REPAIR=true`) go
            // to the daemon; the ones below, which the soak needs, win over them.
            .envs(std::env::vars().filter(|(k, _)| k.starts_with("POSGATE__")))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("POSGATE__DATA_DIR", &self.data_dir)
            .env("POSGATE__INGRESS__LISTEN", self.listen.ingress.to_string())
            .env("POSGATE__ADMIN__LISTEN", self.listen.admin.to_string())
            .env("POSGATE__MQTT__LISTEN", self.listen.mqtt.to_string())
            .env("POSGATE__ADMIN__TOKEN", ADMIN_TOKEN)
            .env("POSGATE__PROVIDER__WEBHOOK_SECRETS", SECRET)
            // The bound addresses are logged at info by these two modules.
            .env(
                "POSGATE__LOG__LEVEL",
                format!(
                    "{},posgate::app=info,posgate::broker=info",
                    std::env::var("POSGATE__LOG__LEVEL").unwrap_or_else(|_| "warn".into())
                ),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?).lines();
        keep_reading(
            BufReader::new(child.stderr.take().context("stderr")?).lines(),
            self.log.clone(),
        );
        let found = tokio::time::timeout(START_TIMEOUT, async {
            let (mut ingress, mut admin, mut mqtt) = (None, None, None);
            while ingress.is_none() || admin.is_none() || mqtt.is_none() {
                let Some(line) = stdout.next_line().await? else {
                    return anyhow::Ok(None);
                };
                ingress = ingress.or_else(|| find_addr(&line, "ingress_addr="));
                admin = admin.or_else(|| find_addr(&line, "admin_addr="));
                mqtt = mqtt.or_else(|| find_addr(&line, "mqtt_addr="));
                push(&self.log, line);
            }
            Ok(ingress.zip(admin).zip(mqtt))
        })
        .await;
        match found {
            Ok(Ok(Some(((ingress, admin), mqtt)))) => {
                keep_reading(stdout, self.log.clone());
                self.listen = Listen {
                    ingress,
                    admin,
                    mqtt,
                };
                Ok(Some(child))
            }
            Ok(Ok(None)) => {
                let status = child.wait().await.context("waiting for posgate")?;
                if status.code() == Some(EX_TEMPFAIL) {
                    return Ok(None);
                }
                bail!(
                    "posgate exited ({status}) before listening on {:?}:\n{}",
                    self.listen,
                    self.log_tail()
                )
            }
            Ok(Err(e)) => Err(e.context("reading posgate's output")),
            Err(_) => bail!(
                "posgate did not log its addresses within {START_TIMEOUT:?}:\n{}",
                self.log_tail()
            ),
        }
    }
}

fn push(log: &Mutex<VecDeque<String>>, line: String) {
    if let Some(file) = &*FULL_LOG {
        use std::io::Write as _;
        if let Ok(mut file) = file.lock() {
            // A diagnosis aid: a failed write loses a log line, never the run.
            let _ = writeln!(file, "{line}");
        }
    }
    if let Ok(mut log) = log.lock() {
        if log.len() == LOG_LINES {
            log.pop_front();
        }
        log.push_back(line);
    }
}

/// With `POSGATE_SIM_DAEMON_LOG` set to a file name, every line of every daemon's output is
/// appended there too (all daemons of a run in one file, their lines carry no name; tell them
/// apart by `replicas.id` or pid in the lines). `POSGATE__LOG__LEVEL` in the environment then
/// raises what they log, e.g. `warn,posgate::delivery=debug` (the addresses the soak needs are
/// logged at info by `posgate::app` and `posgate::broker`, which are always added).
static FULL_LOG: std::sync::LazyLock<Option<Mutex<std::fs::File>>> =
    std::sync::LazyLock::new(|| {
        let path = std::env::var_os("POSGATE_SIM_DAEMON_LOG")?;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()
            .map(Mutex::new)
    });

/// Keeps the last lines of `lines` in `log`, in a task, until the stream ends.
fn keep_reading<R>(mut lines: Lines<R>, log: Arc<Mutex<VecDeque<String>>>)
where
    R: tokio::io::AsyncBufRead + AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            push(&log, line);
        }
    });
}

/// A tmpfs of `size_mib` mounted on `dir`, for the disk-full fault; unmounted on drop.
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts it (needs root, or CAP_SYS_ADMIN).
    ///
    /// # Errors
    /// When `mount` refuses, with what it said.
    pub fn mount(dir: &Path, size_mib: u64) -> anyhow::Result<Tmpfs> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir)
            .output()
            .context("running mount")?;
        if !out.status.success() {
            bail!(
                "mount -t tmpfs on {}: {} {}",
                dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Tmpfs {
            dir: dir.to_owned(),
        })
    }

    /// Fills it with a file of zeros until the disk is full; the file, to delete later.
    ///
    /// # Errors
    /// When the file cannot be created.
    pub async fn fill(&self) -> anyhow::Result<PathBuf> {
        let path = self.dir.join("chaos-filler");
        let file = path.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut f = std::fs::File::create(&file)
                .with_context(|| format!("creating {}", file.display()))?;
            let chunk = vec![0u8; 1 << 20];
            // Until ENOSPC: the point is a full disk.
            while f.write_all(&chunk).is_ok() {}
            let small = [0u8; 4096];
            while f.write_all(&small).is_ok() {}
            anyhow::Ok(())
        })
        .await??;
        Ok(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let out = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .output();
        if let Ok(out) = out
            && !out.status.success()
        {
            eprintln!(
                "chaos: umount {}: {}",
                self.dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
}
