//! Logging: to the journal (with structured fields) when stderr is connected
//! to journald, else readable lines on stderr.

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
        let _ = writeln!(
            std::io::stderr().lock(),
            "{secs:.3} {:5} {}: {}",
            record.level(),
            record.target(),
            record.args()
        );
    }

    fn flush(&self) {}
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
