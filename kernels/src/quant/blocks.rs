//! Byte layouts of the GGUF blocks shoal computes with, and their dequantization.
//!
//! Blocks are read from byte slices at fixed offsets (little-endian, unaligned), exactly as
//! ggml's `ggml-common.h` lays them out, so a tensor can be used straight from a mapped file:
//!
//! | type | bytes | layout (offsets in bytes) |
//! |------|-------|---------------------------|
//! | Q4_0 | 18  | d f16 @0, qs\[16\] @2 (element j: low nibble of qs\[j\], j+16: high nibble) |
//! | Q4_1 | 20  | d f16 @0, m f16 @2, qs\[16\] @4 |
//! | Q5_0 | 22  | d f16 @0, qh u32 @2 (bit j = 5th bit of element j), qs\[16\] @6 |
//! | Q5_1 | 24  | d f16 @0, m f16 @2, qh u32 @4, qs\[16\] @8 |
//! | Q8_0 | 34  | d f16 @0, qs i8\[32\] @2 |
//! | Q8_1 | 36  | d f16 @0, s f16 @2 (= d·Σqs), qs i8\[32\] @4 |
//! | Q4_K | 144 | d f16 @0, dmin f16 @2, scales\[12\] @4 (8 × 6-bit scale, 8 × 6-bit min), qs\[128\] @16 |
//! | Q5_K | 176 | d f16 @0, dmin f16 @2, scales\[12\] @4, qh\[32\] @16, qs\[128\] @48 |
//! | Q6_K | 210 | ql\[128\] @0, qh\[64\] @128, scales i8\[16\] @192, d f16 @208 |
//! | Q8_K | 292 | d f32 @0, qs i8\[256\] @4, bsums i16\[16\] @260 (sums of 16 qs) |
//!
//! Nothing here allocates or panics on well-sized input; size checks live in the callers.

use half::f16;

/// Elements per block of the 32-element formats.
pub const QK: usize = 32;
/// Elements per super-block of the K formats.
pub const QK_K: usize = 256;

pub const Q4_0_BYTES: usize = 18;
pub const Q4_1_BYTES: usize = 20;
pub const Q5_0_BYTES: usize = 22;
pub const Q5_1_BYTES: usize = 24;
pub const Q8_0_BYTES: usize = 34;
pub const Q8_1_BYTES: usize = 36;
pub const Q4_K_BYTES: usize = 144;
pub const Q5_K_BYTES: usize = 176;
pub const Q6_K_BYTES: usize = 210;
pub const Q8_K_BYTES: usize = 292;

/// Offsets inside a Q8_K block.
pub const Q8_K_QS: usize = 4;
pub const Q8_K_BSUMS: usize = 260;

#[inline(always)]
pub fn f16_to_f32(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// f32 → f16 bits, rounding to nearest even (as F16C `vcvtps2ph` with imm 0 does).
#[inline(always)]
pub fn f32_to_f16(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

#[inline(always)]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// f32 → bf16 bits the way ggml does it: NaNs are kept quiet, everything else rounds to
/// nearest even.
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

#[inline(always)]
pub fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

#[inline(always)]
pub fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[inline(always)]
pub fn f16_at(b: &[u8], off: usize) -> f32 {
    f16_to_f32(u16_at(b, off))
}

#[inline(always)]
pub fn f32_at(b: &[u8], off: usize) -> f32 {
    f32::from_bits(u32_at(b, off))
}

/// The 8 six-bit scales and 8 six-bit mins of a Q4_K/Q5_K block, from its 12 scale bytes.
/// Sub-block j < 4 keeps its scale in the low 6 bits of byte j and its min in byte j+4; for
/// j ≥ 4 the low 4 bits sit in a nibble of byte j+4 and the top 2 bits in bits 6..7 of bytes
/// j-4 (scale) and j (min).
#[inline(always)]
pub fn k4_scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let s0 = u32_at(s, 0);
    let s1 = u32_at(s, 4);
    let s2 = u32_at(s, 8);
    let sc_lo = s0 & 0x3f3f_3f3f;
    let sc_hi = (s2 & 0x0f0f_0f0f) | (((s0 >> 6) & 0x0303_0303) << 4);
    let m_lo = s1 & 0x3f3f_3f3f;
    let m_hi = ((s2 >> 4) & 0x0f0f_0f0f) | (((s1 >> 6) & 0x0303_0303) << 4);
    let sc = (sc_lo as u64 | ((sc_hi as u64) << 32)).to_le_bytes();
    let m = (m_lo as u64 | ((m_hi as u64) << 32)).to_le_bytes();
    (sc, m)
}

// ---------------------------------------------------------------------------------------------
// Dequantization, one block at a time. `y` has exactly the block's element count.
// ---------------------------------------------------------------------------------------------

pub fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

pub fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0f) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

pub fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32_at(b, 2);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = (((qs[j] & 0x0f) as u32 | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
    }
}

pub fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32_at(b, 4);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = ((qs[j] & 0x0f) as u32 | h0) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
    }
}

pub fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = b[2 + j] as i8 as f32 * d;
    }
}

pub fn dequant_q8_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = b[4 + j] as i8 as f32 * d;
    }
}

pub fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (sc, m) = k4_scales_mins(&b[4..16]);
    let qs = &b[16..144];
    for j in 0..4 {
        let (d1, m1) = (d * sc[2 * j] as f32, dmin * m[2 * j] as f32);
        let (d2, m2) = (d * sc[2 * j + 1] as f32, dmin * m[2 * j + 1] as f32);
        let q = &qs[32 * j..32 * j + 32];
        let out = &mut y[64 * j..64 * j + 64];
        for l in 0..32 {
            out[l] = d1 * (q[l] & 0x0f) as f32 - m1;
            out[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

pub fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (sc, m) = k4_scales_mins(&b[4..16]);
    let qh = &b[16..48];
    let qs = &b[48..176];
    for j in 0..4 {
        let (d1, m1) = (d * sc[2 * j] as f32, dmin * m[2 * j] as f32);
        let (d2, m2) = (d * sc[2 * j + 1] as f32, dmin * m[2 * j + 1] as f32);
        let q = &qs[32 * j..32 * j + 32];
        let out = &mut y[64 * j..64 * j + 64];
        for l in 0..32 {
            let h1 = ((qh[l] >> (2 * j)) & 1) << 4;
            let h2 = ((qh[l] >> (2 * j + 1)) & 1) << 4;
            out[l] = d1 * ((q[l] & 0x0f) | h1) as f32 - m1;
            out[l + 32] = d2 * ((q[l] >> 4) | h2) as f32 - m2;
        }
    }
}

/// The 6-bit quant of element `i` (0..256) of a Q6_K block, offset by -32.
#[inline(always)]
pub fn q6_k_quant(b: &[u8], i: usize) -> i32 {
    let half = i / 128; // which 128-element half
    let r = i % 128;
    let k = r / 32; // which of the four 32-element groups of the half
    let l = r % 32;
    let ql = b[64 * half + l + 32 * (k & 1)];
    let lo = if k < 2 { ql & 0x0f } else { ql >> 4 };
    let hi = (b[128 + 32 * half + l] >> (2 * k)) & 3;
    (lo | (hi << 4)) as i32 - 32
}

pub fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for (i, v) in y.iter_mut().enumerate().take(QK_K) {
        let sc = b[192 + i / 16] as i8 as f32;
        *v = d * sc * q6_k_quant(b, i) as f32;
    }
}

pub fn dequant_q8_k(b: &[u8], y: &mut [f32]) {
    let d = f32_at(b, 0);
    for j in 0..QK_K {
        y[j] = d * b[Q8_K_QS + j] as i8 as f32;
    }
}
