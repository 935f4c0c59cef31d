//! Quantization of activations (rows of f32) into the "vec_dot_type" of a weight type.
//!
//! The results must equal what llama.cpp's CPU backend computes on x86, so that shoal and
//! llama.cpp see the same integers:
//! - Q8_0 / Q8_1 follow ggml's AVX2 `quantize_row_q8_0/1` (the path an x86 build takes):
//!   `d = amax / 127` stored as f16, `q = round_ties_even(x · (127 / amax))`, and for Q8_1
//!   `s = f16(d · Σq)`. (ggml's scalar `_ref` variant multiplies by `1/d` and rounds half
//!   away from zero; the two differ only on exact ties and in the last bit of the
//!   multiplier.)
//! - Q8_K follows `quantize_row_q8_K_ref` (which x86 also uses): the element of largest
//!   magnitude `max` (the first one on ties) sets `iscale = -127 / max`,
//!   `q = min(127, nearest_int(iscale · x))` (round half to even), `d = 1 / iscale`, so `d`
//!   carries the opposite sign of `max`; `bsums` are sums of 16 consecutive quants.
//! - F16 and BF16 round to nearest even (BF16 keeps NaNs quiet, as ggml does).

use super::blocks::*;

/// `x.round_ties_even()` for |x| ≤ 2²² (and NaN → NaN), without a libm call: adding and
/// subtracting 1.5·2²³ leaves the integer that round-to-nearest-even picks. Without SSE4.1
/// in the target, `round_ties_even` compiles to a call to `rintf`, which cost ~4% of a decode
/// step; this form vectorizes. Callers pass at most ~127.5 in magnitude.
#[inline(always)]
fn round_small(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// Quantizes `x` (a whole number of 32-blocks) to Q8_0 blocks in `y`.
pub fn quantize_row_q8_0(x: &[f32], y: &mut [u8]) {
    debug_assert_eq!(x.len() % QK, 0);
    debug_assert_eq!(y.len(), x.len() / QK * Q8_0_BYTES);
    for (xb, yb) in x.chunks_exact(QK).zip(y.chunks_exact_mut(Q8_0_BYTES)) {
        let (d, _) = q8_block(xb, &mut yb[2..34]);
        yb[0..2].copy_from_slice(&f32_to_f16(d).to_le_bytes());
    }
}

/// Quantizes `x` (a whole number of 32-blocks) to Q8_1 blocks in `y`.
pub fn quantize_row_q8_1(x: &[f32], y: &mut [u8]) {
    debug_assert_eq!(x.len() % QK, 0);
    debug_assert_eq!(y.len(), x.len() / QK * Q8_1_BYTES);
    for (xb, yb) in x.chunks_exact(QK).zip(y.chunks_exact_mut(Q8_1_BYTES)) {
        let (d, sum) = q8_block(xb, &mut yb[4..36]);
        yb[0..2].copy_from_slice(&f32_to_f16(d).to_le_bytes());
        yb[2..4].copy_from_slice(&f32_to_f16(d * sum as f32).to_le_bytes());
    }
}

/// One 32-block of Q8_0/Q8_1: writes the quants, returns `(d, Σq)`.
#[inline(always)]
fn q8_block(x: &[f32], q: &mut [u8]) -> (f32, i32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (qi, &v) in q.iter_mut().zip(x) {
        let r = round_small(v * id) as i32;
        let r = r.clamp(-128, 127);
        sum += r;
        *qi = r as i8 as u8;
    }
    (d, sum)
}

/// Quantizes `x` (a whole number of 256-blocks) to Q8_K blocks in `y`.
pub fn quantize_row_q8_k(x: &[f32], y: &mut [u8]) {
    debug_assert_eq!(x.len() % QK_K, 0);
    debug_assert_eq!(y.len(), x.len() / QK_K * Q8_K_BYTES);
    for (xb, yb) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(Q8_K_BYTES)) {
        let mut amax = 0.0f32;
        let mut max = 0.0f32;
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            yb.fill(0);
            continue;
        }
        let iscale = -127.0 / max;
        let (head, tail) = yb.split_at_mut(Q8_K_BSUMS);
        let qs = &mut head[Q8_K_QS..];
        for (qi, &v) in qs.iter_mut().zip(xb) {
            let r = (round_small(iscale * v) as i32).min(127);
            *qi = r as i8 as u8;
        }
        for (g, bs) in tail.chunks_exact_mut(2).enumerate() {
            let s: i32 = qs[16 * g..16 * g + 16]
                .iter()
                .map(|&q| q as i8 as i32)
                .sum();
            bs.copy_from_slice(&(s as i16).to_le_bytes());
        }
        head[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}

/// Converts `x` to little-endian f16 in `y` (2 bytes per element).
pub fn quantize_row_f16(x: &[f32], y: &mut [u8]) {
    debug_assert_eq!(y.len(), x.len() * 2);
    for (v, o) in x.iter().zip(y.chunks_exact_mut(2)) {
        o.copy_from_slice(&f32_to_f16(*v).to_le_bytes());
    }
}

/// Converts `x` to little-endian bf16 in `y` (2 bytes per element).
pub fn quantize_row_bf16(x: &[f32], y: &mut [u8]) {
    debug_assert_eq!(y.len(), x.len() * 2);
    for (v, o) in x.iter().zip(y.chunks_exact_mut(2)) {
        o.copy_from_slice(&f32_to_bf16(*v).to_le_bytes());
    }
}

/// Copies `x` as little-endian f32 bytes into `y`.
pub fn quantize_row_f32(x: &[f32], y: &mut [u8]) {
    debug_assert_eq!(y.len(), x.len() * 4);
    for (v, o) in x.iter().zip(y.chunks_exact_mut(4)) {
        o.copy_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod round_tests {
    #[test]
    fn round_small_is_round_ties_even_in_range() {
        let mut x = -140.0f32;
        while x <= 140.0 {
            assert_eq!(super::round_small(x), x.round_ties_even(), "{x}");
            x += 1.0 / 64.0;
        }
        for x in [0.5f32, 1.5, 2.5, -0.5, -1.5, 126.5, 127.49999, -127.5, 1e-30, -0.0] {
            assert_eq!(super::round_small(x), x.round_ties_even(), "{x}");
        }
        assert!(super::round_small(f32::NAN).is_nan());
    }
}
