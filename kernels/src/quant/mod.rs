//! GGUF/ggml tensor element types and their block layouts.
//!
//! Every type is known by id, name, block size and bytes per block, so a file's tensor extents
//! can be checked (and a model planned) even for types that shoal cannot compute with; the
//! compute set is [`GgmlType::is_supported`]. Block layouts follow ggml's `ggml-common.h`.
//!
//! For the compute set this module also owns the numerics: dequantization (`blocks`),
//! activation quantization into each weight type's vec_dot_type (`act`: q8_0, q8_1, q8_K,
//! f16, bf16 or f32, byte for byte what ggml's x86 quantizers write), and the dot-product
//! kernels, which `kernel` chooses: `scalar`, the portable reference, or on x86 `x86` (float
//! formats), `x86_q0` (32-element formats) and `x86_k` (K formats). Nothing here allocates on
//! the matmul hot path.
//!
//! Key decision: the x86 kernels sum in the order of llama.cpp's CPU backend (the AVX-512
//! VNNI build its fixtures come from), so their outputs are its outputs bit for bit:
//! - Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: per block, eight integer lane sums, then
//!   `acc = fma(dx·dy, lanes, acc)`; `hsum_float_8(acc)` at the end. Q4_1 and Q5_1 add a
//!   fused `summs = fma(m, s, summs)` over blocks last.
//! - Q4_K: llama.cpp's repacked 8×8 kernels, GEMM for each group of 4 tokens and GEMV for
//!   the tokens left over.
//! - Q6_K: `vec_dot_q6_K_q8_K` below 8 tokens, ggml's tiled kernel from 8.
//!
//! Not claimed bit-exact: the portable path (same integers, another float order); F32, F16,
//! BF16; Q5_K; Q4_K matrices whose row count is not a multiple of 8 (llama.cpp does not
//! repack them); Q4_0 matrices that llama.cpp repacks (row count a multiple of 8); llama.cpp
//! builds without AVX-512. `ggml_ref` checks the activation bytes and every level's dot
//! products against ggml itself; `tests/tests/fidelity.rs` checks whole models.

use crate::cpu::SimdLevel;
use crate::{Error, Result};

pub mod act;
pub mod blocks;
pub mod kernel;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_k;
#[cfg(target_arch = "x86_64")]
mod x86_q0;

#[cfg(test)]
mod ggml_ref;
#[cfg(test)]
mod ggml_ref_data;
#[cfg(test)]
mod quant_tests;
#[cfg(test)]
pub(crate) mod testutil;

/// A ggml element type, numbered as in GGUF files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

/// (type, id, name, elements per block, bytes per block)
const TABLE: &[(GgmlType, u32, &str, usize, usize)] = &[
    (GgmlType::F32, 0, "F32", 1, 4),
    (GgmlType::F16, 1, "F16", 1, 2),
    (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
    (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
    (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
    (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
    (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
    (GgmlType::Q8_1, 9, "Q8_1", 32, 36),
    (GgmlType::Q2_K, 10, "Q2_K", 256, 84),
    (GgmlType::Q3_K, 11, "Q3_K", 256, 110),
    (GgmlType::Q4_K, 12, "Q4_K", 256, 144),
    (GgmlType::Q5_K, 13, "Q5_K", 256, 176),
    (GgmlType::Q6_K, 14, "Q6_K", 256, 210),
    (GgmlType::Q8_K, 15, "Q8_K", 256, 292),
    (GgmlType::IQ2_XXS, 16, "IQ2_XXS", 256, 66),
    (GgmlType::IQ2_XS, 17, "IQ2_XS", 256, 74),
    (GgmlType::IQ3_XXS, 18, "IQ3_XXS", 256, 98),
    (GgmlType::IQ1_S, 19, "IQ1_S", 256, 50),
    (GgmlType::IQ4_NL, 20, "IQ4_NL", 32, 18),
    (GgmlType::IQ3_S, 21, "IQ3_S", 256, 110),
    (GgmlType::IQ2_S, 22, "IQ2_S", 256, 82),
    (GgmlType::IQ4_XS, 23, "IQ4_XS", 256, 136),
    (GgmlType::I8, 24, "I8", 1, 1),
    (GgmlType::I16, 25, "I16", 1, 2),
    (GgmlType::I32, 26, "I32", 1, 4),
    (GgmlType::I64, 27, "I64", 1, 8),
    (GgmlType::F64, 28, "F64", 1, 8),
    (GgmlType::IQ1_M, 29, "IQ1_M", 256, 56),
    (GgmlType::BF16, 30, "BF16", 1, 2),
    (GgmlType::TQ1_0, 34, "TQ1_0", 256, 54),
    (GgmlType::TQ2_0, 35, "TQ2_0", 256, 66),
    (GgmlType::MXFP4, 39, "MXFP4", 32, 17),
];

impl GgmlType {
    fn row(self) -> &'static (GgmlType, u32, &'static str, usize, usize) {
        TABLE
            .iter()
            .find(|r| r.0 == self)
            .expect("every variant is in TABLE")
    }

    /// The type with GGUF id `id`.
    pub fn from_id(id: u32) -> Result<Self> {
        TABLE
            .iter()
            .find(|r| r.1 == id)
            .map(|r| r.0)
            .ok_or(Error::UnknownType(id))
    }

    /// The type named `name` (as ggml spells it, case-insensitive).
    pub fn from_name(name: &str) -> Option<Self> {
        TABLE
            .iter()
            .find(|r| r.2.eq_ignore_ascii_case(name))
            .map(|r| r.0)
    }

    pub fn id(self) -> u32 {
        self.row().1
    }

    pub fn name(self) -> &'static str {
        self.row().2
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        self.row().3
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.row().4
    }

    /// Bytes taken by `n_elements` elements, or `None` when `n_elements` is not a whole number
    /// of blocks or the size overflows.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !n_elements.is_multiple_of(bs) {
            return None;
        }
        (n_elements / bs).checked_mul(self.type_size() as u64)
    }

    /// Whether shoal's kernels can dequantize and multiply with this type.
    pub fn is_supported(self) -> bool {
        matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::Q8_0
                | GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q5_1
                | GgmlType::Q4_K
                | GgmlType::Q5_K
                | GgmlType::Q6_K
        )
    }
}

impl GgmlType {
    /// The format activations are quantized to before a dot product with weights of this
    /// type: the same choice as ggml's CPU backend (`type_traits_cpu[..].vec_dot_type`), so
    /// that shoal computes with the same integers as llama.cpp. Types shoal cannot compute
    /// with map to F32.
    pub fn vec_dot_type(self) -> GgmlType {
        match self {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => GgmlType::Q8_0,
            GgmlType::Q4_1 | GgmlType::Q5_1 => GgmlType::Q8_1,
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => GgmlType::Q8_K,
            GgmlType::F16 => GgmlType::F16,
            GgmlType::BF16 => GgmlType::BF16,
            _ => GgmlType::F32,
        }
    }
}

/// See [`GgmlType::vec_dot_type`].
pub fn vec_dot_type(ty: GgmlType) -> GgmlType {
    ty.vec_dot_type()
}

/// Checks that `cols` elements are a whole number of blocks of `ty` and returns the bytes
/// they take.
pub fn row_bytes(ty: GgmlType, cols: usize) -> Result<usize> {
    ty.bytes_for(cols as u64)
        .map(|b| b as usize)
        .ok_or(Error::BadRowLength {
            ty: ty.name(),
            cols,
            block: ty.block_size(),
        })
}

/// Quantizes one activation row `x` into `out` in format `ty`, one of the vec_dot_types
/// (F32, F16, BF16, Q8_0, Q8_1, Q8_K). `out` must hold exactly the row's bytes.
pub fn quantize_activations(ty: GgmlType, x: &[f32], out: &mut [u8]) -> Result<()> {
    let want = row_bytes(ty, x.len())?;
    if out.len() != want {
        return Err(Error::BadBufferSize {
            what: "quantized activations",
            want,
            got: out.len(),
        });
    }
    match ty {
        GgmlType::F32 => act::quantize_row_f32(x, out),
        GgmlType::F16 => act::quantize_row_f16(x, out),
        GgmlType::BF16 => act::quantize_row_bf16(x, out),
        GgmlType::Q8_0 => act::quantize_row_q8_0(x, out),
        GgmlType::Q8_1 => act::quantize_row_q8_1(x, out),
        GgmlType::Q8_K => act::quantize_row_q8_k(x, out),
        _ => return Err(Error::UnsupportedType(ty.name())),
    }
    Ok(())
}

/// Dequantizes a whole number of blocks of `ty` from `src` into `dst`. Works for the weight
/// types of [`GgmlType::is_supported`] and the activation formats Q8_1 and Q8_K.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    use blocks::*;
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let per_block: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => |b, y| y[0] = f32_at(b, 0),
        GgmlType::F16 => |b, y| y[0] = f16_at(b, 0),
        GgmlType::BF16 => |b, y| y[0] = bf16_to_f32(u16_at(b, 0)),
        GgmlType::Q4_0 => dequant_q4_0,
        GgmlType::Q4_1 => dequant_q4_1,
        GgmlType::Q5_0 => dequant_q5_0,
        GgmlType::Q5_1 => dequant_q5_1,
        GgmlType::Q8_0 => dequant_q8_0,
        GgmlType::Q8_1 => dequant_q8_1,
        GgmlType::Q4_K => dequant_q4_k,
        GgmlType::Q5_K => dequant_q5_k,
        GgmlType::Q6_K => dequant_q6_k,
        GgmlType::Q8_K => dequant_q8_k,
        _ => return Err(Error::UnsupportedType(ty.name())),
    };
    if !src.len().is_multiple_of(ts) {
        let want = src.len().div_ceil(ts) * ts;
        return Err(Error::BadBufferSize {
            what: "quantized row",
            want,
            got: src.len(),
        });
    }
    let want = src.len() / ts * bs;
    if dst.len() != want {
        return Err(Error::BadBufferSize {
            what: "dequantized row",
            want,
            got: dst.len(),
        });
    }
    for (b, y) in src.chunks_exact(ts).zip(dst.chunks_exact_mut(bs)) {
        per_block(b, y);
    }
    Ok(())
}

/// The dot product of one weight row (`cols` elements of `ty`) with one activation row
/// already in `ty`'s vec_dot_type, computed by the kernels of `level`.
pub fn vec_dot(ty: GgmlType, level: SimdLevel, cols: usize, w: &[u8], a: &[u8]) -> Result<f32> {
    let k = kernel::kernel(ty, level).ok_or(Error::UnsupportedType(ty.name()))?;
    let want_w = row_bytes(ty, cols)?;
    let want_a = row_bytes(ty.vec_dot_type(), cols)?;
    if w.len() != want_w {
        return Err(Error::BadBufferSize {
            what: "weight row",
            want: want_w,
            got: w.len(),
        });
    }
    if a.len() != want_a {
        return Err(Error::BadBufferSize {
            what: "activation row",
            want: want_a,
            got: a.len(),
        });
    }
    let mut out = 0.0f32;
    let tile = kernel::Tile {
        w: w.as_ptr(),
        w_stride: want_w,
        rows: 1,
        a: a.as_ptr(),
        a_stride: want_a,
        toks: 1,
        out: &mut out,
        out_stride: 1,
        nb: cols / ty.block_size(),
    };
    // SAFETY: both rows were checked to hold `cols` elements of their formats.
    unsafe { (k.tile)(&tile) };
    Ok(out)
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        for r in TABLE {
            assert_eq!(GgmlType::from_id(r.1).unwrap(), r.0);
            assert_eq!(r.0.id(), r.1);
            assert_eq!(GgmlType::from_name(r.2), Some(r.0));
        }
        assert!(GgmlType::from_id(4).is_err());
        assert!(GgmlType::from_id(1000).is_err());
    }

    #[test]
    fn bytes_for_checks_blocks() {
        assert_eq!(GgmlType::Q4_K.bytes_for(512), Some(288));
        assert_eq!(GgmlType::Q4_K.bytes_for(100), None);
        assert_eq!(GgmlType::F32.bytes_for(u64::MAX), None);
    }
}
