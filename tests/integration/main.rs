//! slmd's integration tests: one binary, real parts (mosquitto, the slmd
//! binary, a GGUF model through llama.cpp).

mod cli;
mod daemon;
mod escalation;
mod factory;
mod faults;
mod mqtt5;
mod packaging;
mod packs;
mod proxy;
mod security;
mod systemd;
mod updates;
mod util;
