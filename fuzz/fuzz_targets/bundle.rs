//! A bundle file as it arrives from a download or a transfer: the tar
//! reader of `unpack` (members, links, paths), then the manifest parser and
//! the GGUF pre-check on what it unpacked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A directory in memory (tmpfs) per process: unpacking writes files.
    let root = std::env::temp_dir().join(format!("slmd-fuzz-bundle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let out = root.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let file = root.join("b.slmdb");
    std::fs::write(&file, data).unwrap();
    if slmd::bundle::unpack(&file, &out).is_ok() {
        // Whatever unpacked stays inside `out`.
        for e in std::fs::read_dir(&out).unwrap().flatten() {
            assert!(e.file_type().unwrap().is_file());
        }
        if let Ok(text) = std::fs::read_to_string(out.join(slmd::bundle::MANIFEST)) {
            if let Ok(m) = slmd::bundle::BundleManifest::parse(&text) {
                let _ = slmd::bundle::Version::parse(&m.version);
            }
        }
        let _ = slmd::bundle::check_gguf_header(&out.join(slmd::bundle::MODEL));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = slmd::bundle::BundleManifest::parse(text);
        let _ = slmd::bundle::Version::parse(text);
    }
});
