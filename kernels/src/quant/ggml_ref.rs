//! Bit-compatibility with llama.cpp: shoal's kernels against what ggml's own CPU kernels
//! computed for the same inputs (`ggml_ref_data.rs`, written by `scripts/reference/ggml_ref_gen.c`).
//!
//! Checked per weight type: the quantized activation bytes are identical (FNV-1a hash), the
//! dequantized weights agree (position-weighted sums, so a layout misread shows), and every
//! SIMD level's dot products agree with ggml's `vec_dot` within float accumulation order.

use super::ggml_ref_data::{COLS, FIXTURES, ROWS, TOKS};
use super::testutil::{dequant_f64, dot_f64};
use super::*;
use crate::cpu::detected_level;

/// What ggml computed for one weight type.
pub(super) struct Fixture {
    pub ty: GgmlType,
    /// FNV-1a 64 of each token's activation row in the vec_dot_type.
    pub act_hash: [u64; TOKS],
    /// `Σ (i + 1) · w_i` of each dequantized weight row.
    pub deq: [f64; ROWS],
    /// `dot(row r, token t)` at index `t * ROWS + r`.
    pub dots: [f32; ROWS * TOKS],
}

/// The generator's splitmix64 and input recipe, step for step.
struct Inputs(u64);

impl Inputs {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn f16_bits(&mut self, e: u16, sign: bool) -> [u8; 2] {
        let r = self.next_u64();
        let mut b = (e << 10) | (r & 0x3ff) as u16;
        if sign && (r >> 10) & 1 == 1 {
            b |= 0x8000;
        }
        b.to_le_bytes()
    }

    fn centered(&mut self) -> i32 {
        (self.next_u64() % 2001) as i32 - 1000
    }

    fn row(&mut self, ty: GgmlType, cols: usize) -> Vec<u8> {
        let mut row = Vec::new();
        match ty {
            GgmlType::F32 => {
                (0..cols).for_each(|_| row.extend((self.centered() as f32 / 1024.0).to_le_bytes()))
            }
            GgmlType::F16 => (0..cols).for_each(|_| {
                row.extend(blocks::f32_to_f16(self.centered() as f32 / 1024.0).to_le_bytes())
            }),
            GgmlType::BF16 => (0..cols).for_each(|_| {
                let v = (self.centered() / 8) as f32 / 128.0;
                row.extend(((v.to_bits() >> 16) as u16).to_le_bytes())
            }),
            _ => {
                row = (0..row_bytes(ty, cols).unwrap())
                    .map(|_| self.next_u64() as u8)
                    .collect();
                for b in row.chunks_exact_mut(ty.type_size()) {
                    match ty {
                        GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 => {
                            b[0..2].copy_from_slice(&self.f16_bits(6, true))
                        }
                        GgmlType::Q4_1 | GgmlType::Q5_1 => {
                            b[0..2].copy_from_slice(&self.f16_bits(6, false));
                            b[2..4].copy_from_slice(&self.f16_bits(8, true));
                        }
                        GgmlType::Q4_K | GgmlType::Q5_K => {
                            b[0..2].copy_from_slice(&self.f16_bits(4, false));
                            b[2..4].copy_from_slice(&self.f16_bits(4, false));
                        }
                        GgmlType::Q6_K => b[208..210].copy_from_slice(&self.f16_bits(4, true)),
                        other => panic!("no recipe for {other}"),
                    }
                }
            }
        }
        row
    }
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &v| {
        (h ^ v as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The types whose SIMD kernels round exactly like ggml's `vec_dot` on x86.
fn exact_like_ggml(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q6_K
    )
}

#[test]
fn matches_ggml_cpu_kernels() {
    assert_eq!(FIXTURES.len(), 11);
    for f in FIXTURES {
        let ty = f.ty;
        let mut inp = Inputs(1000 + ty.id() as u64);
        let rows: Vec<Vec<u8>> = (0..ROWS).map(|_| inp.row(ty, COLS)).collect();
        let x: Vec<f32> = (0..COLS * TOKS)
            .map(|_| inp.centered() as f32 / 256.0)
            .collect();

        let vt = ty.vec_dot_type();
        let acts: Vec<Vec<u8>> = x
            .chunks_exact(COLS)
            .map(|xr| {
                let mut a = vec![0u8; row_bytes(vt, COLS).unwrap()];
                quantize_activations(vt, xr, &mut a).unwrap();
                a
            })
            .collect();
        for (t, a) in acts.iter().enumerate() {
            assert_eq!(
                fnv(a),
                f.act_hash[t],
                "{ty}: activation row {t} differs from ggml's"
            );
        }

        for (r, row) in rows.iter().enumerate() {
            let y = dequant_f64(ty, row, COLS);
            let s: f64 = y.iter().enumerate().map(|(i, v)| (i + 1) as f64 * v).sum();
            let scale: f64 = y
                .iter()
                .enumerate()
                .map(|(i, v)| (i + 1) as f64 * v.abs())
                .sum();
            assert!(
                (s - f.deq[r]).abs() <= 1e-6 * scale,
                "{ty} row {r}: dequantized {s} vs ggml {}",
                f.deq[r]
            );
        }

        for level in SimdLevel::ALL
            .into_iter()
            .filter(|&l| l <= detected_level())
        {
            for t in 0..TOKS {
                let ad = dequant_f64(vt, &acts[t], COLS);
                for r in 0..ROWS {
                    let (_, mag) = dot_f64(&dequant_f64(ty, &rows[r], COLS), &ad);
                    let got = vec_dot(ty, level, COLS, &rows[r], &acts[t]).unwrap();
                    let want = f.dots[t * ROWS + r];
                    if level != SimdLevel::Portable && exact_like_ggml(ty) {
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{ty} {level} row {r} token {t}: {got} vs ggml {want} (bit-exact)"
                        );
                    }
                    assert!(
                        ((got - want) as f64).abs() <= 1e-5 * mag + 1e-6,
                        "{ty} {level} row {r} token {t}: {got} vs ggml {want}"
                    );
                }
            }
        }
    }
}
