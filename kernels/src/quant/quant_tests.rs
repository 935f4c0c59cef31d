//! Tests of block layouts, activation quantization and dot products (every type, every SIMD
//! level the CPU has, against the portable kernels and against an f64 reference).

use super::act::*;
use super::blocks::*;
use super::testutil::*;
use super::*;
use crate::cpu::{SimdLevel, detected_level};

/// Levels this machine can run, lowest first.
fn levels() -> Vec<SimdLevel> {
    SimdLevel::ALL
        .into_iter()
        .filter(|&l| l <= detected_level())
        .collect()
}

/// Element counts to try for `ty`: 1, 3 and 7 blocks, and for the float types some
/// counts that leave SIMD tails.
fn col_counts(ty: GgmlType) -> Vec<usize> {
    match ty.block_size() {
        1 => vec![1, 7, 8, 23, 96, 257],
        bs => vec![bs, 3 * bs, 7 * bs],
    }
}

fn quantized_acts(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let vt = ty.vec_dot_type();
    let mut a = vec![0u8; row_bytes(vt, x.len()).unwrap()];
    quantize_activations(vt, x, &mut a).unwrap();
    a
}

#[test]
fn vec_dot_types_follow_ggml() {
    use GgmlType::*;
    let want = [
        (F32, F32),
        (F16, F16),
        (BF16, BF16),
        (Q8_0, Q8_0),
        (Q4_0, Q8_0),
        (Q5_0, Q8_0),
        (Q4_1, Q8_1),
        (Q5_1, Q8_1),
        (Q4_K, Q8_K),
        (Q5_K, Q8_K),
        (Q6_K, Q8_K),
    ];
    for (w, a) in want {
        assert_eq!(w.vec_dot_type(), a, "{w}");
    }
}

/// (a) Every SIMD level against the portable kernel, same inputs.
#[test]
fn simd_dot_matches_portable() {
    let mut rng = Rng(1);
    for ty in WEIGHT_TYPES {
        for cols in col_counts(ty) {
            for _ in 0..4 {
                let w = random_row(&mut rng, ty, cols);
                let a = quantized_acts(ty, &rng.activations(cols));
                let wd = dequant_f64(ty, &w, cols);
                let ad = dequant_f64(ty.vec_dot_type(), &a, cols);
                let (_, mag) = dot_f64(&wd, &ad);
                let reference = vec_dot(ty, SimdLevel::Portable, cols, &w, &a).unwrap();
                for level in levels() {
                    let got = vec_dot(ty, level, cols, &w, &a).unwrap();
                    let err = (got - reference).abs() as f64;
                    assert!(
                        err <= 1e-5 * mag + 1e-7,
                        "{ty} cols={cols} {level}: {got} vs portable {reference} (mag {mag})"
                    );
                }
            }
        }
    }
}

/// (b) Every level against `dequantize(w) · dequantize(quantized a)` in f64. Tolerance: the
/// f32 rounding of the block scales and sums, 2e-5 of `Σ|w_i a_i|`; for Q4_1/Q5_1 also the
/// f16 rounding of the activation's `s` field, which ggml's dot uses in place of `d·Σq`.
#[test]
fn dot_matches_f64_reference() {
    let mut rng = Rng(2);
    for ty in WEIGHT_TYPES {
        for cols in col_counts(ty) {
            for _ in 0..4 {
                let w = random_row(&mut rng, ty, cols);
                let a = quantized_acts(ty, &rng.activations(cols));
                let wd = dequant_f64(ty, &w, cols);
                let ad = dequant_f64(ty.vec_dot_type(), &a, cols);
                let (want, mag) = dot_f64(&wd, &ad);
                let tol = 2e-5 * mag + q8_1_sum_slack(ty, &w, &a) + 1e-7;
                for level in levels() {
                    let got = vec_dot(ty, level, cols, &w, &a).unwrap() as f64;
                    assert!(
                        (got - want).abs() <= tol,
                        "{ty} cols={cols} {level}: {got} vs f64 {want} (tol {tol})"
                    );
                }
            }
        }
    }
}

/// The f64 reference itself is close to the float product of the unquantized activations,
/// so a kernel that ignored the activation scales would not pass the test above.
#[test]
fn quantized_dot_approximates_float_dot() {
    let mut rng = Rng(3);
    for ty in WEIGHT_TYPES {
        let cols = 7 * ty.block_size().max(32);
        let w = random_row(&mut rng, ty, cols);
        let x = rng.activations(cols);
        let a = quantized_acts(ty, &x);
        let wd = dequant_f64(ty, &w, cols);
        let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let (want, mag) = dot_f64(&wd, &xd);
        let got = vec_dot(ty, detected_level(), cols, &w, &a).unwrap() as f64;
        // 8-bit activations: relative error of a few 1/127 of the magnitude at most.
        let tol = if ty.block_size() == 1 {
            1e-2 * mag
        } else {
            3e-2 * mag
        };
        assert!(
            (got - want).abs() <= tol,
            "{ty}: {got} vs {want} (mag {mag})"
        );
    }
}

#[test]
fn q8_0_matches_ggml_x86_rounding() {
    // amax = 127, so the multiplier is exactly 1 and x · id = x: ties round to even, as
    // `_mm256_round_ps(_MM_ROUND_NEAREST)` does (ggml's scalar `roundf` would give 3 and -3).
    let mut x = vec![0.0f32; 32];
    x[0] = 127.0;
    x[1] = 2.5;
    x[2] = -2.5;
    x[3] = 3.5;
    x[4] = -0.4;
    x[5] = -127.0;
    let mut q = vec![0u8; Q8_0_BYTES];
    quantize_row_q8_0(&x, &mut q);
    assert_eq!(f16_at(&q, 0), f16_to_f32(f32_to_f16(1.0)));
    let qs: Vec<i8> = q[2..8].iter().map(|&v| v as i8).collect();
    assert_eq!(qs, [127, 2, -2, 4, 0, -127]);

    let x: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) / 8.0).collect();
    quantize_row_q8_0(&x, &mut q);
    let d = 2.0f32 / 127.0;
    assert_eq!(u16_at(&q, 0), f32_to_f16(d));
    for (i, &v) in x.iter().enumerate() {
        assert_eq!(
            q[2 + i] as i8 as i32,
            (v * (127.0 / 2.0)).round_ties_even() as i32
        );
    }
}

#[test]
fn q8_0_of_zeros_is_zero() {
    let mut q = vec![0xAAu8; 2 * Q8_0_BYTES];
    quantize_row_q8_0(&[0.0; 64], &mut q);
    assert!(q.iter().all(|&b| b == 0));
}

#[test]
fn q8_1_stores_d_times_sum() {
    let mut rng = Rng(4);
    let x = rng.activations(96);
    let mut q1 = vec![0u8; 3 * Q8_1_BYTES];
    let mut q0 = vec![0u8; 3 * Q8_0_BYTES];
    quantize_row_q8_1(&x, &mut q1);
    quantize_row_q8_0(&x, &mut q0);
    for b in 0..3 {
        let (b1, b0) = (&q1[b * Q8_1_BYTES..], &q0[b * Q8_0_BYTES..]);
        assert_eq!(u16_at(b1, 0), u16_at(b0, 0), "same d as Q8_0");
        assert_eq!(&b1[4..36], &b0[2..34], "same quants as Q8_0");
        let sum: i32 = b1[4..36].iter().map(|&v| v as i8 as i32).sum();
        // ggml multiplies the f32 `d` (before its f16 rounding) by the sum.
        let amax = x[32 * b..32 * b + 32]
            .iter()
            .fold(0.0f32, |m, v| m.max(v.abs()));
        assert_eq!(u16_at(b1, 2), f32_to_f16(amax / 127.0 * sum as f32));
    }
}

#[test]
fn q8_k_takes_the_sign_of_the_largest_magnitude() {
    let mut x = vec![0.0f32; 256];
    x[0] = 1.0;
    x[1] = -2.0; // largest magnitude, negative: iscale = 63.5, d > 0
    x[2] = 2.0; // same magnitude, later: ignored
    x[3] = 0.5;
    x[17] = -1.0;
    let mut q = vec![0u8; Q8_K_BYTES];
    quantize_row_q8_k(&x, &mut q);
    assert_eq!(f32_at(&q, 0), 1.0 / 63.5);
    let qs_of = |q: &[u8], i: usize| q[Q8_K_QS + i] as i8;
    let qs = |i: usize| qs_of(&q, i);
    // 63.5 is not representable as i8 steps of ties: 1.0·63.5 = 63.5 → 64 (even).
    assert_eq!(
        [qs(0), qs(1), qs(2), qs(3), qs(17)],
        [64, -127, 127, 32, -64]
    );
    let bsum = |g: usize| u16_at(&q, Q8_K_BSUMS + 2 * g) as i16;
    assert_eq!(bsum(0), 64 - 127 + 127 + 32);
    assert_eq!(bsum(1), -64);
    assert!((1..16).skip(1).all(|g| bsum(g) == 0));

    // Largest magnitude positive: d is negative and the quants flip sign.
    x[1] = 2.0;
    x[2] = -2.0;
    let mut q = vec![0u8; Q8_K_BYTES];
    quantize_row_q8_k(&x, &mut q);
    assert_eq!(f32_at(&q, 0), -1.0 / 63.5);
    assert_eq!([qs_of(&q, 0), qs_of(&q, 1), qs_of(&q, 2)], [-64, -127, 127]);

    let mut z = vec![0xAAu8; Q8_K_BYTES];
    quantize_row_q8_k(&[0.0; 256], &mut z);
    assert!(z.iter().all(|&b| b == 0));
}

#[test]
fn activation_quantization_error_is_at_most_half_a_step() {
    let mut rng = Rng(5);
    let x = rng.activations(512);
    for ty in [GgmlType::Q8_0, GgmlType::Q8_1, GgmlType::Q8_K] {
        let mut q = vec![0u8; row_bytes(ty, 512).unwrap()];
        quantize_activations(ty, &x, &mut q).unwrap();
        let y = dequant_f64(ty, &q, 512);
        let bs = ty.block_size();
        for (b, (xb, yb)) in x.chunks(bs).zip(y.chunks(bs)).enumerate() {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
            // Half a step of amax/127, plus the f16 rounding of d (Q8_0/Q8_1) at full scale.
            let tol = amax / 127.0 * 0.5 + amax * 1e-3 + 1e-9;
            for (i, (&xv, &yv)) in xb.iter().zip(yb).enumerate() {
                assert!(
                    (xv as f64 - yv).abs() <= tol,
                    "{ty} block {b} elem {i}: {xv} vs {yv}"
                );
            }
        }
    }
}

#[test]
fn f16_and_bf16_conversions_round_to_nearest_even() {
    // 1 + 2^-8 is halfway between two bf16 values: ties to even (1.0).
    assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
    // 1 + 3·2^-8 is halfway too: the even neighbour is above.
    assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
    assert_eq!(f32_to_bf16(-2.0), 0xc000);
    let nan = f32_to_bf16(f32::from_bits(0x7f80_0001));
    assert!(bf16_to_f32(nan).is_nan());
    // f16: 1 + 2^-11 is halfway between 1 and 1 + 2^-10.
    assert_eq!(f32_to_f16(1.0 + 1.0 / 2048.0), 0x3c00);
    assert_eq!(f32_to_f16(1.0 + 3.0 / 2048.0), 0x3c02);
    let mut b = [0u8; 4];
    quantize_row_bf16(&[1.5, -0.25], &mut b);
    assert_eq!(b, [0xc0, 0x3f, 0x80, 0xbe]);
    quantize_row_f16(&[1.5, -0.25], &mut b);
    assert_eq!(b, [0x00, 0x3e, 0x00, 0xb4]);
}

fn f16b(v: f32) -> [u8; 2] {
    f32_to_f16(v).to_le_bytes()
}

/// Hand-built blocks with values worked out from ggml-common.h, so that a layout misread the
/// same way by dequantization and the dot kernels would still be caught.
#[test]
fn dequantize_hand_built_blocks() {
    let mut y = [0f32; 32];

    // Q4_0: d = 0.5, qs[j] = lo j%16, hi 15 - j%16.
    let mut b = vec![0u8; 18];
    b[0..2].copy_from_slice(&f16b(0.5));
    for j in 0..16 {
        b[2 + j] = (j as u8) | ((15 - j as u8) << 4);
    }
    dequant_q4_0(&b, &mut y);
    for j in 0..16 {
        assert_eq!(y[j], (j as f32 - 8.0) * 0.5);
        assert_eq!(y[j + 16], (7.0 - j as f32) * 0.5);
    }

    // Q4_1: d = 0.25, m = -1.
    let mut b = vec![0u8; 20];
    b[0..2].copy_from_slice(&f16b(0.25));
    b[2..4].copy_from_slice(&f16b(-1.0));
    b[4] = 0xF3;
    dequant_q4_1(&b, &mut y);
    assert_eq!(
        (y[0], y[16], y[1]),
        (3.0 * 0.25 - 1.0, 15.0 * 0.25 - 1.0, -1.0)
    );

    // Q5_0: qh bit 0 and bit 16 set, bit 1 clear.
    let mut b = vec![0u8; 22];
    b[0..2].copy_from_slice(&f16b(1.0));
    b[2..6].copy_from_slice(&(1u32 | (1 << 16)).to_le_bytes());
    b[6] = 0x21; // element 0: nibble 1, element 16: nibble 2
    b[7] = 0x03; // element 1: nibble 3, element 17: 0
    dequant_q5_0(&b, &mut y);
    assert_eq!((y[0], y[16], y[1], y[17]), (1.0, 2.0, -13.0, -16.0));

    // Q5_1: same bits, d = 2, m = 0.5.
    let mut b = vec![0u8; 24];
    b[0..2].copy_from_slice(&f16b(2.0));
    b[2..4].copy_from_slice(&f16b(0.5));
    b[4..8].copy_from_slice(&(1u32 | (1 << 16)).to_le_bytes());
    b[8] = 0x21;
    dequant_q5_1(&b, &mut y);
    assert_eq!(
        (y[0], y[16], y[1]),
        (17.0 * 2.0 + 0.5, 18.0 * 2.0 + 0.5, 0.5)
    );

    // Q8_0.
    let mut b = vec![0u8; 34];
    b[0..2].copy_from_slice(&f16b(0.125));
    b[2] = (-128i8) as u8;
    b[33] = 127;
    dequant_q8_0(&b, &mut y);
    assert_eq!((y[0], y[31], y[1]), (-16.0, 127.0 * 0.125, 0.0));
}

#[test]
fn dequantize_hand_built_k_blocks() {
    let mut y = [0f32; 256];
    // Q4_K: d = 1, dmin = 0.5; sub-block 1 (high nibbles of qs[0..32]) has scale 3, min 2;
    // sub-block 5 (j = 5 ≥ 4, packed) has scale 0b10_0111 = 39 and min 0b01_1010 = 26.
    let mut b = vec![0u8; 144];
    b[0..2].copy_from_slice(&f16b(1.0));
    b[2..4].copy_from_slice(&f16b(0.5));
    let s = &mut b[4..16];
    s[1] = 3; // scale of sub-block 1
    s[5] = 2; // min of sub-block 1
    s[9] = 0x07 | (0x0A << 4); // low 4 bits of scale 5 and of min 5
    s[1] |= 0b10 << 6; // top 2 bits of scale 5 (byte j - 4 = 1)
    s[5] |= 0b01 << 6; // top 2 bits of min 5 (byte j = 5)
    let (sc, m) = k4_scales_mins(&b[4..16]);
    assert_eq!((sc[1], m[1], sc[5], m[5]), (3, 2, 39, 26));
    b[16] = 0x50; // element 32 (sub-block 1): 5
    b[16 + 64 + 1] = 0x90; // element 128 + 32 + 1 (sub-block 5): 9
    dequant_q4_k(&b, &mut y);
    assert_eq!(y[32], 3.0 * 5.0 - 0.5 * 2.0);
    assert_eq!(y[161], 39.0 * 9.0 - 0.5 * 26.0);
    assert_eq!(y[0], 0.0);

    // Q5_K: element 32 + 2 of chunk 0 gets its 5th bit from bit 1 of qh[2].
    let mut b = vec![0u8; 176];
    b[0..2].copy_from_slice(&f16b(1.0));
    b[4 + 1] = 1; // scale of sub-block 1
    b[16 + 2] = 0b10;
    b[48 + 2] = 0x40; // high nibble 4
    dequant_q5_k(&b, &mut y);
    assert_eq!(y[34], 20.0);
    assert_eq!(y[2], 0.0);

    // Q6_K: element 64 + 3 of the second half (i = 128 + 67) uses the high nibble of ql[64 + 3]
    // and bits 4..5 of qh[32 + 3], scale group (67 / 16) + 8 = 12.
    let mut b = vec![0u8; 210];
    b[208..210].copy_from_slice(&f16b(0.5));
    b[64 + 3] = 0xB0; // high nibble 11
    b[128 + 32 + 3] = 0b10 << 4; // high bits 2
    b[192 + 12] = (-3i8) as u8;
    dequant_q6_k(&b, &mut y);
    assert_eq!(y[195], 0.5 * -3.0 * ((11 | (2 << 4)) as f32 - 32.0));
    assert_eq!(y[194], 0.5 * -3.0 * -32.0);
}

#[test]
fn dequantize_checks_sizes() {
    let mut y = vec![0f32; 64];
    let src = vec![0u8; 2 * Q4_0_BYTES];
    assert!(dequantize(GgmlType::Q4_0, &src, &mut y).is_ok());
    assert!(matches!(
        dequantize(GgmlType::Q4_0, &src[..35], &mut y),
        Err(crate::Error::BadBufferSize { .. })
    ));
    assert!(matches!(
        dequantize(GgmlType::Q4_0, &src, &mut y[..63]),
        Err(crate::Error::BadBufferSize { .. })
    ));
    assert!(matches!(
        dequantize(GgmlType::IQ2_XXS, &src, &mut y),
        Err(crate::Error::UnsupportedType(_))
    ));
    assert!(dequantize(GgmlType::Q6_K, &[], &mut []).is_ok());
}

#[test]
fn vec_dot_and_quantize_check_sizes() {
    let w = vec![0u8; Q4_K_BYTES];
    let a = vec![0u8; Q8_K_BYTES];
    assert_eq!(
        vec_dot(GgmlType::Q4_K, SimdLevel::Portable, 256, &w, &a).unwrap(),
        0.0
    );
    assert!(vec_dot(GgmlType::Q4_K, SimdLevel::Portable, 255, &w, &a).is_err());
    assert!(vec_dot(GgmlType::Q4_K, SimdLevel::Portable, 256, &w[1..], &a).is_err());
    assert!(vec_dot(GgmlType::Q4_K, SimdLevel::Portable, 256, &w, &a[1..]).is_err());
    assert!(vec_dot(GgmlType::Q2_K, SimdLevel::Portable, 256, &w, &a).is_err());
    let mut q = vec![0u8; 10];
    assert!(quantize_activations(GgmlType::Q8_0, &[0.0; 32], &mut q).is_err());
    assert!(quantize_activations(GgmlType::Q8_0, &[0.0; 31], &mut q).is_err());
    assert!(quantize_activations(GgmlType::Q4_0, &[0.0; 32], &mut [0u8; 18]).is_err());
}
