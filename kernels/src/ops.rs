//! Element-wise and row-wise operations: RMSNorm, RoPE, SiLU/SwiGLU, softmax, residual adds.
//!
//! Key decision: every op reproduces the arithmetic of ggml's CPU backend as llama.cpp runs it
//! (GCC, `-march=native` on an AVX-512 machine, so `-ffp-contract=fast` fuses `a*b + c`), one
//! rounding at a time, so that shoal's greedy tokens can match llama.cpp's exactly:
//! - RMSNorm sums the f32 squares in f64, in order, like `ggml_compute_forward_rms_norm_f32`.
//! - RoPE builds its angles like `ggml_rope_cache_init` (theta multiplied by
//!   `powf(base, -2/n_rot)` in f32, one pair at a time; libm `cosf`/`sinf`) and rotates with
//!   the fused multiply-adds GCC emits for `rotate_pairs`.
//! - SwiGLU and softmax use ggml's vector `expf` (`ggml_v_expf`, the AVX-512 variant) on whole
//!   groups of 16 and libm `expf` on the tail, as `ggml_vec_swiglu_f32` and
//!   `ggml_vec_soft_max_f32` do.
//!
//! Each vectorized kernel (AVX2+FMA, chosen at run time) has a portable twin that computes the
//! same bits with `f32::mul_add`; the tests compare the two, and compare both with hashes of
//! libggml-cpu's outputs.
//!
//! This module must not allocate on a hot path nor know about models: it sees slices.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Whether the AVX2+FMA kernels may run on this CPU (cached by `std`).
#[inline]
fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

// ---------------------------------------------------------------------------------------------
// ggml's vector expf (ARM optimized-routines port), AVX-512 flavour, emulated lane by lane.

/// 0x1.8p23: adding it rounds to an integer.
const EXP_SHIFT: f32 = 12582912.0;
/// 0x1.715476p+0 = log2(e).
const EXP_LOG2E: f32 = f32::from_bits(0x3fb8_aa3b);
/// 0x1.62e4p-1 and 0x1.7f7d1cp-20: ln(2) split in a high and a low part.
const EXP_LN2_HI: f32 = f32::from_bits(0x3f31_7200);
const EXP_LN2_LO: f32 = f32::from_bits(0x35bf_be8e);
/// Polynomial coefficients 0x1.ffffecp-1, 0x1.fffdb6p-2, 0x1.555e66p-3, 0x1.573e2ep-5,
/// 0x1.0e4020p-7.
const EXP_C1: f32 = f32::from_bits(0x3f7f_fff6);
const EXP_C2: f32 = f32::from_bits(0x3eff_fedb);
const EXP_C3: f32 = f32::from_bits(0x3e2a_af33);
const EXP_C4: f32 = f32::from_bits(0x3d2b_9f17);
const EXP_C5: f32 = f32::from_bits(0x3c07_2010);

/// One lane of ggml's AVX-512 `ggml_v_expf`: `exp(x)` within 1.5 ulp, bit-identical to it.
#[inline(always)]
fn exp_lane(x: f32) -> f32 {
    let z = x.mul_add(EXP_LOG2E, EXP_SHIFT);
    let n = z - EXP_SHIFT;
    let b = (-n).mul_add(EXP_LN2_LO, (-n).mul_add(EXP_LN2_HI, x));
    let u = b * b;
    let j = EXP_C5
        .mul_add(b, EXP_C4)
        .mul_add(u, EXP_C3.mul_add(b, EXP_C2))
        .mul_add(u, EXP_C1.mul_add(b, 1.0));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    scalef(j, n)
}

/// `_mm512_scalef_ps` for an integral `n` with `|n| <= 192`: `j * 2^n` rounded once.
#[inline(always)]
fn scalef(j: f32, n: f32) -> f32 {
    // 2^n is exact in f64 for |n| <= 192, and so is the product; the cast rounds once.
    let p = f64::from_bits(((n as i64 + 1023) as u64) << 52);
    (j as f64 * p) as f32
}

/// SiLU with ggml's vector exp, `x / (1 + exp(0 - x))` as `ggml_v_silu` computes it.
#[inline(always)]
fn silu_lane(x: f32) -> f32 {
    x / (1.0 + exp_lane(0.0 - x))
}

/// `x * sigmoid(x)` with libm `expf`, as ggml's scalar `ggml_silu_f32` (used on the tails of
/// rows whose length is not a multiple of 16).
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;

    /// Eight lanes of [`exp_lane`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp8(x: __m256) -> __m256 {
        let shift = _mm256_set1_ps(EXP_SHIFT);
        let z = _mm256_fmadd_ps(x, _mm256_set1_ps(EXP_LOG2E), shift);
        let n = _mm256_sub_ps(z, shift);
        let b = _mm256_fnmadd_ps(
            n,
            _mm256_set1_ps(EXP_LN2_LO),
            _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x),
        );
        let u = _mm256_mul_ps(b, b);
        let p45 = _mm256_fmadd_ps(_mm256_set1_ps(EXP_C5), b, _mm256_set1_ps(EXP_C4));
        let p23 = _mm256_fmadd_ps(_mm256_set1_ps(EXP_C3), b, _mm256_set1_ps(EXP_C2));
        let p01 = _mm256_fmadd_ps(_mm256_set1_ps(EXP_C1), b, _mm256_set1_ps(1.0));
        let j = _mm256_fmadd_ps(_mm256_fmadd_ps(p45, u, p23), u, p01);
        let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
        let big = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(126.0));
        if _mm256_movemask_ps(big) == 0 {
            // 2^n is a normal f32: build it from the exponent bits; one rounding, like scalef.
            let e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
            return _mm256_mul_ps(j, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e)));
        }
        // Rare (|x| > ~87): finish lane by lane.
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds eight f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), x) };
        for l in &mut lanes {
            *l = exp_lane(*l);
        }
        // SAFETY: as above.
        unsafe { _mm256_loadu_ps(lanes.as_ptr()) }
    }

    #[target_feature(enable = "avx2,fma")]
    fn silu8(x: __m256) -> __m256 {
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e))
    }

    /// `out[i] = silu(gate[i]) * up[i]` for `i < n`, `n` a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32], n: usize) {
        assert!(n.is_multiple_of(8) && gate.len() >= n && up.len() >= n && out.len() >= n);
        let mut i = 0;
        while i < n {
            // SAFETY: i + 8 <= n <= every length (asserted above).
            unsafe {
                let g = _mm256_loadu_ps(gate.as_ptr().add(i));
                let u = _mm256_loadu_ps(up.as_ptr().add(i));
                _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(silu8(g), u));
            }
            i += 8;
        }
    }

    /// In-place twin of [`swiglu`]: `gate[i] = silu(gate[i]) * up[i]`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn swiglu_inplace(gate: &mut [f32], up: &[f32], n: usize) {
        assert!(n.is_multiple_of(8) && gate.len() >= n && up.len() >= n);
        let mut i = 0;
        while i < n {
            // SAFETY: i + 8 <= n <= every length (asserted above).
            unsafe {
                let p = gate.as_mut_ptr().add(i);
                let u = _mm256_loadu_ps(up.as_ptr().add(i));
                _mm256_storeu_ps(p, _mm256_mul_ps(silu8(_mm256_loadu_ps(p)), u));
            }
            i += 8;
        }
    }

    /// `y[i] = exp(x[i] - max)` for `i < 16`; returns the 16 values' sum in ggml's order.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp16_sub(x: &mut [f32], max: f32) -> f32 {
        assert!(x.len() >= 16);
        let m = _mm256_set1_ps(max);
        // SAFETY: 16 elements (asserted above).
        unsafe {
            let lo = exp8(_mm256_sub_ps(_mm256_loadu_ps(x.as_ptr()), m));
            let hi = exp8(_mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(8)), m));
            _mm256_storeu_ps(x.as_mut_ptr(), lo);
            _mm256_storeu_ps(x.as_mut_ptr().add(8), hi);
            // _mm512_reduce_add_ps (GCC): halves, then quarters, then pairs.
            let t3 = _mm256_add_ps(hi, lo);
            let t6 = _mm_add_ps(_mm256_extractf128_ps::<1>(t3), _mm256_castps256_ps128(t3));
            let t8 = _mm_add_ps(t6, _mm_movehl_ps(t6, t6));
            _mm_cvtss_f32(_mm_add_ss(t8, _mm_movehdup_ps(t8)))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

/// `out = silu(gate) * up`, element-wise, with ggml's numerics (vector exp on whole groups of
/// 16, libm exp on the rest). ggml works row by row, so one call over several rows matches it
/// when the row length is a multiple of 16.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = gate.len();
    assert!(up.len() == n && out.len() == n, "swiglu: lengths {n}, {}, {}", up.len(), out.len());
    let n16 = n / 16 * 16;
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { avx2::swiglu(gate, up, out, n16) };
        swiglu_tail(&gate[n16..], &up[n16..], &mut out[n16..]);
        return;
    }
    swiglu_portable(gate, up, out);
}

/// `gate = silu(gate) * up`, in place; same numerics as [`swiglu`].
pub fn swiglu_inplace(gate: &mut [f32], up: &[f32]) {
    let n = gate.len();
    assert!(up.len() == n, "swiglu_inplace: lengths {n}, {}", up.len());
    let n16 = n / 16 * 16;
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { avx2::swiglu_inplace(gate, up, n16) };
        for (g, &u) in gate[n16..].iter_mut().zip(&up[n16..]) {
            *g = silu(*g) * u;
        }
        return;
    }
    for (g, &u) in gate[..n16].iter_mut().zip(&up[..n16]) {
        *g = silu_lane(*g) * u;
    }
    for (g, &u) in gate[n16..].iter_mut().zip(&up[n16..]) {
        *g = silu(*g) * u;
    }
}

/// The portable twin of [`swiglu`].
pub fn swiglu_portable(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = gate.len();
    assert!(up.len() == n && out.len() == n, "swiglu: lengths {n}, {}, {}", up.len(), out.len());
    let n16 = n / 16 * 16;
    for ((o, &g), &u) in out[..n16].iter_mut().zip(&gate[..n16]).zip(&up[..n16]) {
        *o = silu_lane(g) * u;
    }
    swiglu_tail(&gate[n16..], &up[n16..], &mut out[n16..]);
}

fn swiglu_tail(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(g) * u;
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax

/// Softmax of one row in place, max-subtracted, with ggml's numerics (`ggml_soft_max` with
/// scale 1 and no mask): exps in f32, their sum in f64, then one multiply by `1/sum`.
pub fn softmax_inplace(x: &mut [f32]) {
    softmax_impl(x, use_avx2());
}

/// The portable twin of [`softmax_inplace`].
pub fn softmax_inplace_portable(x: &mut [f32]) {
    softmax_impl(x, false);
}

fn softmax_impl(x: &mut [f32], simd: bool) {
    if x.is_empty() {
        return;
    }
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| if m > v { m } else { v });
    let n16 = x.len() / 16 * 16;
    let mut sum = 0f64;
    for group in x[..n16].chunks_exact_mut(16) {
        sum += softmax_group16(group, max, simd) as f64;
    }
    for v in &mut x[n16..] {
        let e = (*v - max).exp();
        sum += e as f64;
        *v = e;
    }
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `g[i] = exp(g[i] - max)` over 16 values with ggml's vector exp; returns their f32 sum,
/// added in the order of GCC's `_mm512_reduce_add_ps`. `simd` only where AVX2+FMA exist.
#[inline]
pub(crate) fn softmax_group16(g: &mut [f32], max: f32, simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: callers pass `simd` only from `use_avx2()`.
        return unsafe { avx2::exp16_sub(g, max) };
    }
    let _ = simd;
    for v in g.iter_mut() {
        *v = exp_lane(*v - max);
    }
    reduce16(g)
}

/// Sum of 16 floats in the association order of GCC's `_mm512_reduce_add_ps`.
#[inline]
pub(crate) fn reduce16(a: &[f32]) -> f32 {
    let mut t3 = [0f32; 8];
    for i in 0..8 {
        t3[i] = a[8 + i] + a[i];
    }
    let mut t6 = [0f32; 4];
    for i in 0..4 {
        t6[i] = t3[4 + i] + t3[i];
    }
    (t6[0] + t6[2]) + (t6[1] + t6[3])
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// RMSNorm of one row: `out[i] = x[i] * scale * weight[i]`, `scale = 1/sqrt(mean(x²) + eps)`.
/// The squares are rounded to f32 and summed in f64 in order, as ggml does.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len();
    assert!(
        weight.len() == n && out.len() == n,
        "rms_norm: lengths {n}, {}, {}",
        weight.len(),
        out.len()
    );
    let scale = rms_scale(x, eps);
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// [`rms_norm`] in place.
pub fn rms_norm_inplace(x: &mut [f32], weight: &[f32], eps: f32) {
    assert!(weight.len() == x.len(), "rms_norm: lengths {}, {}", x.len(), weight.len());
    let scale = rms_scale(x, eps);
    for (v, &w) in x.iter_mut().zip(weight) {
        *v = *v * scale * w;
    }
}

fn rms_scale(x: &[f32], eps: f32) -> f32 {
    if x.is_empty() {
        return 0.0;
    }
    // Sequential f64 sum: reassociating it (as a vectorized sum would) changes the result.
    let mut sum = 0f64;
    for &v in x {
        sum += (v * v) as f64;
    }
    let mean = (sum / x.len() as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

// ---------------------------------------------------------------------------------------------
// Residual adds

/// `x += y`, element-wise.
pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    assert!(x.len() == y.len(), "add_inplace: lengths {}, {}", x.len(), y.len());
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Adds `bias` to every row of `x`.
// x: (n, len(bias)) row-major
pub fn add_bias_rows(x: &mut [f32], bias: &[f32]) {
    let d = bias.len();
    assert!(x.len().is_multiple_of(d), "add_bias_rows: {} values are not rows of {d}", x.len());
    if d == 0 {
        return;
    }
    for row in x.chunks_exact_mut(d) {
        add_inplace(row, bias);
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE

/// Rotary position embedding for one model: the angle schedule, applied per token.
#[derive(Debug, Clone)]
pub struct RopeCache {
    n_rot: usize,
    freq_scale: f32,
    /// `powf(freq_base, -2/n_rot)`, the ratio between consecutive pairs' frequencies.
    theta_scale: f32,
    /// Per-pair divisors of the angle (llama 3's `rope_freqs`), or none.
    freq_factors: Option<Vec<f32>>,
}

/// Pairs of a head rotated with a stack buffer; longer heads spill to the heap.
const ROPE_STACK_PAIRS: usize = 256;

impl RopeCache {
    /// Rotation of the first `n_rot` dims (even) of each head, with `theta_i = pos *
    /// freq_scale * freq_base^(-2i/n_rot)` computed as ggml does (ext_factor 0, attn_factor 1).
    pub fn new(n_rot: usize, freq_base: f32, freq_scale: f32) -> Self {
        assert!(n_rot.is_multiple_of(2), "rope: n_rot {n_rot} is odd");
        let theta_scale = freq_base.powf(-2.0f32 / n_rot as f32);
        RopeCache { n_rot, freq_scale, theta_scale, freq_factors: None }
    }

    /// Divides pair `i`'s angle by `factors[i]` (llama 3's `rope_freqs.weight`).
    pub fn with_freq_factors(mut self, factors: Vec<f32>) -> Self {
        assert!(factors.len() >= self.n_rot / 2, "rope: {} freq factors", factors.len());
        self.freq_factors = Some(factors);
        self
    }

    /// Rotated dims per head.
    pub fn n_rot(&self) -> usize {
        self.n_rot
    }

    /// Writes `cos, sin` of each pair's angle at `pos`, interleaved: `cs: (n_rot/2, 2)`.
    /// The row depends only on `pos`, so one row serves every head and layer of a token.
    pub fn cos_sin(&self, pos: usize, cs: &mut [f32]) {
        assert!(cs.len() >= self.n_rot, "rope: cos/sin buffer of {} < {}", cs.len(), self.n_rot);
        // ggml: theta starts at the position as a float and is scaled once per pair.
        let mut theta = pos as f32;
        for i in 0..self.n_rot / 2 {
            let extrap = match &self.freq_factors {
                Some(ff) => theta / ff[i],
                None => theta,
            };
            let t = self.freq_scale * extrap;
            cs[2 * i] = t.cos();
            cs[2 * i + 1] = t.sin();
            theta *= self.theta_scale;
        }
    }

    /// Rotates one token's heads in place. `x: (n_heads, head_dim)`. `neox = false` rotates
    /// adjacent pairs `(x[2i], x[2i+1])` (llama); `neox = true` rotates `(x[i], x[i + n_rot/2])`
    /// (NeoX, qwen2). Dims past `n_rot` are left alone.
    pub fn rope(&self, x: &mut [f32], n_heads: usize, head_dim: usize, pos: usize, neox: bool) {
        let n_rot = self.n_rot;
        if n_rot <= 2 * ROPE_STACK_PAIRS {
            let mut cs = [0f32; 2 * ROPE_STACK_PAIRS];
            self.cos_sin(pos, &mut cs[..n_rot]);
            self.apply(&cs[..n_rot], x, n_heads, head_dim, neox);
        } else {
            let mut cs = vec![0f32; n_rot];
            self.cos_sin(pos, &mut cs);
            self.apply(&cs, x, n_heads, head_dim, neox);
        }
    }

    /// Rotates one token's heads with a row from [`RopeCache::cos_sin`].
    pub fn apply(&self, cs: &[f32], x: &mut [f32], n_heads: usize, head_dim: usize, neox: bool) {
        let n_rot = self.n_rot;
        assert!(n_rot <= head_dim, "rope: n_rot {n_rot} > head_dim {head_dim}");
        assert!(cs.len() >= n_rot, "rope: cos/sin row of {} < {n_rot}", cs.len());
        assert!(
            x.len() == n_heads * head_dim,
            "rope: {} values for {n_heads} heads of {head_dim}",
            x.len()
        );
        if head_dim == 0 {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has FMA (checked just above).
            unsafe { rope_heads_fma(cs, x, head_dim, n_rot, neox) };
            return;
        }
        rope_heads(cs, x, head_dim, n_rot, neox);
    }
}

/// `mul_add` without the `fma` feature is a libm call; this instantiation inlines it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
fn rope_heads_fma(cs: &[f32], x: &mut [f32], head_dim: usize, n_rot: usize, neox: bool) {
    rope_heads(cs, x, head_dim, n_rot, neox)
}

#[inline(always)]
fn rope_heads(cs: &[f32], x: &mut [f32], head_dim: usize, n_rot: usize, neox: bool) {
    for head in x.chunks_exact_mut(head_dim) {
        if neox {
            let (lo, hi) = head[..n_rot].split_at_mut(n_rot / 2);
            for ((a, b), c) in lo.iter_mut().zip(hi.iter_mut()).zip(cs.chunks_exact(2)) {
                (*a, *b) = rotate(*a, *b, c[0], c[1]);
            }
        } else {
            for (p, c) in head[..n_rot].chunks_exact_mut(2).zip(cs.chunks_exact(2)) {
                (p[0], p[1]) = rotate(p[0], p[1], c[0], c[1]);
            }
        }
    }
}

/// One pair of RoPE, fused as GCC compiles ggml's `rotate_pairs` (checked bit for bit against
/// libggml-cpu in both modes): `x0*cos - x1*sin` and `x0*sin + x1*cos`, each one FMA whose
/// addend is the rounded second product.
#[inline(always)]
fn rotate(x0: f32, x1: f32, cos: f32, sin: f32) -> (f32, f32) {
    (x0.mul_add(cos, -(x1 * sin)), x0.mul_add(sin, x1 * cos))
}

/// Helpers shared by the kernel tests: a deterministic generator and the golden-value hash.
#[cfg(test)]
pub(crate) mod test_util {
    /// Exact rationals in [-2, 2]; the C program that made the golden hashes uses the same.
    pub(crate) fn golden_input(i: u64, salt: u64) -> f32 {
        let v = (i.wrapping_mul(2_654_435_761).wrapping_add(salt * 97) % 2001) as i64 - 1000;
        v as f32 / 500.0
    }

    /// FNV-1a over the little-endian bits of each value.
    pub(crate) fn fnv(x: &[f32]) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for v in x {
            for b in v.to_bits().to_le_bytes() {
                h ^= b as u64;
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        h
    }

    /// Uniform values in [-scale, scale) from a xorshift stream.
    pub(crate) fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::{fnv, golden_input, random};
    use super::*;

    fn assert_close(got: &[f32], want: &[f64], rel: f64, abs: f64, what: &str) {
        assert_eq!(got.len(), want.len());
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let err = (g as f64 - w).abs();
            assert!(err <= rel * w.abs() + abs, "{what}[{i}]: got {g}, want {w} (err {err:e})");
        }
    }

    fn assert_bits_eq(a: &[f32], b: &[f32], what: &str) {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let same = x.to_bits() == y.to_bits() || x.is_nan() && y.is_nan();
            assert!(same, "{what}[{i}]: {x:e} ({:#x}) vs {y:e} ({:#x})", x.to_bits(), y.to_bits());
        }
    }

    #[test]
    fn rms_norm_matches_f64_reference() {
        for (n, seed) in [(1, 1), (7, 2), (576, 3), (896, 4), (1000, 5)] {
            let x = random(n, seed, 3.0);
            let w = random(n, seed + 100, 1.5);
            let eps = 1e-5f32;
            let mut out = vec![0f32; n];
            rms_norm(&x, &w, eps, &mut out);
            let mean = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
            let scale = 1.0 / (mean + eps as f64).sqrt();
            let want: Vec<f64> =
                x.iter().zip(&w).map(|(&v, &w)| v as f64 * scale * w as f64).collect();
            // A few f32 roundings (mean, sqrt, two products): 1e-6 relative is generous.
            assert_close(&out, &want, 1e-6, 1e-30, "rms_norm");
            let mut inplace = x.clone();
            rms_norm_inplace(&mut inplace, &w, eps);
            assert_bits_eq(&inplace, &out, "rms_norm_inplace");
        }
    }

    /// Rotation about the angles `RopeCache::cos_sin` produced, in f64.
    fn rope_ref(
        x: &[f32],
        cs: &[f32],
        n_heads: usize,
        hd: usize,
        n_rot: usize,
        neox: bool,
    ) -> Vec<f64> {
        let mut y: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        for h in 0..n_heads {
            for i in 0..n_rot / 2 {
                let (a, b) = if neox { (i, i + n_rot / 2) } else { (2 * i, 2 * i + 1) };
                let (c, s) = (cs[2 * i] as f64, cs[2 * i + 1] as f64);
                let (x0, x1) = (x[h * hd + a] as f64, x[h * hd + b] as f64);
                y[h * hd + a] = x0 * c - x1 * s;
                y[h * hd + b] = x0 * s + x1 * c;
            }
        }
        y
    }

    #[test]
    fn rope_matches_f64_formula() {
        for &(hd, n_rot, base) in
            &[(64, 64, 10000f32), (64, 64, 1e6), (128, 128, 5e5), (80, 32, 1e4)]
        {
            let rc = RopeCache::new(n_rot, base, 1.0);
            for pos in [1usize, 7, 100, 4097, 30000] {
                let n_heads = 3;
                let x = random(n_heads * hd, pos as u64 + hd as u64, 2.0);
                let mut cs = vec![0f32; n_rot];
                rc.cos_sin(pos, &mut cs);
                // The angles against the formula theta_i = pos * base^(-2i/n_rot) in f64. ggml's
                // f32 schedule (pos as f32, theta *= theta_scale per pair) drifts by a few ulp
                // per step, so the error grows with the angle: allow 4e-7 * pos radians + 1e-6.
                for i in 0..n_rot / 2 {
                    let theta = pos as f64 * (base as f64).powf(-2.0 * i as f64 / n_rot as f64);
                    let tol = 1e-6 + 4e-7 * pos as f64;
                    assert!((cs[2 * i] as f64 - theta.cos()).abs() <= tol, "cos pos={pos} i={i}");
                    assert!(
                        (cs[2 * i + 1] as f64 - theta.sin()).abs() <= tol,
                        "sin pos={pos} i={i}"
                    );
                }
                for neox in [false, true] {
                    let mut y = x.clone();
                    rc.rope(&mut y, n_heads, hd, pos, neox);
                    // The rotation itself: two f32 roundings per value, |x| <= 2.
                    let want = rope_ref(&x, &cs, n_heads, hd, n_rot, neox);
                    assert_close(&y, &want, 1e-5, 1e-6, "rope");
                    // Dims past n_rot are copied.
                    for h in 0..n_heads {
                        assert_bits_eq(
                            &y[h * hd + n_rot..(h + 1) * hd],
                            &x[h * hd + n_rot..(h + 1) * hd],
                            "tail",
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rope_at_pos_0_is_identity() {
        let rc = RopeCache::new(64, 10000.0, 1.0);
        let x = random(2 * 64, 9, 2.0);
        for neox in [false, true] {
            let mut y = x.clone();
            rc.rope(&mut y, 2, 64, 0, neox);
            assert_eq!(y, x, "neox={neox}");
        }
    }

    #[test]
    fn rope_normal_and_neox_pair_different_dims() {
        // head_dim 4, base 10000, pos 1: theta_scale = 10000^(-1/2) = 0.01, so pair 0 turns by
        // 1 rad and pair 1 by 0.01 rad. x = [1, 2, 3, 4].
        let rc = RopeCache::new(4, 10000.0, 1.0);
        let (c1, s1) = (1f64.cos(), 1f64.sin());
        let (c2, s2) = (0.01f64.cos(), 0.01f64.sin());
        // Normal: (x0, x1) by 1 rad, (x2, x3) by 0.01 rad.
        let normal = [c1 - 2.0 * s1, s1 + 2.0 * c1, 3.0 * c2 - 4.0 * s2, 3.0 * s2 + 4.0 * c2];
        // NeoX: (x0, x2) by 1 rad, (x1, x3) by 0.01 rad.
        let neox = [c1 - 3.0 * s1, 2.0 * c2 - 4.0 * s2, s1 + 3.0 * c1, 2.0 * s2 + 4.0 * c2];
        // ≈ [-1.14264, 1.92208, 2.95985, 4.02980] and [-1.98404, 1.95990, 2.46253, 4.01980].
        let mut y = [1f32, 2.0, 3.0, 4.0];
        rc.rope(&mut y, 1, 4, 1, false);
        assert_close(&y, &normal, 1e-6, 1e-6, "normal");
        let mut z = [1f32, 2.0, 3.0, 4.0];
        rc.rope(&mut z, 1, 4, 1, true);
        assert_close(&z, &neox, 1e-6, 1e-6, "neox");
        assert!((y[1] - z[1]).abs() > 0.01 && (y[2] - z[2]).abs() > 0.4);
    }

    #[test]
    fn rope_freq_factors_divide_the_angles() {
        let ff: Vec<f32> = (0..32).map(|i| 1.0 + i as f32 / 8.0).collect();
        let plain = RopeCache::new(64, 500000.0, 1.0);
        let scaled = RopeCache::new(64, 500000.0, 1.0).with_freq_factors(ff.clone());
        let (mut a, mut b) = (vec![0f32; 64], vec![0f32; 64]);
        plain.cos_sin(1000, &mut a);
        scaled.cos_sin(1000, &mut b);
        let theta0 = 1000f64; // pair 0 of the plain schedule
        assert!((b[0] as f64 - (theta0 / ff[0] as f64).cos()).abs() < 1e-4);
        assert_ne!(a[2], b[2]);
    }

    #[test]
    fn exp_lane_is_accurate() {
        // ggml documents 1.5 ulp; allow 2 ulp (2.4e-7 relative) over the finite range.
        let mut x = -103.0f32;
        while x < 88.5 {
            let got = exp_lane(x) as f64;
            let want = (x as f64).exp();
            if want > 1.2e-38 {
                assert!((got - want).abs() <= 2.4e-7 * want, "exp({x}) = {got}, want {want}");
            } else {
                assert!((got - want).abs() <= 1.5e-45 * 2.0, "exp({x}) = {got}, want {want}");
            }
            x += 0.0137;
        }
        assert_eq!(exp_lane(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_lane(-200.0), 0.0);
        assert_eq!(exp_lane(200.0), f32::INFINITY);
        assert!(exp_lane(f32::NAN).is_nan());
    }

    /// Inputs that reach every branch of the vector exp: ordinary, |n| > 126, |n| > 192.
    fn exp_probe(n: usize, seed: u64) -> Vec<f32> {
        let mut v = random(n, seed, 12.0);
        let special = [
            95.0, -95.0, -120.0, 88.5, -87.5, 0.0, -0.0, 100.0, -104.0, -150.0, 1e-30, -1e-30,
            87.3, -87.3, 150.0, 200.0, -200.0, 60.0, -60.0, 3.0,
        ];
        for (i, s) in special.iter().enumerate() {
            v[(i * 7) % n] = *s;
        }
        v
    }

    #[test]
    fn swiglu_matches_f64_reference() {
        for n in [1usize, 5, 16, 37, 1536, 4864] {
            let g = random(n, n as u64, 12.0);
            let u = random(n, n as u64 + 1, 2.0);
            let mut out = vec![0f32; n];
            swiglu(&g, &u, &mut out);
            let want: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(&g, &u)| g as f64 / (1.0 + (-(g as f64)).exp()) * u as f64)
                .collect();
            // exp within 2 ulp, then a division and a product: 1e-6 relative.
            assert_close(&out, &want, 1e-6, 1e-37, "swiglu");
            assert!((silu(1.0) as f64 - 1.0 / (1.0 + (-1f64).exp())).abs() < 1e-7);
        }
    }

    #[test]
    fn swiglu_simd_equals_portable() {
        for n in [3usize, 16, 21, 64, 100, 1536] {
            let g = exp_probe(n.max(21), n as u64);
            let g = &g[..n];
            let u = random(n, 77, 2.0);
            let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
            swiglu(g, &u, &mut a);
            swiglu_portable(g, &u, &mut b);
            assert_bits_eq(&a, &b, "swiglu");
            let mut c = g.to_vec();
            swiglu_inplace(&mut c, &u);
            assert_bits_eq(&c, &b, "swiglu_inplace");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_exp_equals_lane_exp() {
        if !use_avx2() {
            return;
        }
        let mut x: Vec<f32> = exp_probe(4096, 5);
        x.extend((0..4096).map(|i| -110.0 + i as f32 * 0.05));
        for chunk in x.chunks_exact(8) {
            let mut got = [0f32; 8];
            // SAFETY: AVX2 and FMA are present (checked above); the buffers hold 8 floats.
            unsafe {
                _mm256_storeu_ps(got.as_mut_ptr(), avx2::exp8(_mm256_loadu_ps(chunk.as_ptr())))
            };
            let want: Vec<f32> = chunk.iter().map(|&v| exp_lane(v)).collect();
            assert_bits_eq(&got, &want, "exp8");
        }
    }

    #[test]
    fn softmax_sums_to_one_and_matches_reference() {
        for n in [1usize, 5, 16, 37, 300, 49152] {
            let x = random(n, n as u64 + 3, 15.0);
            let mut y = x.clone();
            softmax_inplace(&mut y);
            let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let e: Vec<f64> = x.iter().map(|&v| (v as f64 - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            let want: Vec<f64> = e.iter().map(|v| v / sum).collect();
            // x - max (|x - max| <= 30) is rounded to f32 before the exp, which turns its
            // 1 ulp into up to 1.8e-6 relative; plus exp's 2 ulp and the scaling: 3e-6.
            assert_close(&y, &want, 3e-6, 1e-37, "softmax");
            let total: f64 = y.iter().map(|&v| v as f64).sum();
            assert!((total - 1.0).abs() < 1e-5, "sum {total}");
            let mut z = x.clone();
            softmax_inplace_portable(&mut z);
            assert_bits_eq(&y, &z, "softmax simd/portable");
        }
        let mut empty: [f32; 0] = [];
        softmax_inplace(&mut empty);
    }

    #[test]
    fn adds() {
        let mut x = vec![1f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        add_inplace(&mut x, &[1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        assert_eq!(x, [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        add_bias_rows(&mut x, &[10.0, 20.0, 30.0]);
        assert_eq!(x, [12.0, 23.0, 34.0, 15.0, 26.0, 37.0]);
    }

    #[test]
    #[should_panic(expected = "add_bias_rows")]
    fn add_bias_rows_rejects_ragged_rows() {
        add_bias_rows(&mut [0f32; 5], &[1.0, 2.0]);
    }

    /// Bits of llama.cpp's CPU backend (llama-cpp-python 0.3.36's vendored ggml, libggml-cpu
    /// built by GCC 12 with -march=native on an AVX-512 machine), as FNV-1a hashes of the
    /// outputs for `golden_input` inputs. Guards the claim that these ops round as ggml does.
    #[test]
    fn matches_libggml_cpu_bits() {
        let g: Vec<f32> = (0..21).map(|i| golden_input(i, 1) * 6.0).collect();
        let u: Vec<f32> = (0..21).map(|i| golden_input(i, 2)).collect();
        let mut y = vec![0f32; 21];
        swiglu(&g, &u, &mut y);
        assert_eq!(fnv(&y), 0xfea0_1b21_0f38_fd6c, "swiglu");
        swiglu_portable(&g, &u, &mut y);
        assert_eq!(fnv(&y), 0xfea0_1b21_0f38_fd6c, "swiglu_portable");

        let mut x: Vec<f32> = (0..37).map(|i| golden_input(i, 3) * 8.0).collect();
        softmax_inplace(&mut x);
        assert_eq!(fnv(&x), 0x18d7_86f9_f7ea_e6f6, "softmax");

        let x: Vec<f32> = (0..37).map(|i| golden_input(i, 4)).collect();
        let w: Vec<f32> = (0..37).map(|i| golden_input(i, 5)).collect();
        let mut y = vec![0f32; 37];
        rms_norm(&x, &w, 1e-6, &mut y);
        assert_eq!(fnv(&y), 0xa4db_579e_73a9_9c4b, "rms_norm");

        let x: Vec<f32> = (0..128).map(|i| golden_input(i, 6)).collect();
        let mut y = x.clone();
        RopeCache::new(64, 10000.0, 1.0).rope(&mut y, 2, 64, 4097, false);
        assert_eq!(fnv(&y), 0x3dc1_108e_4b6b_cdc9, "rope normal");
        let mut y = x.clone();
        RopeCache::new(64, 1e6, 1.0).rope(&mut y, 2, 64, 4097, true);
        assert_eq!(fnv(&y), 0x3800_80ca_d7da_f781, "rope neox");
    }
}
