//! Bundle format, verification and store, without llama.cpp (the model is
//! a GGUF header and padding; loading real models is tested end to end in
//! tests/integration/updates.rs).

use std::path::{Path, PathBuf};

use super::store::{install_file, BundleStore};
use super::*;

/// A file with a plausible GGUF header (v3, 1 tensor, 2 metadata keys).
fn fake_gguf(dir: &Path, name: &str, len: usize) -> PathBuf {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(1u64.to_le_bytes());
    bytes.extend(2u64.to_le_bytes());
    bytes.resize(len, 7);
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn manifest_for(model: &Path, version: &str) -> String {
    toml::to_string(&BundleManifest {
        name: "test".into(),
        version: version.into(),
        model_sha256: slmd_engine::models::sha256_file(model).unwrap(),
        model_size: std::fs::metadata(model).unwrap().len(),
        licence: "MIT".into(),
        prompt_format: PromptFormat::Chatml,
        min_slmd: "0.1.0".into(),
    })
    .unwrap()
}

struct Keys {
    _dir: tempfile::TempDir,
    secret: PathBuf,
    public: String,
}

fn keys() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let (public, _, sk) = sign::keygen(None).unwrap();
    let secret = dir.path().join("k.key");
    std::fs::write(&secret, sk).unwrap();
    Keys {
        _dir: dir,
        secret,
        public,
    }
}

/// A signed bundle of a fresh fake model; returns its path.
fn bundle(dir: &Path, keys: &Keys, version: &str) -> PathBuf {
    let model = fake_gguf(dir, &format!("m-{version}.gguf"), 4096 + version.len());
    let manifest = manifest_for(&model, version);
    let sig = sign::sign(manifest.as_bytes(), &keys.secret, None).unwrap();
    let out = dir.join(format!("b-{version}.slmdb"));
    pack(&out, &manifest, Some(&sig), &model).unwrap();
    out
}

fn trust(keys: &Keys) -> Trust {
    Trust {
        keys: vec![keys.public.clone()],
        allow_unsigned: false,
    }
}

fn verify_file(file: &Path, trust: &Trust) -> Result<Verified, BundleError> {
    let dir = tempfile::tempdir().unwrap().keep();
    unpack(file, &dir).and_then(|()| verify_staged(&dir, trust))
}

/// Repacks `file` after `edit` changed its members in a directory.
fn tamper(file: &Path, edit: impl FnOnce(&Path)) -> PathBuf {
    let dir = tempfile::tempdir().unwrap().keep();
    unpack(file, &dir).unwrap();
    edit(&dir);
    let sig = std::fs::read_to_string(dir.join(SIGNATURE)).ok();
    let manifest = std::fs::read_to_string(dir.join(MANIFEST)).unwrap();
    let out = dir.join("tampered.slmdb");
    pack(&out, &manifest, sig.as_deref(), &dir.join(MODEL)).unwrap();
    out
}

#[test]
fn versions_compare_number_by_number() {
    let v = |s| Version::parse(s).unwrap();
    assert!(v("1.10") > v("1.9"));
    assert!(v("2") > v("1.99.99"));
    assert_eq!(v("1.0"), v("1.0.0"));
    assert!(Version::parse("1.x").is_err());
    assert!(Version::parse("").is_err());
}

#[test]
fn a_signed_bundle_verifies_and_each_defect_is_refused_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys();
    let good = bundle(dir.path(), &k, "1.0.0");
    let v = verify_file(&good, &trust(&k)).unwrap();
    assert!(v.signed);
    assert_eq!(v.manifest.version, "1.0.0");

    let reason = |file: &Path, t: &Trust| verify_file(file, t).unwrap_err().reason();
    // Another key signed it.
    let other = keys();
    assert_eq!(reason(&good, &trust(&other)), "bad_signature");
    // The manifest changed after signing.
    let edited = tamper(&good, |d| {
        let m = std::fs::read_to_string(d.join(MANIFEST)).unwrap();
        std::fs::write(d.join(MANIFEST), m.replace("MIT", "GPL")).unwrap();
    });
    assert_eq!(reason(&edited, &trust(&k)), "bad_signature");
    // Unsigned: refused unless allowed.
    let unsigned = tamper(&good, |d| std::fs::remove_file(d.join(SIGNATURE)).unwrap());
    assert_eq!(reason(&unsigned, &trust(&k)), "unsigned");
    let lax = Trust {
        allow_unsigned: true,
        ..trust(&k)
    };
    assert!(!verify_file(&unsigned, &lax).unwrap().signed);
    // The model is cut short, or has other bytes of the same length.
    let truncated = tamper(&good, |d| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join(MODEL))
            .unwrap();
        f.set_len(100).unwrap();
    });
    assert_eq!(reason(&truncated, &trust(&k)), "truncated");
    let swapped = tamper(&good, |d| {
        let mut b = std::fs::read(d.join(MODEL)).unwrap();
        let n = b.len();
        b[n - 1] ^= 1;
        std::fs::write(d.join(MODEL), b).unwrap();
    });
    assert_eq!(reason(&swapped, &trust(&k)), "sha256_mismatch");
    // Signed, right size and hash, but not a GGUF file.
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, vec![b'x'; 4096]).unwrap();
    let manifest = manifest_for(&text, "1.0.1");
    let sig = sign::sign(manifest.as_bytes(), &k.secret, None).unwrap();
    let not_gguf = dir.path().join("not-gguf.slmdb");
    pack(&not_gguf, &manifest, Some(&sig), &text).unwrap();
    assert_eq!(reason(&not_gguf, &trust(&k)), "not_gguf");
    // Not a tar at all.
    assert_eq!(reason(&text, &trust(&k)), "not_a_bundle");
}

#[test]
fn a_bundle_for_a_newer_slmd_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = fake_gguf(dir.path(), "m.gguf", 4096);
    let manifest =
        manifest_for(&model, "1.0.0").replace("min_slmd = \"0.1.0\"", "min_slmd = \"99.0\"");
    let out = dir.path().join("b.slmdb");
    pack(&out, &manifest, None, &model).unwrap();
    let lax = Trust {
        keys: vec![],
        allow_unsigned: true,
    };
    assert_eq!(
        verify_file(&out, &lax).unwrap_err().reason(),
        "needs_newer_slmd"
    );
}

#[test]
fn store_installs_activates_refuses_downgrades_and_full_disks_and_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let k = keys();
    let t = trust(&k);
    let store = BundleStore::open(&state).unwrap();
    let v1 = install_file(&store, &bundle(dir.path(), &k, "1.0.0"), &t, false, 0).unwrap();
    assert!(store.active().unwrap().is_none(), "installed, not active");
    store.activate(&v1.id, "1.0.0").unwrap();
    let v2 = install_file(&store, &bundle(dir.path(), &k, "2.0.0"), &t, false, 0).unwrap();
    store.activate(&v2.id, "2.0.0").unwrap();
    assert_eq!(store.active().unwrap().unwrap().id, v2.id);

    // Older than the active one: refused unless forced.
    let old = bundle(dir.path(), &k, "1.5.0");
    let e = install_file(&store, &old, &t, false, 0).unwrap_err();
    assert_eq!(e.reason(), "downgrade");
    // More free space asked for than the disk has.
    let e = install_file(&store, &old, &t, true, u64::MAX / 2).unwrap_err();
    assert_eq!(e.reason(), "disk_full");
    install_file(&store, &old, &t, true, 0).unwrap();
    // Nothing staged is left behind by the refusals.
    let staged: Vec<_> = std::fs::read_dir(store.staging()).unwrap().collect();
    assert!(staged.is_empty(), "{staged:?}");

    assert_eq!(store.rollback("test").unwrap(), Some(v1.id.clone()));
    let p = store.pointer().unwrap();
    assert_eq!(p.last.unwrap().outcome, "rolled_back");
    assert_eq!(
        store.rollback("test").unwrap(),
        None,
        "back to the [model] model"
    );
    assert_eq!(store.rollback("test").unwrap_err().reason(), "no_previous");
}

#[test]
fn a_crash_loop_on_trial_rolls_back_and_a_confirmed_bundle_stays() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys();
    let t = trust(&k);
    let store = BundleStore::open(&dir.path().join("state")).unwrap();
    let v1 = install_file(&store, &bundle(dir.path(), &k, "1.0.0"), &t, false, 0).unwrap();
    store.activate(&v1.id, "1.0.0").unwrap();
    assert!(store.confirm(&v1.id).unwrap());
    let v2 = install_file(&store, &bundle(dir.path(), &k, "2.0.0"), &t, false, 0).unwrap();
    store.activate(&v2.id, "2.0.0").unwrap();
    for _ in 0..3 {
        assert_eq!(store.on_start(3).unwrap(), None);
    }
    let why = store.on_start(3).unwrap().expect("rolled back");
    assert!(why.contains("crash loop"), "{why}");
    assert_eq!(store.active().unwrap().unwrap().id, v1.id);
    assert_eq!(store.on_start(3).unwrap(), None, "v1 is not on trial");
}

#[test]
fn collection_keeps_the_active_and_the_newest_kept_bundles() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys();
    let t = trust(&k);
    let store = BundleStore::open(&dir.path().join("state")).unwrap();
    let mut ids = Vec::new();
    for v in ["1.0.0", "2.0.0", "3.0.0", "4.0.0"] {
        let b = install_file(&store, &bundle(dir.path(), &k, v), &t, false, 0).unwrap();
        store.activate(&b.id, v).unwrap();
        ids.push(b.id);
    }
    let removed = store.collect(1).unwrap();
    assert_eq!(removed.len(), 2, "{removed:?}");
    let left: Vec<String> = store.list().unwrap().into_iter().map(|b| b.id).collect();
    assert_eq!(left, vec![ids[2].clone(), ids[3].clone()]);
    assert_eq!(store.pointer().unwrap().active, Some(ids[3].clone()));
    // The kept one can be rolled back to, then the [model] model; what was
    // collected is out of the history.
    assert_eq!(store.rollback("t").unwrap(), Some(ids[2].clone()));
    assert_eq!(store.rollback("t").unwrap(), None);
    assert_eq!(store.rollback("t").unwrap_err().reason(), "no_previous");
}
