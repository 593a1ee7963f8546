//! [`FleetReport`], the results of a fleet benchmark, and how it is printed.

use serde::Serialize;

use crate::bench::Latency;

/// Results of a fleet benchmark, printed as a table and written as JSON.
#[derive(Debug, Default, Serialize)]
pub struct FleetReport {
    pub scenario: String,
    pub terminals: usize,
    pub rows: Vec<serde_json::Value>,
    pub latency_ms: Option<Latency>,
    pub sent: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub gateway_rss_mib: Vec<f64>,
    /// Where the started gateway kept its state (`redb` or `postgres`), when the bench started it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<&'static str>,
}

/// Prints a report's heading, its rows, and its latency naming what was `measured` (the counts
/// are the caller's).
pub(crate) fn print_measured(report: &FleetReport, measured: &str) {
    println!("bench {}: {} terminals", report.scenario, report.terminals);
    for row in &report.rows {
        println!("  {row}");
    }
    if let Some(l) = &report.latency_ms {
        println!(
            "  {measured}: p50 {:.2} ms, p90 {:.2}, p99 {:.2}, p99.9 {:.2}, max {:.2}",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
    }
}

/// Prints a fleet report.
pub fn print(report: &FleetReport) {
    print_measured(
        report,
        "webhook sent -> confirmation verified at the terminal",
    );
    if let Some(store) = report.store {
        println!("  store: {store}");
    }
    println!(
        "  sent {}, delivered {}, lost {}, duplicates {}, rejected {}",
        report.sent, report.delivered, report.lost, report.duplicates, report.rejected
    );
    if !report.gateway_rss_mib.is_empty() {
        let list: Vec<String> = report
            .gateway_rss_mib
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect();
        println!("  gateway RSS (MiB): {}", list.join(", "));
    }
}
