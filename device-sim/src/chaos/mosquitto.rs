//! A Mosquitto 2 for the failover bench: configured by `posgate broker-config mosquitto` from the
//! replicas' shared PKI, on a free loopback port, killed with this process (`setpriv --pdeathsig
//! KILL`) or when dropped.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// A running Mosquitto.
pub struct Mosquitto {
    child: Child,
    pub addr: SocketAddr,
    /// Where posgate keeps the broker's ACL and CRL (`mqtt.external_broker_dir`).
    pub dir: PathBuf,
}

impl Mosquitto {
    /// Writes the configuration with `posgate` for the PKI in `data_dir` into `dir`, and starts
    /// Mosquitto on it; another free port when the first was taken meanwhile.
    ///
    /// # Errors
    /// When `posgate broker-config` fails, or Mosquitto is missing or does not listen.
    pub async fn start(posgate: &Path, data_dir: &Path, dir: &Path) -> anyhow::Result<Mosquitto> {
        let mut last = None;
        for _ in 0..5 {
            let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
            config(posgate, data_dir, dir, addr).await?;
            match run(dir, addr).await? {
                Some(child) => {
                    return Ok(Mosquitto {
                        child,
                        addr,
                        dir: dir.to_owned(),
                    });
                }
                None => last = Some(addr),
            }
        }
        bail!("mosquitto: no free port after 5 tries (last {last:?})")
    }

    /// The command posgate runs after rewriting the ACL and CRL (`mqtt.external_reload_command`).
    pub fn reload_command(&self) -> String {
        format!("/bin/kill,-HUP,{}", self.child.id().unwrap_or_default())
    }

    /// The settings of a posgate in external mode on this broker.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("POSGATE__MQTT__MODE".into(), "external".into()),
            (
                "POSGATE__MQTT__EXTERNAL_URL".into(),
                format!("mqtts://{}", self.addr),
            ),
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
}

/// `posgate broker-config mosquitto --out dir --listen addr`, then the lines this bench needs.
async fn config(
    posgate: &Path,
    data_dir: &Path,
    dir: &Path,
    addr: SocketAddr,
) -> anyhow::Result<()> {
    let out = Command::new(posgate)
        .env_clear()
        .env("POSGATE__DATA_DIR", data_dir)
        .args(["broker-config", "mosquitto", "--out"])
        .arg(dir)
        .args(["--listen", &addr.to_string()])
        .output()
        .await
        .with_context(|| format!("running {} broker-config", posgate.display()))?;
    if !out.status.success() {
        bail!(
            "posgate broker-config mosquitto: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let conf = dir.join("mosquitto.conf");
    let mut text =
        std::fs::read_to_string(&conf).with_context(|| format!("reading {}", conf.display()))?;
    // Run as root, Mosquitto drops to its own user, which cannot read our 0700 temp dirs: it
    // stays root then. The directory was made by this process, so its owner is our user.
    if std::fs::metadata(dir)?.uid() == 0 {
        text.push_str("user root\n");
    }
    text.push_str("log_dest stderr\nlog_type error\nlog_type warning\n");
    std::fs::write(&conf, text).with_context(|| format!("writing {}", conf.display()))
}

/// Starts it; `None` when the port was taken.
async fn run(dir: &Path, addr: SocketAddr) -> anyhow::Result<Option<Child>> {
    // Debian installs it in /usr/sbin, which a non-root PATH may lack.
    let binary = if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    };
    let log = dir.join("mosquitto.log");
    let mut child = Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--", binary, "-c"])
        .arg(dir.join("mosquitto.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start mosquitto (Debian package `mosquitto`)")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Address already in use") {
                return Ok(None);
            }
            bail!(
                "mosquitto exited ({status}); is the Debian package `mosquitto` installed?\n{text}"
            );
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(Some(child));
        }
        if tokio::time::Instant::now() > deadline {
            bail!("mosquitto not listening on {addr} within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
