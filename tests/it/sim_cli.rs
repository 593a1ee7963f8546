//! `posgate-sim terminal`, `posgate-sim fleet` and `posgate-sim bridge` as a person or a script runs
//! them: the real binary against an in-process gateway and provider simulator.

use std::time::Duration;

use posgate_sim::compare::{self, BridgeOptions};
use posgate_sim::events;
use posgate_sim::provider::{ProviderConfig, ProviderSim, RunningProvider};

use crate::harness::{self, SECRET, TestGateway};

async fn provider_for(gw: &TestGateway) -> RunningProvider {
    let mut config = ProviderConfig::new(gw.webhook_url(), SECRET);
    config.time_scale = 0.01;
    ProviderSim::start(config).await.unwrap()
}

/// Runs the simulator binary with `args` to its end (at most `within`), asserts it exits 0, and
/// returns its stdout.
async fn sim(args: &[&str], within: Duration) -> String {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_posgate-sim-under-test"))
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(within, child)
        .await
        .expect("posgate-sim finished in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_terminal_shows_the_qr_code_then_paid() {
    let gw = harness::spawn_gateway().await;
    let provider = provider_for(&gw).await;
    let (admin, mqtt, api) = (
        gw.admin.to_string(),
        gw.mqtt.to_string(),
        provider.api_base(),
    );
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("pos_watch.json");
    // The terminal `pos_watch` with its bundle, paid `pay_after_ms` after it shows the QR code.
    let watch = |pay_after_ms: &'static str| {
        vec![
            "terminal",
            "--id",
            "pos_watch",
            "--admin",
            &admin,
            "--admin-token",
            &gw.admin_token,
            "--provider-api",
            &api,
            "--bundle",
            bundle.to_str().unwrap(),
            "--pay",
            "--pay-after-ms",
            pay_after_ms,
            "--timeout",
            "30",
        ]
    };
    let mut first = watch("300");
    first.extend(["--mqtt", &mqtt, "--amount", "4.40"]);
    let stdout = sim(&first, Duration::from_secs(60)).await;
    // The QR block: lines of half blocks, wider than 20 modules, before the outcome.
    let qr_lines = stdout
        .lines()
        .filter(|l| l.chars().count() > 20 && l.chars().all(|c| " ▀▄█".contains(c)))
        .count();
    assert!(qr_lines > 10, "no QR code in:\n{stdout}");
    assert!(stdout.contains("ethereum:"), "{stdout}");
    assert!(stdout.contains("4.40 USDC"), "{stdout}");
    let paid = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("PAID"))
        .unwrap_or_else(|| panic!("no PAID line in:\n{stdout}"));
    assert!(paid.contains("4.40"), "{paid}");
    assert!(stdout.contains("terminal_id    pos_watch"), "{stdout}");
    // The bundle was kept, private, and the same terminal runs again from it.
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&bundle).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    // Again from the kept bundle, without `--mqtt` or `--amount`.
    let stdout = sim(&watch("100"), Duration::from_secs(60)).await;
    assert!(
        stdout.lines().any(|l| l.trim_start().starts_with("PAID")),
        "{stdout}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_against_a_running_gateway_and_simulator_loses_nothing() {
    let gw = harness::spawn_gateway().await;
    let provider = provider_for(&gw).await;
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("fleet.json");
    sim(
        &[
            "fleet",
            "--admin",
            &format!("http://{}", gw.admin),
            "--admin-token",
            &gw.admin_token,
            "--mqtt",
            &gw.mqtt.to_string(),
            "--provider-api",
            &provider.api_base(),
            "--terminals",
            "10",
            "--duration",
            "3",
            "--grace",
            "15",
            "--disconnect-rate",
            "0.1",
            "--offline-rate",
            "0.2",
            "--storm-every",
            "2",
            "--quiet",
            "--json",
            json.to_str().unwrap(),
        ],
        Duration::from_secs(90),
    )
    .await;
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["lost"], 0, "{report}");
    assert!(
        report["storms"].as_u64().unwrap() >= 1,
        "a storm happened: {report}"
    );
    assert!(report["payments"].as_u64().unwrap() >= 10, "{report}");
    assert_eq!(report["delivered"], report["payments"], "{report}");
    assert!(
        report["latency_ms"]["p50"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(
        report["provider"]["api"]["intents_created"]
            .as_u64()
            .unwrap()
            >= 10,
        "the intents went through the REST API: {report}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn the_bridge_checks_the_signature_before_publishing() {
    // No broker listens there: publishes queue in the client, which is all the answer waits for.
    let bridge = compare::start_bridge(BridgeOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        broker: "127.0.0.1:9".parse().unwrap(),
        secrets: vec![SECRET.to_owned().into()],
        clear_on_ack: false,
        certs: None,
    })
    .await
    .unwrap();
    let url = format!("http://{}{}", bridge.addr, events::WEBHOOK_PATH);
    let body = events::intent_event(
        "evt_bridge_1",
        "confirmed",
        &events::Intent::new("pi_bridge_1", posgate_proto::MicroUsdc(4_400_000), "pos-1"),
    );
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let post = |headers: [(&'static str, String); 2]| {
        let mut request = http.post(&url).body(body.clone());
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request.send()
    };
    let forged = post(events::signed_headers(
        "whsec_wrong",
        events::now_unix(),
        body.as_bytes(),
    ))
    .await
    .unwrap();
    assert_eq!(forged.status(), 401);
    let stale = post(events::signed_headers(
        SECRET,
        events::now_unix() - 400,
        body.as_bytes(),
    ))
    .await
    .unwrap();
    assert_eq!(stale.status(), 401);
    let good = post(events::signed_headers(
        SECRET,
        events::now_unix(),
        body.as_bytes(),
    ))
    .await
    .unwrap();
    assert_eq!(good.status(), 200);
    let answer: serde_json::Value = good.json().await.unwrap();
    assert_eq!(answer["published"], true, "{answer}");
    bridge.stop().await;
}

/// `posgate-sim attack rpc-flood`, small: it starts its own daemon, runs the honest load quiet and
/// then beside the flood, and reports both phases, the gateway's descriptors and what the flood
/// got (mostly `rate_limited`); exit 0 because no honest confirmation was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attack_bench_runs_beside_the_honest_load_and_reports_both_phases() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("attack.json");
    let stdout = sim(
        &[
            "attack",
            "rpc-flood",
            "--posgate-bin",
            env!("CARGO_BIN_EXE_posgate-under-test"),
            "--terminals",
            "5",
            "--rate",
            "20",
            "--senders",
            "2",
            "--quiet",
            "2",
            "--duration",
            "3",
            "--probes",
            "1",
            "--requests",
            "500",
            "--json",
            json.to_str().unwrap(),
        ],
        Duration::from_secs(90),
    )
    .await;
    assert!(
        stdout.contains("attack rpc-flood beside 5 honest terminals"),
        "{stdout}"
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    for phase in ["quiet", "attack"] {
        let p = &report["honest"][phase];
        assert!(p["delivered"].as_u64().unwrap() > 0, "{phase}: {report}");
        assert_eq!(p["lost"], 0, "{phase}: {report}");
    }
    assert!(
        report["gateway"]["attack"]["fds_max"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert_eq!(
        report["new_terminals"][0]["error"],
        serde_json::Value::Null,
        "{report}"
    );
    assert!(
        report["attack"]["answers"]["rate_limited"]
            .as_u64()
            .unwrap()
            > 0,
        "{report}"
    );
}
