//! The GGUF pre-check that runs before llama.cpp opens a model
//! (`slmd::fuzzing::gguf`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let scratch = std::env::temp_dir().join(format!("slmd-fuzz-gguf-{}", std::process::id()));
    slmd::fuzzing::gguf(data, &scratch);
});
