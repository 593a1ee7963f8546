//! The demo: a short run ends with nothing lost, and its exit code reflects loss.

use std::process::Command;
use std::time::Duration;

use posgate_sim::demo::{self, DemoOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_50_for_10_s_with_chaos_loses_nothing() {
    let options = DemoOptions {
        terminals: 50,
        duration: Duration::from_secs(10),
        grace: Duration::from_secs(20),
        time_scale: 0.01,
        chaos: true,
        drop_all_webhooks: false,
        progress: false,
    };
    let report = demo::run(&options).await.unwrap();
    let r = &report.pos;
    assert!(r.payments >= 50, "{r:?}");
    assert_eq!(
        (r.lost, r.delivered, r.rejected_at_terminal),
        (0, r.payments, 0),
        "{r:?}"
    );
    assert!(r.disconnects + r.reboots > 0, "the chaos did happen: {r:?}");
    assert!(
        r.forged_rejected > 0,
        "forged deliveries were sent and refused: {r:?}"
    );
    assert!(r.latency_ms.p50 > 0.0);
}

fn demo_cli(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_posgate-sim-under-test"))
        .arg("demo")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn the_exit_code_reflects_loss() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let common = [
        "--terminals",
        "5",
        "--duration",
        "2",
        "--grace",
        "2",
        "--quiet",
        "--json",
    ];
    // Every webhook dropped by the provider: the payments never reach a terminal.
    let (code, stdout) = demo_cli(
        &[
            &common[..],
            &[json.to_str().unwrap(), "--no-chaos", "--drop-all-webhooks"],
        ]
        .concat(),
    );
    assert_eq!(code, Some(1), "{stdout}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert!(
        report["lost"].as_u64().unwrap() > 0 && report["lost"] == report["payments"],
        "{report}"
    );
    for key in [
        "payments",
        "delivered",
        "lost",
        "duplicates_suppressed",
        "forged_rejected",
    ] {
        assert!(report[key].is_u64(), "{key} missing from {report}");
    }
    for key in ["p50", "p90", "p99", "p999", "max"] {
        assert!(
            report["latency_ms"][key].is_number(),
            "latency_ms.{key} missing from {report}"
        );
    }
    // The same run with the webhooks delivered: exit 0.
    let (code, stdout) = demo_cli(&[&common[..], &[json.to_str().unwrap(), "--no-chaos"]].concat());
    assert_eq!(code, Some(0), "{stdout}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["lost"], 0, "{report}");
}
