//! A bundle file as it arrives from a download or a transfer
//! (`slmd::fuzzing::bundle`), unpacked in a directory per process.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let scratch = std::env::temp_dir().join(format!("slmd-fuzz-bundle-{}", std::process::id()));
    slmd::fuzzing::bundle(data, &scratch);
});
