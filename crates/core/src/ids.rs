//! Message ids: the one a JSON payload brings, or one derived from the
//! message itself so a redelivery gets the same id.

use sha2::{Digest, Sha256};

/// An id for a message that brought none: a hash of its topic and payload,
/// so a redelivery of the same message gets the same id.
pub fn derived_id(topic: &str, payload: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(topic.as_bytes());
    h.update([0]);
    h.update(payload);
    format!("sha256:{}", &hex::encode(h.finalize())[..16])
}

/// The id to report for a payload, even one that fails to parse.
pub fn id_of(topic: &str, payload: &[u8]) -> String {
    own_id(payload).unwrap_or_else(|| derived_id(topic, payload))
}

/// The id a JSON payload brings, if any.
pub fn own_id(payload: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| json_id(&v))
}

pub fn json_id(v: &serde_json::Value) -> Option<String> {
    match v.get("id")? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}
