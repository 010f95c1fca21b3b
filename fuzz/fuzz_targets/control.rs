//! Model control requests: installs, transfer announcements and chunks,
//! plain or wrapped with a signature (parsed, signature checked, the force
//! and device rules applied).
#![no_main]

use libfuzzer_sys::fuzz_target;
use slmd::bundle::control::{parse, Rules};
use slmd::bundle::Trust;

/// The fuzzer's key (corpus/control/signed is signed with it).
const KEY: &str = "RWQHwrn8WD39JnVhtTlQ78EQlz8l2vGqbbVmOr0ArprZcKOTqJsTWDVK";

fuzz_target!(|data: &[u8]| {
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
        let _ = parse(data, &rules);
    }
});
