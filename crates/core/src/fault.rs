//! Fault injection for the test suite: a crash or a stall at a named point,
//! asked for through an environment variable. Compiled in only with the
//! `fault-hooks` feature, which the daemon's dev-dependencies enable (the
//! test build); in any other build every hook is a no-op.

/// Whether `var` is set to exactly `value`.
#[cfg(feature = "fault-hooks")]
fn asked(var: &str, value: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == value)
}

#[cfg(not(feature = "fault-hooks"))]
fn asked(_var: &str, _value: &str) -> bool {
    false
}

/// Kills the process with SIGKILL, as a power cut or a crash in C code
/// would, when `var` is `value`.
pub fn kill_if(var: &str, value: &str) {
    if asked(var, value) {
        eprintln!("{var}={value}: killing the process");
        // SAFETY: raise(2) with a valid signal number has no preconditions.
        unsafe {
            libc::raise(libc::SIGKILL);
        }
    }
}

/// Blocks the calling thread for an hour, as a wedged backend would, when
/// `var` is `value`.
pub fn stall_if(var: &str, value: &str) {
    if asked(var, value) {
        eprintln!("{var}={value}: stalling the thread");
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
