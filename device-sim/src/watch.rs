//! `posgate-sim terminal`: one terminal a person can watch.
//!
//! Provisioned through the admin API (or loaded from a saved bundle), connected over MQTT/TLS with
//! its own certificate, it asks the provider (simulator) for a payment intent over REST, shows the
//! amount and the intent's `qr_payload` as a QR code in the terminal window, waits for the signed
//! confirmation (verified by [`Terminal`]: signature, `terminal_id`, `seq`), acks it, and shows the
//! outcome in big letters. With `--pay` the "customer" pays through the simulator's control
//! endpoint a moment later, so the whole flow can be watched on one machine.
//!
//! Nothing here decides an outcome: the terminal shows what the gateway signed.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use posgate_proto::MicroUsdc;
use posgate_proto::confirmation::{Confirmation, ConfirmationStatus, Context as Why};
use qrcode::QrCode;
use qrcode::render::unicode::Dense1x2;
use rust_decimal::Decimal;
use serde_json::Value;

use crate::provider::NewIntent;
use crate::remote::{self, RemoteProvider};
use crate::terminal::{Bundle, Terminal};

/// What `posgate-sim terminal` was asked to do.
#[derive(Clone, Debug)]
pub struct WatchOptions {
    /// The terminal's id (provisioned with it, and put in the intent's `metadata.terminal_id`).
    pub id: String,
    /// The gateway's admin API (`HOST:PORT` or `http://HOST:PORT`).
    pub admin: String,
    /// The admin token.
    pub admin_token: String,
    /// The gateway's MQTT/TLS listener; default: the bundle's `mqtt_url`.
    pub mqtt: Option<String>,
    /// A saved provisioning bundle: loaded when the file exists, written after provisioning when
    /// it does not (so the same terminal can be run again).
    pub bundle: Option<PathBuf>,
    /// Merchant the terminal is registered under.
    pub merchant_id: String,
    /// The provider's API, `http://ADDR/v1`.
    pub provider_api: String,
    /// The simulator's control endpoint (default: `provider_api` without `/v1`).
    pub provider_control: Option<String>,
    /// API key for the provider's REST API.
    pub api_key: String,
    /// The amount to charge.
    pub amount: MicroUsdc,
    /// Intent time to live in seconds (the provider's default when `None`).
    pub ttl_secs: Option<u64>,
    /// Make the customer pay after `pay_after`.
    pub pay: bool,
    /// How long the customer takes to pay.
    pub pay_after: Duration,
    /// What the customer pays (default: exactly the amount).
    pub pay_amount: Option<MicroUsdc>,
    /// How long to wait for the outcome.
    pub timeout: Duration,
}

/// Parses a decimal amount such as `4.40` exactly (never through `f64`).
///
/// # Errors
/// When it is not a non-negative decimal with at most 6 places.
pub fn parse_amount(text: &str) -> anyhow::Result<MicroUsdc> {
    let decimal = Decimal::from_str(text.trim()).with_context(|| format!("amount {text:?}"))?;
    MicroUsdc::try_from(decimal).with_context(|| format!("amount {text:?}"))
}

/// What the terminal shows for a confirmation: `PAID`, `EXPIRED`, `CANCELLED`, or the reason an
/// unresolved payment needs the cashier (`UNDERPAID`, `OVERPAID`, `LATE`, `MULTIPLE`).
pub fn outcome(c: &Confirmation) -> &'static str {
    match (c.status, c.context) {
        (ConfirmationStatus::Confirmed, _) => "PAID",
        (ConfirmationStatus::Expired, _) => "EXPIRED",
        (ConfirmationStatus::Cancelled, _) => "CANCELLED",
        (ConfirmationStatus::Unresolved, Some(Why::Underpaid)) => "UNDERPAID",
        (ConfirmationStatus::Unresolved, Some(Why::Overpaid)) => "OVERPAID",
        (ConfirmationStatus::Unresolved, Some(Why::Late)) => "LATE",
        (ConfirmationStatus::Unresolved, Some(Why::Multiple)) => "MULTIPLE",
        (ConfirmationStatus::Unresolved, None) => "UNRESOLVED",
    }
}

/// `qr_payload` as a QR code in Unicode half blocks (two modules per character cell), light
/// modules drawn so that it scans on a dark terminal background, with the quiet zone.
///
/// # Errors
/// When the payload does not fit a QR code.
pub fn render_qr(payload: &str) -> anyhow::Result<String> {
    let code = QrCode::new(payload.as_bytes()).context("encoding the QR code")?;
    Ok(code
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

/// Five rows of `█` spelling `word` (A–Z subset used by the outcomes; others are blank).
pub fn banner(word: &str) -> String {
    let mut rows = vec![String::new(); 5];
    for ch in word.chars() {
        for (row, bits) in rows.iter_mut().zip(glyph(ch)) {
            row.extend(bits.chars().map(|b| if b == '#' { '█' } else { ' ' }));
            row.push(' ');
        }
    }
    rows.iter()
        .map(|r| r.trim_end().to_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

fn glyph(ch: char) -> [&'static str; 5] {
    match ch.to_ascii_uppercase() {
        'A' => [" ### ", "#   #", "#####", "#   #", "#   #"],
        'C' => [" ####", "#    ", "#    ", "#    ", " ####"],
        'D' => ["#### ", "#   #", "#   #", "#   #", "#### "],
        'E' => ["#####", "#    ", "#### ", "#    ", "#####"],
        'I' => ["#####", "  #  ", "  #  ", "  #  ", "#####"],
        'L' => ["#    ", "#    ", "#    ", "#    ", "#####"],
        'M' => ["#   #", "## ##", "# # #", "#   #", "#   #"],
        'N' => ["#   #", "##  #", "# # #", "#  ##", "#   #"],
        'O' => [" ### ", "#   #", "#   #", "#   #", " ### "],
        'P' => ["#### ", "#   #", "#### ", "#    ", "#    "],
        'R' => ["#### ", "#   #", "#### ", "#  # ", "#   #"],
        'S' => [" ####", "#    ", " ### ", "    #", "#### "],
        'T' => ["#####", "  #  ", "  #  ", "  #  ", "  #  "],
        'U' => ["#   #", "#   #", "#   #", "#   #", " ### "],
        'V' => ["#   #", "#   #", "#   #", " # # ", "  #  "],
        'X' => ["#   #", " # # ", "  #  ", " # # ", "#   #"],
        _ => ["     ", "     ", "     ", "     ", "     "],
    }
}

/// Provisions (or loads) the terminal's bundle.
async fn bundle(options: &WatchOptions, admin: SocketAddr) -> anyhow::Result<Bundle> {
    if let Some(path) = &options.bundle
        && path.exists()
    {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let bundle: Bundle = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a provisioning bundle", path.display()))?;
        if bundle.terminal_id != options.id {
            bail!(
                "{} is the bundle of {}, not {}",
                path.display(),
                bundle.terminal_id,
                options.id
            );
        }
        return Ok(bundle);
    }
    let http = reqwest::Client::builder().no_proxy().build()?;
    let url = format!("http://{admin}/v1/terminals");
    let response = http
        .post(&url)
        .bearer_auth(&options.admin_token)
        .json(&serde_json::json!({"id": options.id, "merchant_id": options.merchant_id, "label": "posgate-sim terminal"}))
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    match status.as_u16() {
        201 => {}
        409 => bail!(
            "terminal {} is already registered and its key was shown only once: use another --id, \
             or the --bundle file saved when it was provisioned",
            options.id
        ),
        _ => bail!("provisioning {} answered {status}: {body}", options.id),
    }
    if let Some(path) = &options.bundle {
        save_private(path, &serde_json::to_vec_pretty(&body)?)?;
        eprintln!(
            "bundle saved to {} (it holds the terminal's key)",
            path.display()
        );
    }
    serde_json::from_value(body).context("the provisioning bundle does not parse")
}

/// Writes `bytes` to a new file readable by its owner only (the bundle holds a private key).
fn save_private(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// Runs the terminal until its intent has an outcome; returns it (`PAID`, `EXPIRED`, …).
///
/// # Errors
/// When provisioning, connecting or creating the intent fails, or nothing arrives in time.
pub async fn run(options: &WatchOptions) -> anyhow::Result<&'static str> {
    let color = std::io::stdout().is_terminal();
    let admin = remote::resolve(&options.admin).await?;
    let bundle = bundle(options, admin).await?;
    let mqtt = match &options.mqtt {
        Some(addr) => remote::resolve(addr).await?,
        None => remote::resolve(&bundle.mqtt_url).await?,
    };
    println!(
        "terminal {} (tenant {}) connecting to {mqtt} over MQTT/TLS",
        bundle.terminal_id, bundle.tenant
    );
    let mut terminal = Terminal::connect(bundle, mqtt).await?;
    println!(
        "connected; confirmations are checked against gateway key {}",
        terminal.bundle.gateway_jwk.kid
    );

    let provider = RemoteProvider::new(
        &options.provider_api,
        options.provider_control.as_deref(),
        &options.api_key,
    )?;
    let mut new_intent = NewIntent::for_terminal(options.amount, &options.id);
    new_intent.ttl_secs = options.ttl_secs;
    let intent = provider.create_intent(&new_intent).await?;
    let intent_id = intent["id"]
        .as_str()
        .context("the provider's intent has no id")?
        .to_owned();
    let qr_payload = intent["qr_payload"]
        .as_str()
        .context("the provider's intent has no qr_payload")?
        .to_owned();
    println!();
    println!("  amount due   {} USDC", options.amount);
    println!("  intent       {intent_id}");
    if let Some(order) = intent["metadata"]["order_id"].as_str() {
        println!("  order        {order}");
    }
    if let Some(expires) = intent["expires_at"].as_str() {
        println!("  expires at   {expires}");
    }
    println!();
    println!("{}", render_qr(&qr_payload)?);
    println!("  {qr_payload}");
    println!();

    let payer = options.pay.then(|| {
        let (provider, id, after, amount) = (
            provider.clone(),
            intent_id.clone(),
            options.pay_after,
            options.pay_amount,
        );
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            provider.pay(&id, amount, false).await
        })
    });
    match (options.pay, options.pay_amount) {
        (true, Some(paid)) => println!(
            "waiting for the customer (they will pay {paid} USDC in {} ms)...",
            options.pay_after.as_millis()
        ),
        (true, None) => println!(
            "waiting for the customer (they will pay in {} ms)...",
            options.pay_after.as_millis()
        ),
        (false, _) => println!("waiting for the customer to scan and pay..."),
    }
    std::io::stdout().flush().ok();

    let deadline = tokio::time::Instant::now() + options.timeout;
    let confirmation = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let c = terminal
            .next_confirmation(left)
            .await
            .with_context(|| format!("waiting for the outcome of {intent_id}"))?;
        if c.intent_id == intent_id {
            break c;
        }
        // An older confirmation for this terminal (a previous run): acked and skipped.
        println!(
            "  (earlier confirmation for {}: {:?}, acked)",
            c.intent_id, c.status
        );
    };
    if let Some(payer) = payer {
        match payer.await {
            Ok(Ok(receipt)) => {
                if let Some(tx) = receipt["transaction_id"].as_str() {
                    println!("  customer's transfer {tx}");
                }
            }
            Ok(Err(e)) => eprintln!("paying failed: {e:#}"),
            Err(e) => eprintln!("the paying task failed: {e}"),
        }
    }
    let shown = outcome(&confirmation);
    let (on, off) = match (color, shown) {
        (false, _) => ("", ""),
        (true, "PAID") => ("\x1b[1;32m", "\x1b[0m"),
        (true, _) => ("\x1b[1;31m", "\x1b[0m"),
    };
    println!();
    println!("{on}{}{off}", banner(shown));
    println!();
    println!(
        "{on}  {shown}{off}  {} {}",
        confirmation.amount,
        confirmation.currency.to_uppercase()
    );
    print_fields(&confirmation);
    terminal.disconnect().await;
    Ok(shown)
}

/// The confirmation's fields, one a line.
fn print_fields(c: &Confirmation) {
    println!("  signed confirmation (EdDSA, verified):");
    println!("    intent_id      {}", c.intent_id);
    println!("    terminal_id    {}", c.terminal_id);
    println!("    seq            {}", c.seq);
    match c.context {
        Some(why) => println!("    status         {:?} ({why:?})", c.status),
        None => println!("    status         {:?}", c.status),
    }
    println!(
        "    amount         {} ({} micros)",
        c.amount, c.amount_micros
    );
    println!("    currency       {}", c.currency);
    if let Some(order) = &c.order_id {
        println!("    order_id       {order}");
    }
    if let Some(tx) = &c.tx_hash {
        println!("    tx_hash        {tx}");
    }
    println!("    issued_at      {}", c.issued_at);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_exactly() {
        assert_eq!(parse_amount("4.40").unwrap(), MicroUsdc(4_400_000));
        assert_eq!(parse_amount("8.2").unwrap(), MicroUsdc(8_200_000));
        assert!(parse_amount("-1").is_err());
        assert!(parse_amount("0.0000001").is_err());
        assert!(parse_amount("four").is_err());
    }

    #[test]
    fn the_banner_spells_the_word() {
        let b = banner("PAID");
        let rows: Vec<&str> = b.lines().collect();
        assert_eq!(rows.len(), 5);
        assert_eq!(rows[0], "████   ███  █████ ████");
        assert!(
            banner("UNDERPAID")
                .lines()
                .all(|l| l.chars().count() <= 9 * 6)
        );
    }

    #[test]
    fn the_qr_code_is_drawn_in_half_blocks() {
        let qr = render_qr("ethereum:0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913@8453/transfer?address=0xE006Ca5D3c7c0839CB239C6f624f36B986F56B70&uint256=4500000").unwrap();
        let lines: Vec<&str> = qr.lines().collect();
        assert!(lines.len() > 15, "{qr}");
        assert!(
            qr.contains('█') && (qr.contains('▀') || qr.contains('▄')),
            "{qr}"
        );
        // Square: one module per column, two per line.
        assert_eq!(lines[0].chars().count().div_ceil(2), lines.len());
    }
}
