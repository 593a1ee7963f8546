//! A full disk, as an edge server gets one: `data_dir` on a small tmpfs that the test mounts and
//! fills. Webhooks are answered `503` (never `200` without the commit), nothing already committed
//! is lost, and once space is back the same process takes webhooks again, without a restart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use posgate_proto::MicroUsdc;
use posgate_sim::events::{self, Intent};

use crate::crash::{Daemon, connect_terminals, sigterm, start_daemon};
use crate::harness::{SECRET, eventually, signed_post};

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Tmpfs {
    /// `None` (and a message saying why) where mounting is refused: not root, or a container
    /// without the capability.
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs here (the disk-full test needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Tmpfs { _dir: dir, path })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        drop(
            std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.path)
                .status(),
        );
    }
}

/// Writes zeros into `file` until the file system is full.
fn fill(file: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(file).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling {}: {e}", file.display()),
        }
    }
    drop(f.sync_all());
}

fn event(n: usize) -> (String, String) {
    let pi = format!("pi_disk_{n}");
    let intent = Intent::new(&pi, MicroUsdc(1_000_000 + n as u64), "pos_disk_0");
    (
        pi,
        events::intent_event(&format!("evt_disk_{n}"), "confirmed", &intent),
    )
}

async fn readyz(http: &reqwest::Client, daemon: &Daemon) -> u16 {
    http.get(format!("http://{}/readyz", daemon.admin))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_503_loses_nothing_and_recovers_in_place() {
    let Some(disk) = Tmpfs::mount("24m") else {
        return;
    };
    let data_dir = disk.path.join("data");
    let mut daemon = start_daemon(&data_dir).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut terminal = connect_terminals(&daemon, &http, "pos_disk", 1)
        .await
        .pop()
        .unwrap();
    let url = format!("http://{}{}", daemon.ingress, events::WEBHOOK_PATH);
    let send = |n: usize| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let (_, body) = event(n);
            signed_post(&http, &url, SECRET, body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };

    // Full: webhooks go on until the store runs out of space and answers 503.
    fill(&disk.path.join("filler"));
    let mut answered_200 = Vec::new();
    let mut refused = Vec::new();
    for n in 0..5_000 {
        match send(n).await {
            200 => answered_200.push(n),
            503 => {
                refused.push(n);
                if refused.len() >= 20 {
                    break;
                }
            }
            other => panic!("webhook {n} answered {other} on a full disk"),
        }
    }
    assert!(!refused.is_empty(), "the disk never filled up");
    assert_eq!(readyz(&http, &daemon).await, 503, "/readyz on a full disk");
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "posgate exited on a full disk"
    );

    // Space comes back: the same process takes webhooks again.
    std::fs::remove_file(disk.path.join("filler")).unwrap();
    eventually(Duration::from_secs(30), || async {
        (readyz(&http, &daemon).await == 200).then_some(())
    })
    .await;
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "posgate restarted"
    );
    for &n in &refused {
        assert_eq!(send(n).await, 200, "the retry of webhook {n}");
    }

    // Nothing answered 200 was lost: every confirmation reaches the terminal, verified, once.
    let mut expected: std::collections::BTreeSet<String> = answered_200
        .iter()
        .chain(&refused)
        .map(|&n| event(n).0)
        .collect();
    while !expected.is_empty() {
        let c = terminal
            .next_confirmation(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{} confirmations missing: {e}", expected.len()));
        assert!(expected.remove(&c.intent_id), "unexpected {}", c.intent_id);
    }
    sigterm(&daemon).await;
}
