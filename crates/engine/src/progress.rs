//! What a starting engine is doing: a line for systemd's `STATUS=` (the
//! daemon reads [`Progress::get`] while it waits) and, within a long step,
//! an info log line when a unit of it ends at least [`LOG_EVERY`] after the
//! last, with the time left.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest silence in the log while a start-up step runs.
pub const LOG_EVERY: Duration = Duration::from_secs(3);

/// The current start-up step, shared with whoever reports it.
#[derive(Debug, Clone, Default)]
pub struct Progress(Arc<Mutex<String>>);

impl Progress {
    /// The step being run, e.g. `task home: examples embedded 96/278, about
    /// 8 s left`; empty before the first.
    pub fn get(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Control characters (a task name may hold any) become spaces: the
    /// line goes into an sd_notify message, where a newline starts a field.
    pub(crate) fn set(&self, what: String) {
        let line = what.replace(char::is_control, " ");
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = line;
    }

    /// A step of `total` units, named `what` (`task home: examples
    /// embedded`).
    pub(crate) fn step(&self, what: String, total: usize) -> Step<'_> {
        let step = Step {
            progress: self,
            what,
            total,
            done: 0,
            started: Instant::now(),
            logged: Instant::now(),
        };
        self.set(step.line());
        step
    }
}

/// A counted start-up step; see [`Progress::step`].
pub(crate) struct Step<'p> {
    progress: &'p Progress,
    what: String,
    total: usize,
    done: usize,
    started: Instant,
    logged: Instant,
}

impl Step<'_> {
    /// `n` more units are done.
    pub(crate) fn advance(&mut self, n: usize) {
        self.done = (self.done + n).min(self.total);
        let line = self.line();
        if self.logged.elapsed() >= LOG_EVERY && self.done < self.total {
            log::info!("{line}");
            self.logged = Instant::now();
        }
        self.progress.set(line);
    }

    fn line(&self) -> String {
        let mut line = format!("{} {}/{}", self.what, self.done, self.total);
        if let Some(left) = time_left(self.started.elapsed(), self.done, self.total) {
            line.push_str(&format!(", about {} s left", left.as_secs().max(1)));
        }
        line
    }
}

/// The time the rest of a step should take at the rate so far; `None`
/// before anything is done or after everything is.
fn time_left(elapsed: Duration, done: usize, total: usize) -> Option<Duration> {
    if done == 0 || done >= total {
        return None;
    }
    Some(elapsed.mul_f64((total - done) as f64 / done as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_left_extrapolates_the_rate_so_far() {
        let t = |s| Duration::from_secs(s);
        assert_eq!(time_left(t(2), 1, 5), Some(t(8)));
        assert_eq!(time_left(t(2), 0, 5), None);
        assert_eq!(time_left(t(2), 5, 5), None);
    }

    #[test]
    fn the_shared_line_names_the_step_and_its_count() {
        let progress = Progress::default();
        let mut step = progress.step("task home: examples embedded".into(), 4);
        assert_eq!(progress.get(), "task home: examples embedded 0/4");
        step.advance(3);
        assert!(
            progress
                .get()
                .starts_with("task home: examples embedded 3/4, about "),
            "{}",
            progress.get()
        );
        step.advance(9);
        assert_eq!(progress.get(), "task home: examples embedded 4/4");
        // A task named with a newline cannot add a field to sd_notify.
        progress.step("task a\nREADY=1: fits".into(), 1);
        assert_eq!(progress.get(), "task a READY=1: fits 0/1");
    }
}
