//! A GGUF file cut to its first transformer blocks, for the classifier head.
//!
//! The head reads the mean of the model's last hidden states. Measured on
//! SmolLM2-135M, the states after about four fifths of its blocks classify
//! as well or better than the last ones and cost a fifth less to compute
//! (docs/EVAL.md, "Head depth"), so the engine can give its head a copy of
//! the model without the later blocks. llama.cpp loads exactly the tensors
//! its metadata asks for, so the copy is a real GGUF file: the same
//! metadata with a smaller `<arch>.block_count`, and every tensor but those
//! of the dropped blocks (`blk.<i>.*`, `i >= blocks`).
//!
//! The copy is written to a file beside its destination (named with the
//! process id) and renamed into place, so a file at the destination is
//! always whole.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a GGUF file this reader knows: {0}")]
    Format(String),
}

fn bad(what: impl Into<String>) -> GgufError {
    GgufError::Format(what.into())
}

const STRING: u32 = 8;
const ARRAY: u32 = 9;
const UINT32: u32 = 4;
const DEFAULT_ALIGNMENT: u64 = 32;

/// Byte size of a fixed-size GGUF value type.
fn fixed_size(t: u32) -> Option<u64> {
    Some(match t {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        _ => return None,
    })
}

struct Reader<R> {
    inner: R,
    pos: u64,
}

impl<R: Read> Reader<R> {
    fn bytes(&mut self, n: u64) -> Result<Vec<u8>, GgufError> {
        if n > 1 << 24 {
            return Err(bad(format!("a {n}-byte string")));
        }
        let mut buf = vec![0; n as usize];
        self.inner.read_exact(&mut buf)?;
        self.pos += n;
        Ok(buf)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().expect("4")))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().expect("8")))
    }

    fn string(&mut self) -> Result<Vec<u8>, GgufError> {
        let n = self.u64()?;
        self.bytes(n)
    }

    fn skip(&mut self, n: u64) -> Result<(), GgufError> {
        let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())?;
        self.pos += copied;
        (copied == n).then_some(()).ok_or_else(|| bad("truncated"))
    }

    fn skip_value(&mut self, t: u32) -> Result<(), GgufError> {
        match t {
            STRING => self.string().map(drop),
            ARRAY => {
                let (item, n) = (self.u32()?, self.u64()?);
                match fixed_size(item) {
                    Some(size) => self.skip(size * n),
                    None if item == STRING => (0..n).try_for_each(|_| self.string().map(drop)),
                    None => Err(bad(format!("an array of type {item}"))),
                }
            }
            t => self.skip(fixed_size(t).ok_or_else(|| bad(format!("value type {t}")))?),
        }
    }
}

/// One tensor's entry in the header.
struct TensorInfo {
    name: Vec<u8>,
    dims: Vec<u64>,
    kind: u32,
    offset: u64,
}

/// One metadata entry: its key, value type, and where its value lies.
struct Kv {
    key: Vec<u8>,
    kind: u32,
    value: std::ops::Range<usize>,
}

/// What the header says, with where its parts lie.
struct Header {
    /// Where the metadata ends.
    metadata_end: u64,
    kvs: Vec<Kv>,
    /// `general.architecture`.
    arch: Vec<u8>,
    block_count: u32,
    alignment: u64,
    tensors: Vec<TensorInfo>,
    /// File offset of the tensor data.
    data_start: u64,
}

fn align(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

fn read_header(file: &mut File) -> Result<Header, GgufError> {
    let mut r = Reader {
        inner: BufReader::new(file),
        pos: 0,
    };
    if r.bytes(4)? != b"GGUF" {
        return Err(bad("no GGUF magic"));
    }
    let version = r.u32()?;
    if version < 2 {
        return Err(bad(format!("version {version}")));
    }
    let (n_tensors, n_kv) = (r.u64()?, r.u64()?);
    let mut block_count = None;
    let mut alignment = DEFAULT_ALIGNMENT;
    let mut arch = Vec::new();
    let mut kvs = Vec::new();
    for _ in 0..n_kv {
        let key = r.string()?;
        let kind = r.u32()?;
        let value_at = r.pos as usize;
        if key.ends_with(b".block_count") && kind == UINT32 {
            block_count = Some(r.u32()?);
        } else if key == b"general.alignment" && kind == UINT32 {
            alignment = u64::from(r.u32()?).max(1);
        } else if key == b"general.architecture" && kind == STRING {
            arch = r.string()?;
        } else {
            r.skip_value(kind)?;
        }
        kvs.push(Kv {
            key,
            kind,
            value: value_at..r.pos as usize,
        });
    }
    let metadata_end = r.pos;
    let mut tensors = Vec::new();
    for _ in 0..n_tensors {
        let name = r.string()?;
        let n_dims = r.u32()?;
        let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<_, _>>()?;
        tensors.push(TensorInfo {
            name,
            dims,
            kind: r.u32()?,
            offset: r.u64()?,
        });
    }
    let data_start = align(r.pos, alignment);
    Ok(Header {
        metadata_end,
        kvs,
        arch,
        block_count: block_count.ok_or_else(|| bad("no block count"))?,
        alignment,
        tensors,
        data_start,
    })
}

/// What the engine asks of a model's header, read once.
pub struct Description {
    /// Its transformer blocks.
    pub block_count: u32,
    pub tensors: Vec<Tensor>,
}

/// One tensor as the header lists it.
pub struct Tensor {
    pub name: String,
    /// Number of dimensions.
    pub dims: usize,
    /// GGML type id.
    pub kind: u32,
}

/// The block count and tensors of the model at `path`.
pub fn describe(path: &Path) -> Result<Description, GgufError> {
    let h = read_header(&mut File::open(path)?)?;
    Ok(Description {
        block_count: h.block_count,
        tensors: h
            .tensors
            .into_iter()
            .map(|t| Tensor {
                name: String::from_utf8_lossy(&t.name).into_owned(),
                dims: t.dims.len(),
                kind: t.kind,
            })
            .collect(),
    })
}

/// The block a tensor belongs to (`blk.<i>.…`), if any.
fn block_of(name: &[u8]) -> Option<u32> {
    let rest = name.strip_prefix(b"blk.")?;
    let end = rest.iter().position(|&b| b == b'.')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// The architecture whose graph llama.cpp builds without the output
/// layer, for each one that has such a twin: the same blocks and weights,
/// hidden states out, no logits.
const HIDDEN_ONLY: &[(&[u8], &[u8])] = &[(b"llama", b"llama-embed")];

/// Writes to `dst` the model at `src` with only its first `blocks`
/// transformer blocks (all of them when `blocks` is not fewer).
///
/// With `hidden_only`, a model whose architecture has a twin in
/// [`HIDDEN_ONLY`] is written as that twin (its `<arch>.*` keys renamed):
/// llama.cpp then computes hidden states and no logits. A head reads only
/// hidden states, and the output layer (49152 x 576 on SmolLM2) is a
/// quarter of a token's multiplications when it runs on every token. The
/// hidden states are the same.
pub fn keep_blocks(
    src: &Path,
    dst: &Path,
    blocks: u32,
    hidden_only: bool,
) -> Result<(), GgufError> {
    let mut input = File::open(src)?;
    let h = read_header(&mut input)?;
    let file_len = input.metadata()?.len();
    let blocks = blocks.min(h.block_count);
    // Each tensor's bytes run to the next tensor's offset (or the end).
    let mut starts: Vec<u64> = h.tensors.iter().map(|t| t.offset).collect();
    starts.sort_unstable();
    let data_len = file_len
        .checked_sub(h.data_start)
        .ok_or_else(|| bad("tensor data past the end"))?;
    let size = |offset: u64| {
        let i = starts.partition_point(|&s| s <= offset);
        starts.get(i).copied().unwrap_or(data_len) - offset
    };
    let kept: Vec<&TensorInfo> = h
        .tensors
        .iter()
        .filter(|t| block_of(&t.name).is_none_or(|b| b < blocks))
        .collect();
    let twin = HIDDEN_ONLY
        .iter()
        .find(|(arch, _)| hidden_only && *arch == h.arch.as_slice())
        .map(|&(_, twin)| twin);

    let mut raw = Vec::new();
    input.seek(SeekFrom::Start(0))?;
    (&mut input).take(h.metadata_end).read_to_end(&mut raw)?;
    let mut header = metadata(&raw, &h, blocks, twin);
    header[8..16].copy_from_slice(&(kept.len() as u64).to_le_bytes());
    let mut offset = 0u64;
    for t in &kept {
        header.extend((t.name.len() as u64).to_le_bytes());
        header.extend(&t.name);
        header.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            header.extend(d.to_le_bytes());
        }
        header.extend(t.kind.to_le_bytes());
        header.extend(offset.to_le_bytes());
        offset = align(offset + size(t.offset), h.alignment);
    }
    header.resize(align(header.len() as u64, h.alignment) as usize, 0);

    let tmp = part_path(dst);
    let written = write_cut(&mut input, &h, &kept, &header, size, &tmp);
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    slmd_core::fsutil::commit(&tmp, dst)?;
    Ok(())
}

/// The metadata of `raw` (the file up to the tensor entries) with
/// `blocks` blocks and, given a `twin`, that architecture.
fn metadata(raw: &[u8], h: &Header, blocks: u32, twin: Option<&[u8]>) -> Vec<u8> {
    let string = |s: &[u8]| [&(s.len() as u64).to_le_bytes()[..], s].concat();
    // Magic, version, tensor count, entry count.
    let mut out = raw[..24].to_vec();
    for kv in &h.kvs {
        let mut key = kv.key.clone();
        let mut value = raw[kv.value.clone()].to_vec();
        if let Some(twin) = twin {
            if let Some(rest) = kv.key.strip_prefix(h.arch.as_slice()) {
                if rest.starts_with(b".") {
                    key = [twin, rest].concat();
                }
            }
            if kv.key == b"general.architecture" {
                value = string(twin);
            }
        }
        if kv.key.ends_with(b".block_count") && kv.kind == UINT32 {
            value = blocks.to_le_bytes().to_vec();
        }
        out.extend(string(&key));
        out.extend(kv.kind.to_le_bytes());
        out.extend(value);
    }
    out
}

/// Where a file for `dst` is written before it is renamed into place:
/// beside it, named with the process id.
pub(super) fn part_path(dst: &Path) -> PathBuf {
    let mut tmp = dst.as_os_str().to_owned();
    tmp.push(format!(".{}.part", std::process::id()));
    PathBuf::from(tmp)
}

/// Writes `header` and the `kept` tensors' bytes to a new file at `path`.
fn write_cut(
    input: &mut File,
    h: &Header,
    kept: &[&TensorInfo],
    header: &[u8],
    size: impl Fn(u64) -> u64,
    path: &Path,
) -> Result<(), GgufError> {
    let file = File::create(path)?;
    let mut out = BufWriter::new(&file);
    out.write_all(header)?;
    let mut written = 0u64;
    for t in kept {
        let n = size(t.offset);
        input.seek(SeekFrom::Start(h.data_start + t.offset))?;
        if io::copy(&mut (&mut *input).take(n), &mut out)? != n {
            return Err(bad("tensor data past the end"));
        }
        let padded = align(written + n, h.alignment);
        out.write_all(&vec![0; (padded - written - n) as usize])?;
        written = padded;
    }
    out.flush()?;
    drop(out);
    file.sync_all()?;
    Ok(())
}

/// A GGUF file with `blocks` blocks of one 2-D tensor of GGML type
/// `kind` each, plus a 1-D token table and norm; every tensor's bytes are
/// its index (4 bytes, padded).
#[cfg(test)]
pub(crate) fn test_model(blocks: u32, kind: u32) -> Vec<u8> {
    fn string(s: &[u8]) -> Vec<u8> {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend(s);
        v
    }
    let mut names: Vec<Vec<u8>> = vec![b"token_embd.weight".to_vec()];
    names.extend((0..blocks).map(|i| format!("blk.{i}.attn_q.weight").into_bytes()));
    names.push(b"output_norm.weight".to_vec());
    let mut f = b"GGUF".to_vec();
    f.extend(3u32.to_le_bytes());
    f.extend((names.len() as u64).to_le_bytes());
    f.extend(3u64.to_le_bytes());
    f.extend(string(b"general.architecture"));
    f.extend(STRING.to_le_bytes());
    f.extend(string(b"llama"));
    f.extend(string(b"tokenizer.ggml.tokens"));
    f.extend(ARRAY.to_le_bytes());
    f.extend(STRING.to_le_bytes());
    f.extend(2u64.to_le_bytes());
    f.extend(string(b"a"));
    f.extend(string(b"bc"));
    f.extend(string(b"llama.block_count"));
    f.extend(UINT32.to_le_bytes());
    f.extend(blocks.to_le_bytes());
    for (i, name) in names.iter().enumerate() {
        let block = name.starts_with(b"blk.");
        f.extend(string(name));
        f.extend(if block { 2u32 } else { 1 }.to_le_bytes());
        f.extend(1u64.to_le_bytes());
        if block {
            f.extend(1u64.to_le_bytes());
        }
        f.extend(if block { kind } else { 0 }.to_le_bytes());
        f.extend((i as u64 * 32).to_le_bytes());
    }
    f.resize(align(f.len() as u64, 32) as usize, 0);
    for i in 0..names.len() {
        let mut t = (i as u32).to_le_bytes().to_vec();
        t.resize(if i + 1 == names.len() { 4 } else { 32 }, 0);
        f.extend(t);
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_model_keeps_its_metadata_and_the_first_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("m.gguf"), dir.path().join("cut.gguf"));
        std::fs::write(&src, test_model(4, 0)).unwrap();
        let d = describe(&src).unwrap();
        assert_eq!(d.block_count, 4);
        assert_eq!(d.tensors.len(), 6);
        let t = &d.tensors[1];
        assert_eq!(
            (t.name.as_str(), t.dims, t.kind),
            ("blk.0.attn_q.weight", 2, 0)
        );
        keep_blocks(&src, &dst, 2, false).unwrap();

        let mut f = File::open(&dst).unwrap();
        let h = read_header(&mut f).unwrap();
        assert_eq!(h.block_count, 2);
        let names: Vec<String> = h
            .tensors
            .iter()
            .map(|t| String::from_utf8(t.name.clone()).unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "token_embd.weight",
                "blk.0.attn_q.weight",
                "blk.1.attn_q.weight",
                "output_norm.weight"
            ]
        );
        let bytes = std::fs::read(&dst).unwrap();
        let data = |t: &TensorInfo| {
            let at = (h.data_start + t.offset) as usize;
            u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
        };
        let values: Vec<u32> = h.tensors.iter().map(data).collect();
        assert_eq!(values, [0, 1, 2, 5], "each tensor keeps its own bytes");
        assert_eq!(
            bytes[..h.metadata_end as usize],
            test_model(2, 0)[..h.metadata_end as usize],
            "the metadata is a 2-block model's"
        );
    }

    #[test]
    fn a_hidden_only_cut_is_the_architectures_twin_with_the_same_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let (src, plain, twin) = (
            dir.path().join("m.gguf"),
            dir.path().join("plain.gguf"),
            dir.path().join("twin.gguf"),
        );
        std::fs::write(&src, test_model(3, 0)).unwrap();
        keep_blocks(&src, &plain, 2, false).unwrap();
        keep_blocks(&src, &twin, 2, true).unwrap();
        let h = read_header(&mut File::open(&twin).unwrap()).unwrap();
        assert_eq!(h.arch, b"llama-embed");
        assert_eq!(h.block_count, 2);
        let keys: Vec<&[u8]> = h.kvs.iter().map(|kv| kv.key.as_slice()).collect();
        assert_eq!(
            keys,
            [
                &b"general.architecture"[..],
                b"tokenizer.ggml.tokens",
                b"llama-embed.block_count"
            ]
        );
        // Tensor entries and data are the plain cut's, after a longer header.
        let p = read_header(&mut File::open(&plain).unwrap()).unwrap();
        let (pb, tb) = (
            std::fs::read(&plain).unwrap(),
            std::fs::read(&twin).unwrap(),
        );
        assert_eq!(pb[p.data_start as usize..], tb[h.data_start as usize..]);
        let names = |h: &Header| h.tensors.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&p), names(&h));
        // A model of another architecture is cut as it is.
        let mut other = test_model(3, 0);
        let at = find(&other, b"llama");
        other[at..at + 5].copy_from_slice(b"gemma");
        std::fs::write(&src, other).unwrap();
        keep_blocks(&src, &twin, 2, true).unwrap();
        assert_eq!(
            read_header(&mut File::open(&twin).unwrap()).unwrap().arch,
            b"gemma"
        );
    }

    fn find(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).position(|w| w == needle).unwrap()
    }

    #[test]
    fn what_is_not_gguf_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("m.gguf");
        std::fs::write(&src, b"not a model").unwrap();
        assert!(matches!(describe(&src), Err(GgufError::Format(_))));
        let mut cut = test_model(2, 0);
        cut.truncate(60);
        std::fs::write(&src, cut).unwrap();
        assert!(describe(&src).is_err(), "a cut header");
    }
}
