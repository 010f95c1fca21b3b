//! Task input as it arrives on a task topic (`slmd::fuzzing::payload`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    slmd::fuzzing::payload(data);
});
