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
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let _ = writeln!(std::io::stderr().lock(), "{secs:.3} {}", line(record));
    }

    fn flush(&self) {}
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

/// Installs the logger once; later calls only change the level.
pub fn init(level: log::LevelFilter) {
    let journal = systemd_journal_logger::connected_to_journal();
    let installed = if journal {
        systemd_journal_logger::JournalLog::new()
            .map(|j| j.with_syslog_identifier("slmd".into()).install().is_ok())
            .unwrap_or(false)
    } else {
        log::set_boxed_logger(Box::new(Stderr)).is_ok()
    };
    if installed || journal {
        log::set_max_level(level);
    }
    // llama.cpp is chatty at info; keep its lines to warnings unless debugging.
    if level < log::LevelFilter::Debug {
        LLAMA_QUIET.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

pub static LLAMA_QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[cfg(test)]
mod tests {
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
