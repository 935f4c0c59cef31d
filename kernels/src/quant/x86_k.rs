//! x86-64 kernels for the K formats (Q4_K, Q5_K, Q6_K against Q8_K).
//!
//! Both levels work on 32 quants per 256-bit register like ggml's AVX2 kernels: `vpmaddubsw`
//! of the unsigned weight quants with the activation bytes, then `vpmaddwd` (AVX2) or VNNI
//! `vpdpwssd` (AVX-512) with the sub-block scales into i32 lanes; AVX-512 takes 8 tokens at a
//! time. The mins of Q4_K/Q5_K and Q6_K's offset of 32 come from the activation's `bsums`.
//!
//! How the integer sums become f32 follows llama.cpp, per type:
//! - Q4_K: its repacked 8×8 kernels (used for row counts that are multiples of 8). GEMM, for
//!   each group of 4 tokens: per pair of sub-blocks, the integer sum of the scaled products
//!   goes into `fma(s, d·dy, acc)` and that of the mins into `fma(m, dmin·dy, accm)`; the
//!   result is `acc - accm`. GEMV, for the tokens left over: the same per super-block.
//! - Q6_K: `vec_dot_q6_K_q8_K` below [`super::kernel::LARGE_BATCH`] tokens, the tiled kernel
//!   from there (see [`Q6k`]).
//! - Q5_K (not bit-exact): per super-block `fma(d·dy, lanes, acc)` and
//!   `fma(-dmin·dy, min lanes, acc)`, then one horizontal sum.

#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;
use std::ptr::read_unaligned;

use super::blocks::*;
use super::kernel::{RowDot, Tile, TileFn, drive};
use std::marker::PhantomData;

use super::x86::{Avx2, Isa, Vnni, f16_ptr, f16x2_ptr, f32_ptr, finish, ld128, ld256};
use crate::GgmlType;
use crate::cpu::SimdLevel;

/// The 8 scales and 8 mins of the Q4_K/Q5_K block at `x` as bytes 0..8 and 8..16, unpacked
/// in registers the same way as `blocks::k4_scales_mins`. Reads bytes 4..20 of the block.
#[inline(always)]
unsafe fn k4_scales(x: *const u8) -> __m128i {
    let v = ld128(x.add(4)); // dwords s0, s1, s2 (and 4 bytes of what follows)
    // Low 6 bits of the scales (s0) and mins (s1); low 4 bits of scales 4..8 and mins 4..8
    // from the nibbles of s2.
    let t = _mm_srlv_epi32(
        _mm_shuffle_epi32(v, 0b10_01_10_00),
        _mm_setr_epi32(0, 0, 0, 4),
    );
    let low = _mm_and_si128(
        t,
        _mm_setr_epi32(0x3f3f_3f3f, 0x0f0f_0f0f, 0x3f3f_3f3f, 0x0f0f_0f0f),
    );
    // Top 2 bits of scales 4..8 (bits 6..8 of s0) and mins 4..8 (of s1), moved to bits 4..6.
    let top = _mm_srli_epi32(_mm_shuffle_epi32(v, 0b01_01_00_00), 2);
    let top = _mm_and_si128(top, _mm_setr_epi32(0, 0x3030_3030, 0, 0x3030_3030));
    _mm_or_si128(low, top)
}

/// `vpshufb` patterns over `[k4_scales | k4_scales]`: pattern `i < 8` broadcasts scale `i`
/// zero-extended to every i16 lane; pattern 8 gives the mins each repeated twice
/// (`m0 m0 m1 m1 … m7 m7`), to pair with the 16 `bsums` of a Q8_K block.
static K4_PICK: [[u8; 32]; 9] = {
    let mut t = [[0x80u8; 32]; 9];
    let mut i = 0;
    while i < 8 {
        let mut b = 0;
        while b < 32 {
            t[i][b] = i as u8;
            b += 2;
        }
        i += 1;
    }
    let mut l = 0;
    while l < 16 {
        t[8][2 * l] = (8 + l / 2) as u8;
        l += 1;
    }
    t
};

/// The address of a shuffle table, hidden from the optimizer: with the patterns known,
/// LLVM rewrites each one-instruction `vpshufb` as two narrower shuffles.
#[inline(always)]
fn opaque<T>(p: *const T) -> *const u8 {
    std::hint::black_box(p as *const u8)
}

/// 0x10 in each byte whose bit `bit` (0..8) of `qh` is set. Shifting 16-bit lanes moves bits
/// across bytes, but only bit 4 of each byte is kept and it comes from the same byte.
#[inline(always)]
unsafe fn q5_hbit(qh: __m256i, bit: i32) -> __m256i {
    let moved = if bit <= 4 {
        _mm256_sll_epi16(qh, _mm_cvtsi32_si128(4 - bit))
    } else {
        _mm256_srl_epi16(qh, _mm_cvtsi32_si128(bit - 4))
    };
    _mm256_and_si256(moved, _mm256_set1_epi8(0x10))
}

/// The sum of the 8 i32 lanes of `v` (exact, in any order).
#[inline(always)]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
    _mm_cvtsi128_si32(s)
}

/// Q4_K (`Q5 == false`) or Q5_K (`Q5 == true`), 32 quants per register.
pub(crate) struct Q45k<I, const Q5: bool>(PhantomData<I>);

impl<I: Isa, const Q5: bool> RowDot for Q45k<I, Q5> {
    const GROUP: usize = if I::MANY_REGS { 8 } else { 4 };

    #[inline(always)]
    unsafe fn dot<const N: usize>(nb: usize, w: *const u8, a: *const u8, st: usize) -> [f32; N] {
        let bytes = if Q5 { Q5_K_BYTES } else { Q4_K_BYTES };
        let qs_off = if Q5 { 48 } else { 16 };
        let m4 = _mm256_set1_epi8(0x0f);
        let pick = opaque(K4_PICK.as_ptr());
        // Q4_K rounds like ggml's repacked Q4_K 8x8 kernels (see the module header): GEMM for
        // groups of four or more tokens, GEMV for the rest.
        const { assert!(N <= 8) };
        let (gemm, gemv) = (!Q5 && N >= 4, !Q5 && N < 4);
        let mut acc = [_mm256_setzero_ps(); N];
        let mut accs = [0.0f32; N];
        let mut accm = [0.0f32; N];
        for b in 0..nb {
            let x = w.add(b * bytes);
            let sm = _mm256_broadcastsi128_si256(k4_scales(x));
            let mins2 = _mm256_shuffle_epi8(sm, ld256(pick.add(32 * 8)));
            let qh = if Q5 {
                ld256(x.add(16))
            } else {
                _mm256_setzero_si256()
            };
            let mut sumi = [_mm256_setzero_si256(); N];
            let mins = if gemm {
                k4_scales_mins(std::slice::from_raw_parts(x.add(4), 12)).1
            } else {
                [0; 8]
            };
            let dd = f16x2_ptr(x);
            let (dx, dmx) = (_mm_cvtss_f32(dd), _mm_cvtss_f32(_mm_movehdup_ps(dd)));
            for j in 0..4 {
                let q = ld256(x.add(qs_off + 32 * j));
                let mut lo = _mm256_and_si256(q, m4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                if Q5 {
                    lo = _mm256_or_si256(lo, q5_hbit(qh, 2 * j as i32));
                    hi = _mm256_or_si256(hi, q5_hbit(qh, 2 * j as i32 + 1));
                }
                let sl = _mm256_shuffle_epi8(sm, ld256(pick.add(32 * (2 * j))));
                let sh = _mm256_shuffle_epi8(sm, ld256(pick.add(32 * (2 * j + 1))));
                for c in 0..N {
                    let y = a.add(c * st + b * Q8_K_BYTES + Q8_K_QS + 64 * j);
                    let pl = _mm256_maddubs_epi16(lo, ld256(y));
                    let ph = _mm256_maddubs_epi16(hi, ld256(y.add(32)));
                    if gemm {
                        // ggml's Q4_K 8x8 GEMM: one fma per pair of sub-blocks.
                        let s = hsum_i32(I::wdot(I::wdot(_mm256_setzero_si256(), pl, sl), ph, sh));
                        let y0 = a.add(c * st + b * Q8_K_BYTES);
                        let yd = f32_ptr(y0);
                        let bs = y0.add(Q8_K_BSUMS + 8 * j) as *const i16;
                        let bs = |k: usize| read_unaligned(bs.add(k)) as i32;
                        let mn = mins[2 * j] as i32 * (bs(0) + bs(1))
                            + mins[2 * j + 1] as i32 * (bs(2) + bs(3));
                        accs[c] = (s as f32).mul_add(dx * yd, accs[c]);
                        accm[c] = (mn as f32).mul_add(dmx * yd, accm[c]);
                    } else {
                        sumi[c] = I::wdot(I::wdot(sumi[c], pl, sl), ph, sh);
                    }
                }
            }
            if gemm {
                continue;
            }
            for c in 0..N {
                let y = a.add(c * st + b * Q8_K_BYTES);
                let yd = f32_ptr(y);
                // Σ_j min_j · (bsum_2j + bsum_2j+1), spread over 8 lanes.
                let m = _mm256_madd_epi16(ld256(y.add(Q8_K_BSUMS)), mins2);
                if gemv {
                    // ggml's Q4_K 8x8 GEMV: the super-block's integer sums, one fma each.
                    let (s, mn) = (hsum_i32(sumi[c]), hsum_i32(m));
                    accs[c] = (s as f32).mul_add(dx * yd, accs[c]);
                    accm[c] = (mn as f32).mul_add(dmx * yd, accm[c]);
                } else {
                    let acc1 = _mm256_fmadd_ps(
                        _mm256_set1_ps(dx * yd),
                        _mm256_cvtepi32_ps(sumi[c]),
                        acc[c],
                    );
                    acc[c] =
                        _mm256_fmadd_ps(_mm256_set1_ps(-dmx * yd), _mm256_cvtepi32_ps(m), acc1);
                }
            }
        }
        if Q5 {
            finish(&acc)
        } else {
            let mut out = [0.0f32; N];
            for c in 0..N {
                out[c] = accs[c] - accm[c];
            }
            out
        }
    }
}

/// `vpshufb` patterns over 8 i16 scales repeated in both 128-bit halves: pattern `k` (0..4)
/// fills the low half with scale `2k` and the high half with scale `2k + 1`.
static Q6_PICK: [[u8; 32]; 4] = {
    let mut t = [[0u8; 32]; 4];
    let mut k = 0;
    while k < 4 {
        let mut b = 0;
        while b < 32 {
            let lane = 2 * k + b / 16;
            t[k][b] = (2 * lane + b % 2) as u8;
            b += 1;
        }
        k += 1;
    }
    t
};

/// Q6_K, 32 quants per register. The quants are used unsigned (0..64); their offset of 32 is
/// taken off once per block as `32 · Σ_g scale_g · bsum_g`.
///
/// With `TILED`, rounds like ggml's tiled K-quant matmul (`tiled/tiled-kernel.cpp`, which
/// llama.cpp takes for products of 8 tokens or more): the super-block's exact integer total,
/// `acc = fma(float(total) · dx, dy, acc)` per super-block. Otherwise like ggml's
/// `vec_dot_q6_K_q8_K`: 8 integer lanes, `acc = fma(dx·dy, lanes, acc)`, `hsum_float_8`.
pub(crate) struct Q6k<I, const TILED: bool>(PhantomData<I>);

impl<I: Isa, const TILED: bool> RowDot for Q6k<I, TILED> {
    const GROUP: usize = if I::MANY_REGS { 8 } else { 4 };

    #[inline(always)]
    unsafe fn dot<const N: usize>(nb: usize, w: *const u8, a: *const u8, st: usize) -> [f32; N] {
        let m15 = _mm256_set1_epi8(0x0f);
        let pick = opaque(Q6_PICK.as_ptr());
        let mut acc = [_mm256_setzero_ps(); N];
        let mut accs = [0.0f32; N];
        for b in 0..nb {
            let x = w.add(b * Q6_K_BYTES);
            let sc16 = _mm256_cvtepi8_epi16(ld128(x.add(192)));
            // -32 · scale, per group of 16 quants, against the activation's bsums.
            let neg_sc32 = _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16(sc16, 5));
            let mut sumi = [_mm256_setzero_si256(); N];
            for c in 0..N {
                let y = a.add(c * st + b * Q8_K_BYTES);
                sumi[c] = I::wdot(sumi[c], ld256(y.add(Q8_K_BSUMS)), neg_sc32);
            }
            for h in 0..2 {
                // Scales 8h..8h+8 (of this half) in both 128-bit halves.
                let sc_h = if h == 0 {
                    _mm256_permute2x128_si256(sc16, sc16, 0x00)
                } else {
                    _mm256_permute2x128_si256(sc16, sc16, 0x11)
                };
                let ql0 = ld256(x.add(64 * h));
                let ql1 = ld256(x.add(64 * h + 32));
                let qh = ld256(x.add(128 + 32 * h));
                for k in 0..4 {
                    let src = if k & 1 == 0 { ql0 } else { ql1 };
                    let low = if k < 2 {
                        _mm256_and_si256(src, m15)
                    } else {
                        _mm256_and_si256(_mm256_srli_epi16(src, 4), m15)
                    };
                    let high = match k {
                        0 => _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(3)), 4),
                        1 => _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(12)), 2),
                        2 => _mm256_and_si256(qh, _mm256_set1_epi8(48)),
                        _ => _mm256_srli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(-64)), 2),
                    };
                    let q = _mm256_or_si256(low, high);
                    let scale = _mm256_shuffle_epi8(sc_h, ld256(pick.add(32 * k)));
                    for c in 0..N {
                        let y = a.add(c * st + b * Q8_K_BYTES + Q8_K_QS + 128 * h + 32 * k);
                        sumi[c] = I::wdot(sumi[c], _mm256_maddubs_epi16(q, ld256(y)), scale);
                    }
                }
            }
            let dx = f16_ptr(x.add(208));
            for c in 0..N {
                let dy = f32_ptr(a.add(c * st + b * Q8_K_BYTES));
                if TILED {
                    accs[c] = (hsum_i32(sumi[c]) as f32 * dx).mul_add(dy, accs[c]);
                } else {
                    let d = _mm256_set1_ps(dx * dy);
                    acc[c] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi[c]), acc[c]);
                }
            }
        }
        if TILED { accs } else { finish(&acc) }
    }
}

macro_rules! entries {
    ($feat:literal: $($name:ident => $kern:ty),* $(,)?) => {$(
        #[target_feature(enable = $feat)]
        unsafe fn $name(t: &Tile) {
            drive::<$kern>(t)
        }
    )*};
}

entries! { "avx2,fma,f16c":
    avx2_q4_k => Q45k<Avx2, false>,
    avx2_q5_k => Q45k<Avx2, true>,
    avx2_q6_k => Q6k<Avx2, false>,
    avx2_q6_k_tiled => Q6k<Avx2, true>,
}

entries! { "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni":
    avx512_q4_k => Q45k<Vnni, false>,
    avx512_q5_k => Q45k<Vnni, true>,
    avx512_q6_k => Q6k<Vnni, false>,
    avx512_q6_k_tiled => Q6k<Vnni, true>,
}

/// The K-format kernel for `ty` at `level` for products of [`super::kernel::LARGE_BATCH`] tokens
/// or more, where it rounds differently from [`tile_fn`]'s.
pub(crate) fn large_tile_fn(ty: GgmlType, level: SimdLevel) -> Option<TileFn> {
    Some(match (level, ty) {
        (SimdLevel::Avx2, GgmlType::Q6_K) => avx2_q6_k_tiled,
        (SimdLevel::Avx512, GgmlType::Q6_K) => avx512_q6_k_tiled,
        _ => return None,
    })
}

/// The K-format kernel for `ty` at `level` (already clamped to the CPU).
pub(crate) fn tile_fn(ty: GgmlType, level: SimdLevel) -> Option<TileFn> {
    let f: TileFn = match (level, ty) {
        (SimdLevel::Portable, _) => return None,
        (SimdLevel::Avx2, GgmlType::Q4_K) => avx2_q4_k,
        (SimdLevel::Avx2, GgmlType::Q5_K) => avx2_q5_k,
        (SimdLevel::Avx2, GgmlType::Q6_K) => avx2_q6_k,
        (SimdLevel::Avx512, GgmlType::Q4_K) => avx512_q4_k,
        (SimdLevel::Avx512, GgmlType::Q5_K) => avx512_q5_k,
        (SimdLevel::Avx512, GgmlType::Q6_K) => avx512_q6_k,
        _ => return None,
    };
    Some(f)
}
