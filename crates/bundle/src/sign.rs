//! minisign signatures of bundle manifests (Ed25519; the files are those
//! of the `minisign` tool, so `minisign -Sm manifest.toml` signs a manifest
//! and `minisign -G` makes a key pair slmd accepts).

use std::path::Path;

use minisign::{PublicKey, SecretKey, SignatureBox};

use super::BundleError;

/// Verifies `sig` (a `.minisig` file's text) over `data` against any of
/// `keys` (base64 public keys). Legacy (not prehashed) signatures are
/// refused, as minisign itself does by default.
pub fn verify(data: &[u8], sig: &str, keys: &[String]) -> Result<(), BundleError> {
    let bad = |m: String| BundleError::BadSignature(m);
    // minisign 0.10 panics on a global signature (the fourth line) that
    // is not 64 bytes (found by fuzz/control): refuse it before.
    use base64::Engine as _;
    let global = sig.lines().nth(3).map(|l| {
        base64::engine::general_purpose::STANDARD
            .decode(l.trim())
            .map(|b| b.len())
    });
    if !matches!(global, Some(Ok(64))) {
        return Err(bad("unreadable: no 64-byte global signature".into()));
    }
    let sig = SignatureBox::from_string(sig).map_err(|e| bad(format!("unreadable: {e}")))?;
    if keys.is_empty() {
        return Err(bad(
            "no trusted keys are configured ([updates] trusted_keys)".into(),
        ));
    }
    let mut last = String::new();
    for key in keys {
        let pk = PublicKey::from_base64(key.trim())
            .map_err(|e| bad(format!("trusted key {key:?}: {e}")))?;
        // A backstop: whatever else minisign may panic on is a refusal.
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            minisign::verify(&pk, &sig, std::io::Cursor::new(data), true, false, false)
        }));
        match checked {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "malformed signature".into(),
        }
    }
    Err(bad(format!("no trusted key verifies it ({last})")))
}

/// Signs `data` with the minisign secret key file `key`, decrypting it
/// with `password` when it is encrypted. Returns the `.minisig` text.
pub fn sign(data: &[u8], key: &Path, password: Option<String>) -> Result<String, BundleError> {
    let text = std::fs::read_to_string(key)
        .map_err(|e| super::io_err(format!("reading {}", key.display()), e))?;
    let sk_box = minisign::SecretKeyBox::from_string(&text)
        .map_err(|e| BundleError::BadSignature(format!("secret key {}: {e}", key.display())))?;
    let sk: SecretKey = match password {
        Some(p) => sk_box.into_secret_key(Some(p)),
        None => sk_box.into_unencrypted_secret_key(),
    }
    .map_err(|e| BundleError::BadSignature(format!("secret key {}: {e}", key.display())))?;
    let sig = minisign::sign(None, &sk, std::io::Cursor::new(data), None, None)
        .map_err(|e| BundleError::BadSignature(e.to_string()))?;
    Ok(sig.into_string())
}

/// A new key pair: the public key's base64 line (for `trusted_keys`), the
/// public key file text and the secret key file text (encrypted when a
/// password is given).
pub fn keygen(password: Option<String>) -> Result<(String, String, String), BundleError> {
    let err = |e: minisign::PError| BundleError::BadSignature(e.to_string());
    let pair = match password {
        Some(p) => minisign::KeyPair::generate_encrypted_keypair(Some(p)).map_err(err)?,
        None => minisign::KeyPair::generate_unencrypted_keypair().map_err(err)?,
    };
    let b64 = pair.pk.to_base64();
    let pk_file = pair.pk.to_box().map_err(err)?.into_string();
    let sk_file = pair
        .sk
        .to_box(Some("slmd bundle signing key"))
        .map_err(err)?
        .into_string();
    Ok((b64, pk_file, sk_file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_global_signature_is_refused_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let (public, _, secret) = keygen(None).unwrap();
        let key = dir.path().join("k.key");
        std::fs::write(&key, secret).unwrap();
        let sig = sign(b"data", &key, None).unwrap();
        let mut lines: Vec<String> = sig.lines().map(str::to_owned).collect();
        // The last line is the global signature (64 bytes, base64): cut it.
        let last = lines.len() - 1;
        lines[last] = "PKvA4zXjF2hA0wOwlt9q".into();
        let broken = lines.join("\n") + "\n";
        let e = verify(b"data", &broken, std::slice::from_ref(&public)).unwrap_err();
        assert_eq!(e.reason(), "bad_signature");
        assert!(verify(b"data", &sig, &[public]).is_ok());
    }
}
