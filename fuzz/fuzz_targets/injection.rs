//! Hermes entity injection requests, signed or not
//! (`slmd::fuzzing::injection`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    slmd::fuzzing::injection(data);
});
