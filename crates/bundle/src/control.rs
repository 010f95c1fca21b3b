//! Requests on the model control topic (`slmd/<client_id>/model/update`).
//!
//! ```text
//! {"source": "https://host/smol-2.slmdb", "activate": true, "size": N}
//! {"transfer": {"id": "t1", "size": N, "sha256": "<file>", "chunk_size": 262144}}
//! {"chunk": {"transfer": "t1", "index": 0, "sha256": "<chunk>", "data": "<base64>"}}
//! ```
//!
//! With `[updates] require_signed_requests` (the default), an install or a
//! transfer announcement must come wrapped as `{"signed": "<the request's
//! JSON text>", "signature": "<minisign signature of that text>"}`, signed
//! by a trusted key like bundles. Chunks need no signature: each is checked
//! against its sha256, the file against the signed announcement's sha256,
//! and the bundle against its own signature.
//!
//! Replay. A signed request stays valid forever, so anyone who saw one can
//! send it again. Without `force` that does no harm: the version rule (no
//! older version than the active one) holds for every install, so an old
//! request cannot bring an old model back. `force` is honoured only in a
//! signed request that also names this device (`"device": "<client_id>"`)
//! and carries a sequence number (`"seq": N`) above every one this device
//! accepted before; the highest is kept in `<state>/bundles/control-seq`.
//! Any signed request may carry `seq` and `device`; when it does they are
//! checked the same way.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::Value;

use super::transfer::{Chunk, Start};
use super::{io_err, sign, BundleError, Trust};

#[derive(Debug)]
pub enum Request {
    Install {
        source: String,
        activate: bool,
        force: bool,
        /// The bundle's size as the sender declares it: a download is cut
        /// off beyond it.
        size: Option<u64>,
    },
    Start(Start),
    Chunk(Chunk),
}

/// A parsed request, and what its signature covered.
#[derive(Debug)]
pub struct Parsed {
    pub request: Request,
    pub signed: bool,
    /// The signed request's sequence number, if it has one.
    pub seq: Option<u64>,
}

/// What a control request is checked against.
pub struct Rules<'a> {
    pub trust: &'a Trust,
    pub require_signed: bool,
    /// This device's MQTT client id (a request's `device` must match it).
    pub device: &'a str,
}

fn bad(m: impl Into<String>) -> BundleError {
    BundleError::BadRequest(m.into())
}

/// Parses a control payload, checking its signature when required and
/// the rules for `force`.
pub fn parse(payload: &[u8], rules: &Rules) -> Result<Parsed, BundleError> {
    let outer: Value =
        serde_json::from_slice(payload).map_err(|e| bad(format!("not JSON: {e}")))?;
    let (inner, signed) = match (outer.get("signed"), outer.get("signature")) {
        (Some(Value::String(text)), Some(Value::String(sig))) => {
            sign::verify(text.as_bytes(), sig, &rules.trust.keys)?;
            let inner = serde_json::from_str(text).map_err(|e| bad(format!("signed: {e}")))?;
            (inner, true)
        }
        (None, None) => (outer, false),
        _ => return Err(bad("\"signed\" and \"signature\" go together, as strings")),
    };
    if !inner.is_object() {
        return Err(bad("a request is a JSON object"));
    }
    if let Some(c) = inner.get("chunk") {
        let c: Chunk = serde_json::from_value(c.clone()).map_err(|e| bad(format!("chunk: {e}")))?;
        return Ok(Parsed {
            request: Request::Chunk(c),
            signed,
            seq: None,
        });
    }
    if rules.require_signed && !signed {
        return Err(BundleError::UnsignedRequest);
    }
    let seq = match inner.get("seq") {
        None => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| bad("seq: a number >= 0"))?),
    };
    let device = match inner.get("device") {
        None => None,
        Some(Value::String(d)) => Some(d.clone()),
        Some(_) => return Err(bad("device: a string")),
    };
    if let Some(d) = &device {
        if d != rules.device {
            return Err(BundleError::NotAllowed(format!(
                "the request is for device {d:?}, this is {:?}",
                rules.device
            )));
        }
    }
    let request = if let Some(t) = inner.get("transfer") {
        let extra = inner
            .as_object()
            .into_iter()
            .flat_map(|o| o.keys())
            .find(|k| !["transfer", "seq", "device"].contains(&k.as_str()));
        if let Some(k) = extra {
            return Err(bad(format!("unknown field {k:?} beside transfer")));
        }
        let t: Start =
            serde_json::from_value(t.clone()).map_err(|e| bad(format!("transfer: {e}")))?;
        Request::Start(t)
    } else {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Install {
            source: String,
            #[serde(default = "yes")]
            activate: bool,
            #[serde(default)]
            force: bool,
            size: Option<u64>,
            #[allow(dead_code)]
            seq: Option<u64>,
            #[allow(dead_code)]
            device: Option<String>,
        }
        fn yes() -> bool {
            true
        }
        let i: Install = serde_json::from_value(inner)
            .map_err(|e| bad(format!("expected source, transfer or chunk: {e}")))?;
        Request::Install {
            source: i.source,
            activate: i.activate,
            force: i.force,
            size: i.size,
        }
    };
    let force = match &request {
        Request::Install { force, .. } => *force,
        Request::Start(s) => s.force,
        Request::Chunk(_) => false,
    };
    if force {
        if !signed {
            return Err(BundleError::NotAllowed(
                "force (installing an older version) is honoured only in a signed request".into(),
            ));
        }
        if seq.is_none() || device.is_none() {
            return Err(BundleError::NotAllowed(
                "a forced request must carry \"seq\" and \"device\" so that it cannot be \
                 replayed"
                    .into(),
            ));
        }
    }
    Ok(Parsed {
        request,
        signed,
        seq,
    })
}

/// For requests other than model control (entity injection): checks the
/// signature wrapper (required when `rules.require_signed`), and the
/// signed text's `device`; returns the request's bytes and its `seq`.
pub fn unwrap_signed(payload: &[u8], rules: &Rules) -> Result<(Vec<u8>, Option<u64>), BundleError> {
    let outer: Value =
        serde_json::from_slice(payload).map_err(|e| bad(format!("not JSON: {e}")))?;
    let text = match (outer.get("signed"), outer.get("signature")) {
        (Some(Value::String(text)), Some(Value::String(sig))) => {
            sign::verify(text.as_bytes(), sig, &rules.trust.keys)?;
            text.clone()
        }
        (None, None) if !rules.require_signed => return Ok((payload.to_vec(), None)),
        (None, None) => return Err(BundleError::UnsignedRequest),
        _ => return Err(bad("\"signed\" and \"signature\" go together, as strings")),
    };
    let inner: Value = serde_json::from_str(&text).map_err(|e| bad(format!("signed: {e}")))?;
    match inner.get("device") {
        None => {}
        Some(Value::String(d)) if d == rules.device => {}
        Some(d) => {
            return Err(BundleError::NotAllowed(format!(
                "the request is for device {d}, this is {:?}",
                rules.device
            )))
        }
    }
    let seq = match inner.get("seq") {
        None => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| bad("seq: a number >= 0"))?),
    };
    Ok((text.into_bytes(), seq))
}

/// The highest sequence number of a signed request this device accepted,
/// kept across restarts.
pub struct Sequence {
    path: PathBuf,
    last: Mutex<u64>,
}

impl Sequence {
    pub fn open(bundles_dir: &Path) -> Result<Sequence, BundleError> {
        let path = bundles_dir.join("control-seq");
        let last = match std::fs::read_to_string(&path) {
            Ok(t) => t.trim().parse().unwrap_or(0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err(format!("reading {}", path.display()), e)),
        };
        Ok(Sequence {
            path,
            last: Mutex::new(last),
        })
    }

    pub fn last(&self) -> u64 {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accepts `seq` if it is above every one accepted before, and keeps it
    /// (durably) before the request is acted on.
    pub fn advance(&self, seq: u64) -> Result<(), BundleError> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if seq <= *last {
            return Err(BundleError::Replayed { seq, last: *last });
        }
        slmd_core::fsutil::write_atomic(&self.path, seq.to_string().as_bytes())
            .map_err(|e| io_err(format!("writing {}", self.path.display()), e))?;
        *last = seq;
        Ok(())
    }
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

    fn sign_it(key: &std::path::Path, text: &str) -> String {
        let sig = sign::sign(text.as_bytes(), key, None).unwrap();
        serde_json::json!({"signed": text, "signature": sig}).to_string()
    }

    fn rules(t: &Trust, require_signed: bool) -> Rules<'_> {
        Rules {
            trust: t,
            require_signed,
            device: "dev-1",
        }
    }

    #[test]
    fn signed_requests_verify_and_unsigned_ones_are_refused_when_required() {
        let (t, key, _dir) = trust();
        let text = r#"{"source": "/tmp/b.slmdb", "activate": false}"#;
        let wrapped = sign_it(&key, text);
        match parse(wrapped.as_bytes(), &rules(&t, true)).unwrap().request {
            Request::Install {
                source, activate, ..
            } => assert_eq!((source.as_str(), activate), ("/tmp/b.slmdb", false)),
            other => panic!("{other:?}"),
        }
        let forged = wrapped.replace("b.slmdb", "c.slmdb");
        let reason = |p: &[u8], r: &Rules| parse(p, r).unwrap_err().reason();
        assert_eq!(reason(forged.as_bytes(), &rules(&t, true)), "bad_signature");
        assert_eq!(reason(text.as_bytes(), &rules(&t, true)), "unsigned");
        assert!(parse(text.as_bytes(), &rules(&t, false)).is_ok());
        let chunk = r#"{"chunk": {"transfer": "t", "index": 0, "sha256": "00", "data": ""}}"#;
        assert!(matches!(
            parse(chunk.as_bytes(), &rules(&t, true)).unwrap().request,
            Request::Chunk(_)
        ));
        assert_eq!(reason(b"{\"sorce\": 1}", &rules(&t, false)), "bad_request");
        assert_eq!(reason(b"\xff", &rules(&t, false)), "bad_request");
        assert_eq!(reason(b"[1]", &rules(&t, false)), "bad_request");
    }

    #[test]
    fn force_needs_a_signed_request_for_this_device_with_a_sequence_number() {
        let (t, key, dir) = trust();
        let r = rules(&t, false);
        let reason = |p: &str| parse(p.as_bytes(), &r).unwrap_err().reason();
        // Unsigned: refused even where unsigned requests are accepted.
        let plain = r#"{"source": "/b", "force": true}"#;
        assert_eq!(reason(plain), "not_allowed");
        let transfer = r#"{"transfer": {"id": "t", "size": 1, "sha256": "00", "chunk_size": 1024, "force": true}}"#;
        assert_eq!(reason(transfer), "not_allowed");
        // Signed but replayable (no seq or no device): refused.
        assert_eq!(reason(&sign_it(&key, plain)), "not_allowed");
        let no_device = r#"{"source": "/b", "force": true, "seq": 5}"#;
        assert_eq!(reason(&sign_it(&key, no_device)), "not_allowed");
        let other = r#"{"source": "/b", "force": true, "seq": 5, "device": "dev-2"}"#;
        assert_eq!(reason(&sign_it(&key, other)), "not_allowed");
        let ok = r#"{"source": "/b", "force": true, "seq": 5, "device": "dev-1"}"#;
        let p = parse(sign_it(&key, ok).as_bytes(), &r).unwrap();
        assert_eq!((p.signed, p.seq), (true, Some(5)));
        // The sequence only goes up, also across a reopen.
        let seq = Sequence::open(dir.path()).unwrap();
        seq.advance(5).unwrap();
        assert_eq!(seq.advance(5).unwrap_err().reason(), "replayed");
        let seq = Sequence::open(dir.path()).unwrap();
        assert_eq!(seq.last(), 5);
        assert_eq!(seq.advance(4).unwrap_err().reason(), "replayed");
        seq.advance(6).unwrap();
    }

    #[test]
    fn unwrap_signed_checks_signature_and_device() {
        let (t, key, _dir) = trust();
        let text = r#"{"id": "i", "operations": [], "seq": 3}"#;
        let (inner, seq) = unwrap_signed(sign_it(&key, text).as_bytes(), &rules(&t, true)).unwrap();
        assert_eq!((inner.as_slice(), seq), (text.as_bytes(), Some(3)));
        let r = rules(&t, true);
        assert_eq!(
            unwrap_signed(text.as_bytes(), &r).unwrap_err().reason(),
            "unsigned"
        );
        let elsewhere = r#"{"id": "i", "operations": [], "device": "x"}"#;
        let e = unwrap_signed(sign_it(&key, elsewhere).as_bytes(), &r).unwrap_err();
        assert_eq!(e.reason(), "not_allowed");
        assert!(unwrap_signed(text.as_bytes(), &rules(&t, false)).is_ok());
    }
}
