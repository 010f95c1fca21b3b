//! Hermes entity injection requests (`hermes/injection/perform`), signed
//! or not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use slmd::bundle::control::{unwrap_signed, Rules};
use slmd::bundle::Trust;

/// A key generated for the fuzzer; the corpus holds a request signed with
/// it (corpus/*/signed), so the inner parsers are reached too.
const KEY: &str = "RWQHwrn8WD39JnVhtTlQ78EQlz8l2vGqbbVmOr0ArprZcKOTqJsTWDVK";

fuzz_target!(|data: &[u8]| {
    let _ = slmd::injection::parse(data);
    let trust = Trust {
        keys: vec![KEY.to_owned()],
        allow_unsigned: false,
    };
    for require_signed in [false, true] {
        let rules = Rules {
            trust: &trust,
            require_signed,
            device: "kitchen-pi",
        };
        if let Ok((inner, _seq)) = unwrap_signed(data, &rules) {
            let _ = slmd::injection::parse(&inner);
        }
    }
});
