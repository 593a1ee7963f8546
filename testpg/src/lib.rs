//! A real PostgreSQL server for tests: Debian's `postgresql` package, started by the test
//! process itself in a temporary directory, on 127.0.0.1 and a free port, `fsync=on`.
//!
//! - [`shared`]: one server per test process, started on first use; [`Server::fresh_db`] gives
//!   each test its own database, so no test sees another's rows.
//! - [`Server::start`]: a server of one's own (a test that restarts or kills it).
//! - [`Server::start_tls`]: one of one's own with `ssl = on` and the test's certificate, and
//!   if asked `hostssl` lines only in `pg_hba.conf` (TCP without TLS refused) or a client
//!   certificate required (`hostssl … cert`); the test process itself then connects over the
//!   Unix socket ([`Server::admin_url`]).
//!
//! No server outlives its test process, however that process ends: every server is started
//! through `setpriv --pdeathsig KILL` from a thread that lives as long as the process, so the
//! kernel kills the postmaster when the process dies (nextest runs each test in a process of
//! its own; the static server of a process is never dropped). Its backends follow the
//! postmaster. The directories of dead test processes are removed by the next one that starts a
//! server.
//!
//! As root (CI), `initdb` and `postgres` refuse to run: they run as the `postgres` user the
//! package creates. `initdb` runs once per machine and PostgreSQL version into a template that
//! later servers copy.
//!
//! A missing PostgreSQL is an error that says what to install, never a skipped test.

// Blocking code outside any runtime: std's clock is the right one here.
#![allow(clippy::disallowed_types)]

use std::fs::{self, File};
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

/// The role tests connect as (a superuser, trust authentication on 127.0.0.1).
pub const USER: &str = "posgate";

/// Where the servers' directories live.
fn root() -> PathBuf {
    std::env::temp_dir().join("posgate-testpg")
}

/// A running (or stopped) test server.
pub struct Server {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Mutex<Option<Child>>,
    /// Removed with the server (an owned one).
    owned: bool,
    /// `ssl = on` with `server.crt` and `server.key` in its data directory.
    tls: bool,
    /// TCP connections without TLS are refused (`hostssl` only).
    hostssl_only: bool,
    /// `ssl_ca_file = root.crt`: client certificates are asked for and checked.
    client_ca: bool,
}

/// TLS for [`Server::start_tls`].
pub struct Tls {
    /// The server's certificate (chain), PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// Only `hostssl` lines in `pg_hba.conf`: a TCP connection without TLS is refused.
    pub hostssl_only: bool,
    /// The CA (PEM) of the client certificates the server takes (`ssl_ca_file`). With it, TCP
    /// connections are `hostssl … cert` only: TLS with a certificate of this CA whose CN is
    /// the role, and no other authentication (implies `hostssl_only`).
    pub client_ca_pem: Option<String>,
}

static SHARED: OnceLock<Result<Server, String>> = OnceLock::new();

/// This process's server, started on first use.
///
/// # Panics
/// When no server can be started (PostgreSQL not installed, say), with what to do about it.
pub fn shared() -> &'static Server {
    match SHARED.get_or_init(|| Server::launch(false)) {
        Ok(server) => server,
        Err(e) => panic!("{e}"),
    }
}

static DATABASES: AtomicU32 = AtomicU32::new(0);

impl Server {
    /// A server of one's own, stopped and removed when dropped.
    ///
    /// # Errors
    /// What went wrong, with what to install when PostgreSQL is missing.
    pub fn start() -> Result<Server, String> {
        Server::launch(true)
    }

    /// A server of one's own with TLS on (see [`Tls`]), stopped and removed when dropped.
    ///
    /// # Errors
    /// As [`Server::start`], and when the certificate files cannot be written.
    pub fn start_tls(tls: &Tls) -> Result<Server, String> {
        Server::launch_with(true, Some(tls))
    }

    fn launch(owned: bool) -> Result<Server, String> {
        Server::launch_with(owned, None)
    }

    fn launch_with(owned: bool, tls: Option<&Tls>) -> Result<Server, String> {
        let bin = bin_dir()?;
        let root = root();
        fs::create_dir_all(&root).map_err(|e| format!("creating {}: {e}", root.display()))?;
        sweep(&root);
        let template = template(&bin, &root)?;
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = root.join(format!(
            "{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        drop(fs::remove_dir_all(&dir));
        fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let status = Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(dir.join("data"))
            .status()
            .map_err(|e| format!("cp: {e}"))?;
        if !status.success() {
            return Err(format!("copying the template cluster: {status}"));
        }
        if let Some(tls) = tls {
            write_tls(&dir.join("data"), tls)?;
        }
        give_to_postgres(&dir)?;
        let mut last = String::new();
        // A free port found now may be taken before the server binds it: try a few.
        for _ in 0..5 {
            let port = free_port()?;
            let server = Server {
                bin: bin.clone(),
                dir: dir.clone(),
                port,
                child: Mutex::new(None),
                owned,
                tls: tls.is_some(),
                hostssl_only: tls.is_some_and(|t| t.hostssl_only || t.client_ca_pem.is_some()),
                client_ca: tls.is_some_and(|t| t.client_ca_pem.is_some()),
            };
            match server.run() {
                Ok(()) => return Ok(server),
                Err(e) => {
                    last = e;
                    // Not dropped: `owned` would remove the directory.
                    std::mem::forget(server);
                }
            }
        }
        Err(last)
    }

    /// Starts the server (again) on its directory and port; returns once it takes connections.
    fn run(&self) -> Result<(), String> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("log"))
            .map_err(|e| format!("opening the server log: {e}"))?;
        let mut command = as_postgres(&self.bin.join("postgres"));
        command
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            .args(["-c", "fsync=on", "-c", "synchronous_commit=on"])
            .args(["-c", "max_connections=300", "-c", "shared_buffers=64MB"]);
        if self.tls {
            // Relative to the data directory.
            command.args([
                "-c",
                "ssl=on",
                "-c",
                "ssl_cert_file=server.crt",
                "-c",
                "ssl_key_file=server.key",
            ]);
        }
        if self.client_ca {
            command.args(["-c", "ssl_ca_file=root.crt"]);
        }
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        let child = spawn(command).map_err(|e| format!("starting postgres: {e}"))?;
        *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if postgres::Client::connect(&self.admin_url("postgres"), postgres::NoTls).is_ok() {
                return Ok(());
            }
            let exited = self
                .child
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                return Err(format!(
                    "postgres exited ({status}) on port {}; its log:\n{}",
                    self.port,
                    self.log_tail()
                ));
            }
            if Instant::now() > until {
                self.kill();
                return Err(format!(
                    "postgres took no connection within 60 s; its log:\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// The URL the test process itself uses for database `db`: [`Server::url`], or the Unix
    /// socket when TCP requires TLS (`hostssl` only), so that `postgres::NoTls` still works.
    pub fn admin_url(&self, db: &str) -> String {
        if self.hostssl_only {
            format!(
                "host={} port={} user={USER} dbname={db}",
                self.dir.display(),
                self.port
            )
        } else {
            self.url(db)
        }
    }

    /// Creates a database no one else uses; returns its URL.
    ///
    /// # Panics
    /// When the server does not answer.
    pub fn fresh_db(&self) -> String {
        let name = format!(
            "t_{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::Relaxed)
        );
        let mut client = postgres::Client::connect(&self.admin_url("postgres"), postgres::NoTls)
            .unwrap_or_else(|e| panic!("connecting to the test server: {e}"));
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        self.url(&name)
    }

    /// Kills the server at once (SIGKILL: no shutdown checkpoint, as in a crash); its backends
    /// end when they notice.
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            drop(child.kill());
            drop(child.wait());
        }
    }

    /// Kills the server and starts it again on the same data and port (crash recovery runs).
    ///
    /// # Errors
    /// When it does not come back.
    pub fn restart(&self) -> Result<(), String> {
        self.kill();
        // The old backends hold the port's socket until they notice their postmaster is gone.
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            match self.run() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > until => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Stops the server until [`Server::start_again`].
    pub fn stop(&self) {
        self.kill();
    }

    /// Starts a stopped server again.
    ///
    /// # Errors
    /// When it does not come back.
    pub fn start_again(&self) -> Result<(), String> {
        self.restart()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        if self.owned {
            drop(fs::remove_dir_all(&self.dir));
        }
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` with `initdb` (or `POSGATE_PG_BIN`).
fn bin_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("POSGATE_PG_BIN") {
        let dir = PathBuf::from(dir);
        if !dir.join("initdb").exists() || !dir.join("postgres").exists() {
            return Err(format!(
                "POSGATE_PG_BIN={} holds no initdb and postgres: point it at PostgreSQL's bin \
                 directory (e.g. /usr/lib/postgresql/15/bin), or unset it and install the \
                 Debian package: apt-get update && apt-get install -y postgresql",
                dir.display()
            ));
        }
        return Ok(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        "PostgreSQL is not installed: these tests start a real server from \
         /usr/lib/postgresql/<version>/bin. Install it with \
         `apt-get update && apt-get install -y postgresql` (.ci/run does), or point \
         POSGATE_PG_BIN at a directory holding initdb and postgres."
            .to_owned()
    })
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `program` as a command run as the `postgres` user when we are root, killed when the thread
/// that spawns it (see [`spawn`]) dies.
fn as_postgres(program: &Path) -> Command {
    let mut command = Command::new("setpriv");
    if is_root() {
        command.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--reset-env",
        ]);
    }
    command.args(["--pdeathsig", "KILL", "--"]).arg(program);
    command
}

/// The certificate and key into the data directory `data` (the key 0600: PostgreSQL refuses a
/// key others can read), and with `hostssl_only` a `pg_hba.conf` without `host` lines; with a
/// client CA, `root.crt` and `hostssl … cert` lines only.
fn write_tls(data: &Path, tls: &Tls) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let write = |name: &str, text: &str| {
        let path = data.join(name);
        drop(fs::remove_file(&path));
        File::options()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| format!("writing {}: {e}", path.display()))
    };
    write("server.crt", &tls.cert_pem)?;
    write("server.key", &tls.key_pem)?;
    if let Some(ca) = &tls.client_ca_pem {
        write("root.crt", ca)?;
        write(
            "pg_hba.conf",
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 cert\n\
             hostssl all all ::1/128 cert\n",
        )?;
    } else if tls.hostssl_only {
        write(
            "pg_hba.conf",
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostssl all all ::1/128 trust\n",
        )?;
    }
    Ok(())
}

/// Makes `dir` (recursively) the `postgres` user's, when we are root.
fn give_to_postgres(dir: &Path) -> Result<(), String> {
    if !is_root() {
        return Ok(());
    }
    let status = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(dir)
        .status()
        .map_err(|e| format!("chown: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "chown -R postgres:postgres {}: {status} (is there a `postgres` user? the \
             `postgresql` package creates it)",
            dir.display()
        ))
    }
}

/// A cluster made by `initdb` once per machine and version, copied by every server.
fn template(bin: &Path, root: &Path) -> Result<PathBuf, String> {
    let version = bin
        .parent()
        .and_then(|p| p.file_name())
        .map(|v| v.to_string_lossy().into_owned())
        .unwrap_or_default();
    let template = root.join(format!("template-{version}"));
    let ready = template.join("PG_VERSION");
    if ready.exists() && template.join(".posgate-ready").exists() {
        return Ok(template);
    }
    // One process makes it; the others wait on the lock.
    let lock = File::create(root.join("template.lock")).map_err(|e| e.to_string())?;
    lock.lock()
        .map_err(|e| format!("locking the template: {e}"))?;
    if template.join(".posgate-ready").exists() {
        return Ok(template);
    }
    let work = root.join(format!("template-{version}.{}", std::process::id()));
    drop(fs::remove_dir_all(&work));
    fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    give_to_postgres(&work)?;
    let data = work.join("data");
    let output = as_postgres(&bin.join("initdb"))
        .arg("-D")
        .arg(&data)
        .args(["-U", USER, "--auth=trust", "-E", "UTF8", "--locale=C"])
        // initdb's own fsync of the fresh files only; the server runs with fsync=on.
        .arg("--no-sync")
        .output()
        .map_err(|e| format!("running initdb: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "initdb failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    File::create(data.join(".posgate-ready")).map_err(|e| e.to_string())?;
    drop(fs::remove_dir_all(&template));
    fs::rename(&data, &template).map_err(|e| format!("placing the template: {e}"))?;
    drop(fs::remove_dir_all(&work));
    Ok(template)
}

/// Removes the directories of test processes that are gone (their servers died with them).
fn sweep(root: &Path) {
    for entry in fs::read_dir(root).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            drop(fs::remove_dir_all(entry.path()));
        }
    }
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("finding a port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `command` from a thread that lives as long as the process: `--pdeathsig` fires when
/// the *thread* that forked the child ends, and a test's own thread ends with the test.
fn spawn(command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        drop(
            std::thread::Builder::new()
                .name("testpg-spawner".into())
                .spawn(move || {
                    for (mut command, reply) in rx {
                        drop(reply.send(command.spawn()));
                    }
                    // Never reached while the process lives: the sender is static.
                    loop {
                        std::thread::park();
                    }
                }),
        );
        Mutex::new(tx)
    });
    let (reply, answer) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((command, reply))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("the spawner thread is gone"))?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Two databases of the shared server are apart; an owned server comes back after a kill
    /// with what was committed, and leaves no directory behind.
    #[test]
    fn fresh_databases_and_a_restart() {
        let a = shared().fresh_db();
        let b = shared().fresh_db();
        assert_ne!(a, b);
        let mut client = postgres::Client::connect(&a, postgres::NoTls).unwrap();
        client.batch_execute("CREATE TABLE t (n int)").unwrap();
        let mut other = postgres::Client::connect(&b, postgres::NoTls).unwrap();
        assert!(other.batch_execute("SELECT * FROM t").is_err());

        let own = Server::start().unwrap();
        let url = own.fresh_db();
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        client
            .batch_execute("CREATE TABLE t (n int); INSERT INTO t VALUES (7)")
            .unwrap();
        own.restart().unwrap();
        assert!(
            client.batch_execute("SELECT 1").is_err(),
            "the old session survived"
        );
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let n: i32 = client.query_one("SELECT n FROM t", &[]).unwrap().get(0);
        assert_eq!(n, 7);
        let dir = own.dir.clone();
        drop(own);
        assert!(!dir.exists());
    }
}
