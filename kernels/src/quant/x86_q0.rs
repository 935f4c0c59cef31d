//! x86-64 kernels for the 32-element block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) that round
//! exactly like ggml's CPU backend.
//!
//! ggml computes every output of these formats the same way, whether through `vec_dot`
//! (`arch/x86/quants.c`, decode and Q4_1/Q5_1 prefill) or llamafile's `tinyBLAS_Q0_AVX`
//! (Q4_0/Q5_0/Q8_0 batches of two or more): per block, the 32 integer products are summed four
//! adjacent elements per i32 lane (8 lanes), the lanes go to f32, and
//! `acc = fma(dx·dy, lanes, acc)` with `dx·dy` one f32 product of the two f16 scales; at the
//! end the 8 lanes are summed by `hsum_float_8` (high half + low half, then 2, then 1). Q4_1
//! and Q5_1 also keep a scalar `summs = fma(m, s, summs)` over blocks (GCC contracts ggml's
//! `summs += m * s`), added last. This module does exactly that, so its results are bit for
//! bit ggml's; the kernels only choose how many rows and tokens share a weight block load.
//!
//! The integer lane sums do not depend on how they are formed, so signed weights use the sign
//! trick of ggml (`|x|` against `sign(y, x)`), unsigned ones (Q4_1, Q5_1) go straight into
//! `vpdpbusd` / `vpmaddubsw`. Activations are plain ggml Q8_0 / Q8_1 blocks.

#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;
use std::marker::PhantomData;
use std::ptr::read_unaligned;

use super::blocks::*;
use super::kernel::RowDot;
use super::x86::{Isa, f16x1, f16x2_ptr, hsum_ps, ld128, ld256};

/// A 32-element weight format: its quants in element order, one byte each.
pub(crate) trait Q0Block {
    const BYTES: usize;
    /// Has a min (`d`, `m` at offsets 0 and 2; activations are Q8_1 with `s` at offset 2).
    const MIN: bool;
    /// The 32 quants of the block at `x`, in element order: signed (`q - offset`) for the
    /// scale-only formats, unsigned for the formats with a min.
    unsafe fn quants<I: Isa>(x: *const u8) -> __m256i;
}

/// Low nibbles of the 16 bytes at `p` in bytes 0..16, high nibbles in 16..32.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let v = ld128(p);
    let both = _mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
}

pub(crate) struct E4_0;
pub(crate) struct E4_1;
pub(crate) struct E5_0;
pub(crate) struct E5_1;
pub(crate) struct E8_0;

impl Q0Block for E4_0 {
    const BYTES: usize = Q4_0_BYTES;
    const MIN: bool = false;
    #[inline(always)]
    unsafe fn quants<I: Isa>(x: *const u8) -> __m256i {
        _mm256_sub_epi8(nibbles(x.add(2)), _mm256_set1_epi8(8))
    }
}

impl Q0Block for E5_0 {
    const BYTES: usize = Q5_0_BYTES;
    const MIN: bool = false;
    #[inline(always)]
    unsafe fn quants<I: Isa>(x: *const u8) -> __m256i {
        let hi = I::bit_bytes(read_unaligned(x.add(2) as *const u32), 0x10);
        _mm256_sub_epi8(_mm256_or_si256(nibbles(x.add(6)), hi), _mm256_set1_epi8(16))
    }
}

impl Q0Block for E8_0 {
    const BYTES: usize = Q8_0_BYTES;
    const MIN: bool = false;
    #[inline(always)]
    unsafe fn quants<I: Isa>(x: *const u8) -> __m256i {
        ld256(x.add(2))
    }
}

impl Q0Block for E4_1 {
    const BYTES: usize = Q4_1_BYTES;
    const MIN: bool = true;
    #[inline(always)]
    unsafe fn quants<I: Isa>(x: *const u8) -> __m256i {
        nibbles(x.add(4))
    }
}

impl Q0Block for E5_1 {
    const BYTES: usize = Q5_1_BYTES;
    const MIN: bool = true;
    #[inline(always)]
    unsafe fn quants<I: Isa>(x: *const u8) -> __m256i {
        let hi = I::bit_bytes(read_unaligned(x.add(4) as *const u32), 0x10);
        _mm256_or_si256(nibbles(x.add(8)), hi)
    }
}

/// ggml-exact dot products of 32-element weight rows with Q8_0 / Q8_1 activation rows.
pub(crate) struct ExactQ0<B, I>(PhantomData<(B, I)>);

impl<B: Q0Block, I: Isa> ExactQ0<B, I> {
    /// `R` weight rows (`w_stride` apart) against `N` activation rows (`st` apart).
    #[inline(always)]
    unsafe fn dot_rows<const R: usize, const N: usize>(
        nb: usize,
        w: *const u8,
        w_stride: usize,
        a: *const u8,
        st: usize,
    ) -> [[f32; N]; R] {
        let (ab, qoff) = if B::MIN {
            (Q8_1_BYTES, 4)
        } else {
            (Q8_0_BYTES, 2)
        };
        let mut acc = [[_mm256_setzero_ps(); N]; R];
        // Lane 1 holds ggml's `summs = fma(m, s, summs)`; lane 0 is scratch.
        let mut summs = [[_mm_setzero_ps(); N]; R];
        for b in 0..nb {
            let mut u = [_mm256_setzero_si256(); R];
            let mut q = u;
            // [d, m] of each weight block (lane 0 only without a min).
            let mut dm = [_mm_setzero_ps(); R];
            for r in 0..R {
                let x = w.add(r * w_stride + b * B::BYTES);
                q[r] = B::quants::<I>(x);
                u[r] = if B::MIN {
                    q[r]
                } else {
                    _mm256_sign_epi8(q[r], q[r])
                };
                dm[r] = if B::MIN { f16x2_ptr(x) } else { f16x1(x) };
            }
            for c in 0..N {
                let y = a.add(c * st + b * ab);
                let qy = ld256(y.add(qoff));
                // [d, s] of the activation block (lane 0 only without a min).
                let ds = if B::MIN { f16x2_ptr(y) } else { f16x1(y) };
                for r in 0..R {
                    let v = if B::MIN {
                        qy
                    } else {
                        _mm256_sign_epi8(qy, q[r])
                    };
                    let s = I::udot(_mm256_setzero_si256(), u[r], v);
                    let d = _mm256_broadcastss_ps(_mm_mul_ss(dm[r], ds));
                    acc[r][c] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc[r][c]);
                    if B::MIN {
                        summs[r][c] = _mm_fmadd_ps(dm[r], ds, summs[r][c]);
                    }
                }
            }
        }
        let mut out = [[0.0f32; N]; R];
        for r in 0..R {
            for c in 0..N {
                out[r][c] = hsum_ps(acc[r][c]);
                if B::MIN {
                    out[r][c] += _mm_cvtss_f32(_mm_movehdup_ps(summs[r][c]));
                }
            }
        }
        out
    }
}

impl<B: Q0Block, I: Isa> RowDot for ExactQ0<B, I> {
    const TWO_ROWS: bool = true;

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
