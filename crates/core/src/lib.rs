//! What every stage of slmd shares, and nothing else: it depends on no
//! other slmd crate.
//!
//! - [`examples`]: labelled rows and the examples a task learns from.
//! - [`fault`]: the test suite's crash and stall hooks (a cargo feature).
//! - [`folds`]: stratified cross-validation folds (head calibration, eval).
//! - [`fsutil`]: the one way slmd replaces a file durably.
//! - [`ids`]: message ids, brought or derived.
//! - [`topic`]: MQTT topic names and filters.

pub mod examples;
pub mod fault;
pub mod folds;
pub mod fsutil;
pub mod ids;
pub mod topic;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
