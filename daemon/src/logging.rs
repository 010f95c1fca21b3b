//! Logging: to the journal when stderr is connected to journald, else
//! readable lines on stderr.
//!
//! Records about a message carry structured fields (log's key-values):
//! `task`, `msg_id`, `topic`, `label`, `confidence`, `latency_ms`,
//! `model_sha256`, `reason`. In the journal they are fields of their own
//! (`TASK`, `MSG_ID`, ...), so `journalctl -u slmd TASK=home` or
//! `journalctl -u slmd REASON=invalid_json` select by them; on stderr they
//! follow the message as `key=value`.

use std::io::Write;

struct Stderr;

impl log::Log for Stderr {
    fn enabled(&self, m: &log::Metadata) -> bool {
        // `tracing` forwards span enter/exit records; they are noise here.
        m.level() <= log::max_level()
            && !m.target().starts_with("tracing::")
            && !(m.target().starts_with("llama")
                && m.level() > log::Level::Warn
                && LLAMA_QUIET.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let _ = writeln!(
            std::io::stderr().lock(),
            "{} {}",
            rfc3339(since_epoch),
            line(record)
        );
    }

    fn flush(&self) {}
}

/// The UTC time `since_epoch` after 1970-01-01 as RFC 3339 with
/// milliseconds: `2026-12-07T14:05:09.042Z`.
fn rfc3339(since_epoch: std::time::Duration) -> String {
    let secs = since_epoch.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian; eras of
    // 400 years starting on 1 March).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}

/// Level, target, message, then the record's key-values as `key=value`.
fn line(record: &log::Record) -> String {
    struct Pairs(String);
    impl<'kvs> log::kv::VisitSource<'kvs> for Pairs {
        fn visit_pair(
            &mut self,
            key: log::kv::Key<'kvs>,
            value: log::kv::Value<'kvs>,
        ) -> Result<(), log::kv::Error> {
            use std::fmt::Write;
            let _ = write!(self.0, " {key}={value}");
            Ok(())
        }
    }
    let mut pairs = Pairs(String::new());
    let _ = record.key_values().visit(&mut pairs);
    format!(
        "{:5} {}: {}{}",
        record.level(),
        record.target(),
        record.args(),
        pairs.0
    )
}

/// Installs the logger (the journal when stderr is connected to it, else
/// stderr); called once, by `main`, before anything logs.
pub fn init(level: log::LevelFilter) {
    let journal = systemd_journal_logger::connected_to_journal();
    if journal {
        if let Ok(j) = systemd_journal_logger::JournalLog::new() {
            let _ = j.with_syslog_identifier("slmd".into()).install();
        }
    } else {
        let _ = log::set_boxed_logger(Box::new(Stderr));
    }
    set_level(level);
}

/// The most detailed level logged from now on (a config's `[log] level`).
pub fn set_level(level: log::LevelFilter) {
    log::set_max_level(level);
    // llama.cpp is chatty at info; keep its lines to warnings unless debugging.
    let quiet = level < log::LevelFilter::Debug;
    LLAMA_QUIET.store(quiet, std::sync::atomic::Ordering::Relaxed);
}

pub static LLAMA_QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        use std::time::Duration;
        let at = |secs: u64, ms: u64| {
            super::rfc3339(Duration::from_secs(secs) + Duration::from_millis(ms))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        // `date -u -d @1796652309` and a leap day.
        assert_eq!(at(1_796_652_309, 42), "2026-12-07T14:05:09.042Z");
        assert_eq!(at(951_782_400, 999), "2000-02-29T00:00:00.999Z");
        assert_eq!(at(4_107_542_399, 0), "2100-02-28T23:59:59.000Z");
    }

    #[test]
    fn key_values_follow_the_message() {
        let line = super::line(
            &log::Record::builder()
                .level(log::Level::Info)
                .target("slmd::router")
                .args(format_args!("result"))
                .key_values(&[("task", "home"), ("msg_id", "7")])
                .build(),
        );
        assert_eq!(line, "INFO  slmd::router: result task=home msg_id=7");
    }
}
