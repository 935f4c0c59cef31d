//! Causal attention of a block of query tokens over a sequence's KV cache (f16), with
//! grouped-query heads, and the f32 → f16 row conversion the caller uses to fill the cache.
//!
//! Key decision: the rounding can copy llama.cpp's CPU backend bit for bit (checked against
//! libggml-cpu, see the golden tests), and llama.cpp has two attention paths, so
//! [`AttnNumerics`] picks one; [`attention`] uses the accurate `F32Accum`:
//! - Except in the tiled kernel, the query head is rounded to f16 and dotted with each f16 key
//!   row in the order of ggml's AVX-512 `ggml_vec_dot_f16` (four 16-lane accumulators); the
//!   products of f16 values are exact, so the order is all there is to copy.
//! - `F32Accum` runs ggml's online softmax (libm `expf`, rescale on a new maximum) with the
//!   weighted sum of V in f32.
//! - `GgmlFlash` is `ggml_flash_attn_ext` (llama.cpp's default on CPU): the same online
//!   softmax with the V sum rounded to f16 after each update; a batch of 64+ tokens takes the
//!   tiled kernel (f32 query, 64-cell tiles, sequential FMAs), and one token over 512+ padded
//!   cells the split-KV kernel (per-thread chunks, merged), as ggml does.
//! - `GgmlNoFlash` is llama.cpp with flash attention off (llama-cpp-python's default): f16
//!   matmul scores, ggml's softmax (vector exp, f64 sum), probabilities rounded to f16, f16
//!   matmul with V; one token uses `ggml_vec_dot_f16`'s order, a batch tinyBLAS's.
//!
//! The ggml modes assume that shoal's call covers the same tokens as llama.cpp's ubatch and
//! that llama.cpp's KV length is its usual multiple of 256 ([`llama_n_kv`]).
//!
//! Work is split over (token, head) pairs on the pool; each thread keeps its scratch in a
//! thread-local buffer, so steady-state calls do not allocate. This module must not know about
//! models or the cache's allocation: it sees slices and shapes.

use crate::ops::reduce16;
use crate::pool::ThreadPool;
use half::f16;
use std::cell::RefCell;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Which of llama.cpp's attention paths the rounding copies (see the module header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttnNumerics {
    /// f16 query, online softmax in f32, weighted sum of V in f32. The most accurate.
    #[default]
    F32Accum,
    /// llama.cpp with flash attention (`ggml_flash_attn_ext`). Like `F32Accum` with the V sum
    /// kept in f16, except where ggml switches kernels: a batch of 64 or more tokens runs the
    /// tiled f32 kernel (f32 query, sequential FMA dots), and a single token over a padded KV
    /// length ([`llama_n_kv`]) of 512 or more splits the cells into `n_threads` chunks whose
    /// partial sums are merged. `n_ctx` and `n_threads` are llama.cpp's, to pick the same split.
    GgmlFlash { n_ctx: usize, n_threads: usize },
    /// llama.cpp without flash attention: f16 matmul scores, ggml softmax, f16 probabilities
    /// times f16 V.
    GgmlNoFlash,
}

/// Causal grouped-query attention of `n_tok` query tokens, with [`AttnNumerics::F32Accum`].
///
/// Shapes (row-major):
/// - `q: (n_tok, n_head*head_dim)`; query token `i` sits at position `n_past + i`.
/// - `k_cache, v_cache: (n_ctx, n_kv_head*head_dim)`, rows `0 .. n_past + n_tok` filled.
/// - `out: (n_tok, n_head*head_dim)`.
///
/// Token `i` attends to positions `0 ..= n_past + i`; head `h` reads kv head
/// `h / (n_head / n_kv_head)`; scores are multiplied by `scale` before the softmax.
///
/// # Panics
/// On inconsistent shapes or slices too short for them (caller bugs).
pub fn attention(
    pool: &ThreadPool,
    q: &[f32],
    k_cache: &[f16],
    v_cache: &[f16],
    n_tok: usize,
    n_past: usize,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
) {
    let shape = AttnShape { n_tok, n_past, n_head, n_kv_head, head_dim, scale };
    attention_with(AttnNumerics::F32Accum, pool, q, k_cache, v_cache, &shape, out);
}

/// The sizes of one [`attention_with`] call; the fields mean what [`attention`]'s arguments do.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnShape {
    pub n_tok: usize,
    pub n_past: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// [`attention`] with a choice of [`AttnNumerics`].
pub fn attention_with(
    numerics: AttnNumerics,
    pool: &ThreadPool,
    q: &[f32],
    k_cache: &[f16],
    v_cache: &[f16],
    shape: &AttnShape,
    out: &mut [f32],
) {
    let &AttnShape { n_tok, n_past, n_head, n_kv_head, head_dim, .. } = shape;
    assert!(
        n_kv_head > 0 && n_head % n_kv_head == 0,
        "attention: {n_head} heads cannot share {n_kv_head} kv heads"
    );
    let q_dim = n_head * head_dim;
    assert_eq!(q.len(), n_tok * q_dim, "attention: q holds {} values", q.len());
    assert_eq!(out.len(), n_tok * q_dim, "attention: out holds {} values", out.len());
    let kv_rows = n_past + n_tok;
    let kv_need = kv_rows * n_kv_head * head_dim;
    assert!(
        k_cache.len() >= kv_need && v_cache.len() >= kv_need,
        "attention: caches of {} and {} values hold fewer than {kv_rows} rows",
        k_cache.len(),
        v_cache.len()
    );
    let n_pairs = n_tok * n_head;
    if n_pairs == 0 || head_dim == 0 {
        return;
    }
    let simd = use_simd();
    let kernel = Kernel::choose(numerics, shape);
    let k_t = if kernel == Kernel::Tiled {
        transpose_k_tiles(k_cache, kv_rows, n_kv_head, head_dim)
    } else {
        Vec::new()
    };
    let dst = OutPtr(out.as_mut_ptr());
    pool.run(|ith, nth| {
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            // Strided (token, head) pairs keep causal prefill balanced across threads.
            for pair in (ith..n_pairs).step_by(nth) {
                let (t, h) = (pair / n_head, pair % n_head);
                let job = HeadJob {
                    q: &q[pair * head_dim..(pair + 1) * head_dim],
                    k_cache,
                    v_cache,
                    k_t: &k_t,
                    kv_head: h / (n_head / n_kv_head),
                    n_valid: n_past + t + 1,
                    shape,
                };
                // SAFETY: `pair < n_pairs` and `out.len() == n_pairs * head_dim` (asserted), and
                // each pair is visited by exactly one thread, so the slices are disjoint.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(dst.get().add(pair * head_dim), head_dim)
                };
                run_head(kernel, simd, &job, &mut s, o);
            }
        });
    });
}

/// K rows `0..n_rows` as f32 in 64-cell tiles, each transposed to `(head_dim, 64)` so the
/// tiled kernel's 64 scores accumulate side by side: `(n_kv_head, n_tiles, head_dim, 64)`,
/// cells past `n_rows` zero (the kernel masks them). f16 → f32 is exact, so this changes no
/// bits; it only saves every (token, head) pair from converting the whole cache again.
fn transpose_k_tiles(k_cache: &[f16], n_rows: usize, n_kv_head: usize, hd: usize) -> Vec<f32> {
    let n_tiles = n_rows.div_ceil(TILE);
    let mut k_t = vec![0f32; n_kv_head * n_tiles * hd * TILE];
    let row_len = n_kv_head * hd;
    for r in 0..n_rows {
        let (tile, c) = (r / TILE, r % TILE);
        for kvh in 0..n_kv_head {
            let src = &k_cache[r * row_len + kvh * hd..][..hd];
            let dst = &mut k_t[(kvh * n_tiles + tile) * hd * TILE..][..hd * TILE];
            for (d, &k) in src.iter().enumerate() {
                dst[d * TILE + c] = k.to_f32();
            }
        }
    }
    k_t
}

/// llama.cpp's KV length for a sequence of `used` cells (`llama_kv_cache::get_n_kv`): `used`
/// rounded up to a multiple of 256, at least 256, at most `n_ctx` (which llama.cpp pads to 256).
pub fn llama_n_kv(n_ctx: usize, used: usize) -> usize {
    let pad = |n: usize| n.div_ceil(256) * 256;
    pad(n_ctx).min(pad(used).max(256))
}

/// Longest run of one-token steps that [`ggml_flash_batchable`] lets a replay send as one
/// chunk: a chunk of 64 or more query tokens takes the tiled kernel.
pub const MAX_BATCHED_REPLAY: usize = TILE - 1;

/// Whether a one-token step over `used` cells (the new token included), under
/// [`AttnNumerics::GgmlFlash`] with `n_ctx`, runs the same per-query kernel that a chunk of
/// 2 ..= [`MAX_BATCHED_REPLAY`] query tokens runs. Each query of that kernel is computed on
/// its own, so a run of such steps replayed as one chunk gives the same bits: how a
/// sequence's KV is rebuilt quickly and exactly after a worker is lost. False once ggml
/// would split the KV of a single token (512 cells or more).
pub fn ggml_flash_batchable(n_ctx: usize, used: usize) -> bool {
    let shape = AttnShape { n_tok: 1, n_past: used.saturating_sub(1), n_head: 1, n_kv_head: 1, head_dim: 1, scale: 1.0 };
    Kernel::choose(AttnNumerics::GgmlFlash { n_ctx, n_threads: 1 }, &shape) == Kernel::OnlineF16
}

/// The per-head kernel one call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    OnlineF32,
    OnlineF16,
    SplitF16 { n_kv: usize, n_threads: usize },
    Tiled,
    NoFlash,
}

impl Kernel {
    /// The choice ggml makes in `ggml_compute_forward_flash_attn_ext_f16` (ops.cpp).
    fn choose(numerics: AttnNumerics, shape: &AttnShape) -> Kernel {
        match numerics {
            AttnNumerics::F32Accum => Kernel::OnlineF32,
            AttnNumerics::GgmlNoFlash => Kernel::NoFlash,
            AttnNumerics::GgmlFlash { .. } if shape.n_tok >= TILE => Kernel::Tiled,
            AttnNumerics::GgmlFlash { n_ctx, n_threads } => {
                // No cell may fall outside the chunks, even if n_ctx is understated.
                let used = shape.n_past + shape.n_tok;
                let n_kv = llama_n_kv(n_ctx, used).max(used);
                if shape.n_tok == 1 && n_kv >= 512 {
                    Kernel::SplitF16 { n_kv, n_threads: n_threads.max(1) }
                } else {
                    Kernel::OnlineF16
                }
            }
        }
    }
}

/// ggml's flash-attention tile (`GGML_FA_TILE_Q`, `GGML_FA_TILE_KV`).
const TILE: usize = 64;

/// `out` of [`attention_with`], shared with the pool's threads; each writes its own heads.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the pointee outlives `pool.run`, and threads write disjoint ranges.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}
impl OutPtr {
    // A method (not field access) so closures capture the whole `Sync` wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// One (token, head) pair's inputs.
struct HeadJob<'a> {
    /// The query head, f32: `(head_dim,)`.
    q: &'a [f32],
    k_cache: &'a [f16],
    v_cache: &'a [f16],
    /// For the tiled kernel: K as f32 in 64-cell tiles, each transposed,
    /// `(n_kv_head, n_tiles, head_dim, 64)`; built once per call by [`transpose_k_tiles`] and
    /// shared by every (token, head) pair. Empty for the other kernels.
    k_t: &'a [f32],
    kv_head: usize,
    /// Positions attended to: `0 .. n_valid`.
    n_valid: usize,
    shape: &'a AttnShape,
}

/// Per-thread buffers, grown on demand and kept for the thread's life.
#[derive(Default)]
struct Scratch {
    /// The query head rounded to f16, as f32.
    q16: Vec<f32>,
    /// One K or V row as f32.
    row: Vec<f32>,
    /// The V accumulator: `(head_dim,)`, or `(lanes, head_dim)` for `GgmlNoFlash`.
    acc: Vec<f32>,
    /// Scores, then probabilities, for `GgmlNoFlash`: `(n_valid rounded up to 16,)`.
    scores: Vec<f32>,
    /// The merged V sum of the split kernel, or a K tile transposed `(head_dim, 64)`.
    extra: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

fn run_head(kernel: Kernel, simd: bool, job: &HeadJob<'_>, s: &mut Scratch, out: &mut [f32]) {
    let hd = job.shape.head_dim;
    s.q16.resize(hd, 0.0);
    s.row.resize(hd, 0.0);
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` comes from `use_simd()`, so the CPU has AVX2, FMA and F16C.
        unsafe { x86::run_kernel(kernel, job, s, out) };
        return;
    }
    let _ = simd;
    run_kernel::<false>(kernel, job, s, out);
}

#[inline(always)]
fn run_kernel<const SIMD: bool>(
    kernel: Kernel,
    job: &HeadJob<'_>,
    s: &mut Scratch,
    out: &mut [f32],
) {
    match kernel {
        Kernel::OnlineF32 => online::<false, SIMD>(job, s, out),
        Kernel::OnlineF16 => online::<true, SIMD>(job, s, out),
        Kernel::SplitF16 { n_kv, n_threads } => split::<SIMD>(job, s, out, n_kv, n_threads),
        Kernel::Tiled => tiled::<SIMD>(job, s, out),
        Kernel::NoFlash => no_flash::<SIMD>(job, s, out),
    }
}

/// Online-softmax attention of one head, as ggml's `flash_attn_ext` one-chunk kernel.
/// `F16_ACC`: keep the V sum rounded to f16 after every update, as ggml does for f16 V.
#[inline(always)]
fn online<const F16_ACC: bool, const SIMD: bool>(
    job: &HeadJob<'_>,
    s: &mut Scratch,
    out: &mut [f32],
) {
    round_f16_into::<SIMD>(job.q, &mut s.q16);
    let (_, sum) = online_range::<F16_ACC, SIMD>(job, 0..job.n_valid, s);
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for (o, &a) in out.iter_mut().zip(s.acc.iter()) {
        *o = a * inv;
    }
}

/// The online softmax over the cells `range` into a fresh `s.acc` (unnormalized); returns the
/// running maximum and sum. Expects `s.q16` filled.
#[inline(always)]
fn online_range<const F16_ACC: bool, const SIMD: bool>(
    job: &HeadJob<'_>,
    range: std::ops::Range<usize>,
    s: &mut Scratch,
) -> (f32, f32) {
    let AttnShape { n_kv_head, head_dim: hd, scale, .. } = *job.shape;
    let row_len = n_kv_head * hd;
    let off = job.kv_head * hd;
    let Scratch { q16, acc, .. } = s;
    acc.clear();
    acc.resize(hd, 0.0);
    let mut max = f32::NEG_INFINITY;
    let mut sum = 0f32;
    for j in range {
        let base = j * row_len + off;
        let sc = dot::<SIMD, false>(q16, &job.k_cache[base..base + hd]) * scale;
        let (ms, vs);
        if sc > max {
            // New maximum: rescale what was summed so far; this row's weight is exp(0) = 1.
            ms = (max - sc).exp();
            max = sc;
            vs = 1.0;
            scale_acc::<SIMD, F16_ACC>(acc, ms);
        } else {
            ms = 1.0;
            vs = (sc - max).exp();
        }
        axpy::<SIMD, F16_ACC>(acc, &job.v_cache[base..base + hd], vs);
        // GCC contracts ggml's `S = S*ms + vs` into one FMA.
        sum = sum.mul_add(ms, vs);
    }
    (max, sum)
}

/// ggml's split-KV decode (`use_split_kv_path`): the `n_kv` padded cells cut into `n_threads`
/// chunks, each run as [`online_range`] with an f16 sum, then merged in chunk order as
/// `ggml_flash_attn_ext_reduce_partials` does.
#[inline(always)]
fn split<const SIMD: bool>(
    job: &HeadJob<'_>,
    s: &mut Scratch,
    out: &mut [f32],
    n_kv: usize,
    n_threads: usize,
) {
    round_f16_into::<SIMD>(job.q, &mut s.q16);
    let mut merged = std::mem::take(&mut s.extra);
    merged.clear();
    merged.resize(job.shape.head_dim, 0.0);
    let chunk = n_kv.div_ceil(n_threads);
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
    for c in 0..n_threads {
        // Cells past `n_valid` are masked; a chunk without any has sum 0 and is skipped.
        let (lo, hi) = (c * chunk, ((c + 1) * chunk).min(n_kv).min(job.n_valid));
        if lo >= hi {
            continue;
        }
        let (m, sm) = online_range::<true, SIMD>(job, lo..hi, s);
        if sm == 0.0 {
            continue;
        }
        let m_new = max.max(m);
        let (so, sn) = ((max - m_new).exp(), (m - m_new).exp());
        // GCC fuses `a*so + b*sn` as fma(a, so, b*sn).
        for (a, &b) in merged.iter_mut().zip(s.acc.iter()) {
            *a = a.mul_add(so, b * sn);
        }
        sum = sum.mul_add(so, sm * sn);
        max = m_new;
    }
    let inv = if sum == 0.0 { 1.0 } else { 1.0 / sum };
    for (o, &a) in out.iter_mut().zip(merged.iter()) {
        *o = a * inv;
    }
    s.extra = merged;
}

/// ggml's tiled flash attention (`ggml_compute_forward_flash_attn_ext_tiled`, batches of 64 or
/// more tokens), for one head: f32 query, 64-cell tiles, scores and the V sum by sequential
/// FMAs (`simd_gemm`), each tile's exps summed by ggml's softmax.
#[inline(always)]
fn tiled<const SIMD: bool>(job: &HeadJob<'_>, s: &mut Scratch, out: &mut [f32]) {
    let AttnShape { n_kv_head, head_dim: hd, scale, .. } = *job.shape;
    let row_len = n_kv_head * hd;
    let off = job.kv_head * hd;
    let acc = &mut s.acc;
    acc.clear();
    acc.resize(hd, 0.0);
    let tile_len = hd * TILE;
    let n_tiles = job.k_t.len() / (n_kv_head * tile_len);
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
    for t0 in (0..job.n_valid).step_by(TILE) {
        let n = (job.n_valid - t0).min(TILE);
        // The K tile transposed, so the 64 scores accumulate side by side.
        let kt = &job.k_t[(job.kv_head * n_tiles + t0 / TILE) * tile_len..][..tile_len];
        let mut sc = [0f32; TILE];
        for (d, &qd) in job.q.iter().enumerate() {
            let kd = &kt[d * TILE..(d + 1) * TILE];
            for c in 0..TILE {
                sc[c] = qd.mul_add(kd[c], sc[c]);
            }
        }
        // Cells past the causal window (and the tile's padding) are -inf.
        for (c, v) in sc.iter_mut().enumerate() {
            *v = if c < n { *v * scale } else { f32::NEG_INFINITY };
        }
        let tile_max = sc.iter().fold(f32::NEG_INFINITY, |m, &v| if m > v { m } else { v });
        let m_new = max.max(tile_max);
        if m_new > max {
            let ms = (max - m_new).exp();
            scale_acc::<SIMD, false>(acc, ms);
            sum *= ms;
        }
        max = m_new;
        let mut tile_sum = 0f64;
        for g in sc.chunks_exact_mut(16) {
            tile_sum += exp16_sub::<SIMD>(g, max) as f64;
        }
        sum = (sum as f64 + tile_sum) as f32;
        for c in 0..n {
            let base = (t0 + c) * row_len + off;
            axpy::<SIMD, false>(acc, &job.v_cache[base..base + hd], sc[c]);
        }
    }
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for (o, &a) in out.iter_mut().zip(acc.iter()) {
        *o = a * inv;
    }
}

/// llama.cpp's attention without flash attention, for one head: `softmax(scale * K q) V` with
/// the f16 matmuls' summation orders and ggml's softmax.
#[inline(always)]
fn no_flash<const SIMD: bool>(job: &HeadJob<'_>, s: &mut Scratch, out: &mut [f32]) {
    let AttnShape { n_tok, n_kv_head, head_dim: hd, scale, .. } = *job.shape;
    let row_len = n_kv_head * hd;
    let off = job.kv_head * hd;
    let n = job.n_valid;
    // A batch of tokens goes through tinyBLAS when its shapes allow, a single token through
    // ggml_vec_dot_f16 (ggml-cpu.c: llamafile_sgemm needs n >= 2, k % 16 == 0, m % 4 == 0).
    let kq_tiny = n_tok >= 2 && hd % 16 == 0;
    let kqv_tiny = n_tok >= 2 && hd % 4 == 0;
    let Scratch { q16, acc, scores, .. } = s;
    round_f16_into::<SIMD>(job.q, q16);

    // Scores padded with -inf (masked cells) to whole groups of 16, as ggml's row is.
    let n16 = n.div_ceil(16) * 16;
    scores.clear();
    scores.resize(n16, f32::NEG_INFINITY);
    for j in 0..n {
        let k = &job.k_cache[j * row_len + off..][..hd];
        let dot = if kq_tiny { dot::<SIMD, true>(q16, k) } else { dot::<SIMD, false>(q16, k) };
        scores[j] = dot * scale;
    }
    let max = scores[..n].iter().fold(f32::NEG_INFINITY, |m, &v| if m > v { m } else { v });
    let mut sum = 0f64;
    for g in scores.chunks_exact_mut(16) {
        sum += exp16_sub::<SIMD>(g, max) as f64;
    }
    let inv = (1.0 / sum) as f32;
    for p in scores.iter_mut() {
        *p *= inv;
    }
    // ggml converts the probabilities to f16 for the matmul with V.
    round_f16_inplace::<SIMD>(scores);

    // Lane l of the accumulator sums the rows j with j % lanes == l (both factors are f16
    // values, so the products are exact).
    let lanes = if kqv_tiny { 16 } else { 64 };
    acc.clear();
    acc.resize(lanes * hd, 0.0);
    for j in 0..n {
        let lane = &mut acc[(j % lanes) * hd..(j % lanes + 1) * hd];
        axpy::<SIMD, false>(lane, &job.v_cache[j * row_len + off..][..hd], scores[j]);
    }
    let mut r = [0f32; 16];
    for (d, o) in out.iter_mut().enumerate() {
        if lanes == 64 {
            // ggml_vec_dot_f16's four accumulators: (0 + 2) + (1 + 3), then 16 lanes.
            for l in 0..16 {
                r[l] = (acc[l * hd + d] + acc[(32 + l) * hd + d])
                    + (acc[(16 + l) * hd + d] + acc[(48 + l) * hd + d]);
            }
        } else {
            for l in 0..16 {
                r[l] = acc[l * hd + d];
            }
        }
        *o = reduce16(&r);
    }
}

/// `q · k` in ggml's order: `ggml_vec_dot_f16`'s (AVX-512: 64-wide blocks into four 16-lane
/// accumulators, reduced, the remainder added in f64), or with `TINY` tinyBLAS's (one 16-lane
/// accumulator; `len % 16 == 0`). `q` holds f16 values, so every product is exact.
#[inline(always)]
fn dot<const SIMD: bool, const TINY: bool>(q: &[f32], k: &[f16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if SIMD {
        // SAFETY: SIMD kernels run only where `use_simd()` held.
        return unsafe { if TINY { x86::dot_tiny(q, k) } else { x86::dot_vecdot(q, k) } };
    }
    let n = q.len().min(k.len());
    if TINY {
        let mut acc = [0f32; 16];
        for (qb, kb) in q[..n].chunks_exact(16).zip(k[..n].chunks_exact(16)) {
            for l in 0..16 {
                acc[l] += qb[l] * kb[l].to_f32();
            }
        }
        return reduce16(&acc);
    }
    let np = n & !63;
    let mut acc = [0f32; 64];
    for (qb, kb) in q[..np].chunks_exact(64).zip(k[..np].chunks_exact(64)) {
        for l in 0..64 {
            acc[l] += qb[l] * kb[l].to_f32();
        }
    }
    let mut r = [0f32; 16];
    for l in 0..16 {
        r[l] = (acc[l] + acc[32 + l]) + (acc[16 + l] + acc[48 + l]);
    }
    let mut sum = reduce16(&r) as f64;
    for i in np..n {
        sum += (q[i] * k[i].to_f32()) as f64;
    }
    sum as f32
}

/// `acc += v * s`, one FMA per element, each sum then rounded to f16 if `ROUND`
/// (`ggml_vec_mad_f32` / `ggml_vec_mad_f16`).
#[inline(always)]
fn axpy<const SIMD: bool, const ROUND: bool>(acc: &mut [f32], v: &[f16], s: f32) {
    #[cfg(target_arch = "x86_64")]
    if SIMD {
        // SAFETY: SIMD kernels run only where `use_simd()` held.
        unsafe { x86::axpy::<ROUND>(acc, v, s) };
        return;
    }
    for (a, x) in acc.iter_mut().zip(v) {
        *a = x.to_f32().mul_add(s, *a);
        if ROUND {
            *a = f16::from_f32(*a).to_f32();
        }
    }
}

/// `acc *= s`, then rounded to f16 if `ROUND` (`ggml_vec_scale_f32` / `ggml_vec_scale_f16`).
#[inline(always)]
fn scale_acc<const SIMD: bool, const ROUND: bool>(acc: &mut [f32], s: f32) {
    for a in acc.iter_mut() {
        *a *= s;
    }
    if ROUND {
        round_f16_inplace::<SIMD>(acc);
    }
}

#[inline(always)]
fn exp16_sub<const SIMD: bool>(g: &mut [f32], max: f32) -> f32 {
    crate::ops::softmax_group16(g, max, SIMD)
}

// ---------------------------------------------------------------------------------------------
// f16 rows

/// Whether the AVX2+FMA+F16C kernels may run on this CPU (cached by `std`).
#[inline]
fn use_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Converts a row to f16, rounding to nearest even (F16C when the CPU has it).
pub fn f32_to_f16_row(src: &[f32], dst: &mut [f16]) {
    assert_eq!(src.len(), dst.len(), "f32_to_f16_row: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if use_simd() {
        // SAFETY: the CPU has F16C and AVX2 (checked just above).
        unsafe { x86::f32_to_f16(src, dst) };
        return;
    }
    f32_to_f16_row_portable(src, dst);
}

/// The portable twin of [`f32_to_f16_row`].
pub fn f32_to_f16_row_portable(src: &[f32], dst: &mut [f16]) {
    assert_eq!(src.len(), dst.len(), "f32_to_f16_row: lengths differ");
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f16::from_f32(s);
    }
}

/// `dst = f32(f16(src))`.
#[inline(always)]
fn round_f16_into<const SIMD: bool>(src: &[f32], dst: &mut [f32]) {
    dst.copy_from_slice(src);
    round_f16_inplace::<SIMD>(dst);
}

#[inline(always)]
fn round_f16_inplace<const SIMD: bool>(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if SIMD {
        // SAFETY: SIMD kernels run only where `use_simd()` held.
        unsafe { x86::round_f16(x) };
        return;
    }
    for v in x.iter_mut() {
        *v = f16::from_f32(*v).to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;

    /// The generic kernels compiled with AVX2+FMA+F16C, so that their loops vectorize and
    /// `mul_add` is one instruction.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn run_kernel(kernel: Kernel, job: &HeadJob<'_>, s: &mut Scratch, out: &mut [f32]) {
        super::run_kernel::<true>(kernel, job, s, out)
    }

    /// Eight f16 at `p[i..]` as f32.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn load8(p: &[f16], i: usize) -> __m256 {
        assert!(i + 8 <= p.len());
        // SAFETY: in bounds (asserted); f16 is a u16.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.as_ptr().add(i) as *const __m128i)) }
    }

    /// Eight f32 at `p[i..]`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn load8f(p: &[f32], i: usize) -> __m256 {
        assert!(i + 8 <= p.len());
        // SAFETY: in bounds (asserted).
        unsafe { _mm256_loadu_ps(p.as_ptr().add(i)) }
    }

    /// The sum of 16 lanes (`lo` then `hi`) in GCC's `_mm512_reduce_add_ps` order.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn reduce16_ps(lo: __m256, hi: __m256) -> f32 {
        let t3 = _mm256_add_ps(hi, lo);
        let t6 = _mm_add_ps(_mm256_extractf128_ps::<1>(t3), _mm256_castps256_ps128(t3));
        let t8 = _mm_add_ps(t6, _mm_movehl_ps(t6, t6));
        _mm_cvtss_f32(_mm_add_ss(t8, _mm_movehdup_ps(t8)))
    }

    /// [`super::dot`] in `ggml_vec_dot_f16`'s order.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn dot_vecdot(q: &[f32], k: &[f16]) -> f32 {
        let n = q.len().min(k.len());
        let np = n & !63;
        // a[m] holds lanes 8m..8m+8 of ggml's four 16-lane accumulators.
        let mut a = [_mm256_setzero_ps(); 8];
        for i in (0..np).step_by(64) {
            for (m, am) in a.iter_mut().enumerate() {
                *am = _mm256_fmadd_ps(load8f(q, i + 8 * m), load8(k, i + 8 * m), *am);
            }
        }
        // (acc0 + acc2) + (acc1 + acc3), then the 16 lanes.
        let lo = _mm256_add_ps(_mm256_add_ps(a[0], a[4]), _mm256_add_ps(a[2], a[6]));
        let hi = _mm256_add_ps(_mm256_add_ps(a[1], a[5]), _mm256_add_ps(a[3], a[7]));
        let mut sum = reduce16_ps(lo, hi) as f64;
        for i in np..n {
            sum += (q[i] * k[i].to_f32()) as f64;
        }
        sum as f32
    }

    /// [`super::dot`] in tinyBLAS's order; `len % 16 == 0`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn dot_tiny(q: &[f32], k: &[f16]) -> f32 {
        let n = q.len().min(k.len()) & !15;
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for i in (0..n).step_by(16) {
            lo = _mm256_fmadd_ps(load8f(q, i), load8(k, i), lo);
            hi = _mm256_fmadd_ps(load8f(q, i + 8), load8(k, i + 8), hi);
        }
        reduce16_ps(lo, hi)
    }

    /// [`super::axpy`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn axpy<const ROUND: bool>(acc: &mut [f32], v: &[f16], s: f32) {
        let n = acc.len().min(v.len());
        let sv = _mm256_set1_ps(s);
        let mut i = 0;
        while i + 8 <= n {
            let mut r = _mm256_fmadd_ps(load8(v, i), sv, load8f(acc, i));
            if ROUND {
                r = _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(r));
            }
            // SAFETY: i + 8 <= n <= acc.len().
            unsafe { _mm256_storeu_ps(acc.as_mut_ptr().add(i), r) };
            i += 8;
        }
        for j in i..n {
            acc[j] = v[j].to_f32().mul_add(s, acc[j]);
            if ROUND {
                acc[j] = f16::from_f32(acc[j]).to_f32();
            }
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(super) fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n <= both lengths; f16 is a u16.
            unsafe {
                let v = _mm256_loadu_ps(src.as_ptr().add(i));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
            }
            i += 8;
        }
        for k in i..n {
            dst[k] = f16::from_f32(src[k]);
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(super) fn round_f16(x: &mut [f32]) {
        let n = x.len();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n.
            unsafe {
                let p = x.as_mut_ptr().add(i);
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(p));
                _mm256_storeu_ps(p, _mm256_cvtph_ps(h));
            }
            i += 8;
        }
        for v in &mut x[i..] {
            *v = f16::from_f32(*v).to_f32();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{fnv, golden_input, random};

    fn to_f16(x: &[f32]) -> Vec<f16> {
        x.iter().map(|&v| f16::from_f32(v)).collect()
    }

    /// Plain f64 attention: q rounded to f16 (as every mode does), full softmax per head over
    /// the causal window, grouped-query mapping.
    fn reference(q: &[f32], k: &[f16], v: &[f16], s: &AttnShape) -> Vec<f64> {
        let (hd, nh, nkh) = (s.head_dim, s.n_head, s.n_kv_head);
        let mut out = vec![0f64; s.n_tok * nh * hd];
        for t in 0..s.n_tok {
            for h in 0..nh {
                let kvh = h / (nh / nkh);
                let qh: Vec<f64> = q[(t * nh + h) * hd..][..hd]
                    .iter()
                    .map(|&x| f16::from_f32(x).to_f64())
                    .collect();
                let n = s.n_past + t + 1;
                let row = |c: &[f16], j: usize, d: usize| c[(j * nkh + kvh) * hd + d].to_f64();
                let sc: Vec<f64> = (0..n)
                    .map(|j| (0..hd).map(|d| qh[d] * row(k, j, d)).sum::<f64>() * s.scale as f64)
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    out[(t * nh + h) * hd + d] = (0..n).map(|j| e[j] / z * row(v, j, d)).sum();
                }
            }
        }
        out
    }

    struct Case {
        q: Vec<f32>,
        k: Vec<f16>,
        v: Vec<f16>,
        shape: AttnShape,
    }

    fn case(n_tok: usize, n_past: usize, n_head: usize, n_kv_head: usize, head_dim: usize) -> Case {
        let kv = (n_past + n_tok) * n_kv_head * head_dim;
        let seed = (n_tok * 1000 + n_past * 10 + n_head) as u64;
        Case {
            q: random(n_tok * n_head * head_dim, seed, 2.0),
            k: to_f16(&random(kv, seed + 1, 2.0)),
            v: to_f16(&random(kv, seed + 2, 1.5)),
            shape: AttnShape {
                n_tok,
                n_past,
                n_head,
                n_kv_head,
                head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(),
            },
        }
    }

    fn run(c: &Case, numerics: AttnNumerics, pool: &ThreadPool) -> Vec<f32> {
        let mut out = vec![0f32; c.q.len()];
        attention_with(numerics, pool, &c.q, &c.k, &c.v, &c.shape, &mut out);
        out
    }

    fn max_err(got: &[f32], want: &[f64]) -> f64 {
        got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max)
    }

    /// The fixtures' llama.cpp settings: n_ctx 512, 2 threads.
    const FLASH: AttnNumerics = AttnNumerics::GgmlFlash { n_ctx: 512, n_threads: 2 };

    /// What recovery relies on: a run of one-token steps where `ggml_flash_batchable` holds
    /// gives, as one chunk, the very bits the steps gave one at a time; and the predicate is
    /// false where a single token would take the split kernel.
    #[test]
    fn batchable_single_token_steps_replay_as_one_chunk_exactly() {
        let pool = ThreadPool::new(2);
        let numerics = AttnNumerics::GgmlFlash { n_ctx: 4096, n_threads: 2 };
        let (n_past, n_tok, nh, nkh, hd) = (190usize, MAX_BATCHED_REPLAY, 6, 2, 64);
        assert!(ggml_flash_batchable(4096, n_past + n_tok));
        assert!(!ggml_flash_batchable(4096, 257), "257 cells: ggml reads 512 and splits one token's KV");
        assert!(ggml_flash_batchable(256, 256));
        let whole = case(n_tok, n_past, nh, nkh, hd);
        let all = run(&whole, numerics, &pool);
        let q_row = nh * hd;
        for t in 0..n_tok {
            let one = Case {
                q: whole.q[t * q_row..(t + 1) * q_row].to_vec(),
                k: whole.k.clone(),
                v: whole.v.clone(),
                shape: AttnShape { n_tok: 1, n_past: n_past + t, ..whole.shape },
            };
            let got = run(&one, numerics, &pool);
            let want = &all[t * q_row..(t + 1) * q_row];
            assert!(got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()), "token {t} differs");
        }
    }

    const SHAPES: [(usize, usize); 5] = [(1, 0), (1, 5), (1, 100), (7, 0), (7, 3)];
    const HEADS: [(usize, usize); 3] = [(9, 3), (14, 2), (4, 4)];

    #[test]
    fn matches_f64_reference() {
        let pools = [ThreadPool::new(1), ThreadPool::new(3)];
        for (n_tok, n_past) in SHAPES {
            for (n_head, n_kv) in HEADS {
                let c = case(n_tok, n_past, n_head, n_kv, 64);
                let want = reference(&c.q, &c.k, &c.v, &c.shape);
                for pool in &pools {
                    let (s, mut got) = (&c.shape, vec![0f32; c.q.len()]);
                    let (n_tok, n_past, n_head, n_kv) = (s.n_tok, s.n_past, s.n_head, s.n_kv_head);
                    let (q, k, v) = (&c.q, &c.k, &c.v);
                    attention(pool, q, k, v, n_tok, n_past, n_head, n_kv, 64, s.scale, &mut got);
                    // F32Accum: only f32 roundings of sums of <= 107 terms of size <= 1.5.
                    let e = max_err(&got, &want);
                    assert!(e <= 1e-4, "F32Accum {n_tok}/{n_past} {n_head}/{n_kv}: {e:e}");
                    // GgmlNoFlash rounds the probabilities to f16 (2^-11 relative each).
                    let e = max_err(&run(&c, AttnNumerics::GgmlNoFlash, pool), &want);
                    assert!(e <= 2e-3, "GgmlNoFlash {n_tok}/{n_past} {n_head}/{n_kv}: {e:e}");
                    // GgmlFlash keeps the running V sum in f16: 2^-11 relative per update.
                    let e = max_err(&run(&c, FLASH, pool), &want);
                    assert!(e <= 1e-2, "GgmlFlash {n_tok}/{n_past} {n_head}/{n_kv}: {e:e}");
                }
            }
        }
    }

    #[test]
    fn odd_head_dims_and_long_context() {
        let pool = ThreadPool::new(2);
        // 60 and 48 leave a remainder after ggml's 64-wide blocks; 32000 past positions.
        for (n_tok, n_past, hd) in [(3, 9, 60), (1, 17, 48), (2, 5, 80), (1, 32000, 64)] {
            let c = case(n_tok, n_past, 2, 1, hd);
            let want = reference(&c.q, &c.k, &c.v, &c.shape);
            let e = max_err(&run(&c, AttnNumerics::F32Accum, &pool), &want);
            assert!(e <= 1e-4, "F32Accum hd={hd} n_past={n_past}: {e:e}");
            let e = max_err(&run(&c, AttnNumerics::GgmlNoFlash, &pool), &want);
            assert!(e <= 2e-3, "GgmlNoFlash hd={hd} n_past={n_past}: {e:e}");
        }
    }

    #[test]
    fn thread_count_does_not_change_bits() {
        let pools: Vec<ThreadPool> = (1..=3).map(ThreadPool::new).collect();
        for numerics in [AttnNumerics::F32Accum, FLASH, AttnNumerics::GgmlNoFlash] {
            let c = case(7, 3, 14, 2, 64);
            let one = run(&c, numerics, &pools[0]);
            for pool in &pools[1..] {
                assert!(
                    run(&c, numerics, pool)
                        .iter()
                        .zip(&one)
                        .all(|(a, b)| a.to_bits() == b.to_bits())
                );
            }
        }
    }

    #[test]
    fn simd_equals_portable() {
        if !use_simd() {
            return;
        }
        let kernels = [
            Kernel::OnlineF32,
            Kernel::OnlineF16,
            Kernel::SplitF16 { n_kv: 512, n_threads: 3 },
            Kernel::Tiled,
            Kernel::NoFlash,
        ];
        for (n_tok, n_past, hd) in [(1, 300, 64), (7, 3, 64), (3, 9, 60), (2, 70, 128)] {
            let c = case(n_tok, n_past, 4, 2, hd);
            let k_t = transpose_k_tiles(&c.k, n_past + n_tok, 2, hd);
            for kernel in kernels {
                for pair in 0..n_tok * 4 {
                    let job = HeadJob {
                        q: &c.q[pair * hd..(pair + 1) * hd],
                        k_cache: &c.k,
                        v_cache: &c.v,
                        k_t: &k_t,
                        kv_head: (pair % 4) / 2,
                        n_valid: n_past + pair / 4 + 1,
                        shape: &c.shape,
                    };
                    let (mut a, mut b) = (vec![0f32; hd], vec![0f32; hd]);
                    run_head(kernel, true, &job, &mut Scratch::default(), &mut a);
                    run_head(kernel, false, &job, &mut Scratch::default(), &mut b);
                    assert!(
                        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{kernel:?} n_tok={n_tok} hd={hd} pair={pair}"
                    );
                }
            }
        }
    }

    #[test]
    fn flash_kernel_follows_ggml_choice() {
        assert_eq!(llama_n_kv(512, 5), 256);
        assert_eq!(llama_n_kv(512, 257), 512);
        assert_eq!(llama_n_kv(300, 2000), 512);
        assert_eq!(llama_n_kv(4096, 1000), 1024);
        let shape = |n_tok, n_past| AttnShape {
            n_tok,
            n_past,
            n_head: 4,
            n_kv_head: 2,
            head_dim: 64,
            scale: 0.125,
        };
        assert_eq!(Kernel::choose(FLASH, &shape(1, 255)), Kernel::OnlineF16);
        assert_eq!(
            Kernel::choose(FLASH, &shape(1, 256)),
            Kernel::SplitF16 { n_kv: 512, n_threads: 2 }
        );
        assert_eq!(Kernel::choose(FLASH, &shape(63, 0)), Kernel::OnlineF16);
        assert_eq!(Kernel::choose(FLASH, &shape(64, 0)), Kernel::Tiled);
        assert_eq!(Kernel::choose(AttnNumerics::default(), &shape(64, 900)), Kernel::OnlineF32);
        // Every kernel stays close to the f64 reference (f16 sums: 1e-2).
        let pool = ThreadPool::new(2);
        for (n_tok, n_past, n_threads) in [(1, 600, 2), (1, 300, 3), (70, 20, 2), (1, 1000, 5)] {
            let c = case(n_tok, n_past, 4, 2, 64);
            let want = reference(&c.q, &c.k, &c.v, &c.shape);
            let flash = AttnNumerics::GgmlFlash { n_ctx: 4096, n_threads };
            let e = max_err(&run(&c, flash, &pool), &want);
            assert!(e <= 1e-2, "n_tok={n_tok} n_past={n_past} n_threads={n_threads}: {e:e}");
        }
    }

    #[test]
    fn f32_to_f16_row_simd_equals_portable() {
        let mut x = random(1000, 3, 70000.0);
        x.extend(random(100, 4, 1e-5));
        x.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 65504.0, 65520.0]);
        x.extend([1e-8, 5.96e-8, 2.98e-8, 1.0 + 1.0 / 2048.0, 1.0 + 3.0 / 2048.0]);
        let (mut a, mut b) = (vec![f16::ZERO; x.len()], vec![f16::ZERO; x.len()]);
        f32_to_f16_row(&x, &mut a);
        f32_to_f16_row_portable(&x, &mut b);
        for (i, (p, q)) in a.iter().zip(&b).enumerate() {
            assert!(
                p.to_bits() == q.to_bits() || p.is_nan() && q.is_nan(),
                "{i}: {} {p} {q}",
                x[i]
            );
        }
        // Round to nearest even at the halfway points.
        assert_eq!(b[b.len() - 2].to_f32(), 1.0);
        assert_eq!(b[b.len() - 1].to_f32(), 1.0 + 4.0 / 2048.0);
    }

    #[test]
    fn empty_block_is_a_no_op() {
        let pool = ThreadPool::new(2);
        attention(&pool, &[], &[], &[], 0, 0, 4, 2, 64, 0.125, &mut []);
    }

    /// Runs a case with one field of its shape changed.
    fn run_with(c: &Case, shape: AttnShape) {
        let mut out = vec![0f32; c.q.len()];
        attention_with(
            AttnNumerics::F32Accum,
            &ThreadPool::new(1),
            &c.q,
            &c.k,
            &c.v,
            &shape,
            &mut out,
        );
    }

    #[test]
    #[should_panic(expected = "cannot share")]
    fn rejects_heads_not_divisible_by_kv_heads() {
        let c = case(1, 0, 4, 2, 8);
        run_with(&c, AttnShape { n_kv_head: 3, ..c.shape });
    }

    #[test]
    #[should_panic(expected = "fewer than")]
    fn rejects_short_cache() {
        let c = case(2, 3, 4, 2, 8);
        run_with(&c, AttnShape { n_past: 4, ..c.shape });
    }

    #[test]
    #[should_panic(expected = "q holds")]
    fn rejects_short_q() {
        let c = case(2, 3, 4, 2, 8);
        run_with(&c, AttnShape { n_tok: 1, ..c.shape });
    }

    /// Bits of llama.cpp's CPU backend (see `ops::tests::matches_libggml_cpu_bits` for the
    /// build): ggml_mul_mat + ggml_soft_max_ext + ggml_mul_mat over a cache padded to 256
    /// cells (flash attention off) and ggml_flash_attn_ext (on: one-chunk, tiled and split-KV
    /// kernels), for 4 heads / 2 kv heads of 64, scale 1/8, `golden_input` data. Guards the
    /// claim that the two ggml modes are bit-exact.
    #[test]
    fn matches_libggml_cpu_bits() {
        let pool = ThreadPool::new(2);
        let want = [
            (AttnNumerics::GgmlNoFlash, 1, 6, 0x09c2_703a_0ce7_bf4a),
            (AttnNumerics::GgmlNoFlash, 3, 2, 0x644c_99f0_ff79_1990),
            (FLASH, 1, 6, 0xec65_1f5b_b7ea_fdb3),
            (FLASH, 3, 2, 0xd608_9d34_b95c_2033),
            // 64 tokens: the tiled kernel.
            (FLASH, 64, 5, 0x39b0_c08f_703b_2371),
            // One token over 512 padded cells, ggml on 3 threads: the split-KV kernel.
            (AttnNumerics::GgmlFlash { n_ctx: 4096, n_threads: 3 }, 1, 300, 0x727b_67ea_4785_6667),
        ];
        for (numerics, n_tok, n_past, hash) in want {
            let (nh, nkh, hd) = (4, 2, 64);
            let q: Vec<f32> = (0..n_tok * nh * hd).map(|i| golden_input(i as u64, 11)).collect();
            let kv = (n_past + n_tok) * nkh * hd;
            let k: Vec<f16> = (0..kv).map(|i| f16::from_f32(golden_input(i as u64, 12))).collect();
            let v: Vec<f16> = (0..kv).map(|i| f16::from_f32(golden_input(i as u64, 13))).collect();
            let shape =
                AttnShape { n_tok, n_past, n_head: nh, n_kv_head: nkh, head_dim: hd, scale: 0.125 };
            let mut out = vec![0f32; q.len()];
            attention_with(numerics, &pool, &q, &k, &v, &shape, &mut out);
            assert_eq!(fnv(&out), hash, "{numerics:?} n_tok={n_tok} n_past={n_past}");
        }
    }
}
