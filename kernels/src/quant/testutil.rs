//! Test helpers: a small deterministic PRNG, random valid blocks of every supported type,
//! and f64 references.

use super::blocks::*;
use crate::GgmlType;

/// The 11 weight types shoal computes with.
pub const WEIGHT_TYPES: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// splitmix64.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    /// Magnitude uniform in [lo, hi), random sign.
    pub fn signed(&mut self, lo: f32, hi: f32) -> f32 {
        let v = self.range(lo, hi);
        if self.next_u64() & 1 == 0 { v } else { -v }
    }

    pub fn fill_bytes(&mut self, b: &mut [u8]) {
        for v in b {
            *v = self.next_u64() as u8;
        }
    }

    /// Activation-like values: mostly small, some larger, occasionally zero.
    pub fn activations(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| match self.next_u64() % 16 {
                0 => 0.0,
                1 => self.signed(1.0, 8.0),
                _ => self.range(-1.0, 1.0),
            })
            .collect()
    }
}

fn put_f16(b: &mut [u8], off: usize, v: f32) {
    b[off..off + 2].copy_from_slice(&f32_to_f16(v).to_le_bytes());
}

/// One random, valid row of `cols` elements of weight type `ty`: random quant bits and
/// random f16 scales in a sane range (both signs for `d`, as ggml's quantizers produce).
pub fn random_row(rng: &mut Rng, ty: GgmlType, cols: usize) -> Vec<u8> {
    let bytes = ty.bytes_for(cols as u64).expect("whole blocks") as usize;
    let mut row = vec![0u8; bytes];
    match ty {
        GgmlType::F32 => {
            for c in row.chunks_exact_mut(4) {
                c.copy_from_slice(&rng.range(-1.0, 1.0).to_le_bytes());
            }
            return row;
        }
        GgmlType::F16 => {
            for c in row.chunks_exact_mut(2) {
                c.copy_from_slice(&f32_to_f16(rng.range(-1.0, 1.0)).to_le_bytes());
            }
            return row;
        }
        GgmlType::BF16 => {
            for c in row.chunks_exact_mut(2) {
                c.copy_from_slice(&f32_to_bf16(rng.range(-1.0, 1.0)).to_le_bytes());
            }
            return row;
        }
        _ => {}
    }
    rng.fill_bytes(&mut row);
    for b in row.chunks_exact_mut(ty.type_size()) {
        match ty {
            GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 => {
                put_f16(b, 0, rng.signed(1e-3, 2e-2))
            }
            GgmlType::Q4_1 | GgmlType::Q5_1 => {
                put_f16(b, 0, rng.range(1e-3, 2e-2));
                put_f16(b, 2, rng.range(-0.3, 0.1));
            }
            GgmlType::Q4_K | GgmlType::Q5_K => {
                put_f16(b, 0, rng.range(1e-4, 2e-3));
                put_f16(b, 2, rng.range(1e-4, 2e-3));
            }
            GgmlType::Q6_K => put_f16(b, 208, rng.signed(1e-4, 2e-3)),
            other => panic!("no random blocks for {other}"),
        }
    }
    row
}

/// `rows` random rows of `ty`, concatenated.
pub fn random_matrix(rng: &mut Rng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    (0..rows).flat_map(|_| random_row(rng, ty, cols)).collect()
}

/// Dequantizes a row of `ty` (weights or activation formats) to f64.
pub fn dequant_f64(ty: GgmlType, src: &[u8], cols: usize) -> Vec<f64> {
    let mut y = vec![0f32; cols];
    super::dequantize(ty, src, &mut y).expect("valid row");
    y.into_iter().map(f64::from).collect()
}

/// `Σ w_i a_i` in f64 and `Σ |w_i a_i|` (the scale errors are measured against).
pub fn dot_f64(w: &[f64], a: &[f64]) -> (f64, f64) {
    let mut s = 0.0;
    let mut m = 0.0;
    for (x, y) in w.iter().zip(a) {
        s += x * y;
        m += (x * y).abs();
    }
    (s, m)
}

/// For Q4_1/Q5_1 rows against Q8_1 activations: the extra error the kernels are allowed
/// because they use the activation's f16 `s = f16(d·Σq)` instead of `d·Σq` (as ggml does):
/// `Σ |m| · |s - d·Σq|` over blocks, plus one f16 ulp of `s`.
pub fn q8_1_sum_slack(ty: GgmlType, w: &[u8], a: &[u8]) -> f64 {
    if !matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
        return 0.0;
    }
    let ts = ty.type_size();
    let mut slack = 0.0;
    for (x, y) in w.chunks_exact(ts).zip(a.chunks_exact(Q8_1_BYTES)) {
        let m = f16_at(x, 2) as f64;
        let d = f16_at(y, 0) as f64;
        let s = f16_at(y, 2) as f64;
        let sum: i32 = y[4..].iter().map(|&q| q as i8 as i32).sum();
        slack += m.abs() * ((s - d * sum as f64).abs() + s.abs() * 1e-3);
    }
    slack
}
