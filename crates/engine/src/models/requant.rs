//! The heads' cut model with Q4_1 weights rewritten as Q4_0.
//!
//! At load time llama.cpp's CPU backend repacks Q4_0 matrices into an
//! interleaved layout that its kernels multiply several rows at a time (x86
//! with AVX2; Arm with the dot-product or int8 matrix extensions). Q4_1 has
//! no such layout and goes through a plain dot product per row. Measured on
//! SmolLM2-135M (docs/BENCHMARKS.md, "Q4_0 heads"), heads reading a Q4_0
//! copy answer in about a quarter less time and put 40% more messages
//! through; accuracy moves by less than one fold seed's spread.
//!
//! The weights are rounded a second time, which is why it is a setting
//! (`model.head_requantize`) and why only a file whose block matrices are
//! all Q4_1 is rewritten: Q4_1 and Q4_0 hold 4 bits per weight alike, so
//! nothing finer is lost. The token table is copied as it is.
//!
//! The output matrix becomes Q4_0 too. A head reads hidden states, never
//! logits, but llama.cpp computes the logits of every token it outputs,
//! and a head outputs every token: the output layer (49152 x 576 on
//! SmolLM2, a quarter of a token's multiplications) runs on every request
//! token. SmolLM2 ties it to its Q8_0 token table, which llama.cpp does
//! not repack; the cut is therefore given an output matrix of its own
//! ([`super::gguf::keep_blocks`]) for this step to make Q4_0. The hidden
//! states are unchanged, bit for bit: the token table that embeds the input
//! is not touched. The work is llama.cpp's own quantiser, so the result is
//! what its `llama-quantize` tool would write.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::gguf::{describe, part_path, GgufError, Tensor};
use llama_cpp_sys_2 as sys;

const Q4_1: u32 = 3;

/// Whether every matrix of a model's transformer blocks (`tensors`, as
/// [`describe`] lists them) is Q4_1.
pub fn has_q4_1_blocks(tensors: &[Tensor]) -> bool {
    let mut matrices = tensors
        .iter()
        .filter(|t| t.name.starts_with("blk.") && t.dims >= 2)
        .peekable();
    matrices.peek().is_some() && matrices.all(|t| t.kind == Q4_1)
}

/// Writes to `dst` the model at `src` with its block matrices and its
/// output matrix (if it has one of its own) as Q4_0, using `threads`
/// threads. The file is written beside `dst` and renamed
/// into place, so a file at `dst` is always whole.
pub fn to_q4_0(src: &Path, dst: &Path, threads: i32) -> Result<(), GgufError> {
    let tensors = describe(src)?.tensors;
    // The type a tensor has, so that llama.cpp copies it unchanged.
    let keep = |name: &str| {
        tensors
            .iter()
            .find(|t| t.name == name)
            .map_or(sys::GGML_TYPE_COUNT, |t| t.kind)
    };
    let mut params = unsafe { sys::llama_model_quantize_default_params() };
    params.ftype = sys::LLAMA_FTYPE_MOSTLY_Q4_0;
    params.nthread = threads.max(1);
    params.allow_requantize = true;
    // Every quantisable tensor to Q4_0, except the token table, kept as it
    // is (the output matrix's type otherwise defaults to Q6_K).
    params.pure_ = true;
    params.token_embedding_type = keep("token_embd.weight");
    params.output_tensor_type = sys::GGML_TYPE_Q4_0;

    let tmp = part_path(dst);
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| GgufError::Format(format!("a NUL byte in {}", p.display())))
    };
    let (c_src, c_tmp) = (c(src)?, c(&tmp)?);
    // SAFETY: both paths are NUL-terminated strings that outlive the call,
    // and `params` is llama.cpp's defaults with plain values changed (its
    // pointers stay null).
    let status = unsafe { sys::llama_model_quantize(c_src.as_ptr(), c_tmp.as_ptr(), &params) };
    if status != 0 {
        let _ = std::fs::remove_file(&tmp);
        return Err(GgufError::Format(format!(
            "llama.cpp could not requantise {}",
            src.display()
        )));
    }
    slmd_core::fsutil::commit(&tmp, dst)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::gguf::test_model;

    #[test]
    fn only_a_model_whose_block_matrices_are_all_q4_1_is_requantised() {
        let dir = tempfile::tempdir().unwrap();
        let is_q4_1 = |bytes: Vec<u8>| {
            let path = dir.path().join("m.gguf");
            std::fs::write(&path, bytes).unwrap();
            has_q4_1_blocks(&describe(&path).unwrap().tensors)
        };
        assert!(is_q4_1(test_model(3, Q4_1)));
        assert!(!is_q4_1(test_model(3, 2)), "Q4_0 already");
        assert!(!is_q4_1(test_model(3, 14)), "Q6_K");
        assert!(!is_q4_1(test_model(0, Q4_1)), "no blocks");
        let mut mixed = test_model(3, Q4_1);
        // Its header entry: the name, the dimension count (u32), two u64
        // dimensions, then the type (u32).
        let at = find(&mixed, b"blk.2.attn_q.weight") + 19 + 4 + 2 * 8;
        mixed[at..at + 4].copy_from_slice(&14u32.to_le_bytes());
        assert!(!is_q4_1(mixed), "one Q6_K matrix among Q4_1 ones");
    }

    fn find(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).position(|w| w == needle).unwrap()
    }
}
