//! Requests on the model control topic (`slmd/<client_id>/model/update`).
//!
//! ```text
//! {"source": "https://host/smol-2.slmdb", "activate": true, "force": false}
//! {"transfer": {"id": "t1", "size": N, "sha256": "<file>", "chunk_size": 262144}}
//! {"chunk": {"transfer": "t1", "index": 0, "sha256": "<chunk>", "data": "<base64>"}}
//! ```
//!
//! With `[updates] require_signed_requests`, an install or a transfer
//! announcement must come wrapped as `{"signed": "<the request's JSON
//! text>", "signature": "<minisign signature of that text>"}`, signed by a
//! trusted key like bundles. Chunks need no signature: each is checked
//! against its sha256, the file against the signed announcement's sha256,
//! and the bundle against its own signature.

use serde_json::Value;

use super::transfer::{Chunk, Start};
use super::{sign, BundleError, Trust};

#[derive(Debug)]
pub enum Request {
    Install {
        source: String,
        activate: bool,
        force: bool,
    },
    Start(Start),
    Chunk(Chunk),
}

fn bad(m: impl Into<String>) -> BundleError {
    BundleError::BadRequest(m.into())
}

/// Parses a control payload, checking its signature when required.
pub fn parse(payload: &[u8], trust: &Trust, require_signed: bool) -> Result<Request, BundleError> {
    let outer: Value =
        serde_json::from_slice(payload).map_err(|e| bad(format!("not JSON: {e}")))?;
    let (inner, signed) = match (outer.get("signed"), outer.get("signature")) {
        (Some(Value::String(text)), Some(Value::String(sig))) => {
            sign::verify(text.as_bytes(), sig, &trust.keys)?;
            let inner = serde_json::from_str(text).map_err(|e| bad(format!("signed: {e}")))?;
            (inner, true)
        }
        (None, None) => (outer, false),
        _ => return Err(bad("\"signed\" and \"signature\" go together, as strings")),
    };
    let field = |k: &str| inner.get(k).cloned();
    if let Some(c) = field("chunk") {
        let c: Chunk = serde_json::from_value(c).map_err(|e| bad(format!("chunk: {e}")))?;
        return Ok(Request::Chunk(c));
    }
    if require_signed && !signed {
        return Err(BundleError::Unsigned);
    }
    if let Some(t) = field("transfer") {
        let t: Start = serde_json::from_value(t).map_err(|e| bad(format!("transfer: {e}")))?;
        return Ok(Request::Start(t));
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Install {
        source: String,
        #[serde(default = "yes")]
        activate: bool,
        #[serde(default)]
        force: bool,
    }
    fn yes() -> bool {
        true
    }
    let i: Install = serde_json::from_value(inner)
        .map_err(|e| bad(format!("expected source, transfer or chunk: {e}")))?;
    Ok(Request::Install {
        source: i.source,
        activate: i.activate,
        force: i.force,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trust() -> (Trust, std::path::PathBuf, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (public, _, secret) = sign::keygen(None).unwrap();
        let key = dir.path().join("k.key");
        std::fs::write(&key, secret).unwrap();
        let t = Trust {
            keys: vec![public],
            allow_unsigned: false,
        };
        (t, key, dir)
    }

    #[test]
    fn signed_requests_verify_and_unsigned_ones_are_refused_when_required() {
        let (t, key, _dir) = trust();
        let text = r#"{"source": "/tmp/b.slmdb", "activate": false}"#;
        let sig = sign::sign(text.as_bytes(), &key, None).unwrap();
        let wrapped = serde_json::json!({"signed": text, "signature": sig}).to_string();
        match parse(wrapped.as_bytes(), &t, true).unwrap() {
            Request::Install {
                source, activate, ..
            } => assert_eq!((source.as_str(), activate), ("/tmp/b.slmdb", false)),
            other => panic!("{other:?}"),
        }
        let forged = wrapped.replace("b.slmdb", "c.slmdb");
        assert_eq!(
            parse(forged.as_bytes(), &t, true).unwrap_err().reason(),
            "bad_signature"
        );
        assert_eq!(
            parse(text.as_bytes(), &t, true).unwrap_err().reason(),
            "unsigned"
        );
        assert!(parse(text.as_bytes(), &t, false).is_ok());
        let chunk = r#"{"chunk": {"transfer": "t", "index": 0, "sha256": "00", "data": ""}}"#;
        assert!(matches!(
            parse(chunk.as_bytes(), &t, true),
            Ok(Request::Chunk(_))
        ));
        assert_eq!(
            parse(b"{\"sorce\": 1}", &t, false).unwrap_err().reason(),
            "bad_request"
        );
        assert_eq!(
            parse(b"\xff", &t, false).unwrap_err().reason(),
            "bad_request"
        );
    }
}
