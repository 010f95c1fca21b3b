//! The entry points of the fuzz targets (`fuzz/`, cargo-fuzz): every parser
//! that sees bytes from the network or from a bundle, fed as an attacker
//! would. Each returns whether its main parser accepted the input. The unit
//! test below replays the committed corpus (`fuzz/corpus/<target>`) on
//! stable Rust in every test run, so an input that once crashed a parser
//! stays checked without a fuzzing toolchain.

use std::path::Path;

use crate::bundle::control::{parse, unwrap_signed, Rules};
use crate::bundle::{self, Trust};
use crate::config::{Limits, Protocol};

/// The fuzzers' public key: the corpus's `signed` inputs are signed with
/// its secret half, so the parsers behind the signature are reached too.
pub const KEY: &str = "RWQHwrn8WD39JnVhtTlQ78EQlz8l2vGqbbVmOr0ArprZcKOTqJsTWDVK";

fn rules_of(trust: &Trust, require_signed: bool) -> Rules<'_> {
    Rules {
        trust,
        require_signed,
        device: "kitchen-pi",
    }
}

fn trust() -> Trust {
    Trust {
        keys: vec![KEY.to_owned()],
        allow_unsigned: false,
    }
}

/// Task input on a task topic: slmd JSON or plain text, a Hermes
/// `nlu/query`, the id helpers of dedup and the Hermes error shape.
/// Accepted: some protocol parses it.
pub fn payload(data: &[u8]) -> bool {
    let limits = Limits::default();
    let topic = "home/kitchen/command";
    let mut accepted = false;
    for protocol in [Protocol::Slmd, Protocol::Hermes] {
        accepted |= crate::payload::parse(protocol, topic, data, &limits).is_ok();
    }
    let _ = crate::payload::own_id(data);
    let _ = crate::payload::id_of(topic, data);
    let session = crate::hermes::Session::of_payload(data);
    let _ = crate::hermes::error(&session, "bad_request", "fuzz");
    accepted
}

/// A Hermes entity injection, plain or signed. Accepted: a signed request
/// that parses.
pub fn injection(data: &[u8]) -> bool {
    let _ = crate::injection::parse(data);
    let trust = trust();
    let signed = |require_signed| {
        unwrap_signed(data, &rules_of(&trust, require_signed))
            .is_ok_and(|(inner, _seq)| crate::injection::parse(&inner).is_ok())
    };
    signed(false);
    signed(true)
}

/// A model control request (install, transfer announcement or chunk),
/// plain or signed, under both signing rules. Accepted: under the default
/// rule (signed requests only; chunks are checked against their signed
/// announcement later).
pub fn control(data: &[u8]) -> bool {
    let trust = trust();
    let _ = parse(data, &rules_of(&trust, false));
    parse(data, &rules_of(&trust, true)).is_ok()
}

/// A bundle file: the tar reader (members, links, paths), then the
/// manifest, version and GGUF checks on what it unpacked. Accepted: it
/// unpacked. Works in a directory of its own under `scratch`.
pub fn bundle(data: &[u8], scratch: &Path) -> bool {
    let _ = std::fs::remove_dir_all(scratch);
    let out = scratch.join("out");
    std::fs::create_dir_all(&out).expect("a scratch directory");
    let file = scratch.join("b.slmdb");
    std::fs::write(&file, data).expect("a scratch file");
    let unpacked = bundle::unpack(&file, &out).is_ok();
    if unpacked {
        // Whatever unpacked stays inside `out`, as plain files.
        for e in std::fs::read_dir(&out).expect("unpacked").flatten() {
            assert!(e.file_type().expect("a file type").is_file());
        }
        if let Ok(text) = std::fs::read_to_string(out.join(bundle::MANIFEST)) {
            if let Ok(m) = bundle::BundleManifest::parse(&text) {
                let _ = bundle::Version::parse(&m.version);
            }
        }
        let _ = bundle::check_gguf_header(&out.join(bundle::MODEL));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = bundle::BundleManifest::parse(text);
        let _ = bundle::Version::parse(text);
    }
    unpacked
}

/// The GGUF pre-check that runs before llama.cpp opens a model. Accepted:
/// the header is sane.
pub fn gguf(data: &[u8], scratch: &Path) -> bool {
    std::fs::write(scratch, data).expect("a scratch file");
    bundle::check_gguf_header(scratch).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input of `target`'s corpus, by file name.
    fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        let mut out: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .flatten()
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                (name, std::fs::read(e.path()).unwrap())
            })
            .collect();
        out.sort();
        out
    }

    /// Replays `target`'s corpus; returns the names of the inputs its
    /// parser accepted.
    fn replay(target: &str, run: impl Fn(&[u8]) -> bool) -> Vec<String> {
        let inputs = corpus(target);
        assert!(!inputs.is_empty(), "the {target} corpus is empty");
        inputs
            .into_iter()
            .filter(|(_, data)| run(data))
            .map(|(name, _)| name)
            .collect()
    }

    #[test]
    fn the_fuzz_corpus_replays_with_the_expected_verdicts() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            replay("payload", payload),
            ["context", "hermes", "json", "plain"]
        );
        // Only signed requests pass the default rules; the input that once
        // crashed minisign (a short global signature) is refused.
        assert_eq!(replay("injection", injection), ["signed"]);
        // A chunk needs no signature of its own: its transfer's signed
        // announcement pins every chunk's hash.
        assert_eq!(replay("control", control), ["chunk", "signed"]);
        assert_eq!(
            replay("bundle", |d| bundle(d, &dir.path().join("b"))),
            ["good"]
        );
        assert_eq!(
            replay("gguf", |d| gguf(d, &dir.path().join("g"))),
            ["header-v3"]
        );
    }
}
