//! Model control requests: installs, transfer announcements and chunks,
//! plain or signed (`slmd::fuzzing::control`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    slmd::fuzzing::control(data);
});
