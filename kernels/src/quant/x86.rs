//! x86-64 kernels for the 32-element block formats and the float formats, and the choice
//! of x86 kernel per type and level.
//!
//! Each kernel is written once, generic over [`Isa`], and instantiated inside
//! `#[target_feature]` entry points: AVX2 sums byte products with `vpmaddubsw` + `vpmaddwd`,
//! AVX-512 with one VNNI `vpdpbusd` (and `vpdpwssd` for i16) on 256-bit registers. On Zen 4,
//! which runs 512-bit operations in two halves, 256-bit VNNI is as fast as 512-bit and keeps
//! the code shared. Operands never reach `vpmaddubsw`'s i16 saturation, so both levels compute
//! the same integers, and those are the integers of ggml's kernels.
//!
//! The 32-element formats read their activations in the pair layout of
//! [`super::act::pack_q8_pairs`] (two blocks per 128-byte record, scales widened to f32, the
//! weight offset's correction precomputed), which halves the float work per block. With
//! several tokens and 32 registers, two weight rows share each activation load.

// The helpers below are `unsafe fn`s made only of intrinsics; wrapping every line in its own
// `unsafe {}` would say nothing more.
#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;
use std::marker::PhantomData;
use std::ptr::read_unaligned;

use super::blocks::*;
use super::kernel::{ActLayout, Kernel, RowDot, Tile, TileFn, drive};
use super::x86_k;
use super::x86_q0::*;
use crate::GgmlType;
use crate::cpu::SimdLevel;

/// How a kernel sums `u8 × i8` byte products, four adjacent bytes per i32 lane, and
/// spreads bits to bytes.
pub(crate) trait Isa {
    /// 32 vector registers (AVX-512) rather than 16, enough for two-row kernels.
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
// 32-element formats against pair-layout Q8_0/Q8_1 activations (`act::pack_q8_pairs`):
// Q8_0, Q4_0, Q5_0 (scale only) and Q4_1, Q5_1 (scale and min).
//
// A step takes two blocks: their quants 0..16 fill one register and quants 16..32 another,
// which is how 4-bit weights come out of one 32-byte load of two blocks' nibbles, and how the
// pair layout stores the activations. Scale-only weights are made unsigned by an offset
// (`q + 8` for Q4_0, `q + 16` for Q5_0, `q + 128` for Q8_0) whose effect, `-off·Σy`, the
// activation record already holds and which starts the integer sum. With the lanes of the
// two blocks side by side, one `cvt`, one `mul` by the activation scales and one `fma` by the
// weight scales serve both blocks.
// ---------------------------------------------------------------------------------------------

/// A 32-element weight format as read by [`PairQ8`].
pub(crate) trait PairBlock {
    const BYTES: usize;
    /// Has a min (`d`, `m` at offsets 0 and 2; activations are Q8_1).
    const MIN: bool;
    /// Offset making the quants unsigned; the activations must be packed with it.
    const OFF: i32;
    /// Quants stay signed and go through the sign trick instead (Q8_0 without VNNI, whose
    /// `vpmaddubsw` would saturate on `q + 128`).
    const SIGNED: bool = false;
    /// Quants of blocks `x0`, `x1`: (0..16 of both, 16..32 of both), plus `OFF`.
    unsafe fn quants<I: Isa>(x0: *const u8, x1: *const u8) -> (__m256i, __m256i);
}

/// Two 16-byte rows as one register: `p0` in the low half, `p1` in the high half.
#[inline(always)]
unsafe fn ld2x128(p0: *const u8, p1: *const u8) -> __m256i {
    _mm256_inserti128_si256(_mm256_castsi128_si256(ld128(p0)), ld128(p1), 1)
}

/// The nibbles of two blocks (16 bytes each at `p0`, `p1`) as (low nibbles, high nibbles).
#[inline(always)]
unsafe fn nibble_pair(p0: *const u8, p1: *const u8) -> (__m256i, __m256i) {
    let m4 = _mm256_set1_epi8(0x0f);
    let v = ld2x128(p0, p1);
    (
        _mm256_and_si256(v, m4),
        _mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
    )
}

/// The 5th bits of two blocks (u32 at `p0`, `p1`, bit j = element j) as 0x10 bytes laid out
/// like [`nibble_pair`].
#[inline(always)]
unsafe fn fifth_bits<I: Isa>(p0: *const u8, p1: *const u8) -> (__m256i, __m256i) {
    let h0 = read_unaligned(p0 as *const u32);
    let h1 = read_unaligned(p1 as *const u32);
    let lo = (h0 & 0xffff) | (h1 << 16);
    let hi = (h0 >> 16) | (h1 & 0xffff_0000);
    (I::bit_bytes(lo, 0x10), I::bit_bytes(hi, 0x10))
}

pub(crate) struct BQ8_0;
pub(crate) struct BQ8_0Signed;
pub(crate) struct BQ4_0;
pub(crate) struct BQ5_0;
pub(crate) struct BQ4_1;
pub(crate) struct BQ5_1;

impl PairBlock for BQ8_0 {
    const BYTES: usize = Q8_0_BYTES;
    const MIN: bool = false;
    const OFF: i32 = 128;
    #[inline(always)]
    unsafe fn quants<I: Isa>(x0: *const u8, x1: *const u8) -> (__m256i, __m256i) {
        let flip = _mm256_set1_epi8(-128);
        let lo = ld2x128(x0.add(2), x1.add(2));
        let hi = ld2x128(x0.add(18), x1.add(18));
        (_mm256_xor_si256(lo, flip), _mm256_xor_si256(hi, flip))
    }
}

impl PairBlock for BQ8_0Signed {
    const BYTES: usize = Q8_0_BYTES;
    const MIN: bool = false;
    const OFF: i32 = 0;
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn quants<I: Isa>(x0: *const u8, x1: *const u8) -> (__m256i, __m256i) {
        (
            ld2x128(x0.add(2), x1.add(2)),
            ld2x128(x0.add(18), x1.add(18)),
        )
    }
}

impl PairBlock for BQ4_0 {
    const BYTES: usize = Q4_0_BYTES;
    const MIN: bool = false;
    const OFF: i32 = 8;
    #[inline(always)]
    unsafe fn quants<I: Isa>(x0: *const u8, x1: *const u8) -> (__m256i, __m256i) {
        nibble_pair(x0.add(2), x1.add(2))
    }
}

impl PairBlock for BQ5_0 {
    const BYTES: usize = Q5_0_BYTES;
    const MIN: bool = false;
    const OFF: i32 = 16;
    #[inline(always)]
    unsafe fn quants<I: Isa>(x0: *const u8, x1: *const u8) -> (__m256i, __m256i) {
        let (lo, hi) = nibble_pair(x0.add(6), x1.add(6));
        let (blo, bhi) = fifth_bits::<I>(x0.add(2), x1.add(2));
        (_mm256_or_si256(lo, blo), _mm256_or_si256(hi, bhi))
    }
}

impl PairBlock for BQ4_1 {
    const BYTES: usize = Q4_1_BYTES;
    const MIN: bool = true;
    const OFF: i32 = 0;
    #[inline(always)]
    unsafe fn quants<I: Isa>(x0: *const u8, x1: *const u8) -> (__m256i, __m256i) {
        nibble_pair(x0.add(4), x1.add(4))
    }
}

impl PairBlock for BQ5_1 {
    const BYTES: usize = Q5_1_BYTES;
    const MIN: bool = true;
    const OFF: i32 = 0;
    #[inline(always)]
    unsafe fn quants<I: Isa>(x0: *const u8, x1: *const u8) -> (__m256i, __m256i) {
        let (lo, hi) = nibble_pair(x0.add(8), x1.add(8));
        let (blo, bhi) = fifth_bits::<I>(x0.add(4), x1.add(4));
        (_mm256_or_si256(lo, blo), _mm256_or_si256(hi, bhi))
    }
}

/// f16 scales of two blocks as f32: `[s0, s1, 0, 0]` (2 bytes each) or, when `wide`,
/// `[s0, t0, s1, t1]` (two consecutive f16 each).
#[inline(always)]
unsafe fn scale_pair(wide: bool, p0: *const u8, p1: *const u8) -> __m128 {
    let v = if wide {
        _mm_insert_epi32(
            movd(read_unaligned(p0 as *const u32)),
            read_unaligned(p1 as *const u32) as i32,
            1,
        )
    } else {
        let lo = movd(read_unaligned(p0 as *const u16) as u32);
        _mm_insert_epi16(lo, read_unaligned(p1 as *const u16) as i32, 1)
    };
    _mm_cvtph_ps(v)
}

pub(crate) struct PairQ8<B, I>(PhantomData<(B, I)>);

impl<B: PairBlock, I: Isa> PairQ8<B, I> {
    /// Adds pair `p` (blocks `2p`, `2p + 1`) of `R` weight rows against `N` activation rows.
    #[inline(always)]
    unsafe fn pair<const R: usize, const N: usize>(
        p: usize,
        nb: usize,
        w: *const u8,
        w_stride: usize,
        a: *const u8,
        st: usize,
        acc: &mut [[__m256; N]; R],
        accm: &mut [[__m128; N]; R],
    ) {
        use super::act::PAIR_BYTES;
        // Lanes of the scale pair holding the second block's `d`.
        let pick = if B::MIN {
            _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2)
        } else {
            _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1)
        };
        let mut q = [(_mm256_setzero_si256(), _mm256_setzero_si256()); R];
        let mut u = q;
        let mut dx = [_mm256_setzero_ps(); R];
        let mut mx = [_mm_setzero_ps(); R];
        for r in 0..R {
            let x0 = w.add(r * w_stride + 2 * p * B::BYTES);
            // An odd last block pairs with itself; its activation twin is all zeros.
            let x1 = if 2 * p + 1 < nb { x0.add(B::BYTES) } else { x0 };
            q[r] = B::quants::<I>(x0, x1);
            u[r] = if B::SIGNED {
                (
                    _mm256_sign_epi8(q[r].0, q[r].0),
                    _mm256_sign_epi8(q[r].1, q[r].1),
                )
            } else {
                q[r]
            };
            let sc = scale_pair(B::MIN, x0, x1);
            dx[r] = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(sc), pick);
            // [m0, m1, ·, ·] against the activation's [s0, s1, 0, 0].
            mx[r] = _mm_shuffle_ps(sc, sc, 0b11_01_11_01);
        }
        for c in 0..N {
            let rec = a.add(c * st + p * PAIR_BYTES);
            let init = if B::MIN {
                _mm256_setzero_si256()
            } else {
                ld256(rec.add(96))
            };
            let (ylo, yhi) = (ld256(rec), ld256(rec.add(32)));
            let dy = _mm256_loadu_ps(rec.add(64) as *const f32);
            for r in 0..R {
                let (mut ylo, mut yhi) = (ylo, yhi);
                if B::SIGNED {
                    ylo = _mm256_sign_epi8(ylo, q[r].0);
                    yhi = _mm256_sign_epi8(yhi, q[r].1);
                }
                let s = I::udot(I::udot(init, u[r].0, ylo), u[r].1, yhi);
                let t = _mm256_mul_ps(_mm256_cvtepi32_ps(s), dy);
                acc[r][c] = _mm256_fmadd_ps(t, dx[r], acc[r][c]);
                if B::MIN {
                    let sy = _mm_loadu_ps(rec.add(96) as *const f32);
                    accm[r][c] = _mm_fmadd_ps(mx[r], sy, accm[r][c]);
                }
            }
        }
    }

    /// `R` weight rows (`w_stride` apart) against `N` activation rows.
    #[inline(always)]
    unsafe fn dot_rows<const R: usize, const N: usize>(
        nb: usize,
        w: *const u8,
        w_stride: usize,
        a: *const u8,
        st: usize,
    ) -> [[f32; N]; R] {
        let mut acc = [[_mm256_setzero_ps(); N]; R];
        let mut accm = [[_mm_setzero_ps(); N]; R];
        for p in 0..nb.div_ceil(2) {
            Self::pair::<R, N>(p, nb, w, w_stride, a, st, &mut acc, &mut accm);
        }
        let mut out = [[0.0f32; N]; R];
        for r in 0..R {
            for c in 0..N {
                let m = accm[r][c];
                out[r][c] =
                    hsum_ps(acc[r][c]) + (_mm_cvtss_f32(m) + _mm_cvtss_f32(_mm_movehdup_ps(m)));
            }
        }
        out
    }
}

impl<B: PairBlock, I: Isa> RowDot for PairQ8<B, I> {
    const TWO_ROWS: bool = I::MANY_REGS;

    #[inline(always)]
    unsafe fn dot<const N: usize>(nb: usize, w: *const u8, a: *const u8, st: usize) -> [f32; N] {
        let [o] = Self::dot_rows::<1, N>(nb, w, 0, a, st);
        o
    }

    #[inline(always)]
    unsafe fn dot2<const N: usize>(
        nb: usize,
        w: *const u8,
        w_stride: usize,
        a: *const u8,
        st: usize,
    ) -> [[f32; N]; 2] {
        Self::dot_rows::<2, N>(nb, w, w_stride, a, st)
    }
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
    exact_avx2_q8_0 => ExactQ0<E8_0, Avx2>,
    exact_avx2_q4_0 => ExactQ0<E4_0, Avx2>,
    exact_avx2_q5_0 => ExactQ0<E5_0, Avx2>,
    exact_avx2_q4_1 => ExactQ0<E4_1, Avx2>,
    exact_avx2_q5_1 => ExactQ0<E5_1, Avx2>,
    avx2_q8_0 => PairQ8<BQ8_0Signed, Avx2>,
    avx2_q4_0 => PairQ8<BQ4_0, Avx2>,
    avx2_q5_0 => PairQ8<BQ5_0, Avx2>,
    avx2_q4_1 => PairQ8<BQ4_1, Avx2>,
    avx2_q5_1 => PairQ8<BQ5_1, Avx2>,
    avx2_f32 => FloatDot<FF32>,
    avx2_f16 => FloatDot<FF16>,
    avx2_bf16 => FloatDot<FBF16>,
}

entries! { "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni":
    exact_avx512_q8_0 => ExactQ0<E8_0, Vnni>,
    exact_avx512_q4_0 => ExactQ0<E4_0, Vnni>,
    exact_avx512_q5_0 => ExactQ0<E5_0, Vnni>,
    exact_avx512_q4_1 => ExactQ0<E4_1, Vnni>,
    exact_avx512_q5_1 => ExactQ0<E5_1, Vnni>,
    avx512_q8_0 => PairQ8<BQ8_0, Vnni>,
    avx512_q4_0 => PairQ8<BQ4_0, Vnni>,
    avx512_q5_0 => PairQ8<BQ5_0, Vnni>,
    avx512_q4_1 => PairQ8<BQ4_1, Vnni>,
    avx512_q5_1 => PairQ8<BQ5_1, Vnni>,
}

fn pairs<B: PairBlock>(tile: TileFn) -> Kernel {
    Kernel {
        tile,
        large: None,
        layout: ActLayout::Pairs {
            min: B::MIN,
            off: B::OFF,
        },
    }
}

/// The x86 kernel for `ty` at `level` (already clamped to the CPU), if there is one.
pub(crate) fn kernel(ty: GgmlType, level: SimdLevel) -> Option<Kernel> {
    let blocks = |tile: TileFn| Kernel {
        tile,
        large: None,
        layout: ActLayout::Blocks,
    };
    let avx512 = level == SimdLevel::Avx512;
    let exact = true;
    Some(match ty {
        _ if level == SimdLevel::Portable => return None,
        GgmlType::F32 => blocks(avx2_f32),
        GgmlType::F16 => blocks(avx2_f16),
        GgmlType::BF16 => blocks(avx2_bf16),
        GgmlType::Q8_0 if exact && avx512 => blocks(exact_avx512_q8_0),
        GgmlType::Q4_0 if exact && avx512 => blocks(exact_avx512_q4_0),
        GgmlType::Q5_0 if exact && avx512 => blocks(exact_avx512_q5_0),
        GgmlType::Q4_1 if exact && avx512 => blocks(exact_avx512_q4_1),
        GgmlType::Q5_1 if exact && avx512 => blocks(exact_avx512_q5_1),
        GgmlType::Q8_0 if exact => blocks(exact_avx2_q8_0),
        GgmlType::Q4_0 if exact => blocks(exact_avx2_q4_0),
        GgmlType::Q5_0 if exact => blocks(exact_avx2_q5_0),
        GgmlType::Q4_1 if exact => blocks(exact_avx2_q4_1),
        GgmlType::Q5_1 if exact => blocks(exact_avx2_q5_1),
        GgmlType::Q8_0 if avx512 => pairs::<BQ8_0>(avx512_q8_0),
        GgmlType::Q4_0 if avx512 => pairs::<BQ4_0>(avx512_q4_0),
        GgmlType::Q5_0 if avx512 => pairs::<BQ5_0>(avx512_q5_0),
        GgmlType::Q4_1 if avx512 => pairs::<BQ4_1>(avx512_q4_1),
        GgmlType::Q5_1 if avx512 => pairs::<BQ5_1>(avx512_q5_1),
        GgmlType::Q8_0 => pairs::<BQ8_0Signed>(avx2_q8_0),
        GgmlType::Q4_0 => pairs::<BQ4_0>(avx2_q4_0),
        GgmlType::Q5_0 => pairs::<BQ5_0>(avx2_q5_0),
        GgmlType::Q4_1 => pairs::<BQ4_1>(avx2_q4_1),
        GgmlType::Q5_1 => pairs::<BQ5_1>(avx2_q5_1),
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => Kernel {
            large: x86_k::large_tile_fn(ty, level),
            ..blocks(x86_k::tile_fn(ty, level)?)
        },
        _ => return None,
    })
}
