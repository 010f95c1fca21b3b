//! Task input as it arrives on a task topic: plain text, slmd JSON, Hermes
//! `nlu/query` (with session, intent filter, context), and the id helpers
//! used for dedup.
#![no_main]

use libfuzzer_sys::fuzz_target;
use slmd::config::{Limits, Protocol};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    for protocol in [Protocol::Slmd, Protocol::Hermes] {
        let _ = slmd::payload::parse(protocol, "home/kitchen/command", data, &limits);
    }
    let _ = slmd::payload::own_id(data);
    let _ = slmd::payload::id_of("home/kitchen/command", data);
    let session = slmd::hermes::Session::of_payload(data);
    let _ = slmd::hermes::error(&session, "bad_request", "fuzz");
});
