//! The GGUF pre-check that runs before llama.cpp opens a model.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let file = std::env::temp_dir().join(format!("slmd-fuzz-gguf-{}", std::process::id()));
    std::fs::write(&file, data).unwrap();
    let _ = slmd::bundle::check_gguf_header(&file);
});
