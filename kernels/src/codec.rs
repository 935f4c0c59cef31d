//! The activation wire codec: hidden states `(n_tokens, dim)` as bytes between stages.
//!
//! Three encodings, chosen per cluster:
//! - `F32`: little-endian f32, exact (a pipeline over it computes what one process does).
//! - `Bf16`: the top 16 bits of each f32 rounded to nearest even; half the bytes, relative
//!   error ≤ 2⁻⁸ per element.
//! - `Q8`: per token one f32 scale `max|x| / 127`, then `dim` int8 values `round(x / scale)`;
//!   about a quarter of the bytes, absolute error ≤ scale / 2 per element.
//!
//! Layout of `Q8`: all `n_tokens` scales first (f32 LE), then the `n_tokens × dim` int8 values
//! row-major. The loops are plain slices over fixed-size chunks so the compiler vectorizes them.
//! [`decode`] checks that the byte length matches the shape before touching anything; it is
//! the place where a frame from the wire is validated. This module must not know about the
//! network or models.

use std::fmt;

/// An activation encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Codec {
    F32,
    Bf16,
    Q8,
}

/// A frame whose bytes do not fit its declared shape.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error("activation frame of {got} bytes, expected {want} for {n_tokens} tokens × {dim} as {codec}")]
    Length { codec: Codec, n_tokens: usize, dim: usize, got: usize, want: usize },
    #[error("activation frame shape {n_tokens} × {dim} overflows")]
    Overflow { n_tokens: usize, dim: usize },
    #[error("activation frame has a non-finite q8 scale {scale} for token {token}")]
    BadScale { token: usize, scale: f32 },
    #[error("{got} floats for {n_tokens} tokens × {dim}")]
    InputShape { n_tokens: usize, dim: usize, got: usize },
}

impl CodecError {
    /// Whether the same call could succeed later: a malformed frame never does.
    pub fn is_retryable(&self) -> bool {
        match self {
            CodecError::Length { .. }
            | CodecError::Overflow { .. }
            | CodecError::BadScale { .. }
            | CodecError::InputShape { .. } => false,
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Codec {
    type Err = String;
    fn from_str(s: &str) -> Result<Codec, String> {
        match s {
            "f32" => Ok(Codec::F32),
            "bf16" => Ok(Codec::Bf16),
            "q8" => Ok(Codec::Q8),
            _ => Err(format!("unknown activation codec {s:?} (expected f32, bf16 or q8)")),
        }
    }
}

impl Codec {
    pub fn name(self) -> &'static str {
        match self {
            Codec::F32 => "f32",
            Codec::Bf16 => "bf16",
            Codec::Q8 => "q8",
        }
    }

    /// Bytes of a frame of `n_tokens × dim`, or `None` on overflow.
    pub fn encoded_len(self, n_tokens: usize, dim: usize) -> Option<usize> {
        let n = n_tokens.checked_mul(dim)?;
        match self {
            Codec::F32 => n.checked_mul(4),
            Codec::Bf16 => n.checked_mul(2),
            Codec::Q8 => n.checked_add(n_tokens.checked_mul(4)?),
        }
    }
}

/// Encodes `x: (n_tokens, dim)` into `out` (cleared first).
pub fn encode(codec: Codec, x: &[f32], n_tokens: usize, dim: usize, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let want = codec.encoded_len(n_tokens, dim).ok_or(CodecError::Overflow { n_tokens, dim })?;
    if x.len() != n_tokens * dim {
        return Err(CodecError::InputShape { n_tokens, dim, got: x.len() });
    }
    out.clear();
    out.resize(want, 0);
    match codec {
        Codec::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        Codec::Bf16 => {
            for (o, &v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f32_to_bf16(v).to_le_bytes());
            }
        }
        Codec::Q8 => {
            let (scales, qs) = out.split_at_mut(n_tokens * 4);
            for t in 0..n_tokens {
                let row = &x[t * dim..(t + 1) * dim];
                let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let scale = if amax.is_finite() { amax / 127.0 } else { f32::MAX / 127.0 };
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                scales[t * 4..t * 4 + 4].copy_from_slice(&scale.to_le_bytes());
                for (q, &v) in qs[t * dim..(t + 1) * dim].iter_mut().zip(row) {
                    // Round half away from zero with a truncating convert (vectorizes on
                    // baseline x86-64, unlike `f32::round`).
                    let y = (v * inv).clamp(-127.0, 127.0);
                    *q = (y + 0.5f32.copysign(y)) as i32 as i8 as u8;
                }
            }
        }
    }
    Ok(())
}

/// Decodes a frame of `n_tokens × dim` into `out` (resized), checking its length first.
pub fn decode(codec: Codec, bytes: &[u8], n_tokens: usize, dim: usize, out: &mut Vec<f32>) -> Result<(), CodecError> {
    let want = codec.encoded_len(n_tokens, dim).ok_or(CodecError::Overflow { n_tokens, dim })?;
    if bytes.len() != want {
        return Err(CodecError::Length { codec, n_tokens, dim, got: bytes.len(), want });
    }
    out.clear();
    out.resize(n_tokens * dim, 0.0);
    match codec {
        Codec::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Codec::Bf16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        Codec::Q8 => {
            let (scales, qs) = bytes.split_at(n_tokens * 4);
            for t in 0..n_tokens {
                let s = &scales[t * 4..t * 4 + 4];
                let scale = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                if !scale.is_finite() || scale < 0.0 {
                    return Err(CodecError::BadScale { token: t, scale });
                }
                for (o, &q) in out[t * dim..(t + 1) * dim].iter_mut().zip(&qs[t * dim..(t + 1) * dim]) {
                    *o = (q as i8) as f32 * scale;
                }
            }
        }
    }
    Ok(())
}

/// f32 → bf16, round to nearest even; NaN stays NaN.
#[inline]
pub fn f32_to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let quiet_nan = (b >> 16) | 0x40;
    // A select rather than an early return, so the loop over a row vectorizes.
    (if (b & 0x7fff_ffff) > 0x7f80_0000 { quiet_nan } else { rounded }) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, dim: usize) -> Vec<f32> {
        let mut x = 0x9e37_79b9u32;
        (0..n * dim)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let v = (x as f32 / u32::MAX as f32 - 0.5) * 8.0;
                // Sprinkle outliers like real hidden states have.
                if i % 97 == 0 { v * 40.0 } else { v }
            })
            .collect()
    }

    fn round_trip(c: Codec, x: &[f32], n: usize, dim: usize) -> Vec<f32> {
        let mut b = Vec::new();
        encode(c, x, n, dim, &mut b).unwrap();
        assert_eq!(b.len(), c.encoded_len(n, dim).unwrap());
        let mut y = Vec::new();
        decode(c, &b, n, dim, &mut y).unwrap();
        y
    }

    #[test]
    fn f32_is_exact() {
        let (n, dim) = (5, 67);
        let mut x = data(n, dim);
        x[3] = -0.0;
        x[4] = f32::MIN_POSITIVE / 3.0;
        let y = round_trip(Codec::F32, &x, n, dim);
        assert!(x.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn bf16_relative_error_is_bounded() {
        let (n, dim) = (7, 129);
        let x = data(n, dim);
        let y = round_trip(Codec::Bf16, &x, n, dim);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= a.abs() * (1.0 / 256.0), "{a} -> {b}");
        }
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80, "ties go to even");
        assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), 0x3f82, "ties go to even");
        assert!(f32::from_bits((f32_to_bf16(f32::NAN) as u32) << 16).is_nan());
        assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f80, "rounds up to infinity like every bf16 converter");
    }

    #[test]
    fn q8_error_is_half_a_step_per_token() {
        let (n, dim) = (6, 200);
        let mut x = data(n, dim);
        for v in &mut x[dim..2 * dim] {
            *v = 0.0; // an all-zero token has scale 0
        }
        let y = round_trip(Codec::Q8, &x, n, dim);
        for t in 0..n {
            let row = &x[t * dim..(t + 1) * dim];
            let step = row.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, b) in row.iter().zip(&y[t * dim..(t + 1) * dim]) {
                assert!((a - b).abs() <= step * 0.5 + step * 1e-5, "token {t}: {a} -> {b}");
            }
        }
        assert!(y[dim..2 * dim].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn wrong_lengths_and_bad_scales_are_refused() {
        let mut out = Vec::new();
        for c in [Codec::F32, Codec::Bf16, Codec::Q8] {
            let len = c.encoded_len(3, 8).unwrap();
            assert!(matches!(decode(c, &vec![0; len + 1], 3, 8, &mut out), Err(CodecError::Length { .. })));
            assert!(matches!(decode(c, &vec![0; len - 1], 3, 8, &mut out), Err(CodecError::Length { .. })));
            assert!(decode(c, &vec![0; len], 3, 8, &mut out).is_ok());
            assert!(matches!(decode(c, &[], usize::MAX, 8, &mut out), Err(CodecError::Overflow { .. })));
            assert!(matches!(encode(c, &[1.0; 5], 3, 8, &mut Vec::new()), Err(CodecError::InputShape { .. })));
        }
        let mut b = vec![0u8; Codec::Q8.encoded_len(1, 4).unwrap()];
        b[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(decode(Codec::Q8, &b, 1, 4, &mut out), Err(CodecError::BadScale { .. })));
    }

    #[test]
    fn names_parse_back() {
        for c in [Codec::F32, Codec::Bf16, Codec::Q8] {
            assert_eq!(c.name().parse::<Codec>().unwrap(), c);
        }
        assert!("fp8".parse::<Codec>().is_err());
    }
}
