//! The tile kernel interface shared by every SIMD level, and the choice of kernel.
//!
//! A [`Tile`] is a block of the product `out (toks, rows) = act (toks, ·) · w (rows, ·)ᵀ`.
//! The SIMD kernels walk the tokens in groups (four, or eight where registers allow) and, for
//! each weight row (or pair of rows), compute the dots with all tokens of the group at once, so
//! that a weight block is loaded and decoded once per group (prefill) while decode
//! (`toks == 1`) streams the rows one at a time. Every kernel reads its activations as rows
//! of plain vec_dot_type blocks, as ggml does. A [`Kernel`] may name a second tile function
//! for products of [`LARGE_BATCH`] tokens or more, where llama.cpp rounds differently.

use super::scalar;
use crate::GgmlType;
use crate::cpu::SimdLevel;

/// A block of the product, described by raw pointers so the same kernel serves every thread.
///
/// `out[c * out_stride + r] = dot(row r of w, row c of act)` for `r < rows`, `c < toks`.
#[derive(Clone, Copy, Debug)]
pub struct Tile {
    /// First weight row.
    pub w: *const u8,
    /// Bytes between weight rows.
    pub w_stride: usize,
    pub rows: usize,
    /// First activation row, in the vec_dot_type of the weights.
    pub a: *const u8,
    /// Bytes between activation rows.
    pub a_stride: usize,
    pub toks: usize,
    pub out: *mut f32,
    /// Elements between the outputs of consecutive tokens.
    pub out_stride: usize,
    /// Blocks per row (elements per row for F32/F16/BF16).
    pub nb: usize,
}

/// A kernel computing a whole [`Tile`].
///
/// # Safety
/// Every pointer of the tile must be valid for the extents it describes, and the outputs must
/// not be written concurrently by anyone else.
pub type TileFn = unsafe fn(&Tile);

/// The dot of one weight row with `N` activation rows `a_stride` bytes apart.
pub(crate) trait RowDot {
    /// # Safety
    /// `w` holds `nb` weight blocks; each of the `N` activation rows holds `nb` blocks of the
    /// vec_dot_type (with matching element counts).
    unsafe fn dot<const N: usize>(
        nb: usize,
        w: *const u8,
        a: *const u8,
        a_stride: usize,
    ) -> [f32; N];

    /// Tokens per group: 4, or 8 where registers allow it (then remainders go by 4).
    const GROUP: usize = 4;

    /// Whether [`RowDot::dot2`] is faster than two calls of [`RowDot::dot`] (with more than
    /// one activation row).
    const TWO_ROWS: bool = false;

    /// The dots of weight rows `w` and `w + w_stride` with the same `N` activation rows.
    ///
    /// # Safety
    /// As for [`RowDot::dot`], for both rows.
    #[inline(always)]
    unsafe fn dot2<const N: usize>(
        nb: usize,
        w: *const u8,
        w_stride: usize,
        a: *const u8,
        a_stride: usize,
    ) -> [[f32; N]; 2] {
        // SAFETY: forwarded from the caller.
        unsafe {
            [
                Self::dot::<N>(nb, w, a, a_stride),
                Self::dot::<N>(nb, w.add(w_stride), a, a_stride),
            ]
        }
    }
}

/// Runs a tile with kernel `K`. Inlined into each `#[target_feature]` entry point.
#[inline(always)]
pub(crate) unsafe fn drive<K: RowDot>(t: &Tile) {
    let mut c = 0;
    while c < t.toks {
        let left = t.toks - c;
        // SAFETY: forwarded from the caller; `c + N <= toks`.
        unsafe {
            if K::GROUP >= 8 && left >= 8 {
                rows::<K, 8>(t, c);
                c += 8;
                continue;
            }
            match left {
                1 => rows::<K, 1>(t, c),
                2 => rows::<K, 2>(t, c),
                3 => rows::<K, 3>(t, c),
                _ => rows::<K, 4>(t, c),
            }
        }
        c += left.min(4);
    }
}

#[inline(always)]
unsafe fn rows<K: RowDot, const N: usize>(t: &Tile, c: usize) {
    // SAFETY: the caller guarantees the tile's extents.
    unsafe {
        let a = t.a.add(c * t.a_stride);
        let mut r = 0;
        // Only with several tokens: decode streams rows from memory, and two interleaved
        // row streams defeat the hardware prefetchers (3x slower on a 30 MB matrix).
        if K::TWO_ROWS && N > 1 {
            while r + 2 <= t.rows {
                let o = K::dot2::<N>(t.nb, t.w.add(r * t.w_stride), t.w_stride, a, t.a_stride);
                for i in 0..N {
                    *t.out.add((c + i) * t.out_stride + r) = o[0][i];
                    *t.out.add((c + i) * t.out_stride + r + 1) = o[1][i];
                }
                r += 2;
            }
        }
        while r < t.rows {
            let o = K::dot::<N>(t.nb, t.w.add(r * t.w_stride), a, t.a_stride);
            for (i, v) in o.iter().enumerate() {
                *t.out.add((c + i) * t.out_stride + r) = *v;
            }
            r += 1;
        }
    }
}

type ScalarDot = fn(usize, &[u8], &[u8]) -> f32;

/// Bytes of `nb` blocks of weights of `ty` and of its activations.
fn row_bytes(ty: GgmlType, nb: usize) -> (usize, usize) {
    let act = super::vec_dot_type(ty);
    (
        nb * ty.type_size(),
        nb * ty.block_size() / act.block_size() * act.type_size(),
    )
}

/// The portable reference kernel for `ty`, or `None` if `ty` is not supported.
pub fn portable_dot(ty: GgmlType) -> Option<ScalarDot> {
    Some(match ty {
        GgmlType::F32 => scalar::dot_f32,
        GgmlType::F16 => scalar::dot_f16,
        GgmlType::BF16 => scalar::dot_bf16,
        GgmlType::Q4_0 => scalar::dot_q4_0,
        GgmlType::Q4_1 => scalar::dot_q4_1,
        GgmlType::Q5_0 => scalar::dot_q5_0,
        GgmlType::Q5_1 => scalar::dot_q5_1,
        GgmlType::Q8_0 => scalar::dot_q8_0,
        GgmlType::Q4_K => scalar::dot_q4_k,
        GgmlType::Q5_K => scalar::dot_q5_k,
        GgmlType::Q6_K => scalar::dot_q6_k,
        _ => return None,
    })
}

macro_rules! portable_tiles {
    ($($name:ident => $ty:ident),* $(,)?) => {$(
        unsafe fn $name(t: &Tile) {
            let (wb, ab) = row_bytes(GgmlType::$ty, t.nb);
            let f = portable_dot(GgmlType::$ty).expect("supported");
            for c in 0..t.toks {
                // SAFETY: the caller guarantees the tile's extents.
                let a = unsafe { std::slice::from_raw_parts(t.a.add(c * t.a_stride), ab) };
                for r in 0..t.rows {
                    // SAFETY: as above.
                    unsafe {
                        let w = std::slice::from_raw_parts(t.w.add(r * t.w_stride), wb);
                        *t.out.add(c * t.out_stride + r) = f(t.nb, w, a);
                    }
                }
            }
        }
    )*};
}

portable_tiles! {
    tile_f32 => F32, tile_f16 => F16, tile_bf16 => BF16,
    tile_q4_0 => Q4_0, tile_q4_1 => Q4_1, tile_q5_0 => Q5_0, tile_q5_1 => Q5_1,
    tile_q8_0 => Q8_0, tile_q4_k => Q4_K, tile_q5_k => Q5_K, tile_q6_k => Q6_K,
}

fn portable_tile(ty: GgmlType) -> Option<TileFn> {
    Some(match ty {
        GgmlType::F32 => tile_f32,
        GgmlType::F16 => tile_f16,
        GgmlType::BF16 => tile_bf16,
        GgmlType::Q4_0 => tile_q4_0,
        GgmlType::Q4_1 => tile_q4_1,
        GgmlType::Q5_0 => tile_q5_0,
        GgmlType::Q5_1 => tile_q5_1,
        GgmlType::Q8_0 => tile_q8_0,
        GgmlType::Q4_K => tile_q4_k,
        GgmlType::Q5_K => tile_q5_k,
        GgmlType::Q6_K => tile_q6_k,
        _ => return None,
    })
}

/// Products of this many tokens or more take [`Kernel::large`]: llama.cpp switches K-quant
/// matmuls to its tiled kernels from 8 tokens (`ggml_tiled_min_batch`), which round
/// differently from `vec_dot`.
pub const LARGE_BATCH: usize = 8;

/// A tile kernel, and the one that replaces it for large products.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    pub tile: TileFn,
    /// The kernel for products of [`LARGE_BATCH`] tokens or more, where it differs from
    /// `tile`.
    pub large: Option<TileFn>,
}

impl Kernel {
    pub(crate) fn new(tile: TileFn) -> Self {
        Kernel { tile, large: None }
    }

    /// The tile kernel for a product of `n` tokens.
    pub fn tile_for(&self, n: usize) -> TileFn {
        match self.large {
            Some(f) if n >= LARGE_BATCH => f,
            _ => self.tile,
        }
    }
}

/// The kernel for weights of type `ty` at `level` (clamped to what the CPU supports), or
/// `None` when `ty` is not a supported weight type.
pub fn kernel(ty: GgmlType, level: SimdLevel) -> Option<Kernel> {
    let level = crate::cpu::clamp_level(level);
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(k) = super::x86::kernel(ty, level) {
            return Some(k);
        }
    }
    let _ = level;
    portable_tile(ty).map(Kernel::new)
}
