//! x86-64 kernels: the two SIMD levels ([`Isa`]) and the helpers shared by `x86_q0` and
//! `x86_k`, the float formats (F32, F16, BF16), and the choice of x86 kernel per type and
//! level ([`kernel`]).
//!
//! Each kernel is written once, generic over [`Isa`], and instantiated inside
//! `#[target_feature]` entry points: AVX2 sums byte products with `vpmaddubsw` + `vpmaddwd`,
//! AVX-512 with one VNNI `vpdpbusd` (and `vpdpwssd` for i16) on 256-bit registers. On Zen 4,
//! which runs 512-bit operations in two halves, 256-bit VNNI is as fast as 512-bit and keeps
//! the code shared. Operands never reach `vpmaddubsw`'s i16 saturation, so both levels compute
//! the same integers, and those are the integers of ggml's kernels.
//!
//! Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 take the kernels of `x86_q0`, the K formats those of
//! `x86_k`. They read plain ggml activation blocks, the two levels round alike, and all but
//! Q5_K sum in ggml's order (see those headers). The float formats accumulate with FMA in two
//! sets of 8 f32 lanes, which is not ggml's order: close to llama.cpp, not bit-identical.

// The helpers below are `unsafe fn`s made only of intrinsics; wrapping every line in its own
// `unsafe {}` would say nothing more.
#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;
use std::marker::PhantomData;
use std::ptr::read_unaligned;

use super::blocks::*;
use super::kernel::{Kernel, RowDot, Tile, TileFn, drive};
use super::x86_k;
use super::x86_q0::*;
use crate::GgmlType;
use crate::cpu::SimdLevel;

/// How a kernel sums `u8 × i8` byte products, four adjacent bytes per i32 lane, and
/// spreads bits to bytes.
pub(crate) trait Isa {
    /// 32 vector registers (AVX-512) rather than 16, enough for groups of 8 tokens.
    const MANY_REGS: bool;
    unsafe fn udot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i;
    /// Byte i is `val` where bit i of `bits` is set, else 0.
    unsafe fn bit_bytes(bits: u32, val: i8) -> __m256i;
    /// `acc + Σ` of adjacent `i16 × i16` products, per i32 lane.
    unsafe fn wdot(acc: __m256i, a: __m256i, b: __m256i) -> __m256i;
}

pub(crate) struct Avx2;
pub(crate) struct Vnni;

impl Isa for Avx2 {
    const MANY_REGS: bool = false;
    #[inline(always)]
    unsafe fn udot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        let p16 = _mm256_maddubs_epi16(u, s);
        _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }
    #[inline(always)]
    unsafe fn bit_bytes(bits: u32, val: i8) -> __m256i {
        _mm256_and_si256(bits_to_bytes(bits), _mm256_set1_epi8(val))
    }
    #[inline(always)]
    unsafe fn wdot(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
    }
}

impl Isa for Vnni {
    const MANY_REGS: bool = true;
    #[inline(always)]
    unsafe fn udot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, u, s)
    }
    #[inline(always)]
    unsafe fn bit_bytes(bits: u32, val: i8) -> __m256i {
        _mm256_maskz_mov_epi8(bits, _mm256_set1_epi8(val))
    }
    #[inline(always)]
    unsafe fn wdot(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        vpdpwssd(acc, a, b)
    }
}

/// `vpdpwssd` in `asm!`: LLVM's machine combiner splits a chain of the intrinsic back into
/// `vpmaddwd` + `vpaddd`, one more instruction each.
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
unsafe fn vpdpwssd(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    let mut acc = acc;
    std::arch::asm!(
        "vpdpwssd {acc}, {a}, {b}",
        acc = inout(ymm_reg) acc,
        a = in(ymm_reg) a,
        b = in(ymm_reg) b,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

#[inline(always)]
pub(crate) unsafe fn ld128(p: *const u8) -> __m128i {
    _mm_loadu_si128(p as *const __m128i)
}

#[inline(always)]
pub(crate) unsafe fn ld256(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// `bits` in lane 0 of a register whose other lanes are zero (`vmovd`).
///
/// Written in `asm!` so the compiler cannot narrow it: when only lane 0 of a conversion is
/// used, LLVM turns the load into a `vpinsrw` into whatever register is at hand, often an
/// accumulator, which chained every block to the previous block's FMA and made the
/// kernels several times slower.
#[inline(always)]
unsafe fn movd(bits: u32) -> __m128i {
    let v: __m128i;
    std::arch::asm!(
        "vmovd {v}, {b:e}",
        v = lateout(xmm_reg) v,
        b = in(reg) bits,
        options(pure, nomem, nostack, preserves_flags)
    );
    v
}

/// The f16 at `p` as f32 (F16C).
#[inline(always)]
pub(crate) unsafe fn f16_ptr(p: *const u8) -> f32 {
    let bits = read_unaligned(p as *const u16);
    _mm_cvtss_f32(_mm_cvtph_ps(movd(bits as u32)))
}

/// The f16 at `p` as f32, without F16C (for element tails).
#[inline(always)]
unsafe fn f16_ptr_exact(p: *const u8) -> f32 {
    f16_to_f32(read_unaligned(p as *const u16))
}

/// The f16 at `p` as f32 lane 0 (other lanes zero).
#[inline(always)]
pub(crate) unsafe fn f16x1(p: *const u8) -> __m128 {
    _mm_cvtph_ps(movd(read_unaligned(p as *const u16) as u32))
}

/// The two consecutive f16 at `p` as f32 lanes 0 and 1.
#[inline(always)]
pub(crate) unsafe fn f16x2_ptr(p: *const u8) -> __m128 {
    let bits = read_unaligned(p as *const u32);
    _mm_cvtph_ps(movd(bits))
}

#[inline(always)]
pub(crate) unsafe fn f32_ptr(p: *const u8) -> f32 {
    read_unaligned(p as *const f32)
}

/// Byte i of the result is 0xFF if bit i of `bits` is set, else 0.
#[inline(always)]
unsafe fn bits_to_bytes(bits: u32) -> __m256i {
    let v = _mm256_set1_epi32(bits as i32);
    let pick = _mm256_setr_epi64x(
        0,
        0x0101_0101_0101_0101,
        0x0202_0202_0202_0202,
        0x0303_0303_0303_0303,
    );
    let spread = _mm256_shuffle_epi8(v, pick);
    let mask = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask)
}

#[inline(always)]
pub(crate) unsafe fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline(always)]
pub(crate) unsafe fn finish<const N: usize>(acc: &[__m256; N]) -> [f32; N] {
    // Loops, not `array::from_fn`: its closures are not always inlined into the
    // `#[target_feature]` caller, and then every intrinsic inside becomes a call.
    let mut out = [0.0f32; N];
    for c in 0..N {
        out[c] = hsum_ps(acc[c]);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Float formats: F32 · F32, F16 · F16, BF16 · BF16, accumulated in f32 with FMA.
// ---------------------------------------------------------------------------------------------

/// How a float format loads 8 elements as f32; `SIZE` bytes per element.
pub(crate) trait FloatFmt {
    const SIZE: usize;
    unsafe fn load8(p: *const u8) -> __m256;
    unsafe fn one(p: *const u8) -> f32;
}

pub(crate) struct FF32;
pub(crate) struct FF16;
pub(crate) struct FBF16;

impl FloatFmt for FF32 {
    const SIZE: usize = 4;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_loadu_ps(p as *const f32)
    }
    #[inline(always)]
    unsafe fn one(p: *const u8) -> f32 {
        f32_ptr(p)
    }
}

impl FloatFmt for FF16 {
    const SIZE: usize = 2;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(ld128(p))
    }
    #[inline(always)]
    unsafe fn one(p: *const u8) -> f32 {
        f16_ptr_exact(p)
    }
}

impl FloatFmt for FBF16 {
    const SIZE: usize = 2;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(ld128(p)), 16))
    }
    #[inline(always)]
    unsafe fn one(p: *const u8) -> f32 {
        bf16_to_f32(read_unaligned(p as *const u16))
    }
}

pub(crate) struct FloatDot<F>(PhantomData<F>);

impl<F: FloatFmt> RowDot for FloatDot<F> {
    #[inline(always)]
    unsafe fn dot<const N: usize>(n: usize, w: *const u8, a: *const u8, st: usize) -> [f32; N] {
        let mut acc0 = [_mm256_setzero_ps(); N];
        let mut acc1 = [_mm256_setzero_ps(); N];
        let mut i = 0;
        while i + 16 <= n {
            let w0 = F::load8(w.add(i * F::SIZE));
            let w1 = F::load8(w.add((i + 8) * F::SIZE));
            for c in 0..N {
                let y = a.add(c * st + i * F::SIZE);
                acc0[c] = _mm256_fmadd_ps(w0, F::load8(y), acc0[c]);
                acc1[c] = _mm256_fmadd_ps(w1, F::load8(y.add(8 * F::SIZE)), acc1[c]);
            }
            i += 16;
        }
        if i + 8 <= n {
            let w0 = F::load8(w.add(i * F::SIZE));
            for c in 0..N {
                let y = a.add(c * st + i * F::SIZE);
                acc0[c] = _mm256_fmadd_ps(w0, F::load8(y), acc0[c]);
            }
            i += 8;
        }
        let mut out = [0.0f32; N];
        for c in 0..N {
            out[c] = hsum_ps(_mm256_add_ps(acc0[c], acc1[c]));
        }
        for j in i..n {
            let wj = F::one(w.add(j * F::SIZE));
            for c in 0..N {
                out[c] += wj * F::one(a.add(c * st + j * F::SIZE));
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points.
// ---------------------------------------------------------------------------------------------

macro_rules! entries {
    ($feat:literal: $($name:ident => $kern:ty),* $(,)?) => {$(
        #[target_feature(enable = $feat)]
        unsafe fn $name(t: &Tile) {
            drive::<$kern>(t)
        }
    )*};
}

entries! { "avx2,fma,f16c":
    avx2_q8_0 => ExactQ0<E8_0, Avx2>,
    avx2_q4_0 => ExactQ0<E4_0, Avx2>,
    avx2_q5_0 => ExactQ0<E5_0, Avx2>,
    avx2_q4_1 => ExactQ0<E4_1, Avx2>,
    avx2_q5_1 => ExactQ0<E5_1, Avx2>,
    avx2_f32 => FloatDot<FF32>,
    avx2_f16 => FloatDot<FF16>,
    avx2_bf16 => FloatDot<FBF16>,
}

entries! { "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni":
    avx512_q8_0 => ExactQ0<E8_0, Vnni>,
    avx512_q4_0 => ExactQ0<E4_0, Vnni>,
    avx512_q5_0 => ExactQ0<E5_0, Vnni>,
    avx512_q4_1 => ExactQ0<E4_1, Vnni>,
    avx512_q5_1 => ExactQ0<E5_1, Vnni>,
}

/// The x86 kernel for `ty` at `level` (already clamped to the CPU), if there is one.
pub(crate) fn kernel(ty: GgmlType, level: SimdLevel) -> Option<Kernel> {
    let avx512 = level == SimdLevel::Avx512;
    let tile: TileFn = match ty {
        _ if level == SimdLevel::Portable => return None,
        GgmlType::F32 => avx2_f32,
        GgmlType::F16 => avx2_f16,
        GgmlType::BF16 => avx2_bf16,
        GgmlType::Q8_0 if avx512 => avx512_q8_0,
        GgmlType::Q4_0 if avx512 => avx512_q4_0,
        GgmlType::Q5_0 if avx512 => avx512_q5_0,
        GgmlType::Q4_1 if avx512 => avx512_q4_1,
        GgmlType::Q5_1 if avx512 => avx512_q5_1,
        GgmlType::Q8_0 => avx2_q8_0,
        GgmlType::Q4_0 => avx2_q4_0,
        GgmlType::Q5_0 => avx2_q5_0,
        GgmlType::Q4_1 => avx2_q4_1,
        GgmlType::Q5_1 => avx2_q5_1,
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
            return Some(Kernel {
                tile: x86_k::tile_fn(ty, level)?,
                large: x86_k::large_tile_fn(ty, level),
            });
        }
        _ => return None,
    };
    Some(Kernel::new(tile))
}
