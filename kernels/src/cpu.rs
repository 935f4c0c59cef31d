//! Run-time CPU feature detection and the choice of SIMD path.
//!
//! Kernels come in three flavours: a portable scalar path (the reference every other path is
//! tested against), AVX2+FMA+F16C, and AVX-512 (F/BW/VL + VNNI, on top of the AVX2 set). The
//! best level the CPU supports is detected once; [`set_simd_level`] lowers it for the whole
//! process (tests, benchmarks, or users chasing a suspected SIMD bug), and the `*_with` entry
//! points of [`crate::matmul`] take a level explicitly. A level the CPU lacks is never used:
//! requests are clamped to what was detected.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

/// A family of kernels, ordered from the most portable to the fastest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// Plain Rust, any CPU. The reference for tests.
    Portable,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL + VNNI (`vpdpbusd`), plus everything of [`SimdLevel::Avx2`].
    Avx512,
}

impl SimdLevel {
    /// Every level, lowest first.
    pub const ALL: [SimdLevel; 3] = [SimdLevel::Portable, SimdLevel::Avx2, SimdLevel::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Portable => "portable",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    /// The level named `name` (as [`SimdLevel::name`] spells it, case-insensitive).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(name))
    }

    fn encode(self) -> u8 {
        match self {
            SimdLevel::Portable => 1,
            SimdLevel::Avx2 => 2,
            SimdLevel::Avx512 => 3,
        }
    }

    fn decode(v: u8) -> Option<Self> {
        match v {
            1 => Some(SimdLevel::Portable),
            2 => Some(SimdLevel::Avx2),
            3 => Some(SimdLevel::Avx512),
            _ => None,
        }
    }
}

impl std::fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// 0 = no override; otherwise `SimdLevel::encode`.
static OVERRIDE: AtomicU8 = AtomicU8::new(0);

/// The best level this CPU supports (detected once).
pub fn detected_level() -> SimdLevel {
    static DETECTED: OnceLock<SimdLevel> = OnceLock::new();
    *DETECTED.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> SimdLevel {
    use std::arch::is_x86_feature_detected as has;
    let avx2 = has!("avx2") && has!("fma") && has!("f16c");
    if !avx2 {
        return SimdLevel::Portable;
    }
    if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") {
        SimdLevel::Avx512
    } else {
        SimdLevel::Avx2
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> SimdLevel {
    SimdLevel::Portable
}

/// The level kernels use now: the detected level, lowered by [`set_simd_level`] if set.
pub fn simd_level() -> SimdLevel {
    let detected = detected_level();
    match SimdLevel::decode(OVERRIDE.load(Ordering::Relaxed)) {
        Some(l) => l.min(detected),
        None => detected,
    }
}

/// Caps the level for the whole process (`None` restores the detected level) and returns the
/// level now in effect, which is `level` clamped to what the CPU supports.
pub fn set_simd_level(level: Option<SimdLevel>) -> SimdLevel {
    OVERRIDE.store(level.map_or(0, SimdLevel::encode), Ordering::Relaxed);
    simd_level()
}

/// `level` lowered to what this CPU can run.
pub fn clamp_level(level: SimdLevel) -> SimdLevel {
    level.min(detected_level())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_order() {
        for l in SimdLevel::ALL {
            assert_eq!(SimdLevel::from_name(l.name()), Some(l));
            assert_eq!(SimdLevel::decode(l.encode()), Some(l));
        }
        assert!(SimdLevel::Portable < SimdLevel::Avx2 && SimdLevel::Avx2 < SimdLevel::Avx512);
        assert_eq!(clamp_level(SimdLevel::Portable), SimdLevel::Portable);
        assert!(clamp_level(SimdLevel::Avx512) <= detected_level());
    }
}
