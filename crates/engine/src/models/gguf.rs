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

/// What the header says, with where its parts lie.
struct Header {
    /// Where the metadata ends: the file up to here is copied as it is.
    metadata_end: u64,
    /// Where in the file the block count's `u32` value is.
    block_count_at: usize,
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
    let (mut block_count_at, mut block_count) = (None, 0);
    let mut alignment = DEFAULT_ALIGNMENT;
    for _ in 0..n_kv {
        let key = r.string()?;
        let t = r.u32()?;
        let value_at = r.pos;
        if key.ends_with(b".block_count") && t == UINT32 {
            block_count = r.u32()?;
            block_count_at = Some(value_at as usize);
        } else if key == b"general.alignment" && t == UINT32 {
            alignment = u64::from(r.u32()?).max(1);
        } else {
            r.skip_value(t)?;
        }
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
        block_count_at: block_count_at.ok_or_else(|| bad("no block count"))?,
        block_count,
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

/// Writes to `dst` the model at `src` with only its first `blocks`
/// transformer blocks (all of them when `blocks` is not fewer).
///
/// With `own_output`, a model whose output layer is its token table (tied:
/// no `output.weight`) gets an `output.weight` of its own, a copy of the
/// table, so that the two can then be stored in different types (see
/// [`super::requant`]).
pub fn keep_blocks(src: &Path, dst: &Path, blocks: u32, own_output: bool) -> Result<(), GgufError> {
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
    let output = own_output.then(|| untied_output(&h.tensors)).flatten();
    let kept: Vec<&TensorInfo> = h
        .tensors
        .iter()
        .filter(|t| block_of(&t.name).is_none_or(|b| b < blocks))
        .chain(&output)
        .collect();

    let mut header = Vec::new();
    input.seek(SeekFrom::Start(0))?;
    (&mut input).take(h.metadata_end).read_to_end(&mut header)?;
    header[8..16].copy_from_slice(&(kept.len() as u64).to_le_bytes());
    header[h.block_count_at..h.block_count_at + 4].copy_from_slice(&blocks.to_le_bytes());
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

/// An `output.weight` entry that reads the token table's bytes, when the
/// model has a token table and no output matrix of its own.
fn untied_output(tensors: &[TensorInfo]) -> Option<TensorInfo> {
    if tensors.iter().any(|t| t.name == b"output.weight") {
        return None;
    }
    let table = tensors.iter().find(|t| t.name == b"token_embd.weight")?;
    Some(TensorInfo {
        name: b"output.weight".to_vec(),
        dims: table.dims.clone(),
        kind: table.kind,
        offset: table.offset,
    })
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
    fn a_tied_output_layer_can_be_given_a_matrix_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("m.gguf");
        std::fs::write(&src, test_model(2, 0)).unwrap();
        let names_and_data = |path: &Path| {
            let mut f = File::open(path).unwrap();
            let h = read_header(&mut f).unwrap();
            let bytes = std::fs::read(path).unwrap();
            h.tensors
                .iter()
                .map(|t| {
                    let at = (h.data_start + t.offset) as usize;
                    let value = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
                    (
                        String::from_utf8(t.name.clone()).unwrap(),
                        t.dims.clone(),
                        value,
                    )
                })
                .collect::<Vec<_>>()
        };
        let untied = dir.path().join("untied.gguf");
        keep_blocks(&src, &untied, 2, true).unwrap();
        let tensors = names_and_data(&untied);
        let table = tensors[0].clone();
        assert_eq!(table.0, "token_embd.weight");
        assert_eq!(
            tensors.last().unwrap(),
            &("output.weight".to_string(), table.1, table.2),
            "the output matrix is a copy of the token table"
        );
        assert_eq!(tensors.len(), 5);
        // A model with an output matrix of its own keeps just that one.
        let again = dir.path().join("again.gguf");
        keep_blocks(&untied, &again, 2, true).unwrap();
        assert_eq!(names_and_data(&again), tensors);
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
