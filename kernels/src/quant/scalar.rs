//! Portable dot products of one weight row with one activation row in its vec_dot_type.
//!
//! These are the reference the SIMD paths are tested against. Integer parts are exact (as in
//! ggml), and each block's integer sum is scaled and accumulated in f32 in block order, like
//! ggml's `_generic` kernels.

use super::blocks::*;

/// Sums of `u · y` over the 32 elements of a block, for weights given as 16 packed bytes
/// whose low nibbles are elements 0..16 and high nibbles 16..32; `off` is subtracted from
/// each nibble and `hi(j)` (0 or 16) is OR-ed into element j first.
#[inline(always)]
fn nibble_dot(qs: &[u8], y: &[u8], off: i32, hi: impl Fn(usize) -> u8) -> i32 {
    let mut s = 0i32;
    for j in 0..16 {
        let x0 = ((qs[j] & 0x0f) | hi(j)) as i32 - off;
        let x1 = ((qs[j] >> 4) | hi(j + 16)) as i32 - off;
        s += x0 * y[j] as i8 as i32 + x1 * y[j + 16] as i8 as i32;
    }
    s
}

pub fn dot_q4_0(nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for b in 0..nb {
        let x = &w[b * Q4_0_BYTES..][..Q4_0_BYTES];
        let y = &a[b * Q8_0_BYTES..][..Q8_0_BYTES];
        let s = nibble_dot(&x[2..], &y[2..], 8, |_| 0);
        sum += f16_at(x, 0) * f16_at(y, 0) * s as f32;
    }
    sum
}

pub fn dot_q4_1(nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for b in 0..nb {
        let x = &w[b * Q4_1_BYTES..][..Q4_1_BYTES];
        let y = &a[b * Q8_1_BYTES..][..Q8_1_BYTES];
        let s = nibble_dot(&x[4..], &y[4..], 0, |_| 0);
        sum += f16_at(x, 0) * f16_at(y, 0) * s as f32 + f16_at(x, 2) * f16_at(y, 2);
    }
    sum
}

pub fn dot_q5_0(nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for b in 0..nb {
        let x = &w[b * Q5_0_BYTES..][..Q5_0_BYTES];
        let y = &a[b * Q8_0_BYTES..][..Q8_0_BYTES];
        let qh = u32_at(x, 2);
        let s = nibble_dot(&x[6..], &y[2..], 16, |j| (((qh >> j) & 1) << 4) as u8);
        sum += f16_at(x, 0) * f16_at(y, 0) * s as f32;
    }
    sum
}

pub fn dot_q5_1(nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for b in 0..nb {
        let x = &w[b * Q5_1_BYTES..][..Q5_1_BYTES];
        let y = &a[b * Q8_1_BYTES..][..Q8_1_BYTES];
        let qh = u32_at(x, 4);
        let s = nibble_dot(&x[8..], &y[4..], 0, |j| (((qh >> j) & 1) << 4) as u8);
        sum += f16_at(x, 0) * f16_at(y, 0) * s as f32 + f16_at(x, 2) * f16_at(y, 2);
    }
    sum
}

pub fn dot_q8_0(nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for b in 0..nb {
        let x = &w[b * Q8_0_BYTES..][..Q8_0_BYTES];
        let y = &a[b * Q8_0_BYTES..][..Q8_0_BYTES];
        let s: i32 = x[2..]
            .iter()
            .zip(&y[2..])
            .map(|(&p, &q)| p as i8 as i32 * q as i8 as i32)
            .sum();
        sum += f16_at(x, 0) * f16_at(y, 0) * s as f32;
    }
    sum
}

/// Σ over the 8 sub-blocks of `min_j · (Σ of the sub-block's Q8_K quants)`.
#[inline(always)]
fn k_mins_dot(mins: &[u8; 8], y: &[u8]) -> i32 {
    let mut s = 0i32;
    for j in 0..16 {
        let bs = u16_at(y, Q8_K_BSUMS + 2 * j) as i16 as i32;
        s += bs * mins[j / 2] as i32;
    }
    s
}

pub fn dot_q4_k(nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for b in 0..nb {
        let x = &w[b * Q4_K_BYTES..][..Q4_K_BYTES];
        let y = &a[b * Q8_K_BYTES..][..Q8_K_BYTES];
        let (sc, mins) = k4_scales_mins(&x[4..16]);
        let qs = &x[16..];
        let q8 = &y[Q8_K_QS..];
        let mut isum = 0i32;
        for j in 0..4 {
            let (mut s0, mut s1) = (0i32, 0i32);
            for l in 0..32 {
                let q = qs[32 * j + l];
                s0 += (q & 0x0f) as i32 * q8[64 * j + l] as i8 as i32;
                s1 += (q >> 4) as i32 * q8[64 * j + 32 + l] as i8 as i32;
            }
            isum += s0 * sc[2 * j] as i32 + s1 * sc[2 * j + 1] as i32;
        }
        let yd = f32_at(y, 0);
        sum += f16_at(x, 0) * yd * isum as f32;
        sum -= f16_at(x, 2) * yd * k_mins_dot(&mins, y) as f32;
    }
    sum
}

pub fn dot_q5_k(nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for b in 0..nb {
        let x = &w[b * Q5_K_BYTES..][..Q5_K_BYTES];
        let y = &a[b * Q8_K_BYTES..][..Q8_K_BYTES];
        let (sc, mins) = k4_scales_mins(&x[4..16]);
        let qh = &x[16..48];
        let qs = &x[48..];
        let q8 = &y[Q8_K_QS..];
        let mut isum = 0i32;
        for j in 0..4 {
            let (mut s0, mut s1) = (0i32, 0i32);
            for l in 0..32 {
                let q = qs[32 * j + l];
                let lo = (q & 0x0f) | (((qh[l] >> (2 * j)) & 1) << 4);
                let hi = (q >> 4) | (((qh[l] >> (2 * j + 1)) & 1) << 4);
                s0 += lo as i32 * q8[64 * j + l] as i8 as i32;
                s1 += hi as i32 * q8[64 * j + 32 + l] as i8 as i32;
            }
            isum += s0 * sc[2 * j] as i32 + s1 * sc[2 * j + 1] as i32;
        }
        let yd = f32_at(y, 0);
        sum += f16_at(x, 0) * yd * isum as f32;
        sum -= f16_at(x, 2) * yd * k_mins_dot(&mins, y) as f32;
    }
    sum
}

pub fn dot_q6_k(nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    let mut q = [0i8; QK_K];
    for b in 0..nb {
        let x = &w[b * Q6_K_BYTES..][..Q6_K_BYTES];
        let y = &a[b * Q8_K_BYTES..][..Q8_K_BYTES];
        // Unpack the 6-bit quants of each 128-element half (see `blocks::q6_k_quant`).
        for h in 0..2 {
            let (ql, qh) = (&x[64 * h..64 * h + 64], &x[128 + 32 * h..128 + 32 * h + 32]);
            let out = &mut q[128 * h..128 * h + 128];
            for l in 0..32 {
                out[l] = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i8 - 32;
                out[l + 32] = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                out[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                out[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            }
        }
        let q8 = &y[Q8_K_QS..];
        let mut isum = 0i32;
        for g in 0..16 {
            let s: i32 = (16 * g..16 * g + 16)
                .map(|i| q[i] as i32 * q8[i] as i8 as i32)
                .sum();
            isum += s * x[192 + g] as i8 as i32;
        }
        sum += f16_at(x, 208) * f32_at(y, 0) * isum as f32;
    }
    sum
}

pub fn dot_f32(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; 8];
    for i in 0..n {
        acc[i % 8] += f32_at(w, 4 * i) * f32_at(a, 4 * i);
    }
    acc.iter().sum()
}

pub fn dot_f16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; 8];
    for i in 0..n {
        acc[i % 8] += f16_at(w, 2 * i) * f16_at(a, 2 * i);
    }
    acc.iter().sum()
}

pub fn dot_bf16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; 8];
    for i in 0..n {
        acc[i % 8] += bf16_to_f32(u16_at(w, 2 * i)) * bf16_to_f32(u16_at(a, 2 * i));
    }
    acc.iter().sum()
}
