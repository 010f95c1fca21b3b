//! Proof that the broker link's loop is turning (the watchdog reads it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use slmd_core::now_ms;

/// A liveness beat: the MQTT loop stamps it every time round; the watchdog
/// reads its age.
#[derive(Default)]
pub struct Heartbeat(AtomicU64);

impl Heartbeat {
    pub fn beat(&self) {
        self.0.store(now_ms(), Ordering::Relaxed);
    }

    pub fn age(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.0.load(Ordering::Relaxed)))
    }
}
