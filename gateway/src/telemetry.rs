//! The tracing subscriber: plain or JSON lines on stdout, for journald. Only the binary installs it.
//!
//! Under systemd (`$JOURNAL_STREAM` set, or `log.format = "journald"`), every line starts with its
//! syslog priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug), which journald reads
//! (`SyslogLevelPrefix=`, on by default) and strips: `journalctl -u posgate -p err` then shows the
//! errors. The journal keeps its own timestamps, so those lines carry none.
//!
//! The level (`log.level`) can change at runtime: [`LogReload::set_level`], called on SIGHUP.
//!
//! Warnings a client can cause at will (a refused webhook, an unreadable ack, a refused MQTT
//! client) go through a [`Throttle`]: at most one line a second per kind, saying how many were left
//! out, so a flood cannot drown the lines that matter (journald's rate limit would drop those
//! too). The metrics keep the full counts; errors are never throttled.

use std::fmt;
use std::io::IsTerminal;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::{LogConfig, LogFormat};

/// Changes the log level of the installed subscriber.
#[derive(Clone)]
pub struct LogReload(reload::Handle<EnvFilter, Registry>);

impl LogReload {
    /// Applies `level` (a `tracing_subscriber::EnvFilter` directive, validated by the config).
    ///
    /// # Errors
    /// When the directive does not parse or the subscriber is gone.
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        let filter = filter(level).map_err(|e| e.to_string())?;
        self.0.reload(filter).map_err(|e| e.to_string())
    }
}

/// rmqtt's session module warns once per refused SUBSCRIBE (too many subscriptions, a bad filter)
/// without any limit: a terminal could flood the log with them (the attack bench counted 19,992
/// lines for 19,992 refusals). posgate counts and logs what it refuses itself, throttled; rmqtt's
/// own lines there are shown from `error` up unless `log.level` names `rmqtt::session`.
const QUIET_TARGETS: &str = "rmqtt::session=error";

/// The filter for `level`, with [`QUIET_TARGETS`] unless `level` names them.
fn filter(level: &str) -> Result<EnvFilter, tracing_subscriber::filter::ParseError> {
    let filter = EnvFilter::try_new(level)?;
    if level.contains("rmqtt::session") {
        return Ok(filter);
    }
    Ok(filter.add_directive(QUIET_TARGETS.parse()?))
}

/// Installs the global subscriber; `journal`: stdout goes to journald (`$JOURNAL_STREAM`). A
/// second call (tests) installs nothing and returns `None`.
pub fn init(log: &LogConfig, journal: bool) -> Option<LogReload> {
    let filter = filter(&log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let prefixed = journal || log.format == LogFormat::Journald;
    let ansi = !prefixed && std::io::stdout().is_terminal();
    let layer: Box<dyn Layer<_> + Send + Sync> = match (log.format, prefixed) {
        (LogFormat::Json, false) => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(std::io::stdout)
            .boxed(),
        (LogFormat::Json, true) => tracing_subscriber::fmt::layer()
            .event_format(Prioritised(
                tracing_subscriber::fmt::format()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false),
            ))
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .with_writer(std::io::stdout)
            .boxed(),
        (LogFormat::Plain | LogFormat::Journald, true) => tracing_subscriber::fmt::layer()
            .event_format(Prioritised(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_ansi(false),
            ))
            .with_ansi(false)
            .with_writer(std::io::stdout)
            .boxed(),
        (LogFormat::Plain | LogFormat::Journald, false) => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stdout)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init()
        .ok()
        .map(|()| LogReload(handle))
}

/// At most one log line per `every` for one kind of warning; the next line says how many were
/// left out in between.
pub struct Throttle {
    every: std::time::Duration,
    last: std::sync::Mutex<Option<tokio::time::Instant>>,
    suppressed: std::sync::atomic::AtomicU64,
}

impl Throttle {
    /// One line per `every`.
    pub const fn new(every: std::time::Duration) -> Throttle {
        Throttle {
            every,
            last: std::sync::Mutex::new(None),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(left_out)` when a line may be written now (`left_out`: how many were not since the
    /// last one), `None` when this one is left out.
    pub fn allow(&self) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let now = tokio::time::Instant::now();
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|at| now.duration_since(at) < self.every) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// The syslog priority of a level, as journald reads it from the start of a line.
fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// A line format with its syslog priority in front (`<3>…`).
struct Prioritised<F>(F);

impl<S, N, F> FormatEvent<S, N> for Prioritised<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many events pass `level`'s filter, of a warning and an error from rmqtt's session
    /// module and a warning from posgate.
    fn passing(level: &str) -> usize {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tracing_subscriber::layer::SubscriberExt;
        struct Count(Arc<AtomicUsize>);
        impl<S: tracing::Subscriber> Layer<S> for Count {
            fn on_event(
                &self,
                _: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let count = Arc::new(AtomicUsize::new(0));
        let subscriber =
            Registry::default().with(Count(count.clone()).with_filter(filter(level).unwrap()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "rmqtt::session", "Subscribe failed, too many subscriptions");
            tracing::error!(target: "rmqtt::session", "an error");
            tracing::warn!(target: "posgate::broker", "subscribe refused");
        });
        count.load(Ordering::Relaxed)
    }

    /// rmqtt's per-SUBSCRIBE warnings are left out unless the level names them; errors pass.
    #[test]
    fn rmqtt_session_warnings_are_quiet_unless_asked_for() {
        assert_eq!(passing("info"), 2);
        assert_eq!(passing("debug"), 2);
        assert_eq!(passing("info,rmqtt::session=warn"), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttle_writes_one_line_a_period_and_counts_the_rest() {
        let throttle = Throttle::new(std::time::Duration::from_secs(1));
        assert_eq!(throttle.allow(), Some(0));
        for _ in 0..999 {
            assert_eq!(throttle.allow(), None);
        }
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        assert_eq!(throttle.allow(), Some(999));
        assert_eq!(throttle.allow(), None);
    }

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(priority(Level::ERROR), 3);
        assert_eq!(priority(Level::WARN), 4);
        assert_eq!(priority(Level::INFO), 6);
        assert_eq!(priority(Level::DEBUG), 7);
    }
}
