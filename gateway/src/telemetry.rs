//! The tracing subscriber: plain or JSON lines on stdout, for journald. Only the binary installs it.
//!
//! Under systemd (`$JOURNAL_STREAM` set, or `log.format = "journald"`), every line starts with its
//! syslog priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug), which journald reads
//! (`SyslogLevelPrefix=`, on by default) and strips: `journalctl -u posgate -p err` then shows the
//! errors. The journal keeps its own timestamps, so those lines carry none.
//!
//! The level (`log.level`) can change at runtime: [`LogReload::set_level`], called on SIGHUP.

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
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        self.0.reload(filter).map_err(|e| e.to_string())
    }
}

/// Installs the global subscriber; `journal`: stdout goes to journald (`$JOURNAL_STREAM`). A
/// second call (tests) installs nothing and returns `None`.
pub fn init(log: &LogConfig, journal: bool) -> Option<LogReload> {
    let filter = EnvFilter::try_new(&log.level).unwrap_or_else(|_| EnvFilter::new("info"));
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

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(priority(Level::ERROR), 3);
        assert_eq!(priority(Level::WARN), 4);
        assert_eq!(priority(Level::INFO), 6);
        assert_eq!(priority(Level::DEBUG), 7);
    }
}
