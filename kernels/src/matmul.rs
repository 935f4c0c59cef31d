//! Matrix × vector (decode) and matrix × matrix (prefill) over quantized weights.
//!
//! API contract (used by `shoal-model`):
//! - `QMatrix::new(ty, rows, cols, data)` validates `data.len() == rows * ty.bytes_for(cols)`.
//! - `matmul(pool, &w, x, n, out, scratch)`: `x: (n, cols)` f32 row-major,
//!   `out: (n, rows)` f32 row-major, `out[t][r] = dot(w[r], x[t])`.
//! - `dequantize_row(ty, src, dst)`: one row (or any whole number of blocks) to f32.
//!
//! Design:
//! - **Activations.** Each call quantizes `x` once into the format ggml's CPU backend pairs
//!   with the weight type ([`vec_dot_type`]): q8_0 for Q4_0/Q5_0/Q8_0, q8_1 for Q4_1/Q5_1,
//!   q8_K for the K formats, f16/bf16 for F16/BF16, and f32 (used in place, no copy) for F32,
//!   with the rounding of ggml's x86 quantizers (`quant::act`), so shoal and llama.cpp feed
//!   the same bytes to their kernels. The quantized rows live in the caller's `scratch`,
//!   which only grows, so a warm hot path does not allocate.
//! - **Kernels.** `quant::kernel` picks one tile kernel per (type, SIMD level), and for Q6_K a
//!   second one for products of 8 tokens or more. On x86 those of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0,
//!   Q4_K and Q6_K sum in llama.cpp's order and give its outputs bit for bit; the
//!   [`crate::quant`] header lists where that is not claimed. A kernel takes tokens in groups
//!   (4, or 8 for the K formats with AVX-512) so that a weight block is decoded once per group.
//! - **Tiling.** Decode (`n == 1`) streams each thread's rows once. Prefill walks chunks of
//!   tokens (multiples of 4, so token groups fall where llama.cpp's do) whose activations
//!   fit in L2 and, inside a chunk, blocks of rows whose weights fit in L1, so weights are
//!   re-read from cache instead of memory and each activation row is reused across a row
//!   block.
//! - **Threading.** Rows are split into contiguous, nearly equal ranges, one per pool thread
//!   (`pool::split_range`); each thread writes only `out[t * rows + r]` for its own rows. One
//!   thread computes each output whole, so results do not depend on the thread count.
//!   Quantizing many tokens is split by tokens the same way, in a first `pool.run`.

use crate::cpu::{self, SimdLevel};
use crate::pool::split_range;
use crate::quant::{self, kernel};
use crate::{Error, GgmlType, Result, ThreadPool};

/// A weight matrix in a GGUF block format: `rows` rows of `cols` elements, row-major.
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> QMatrix<'a> {
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: &'a [u8]) -> Result<Self> {
        if !ty.is_supported() {
            return Err(Error::UnsupportedType(ty.name()));
        }
        let row = ty.bytes_for(cols as u64).ok_or(Error::BadRowLength {
            ty: ty.name(),
            cols,
            block: ty.block_size(),
        })? as usize;
        let want = row * rows;
        if data.len() != want {
            return Err(Error::BadBufferSize {
                what: "weight matrix",
                want,
                got: data.len(),
            });
        }
        Ok(QMatrix {
            ty,
            rows,
            cols,
            data,
        })
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.data.len() / self.rows.max(1)
    }

    /// The bytes of row `r`.
    pub fn row(&self, r: usize) -> &'a [u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }
}

/// The format activations are converted to before multiplying with weights of type `ty`
/// (ggml's `vec_dot_type`). See [`GgmlType::vec_dot_type`].
pub fn vec_dot_type(ty: GgmlType) -> GgmlType {
    ty.vec_dot_type()
}

/// Bytes of scratch [`matmul`] uses for `n` tokens against `w`.
pub fn scratch_bytes(w: &QMatrix<'_>, n: usize) -> usize {
    let vt = w.ty.vec_dot_type();
    if vt == GgmlType::F32 {
        return 0;
    }
    quant::row_bytes(vt, w.cols).map_or(0, |b| n * b)
}

/// `out (n, rows) = x (n, cols) · wᵀ`. `scratch` holds the quantized activations between
/// calls so that the hot path does not allocate.
///
/// Panics if `x.len() != n * w.cols` or `out.len() != n * w.rows`.
pub fn matmul(
    pool: &ThreadPool,
    w: &QMatrix<'_>,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    scratch: &mut Vec<u8>,
) {
    matmul_with(cpu::simd_level(), pool, w, x, n, out, scratch)
}

/// Raw pointers handed to the pool's threads, which write disjoint parts of their targets.
#[derive(Clone, Copy)]
struct Shared<T>(T);
// SAFETY: used only for pointers into buffers that outlive `pool.run`, with every thread
// writing a range no other thread touches.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T: Copy> Shared<T> {
    /// The pointer. A method, so closures capture the `Sync` wrapper and not its field.
    fn get(&self) -> T {
        self.0
    }
}

/// Activation bytes of a token chunk in prefill: about half of a 1 MiB L2.
const PREFILL_ACT_BYTES: usize = 384 << 10;
/// Weight bytes of a row block in prefill: half of a 32 KiB L1.
const PREFILL_W_BYTES: usize = 16 << 10;
/// Below this many activation elements, converting on the calling thread is cheaper than
/// waking the pool.
const PARALLEL_QUANT_ELEMS: usize = 1 << 14;

/// [`matmul`] with the kernels of `level` (clamped to what the CPU supports).
pub fn matmul_with(
    level: SimdLevel,
    pool: &ThreadPool,
    w: &QMatrix<'_>,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    scratch: &mut Vec<u8>,
) {
    let (rows, cols) = (w.rows, w.cols);
    assert_eq!(
        x.len(),
        n * cols,
        "matmul: x has {} elements, want {n} x {cols}",
        x.len()
    );
    assert_eq!(
        out.len(),
        n * rows,
        "matmul: out has {} elements, want {n} x {rows}",
        out.len()
    );
    if n == 0 || rows == 0 {
        return;
    }
    let k = kernel::kernel(w.ty, level).expect("QMatrix::new admits only supported types");
    let vt = w.ty.vec_dot_type();
    let a_row = quant::row_bytes(vt, cols).expect("QMatrix::new checked the row length");

    let acts: &[u8] = if vt == GgmlType::F32 {
        // SAFETY: any f32 is 4 valid bytes; the kernels read them as little-endian f32.
        unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) }
    } else {
        let need = n * a_row;
        if scratch.len() < need {
            scratch.resize(need, 0);
        }
        let buf = &mut scratch[..need];
        if n == 1 || n * cols < PARALLEL_QUANT_ELEMS || pool.n_threads() == 1 {
            for (xr, ar) in x.chunks_exact(cols).zip(buf.chunks_exact_mut(a_row)) {
                quant::quantize_activations(vt, xr, ar).expect("sizes checked above");
            }
        } else {
            let dst = Shared(buf.as_mut_ptr());
            pool.run(|ith, nth| {
                for t in split_range(n, ith, nth) {
                    // SAFETY: token ranges of different threads are disjoint and in bounds.
                    let ar =
                        unsafe { std::slice::from_raw_parts_mut(dst.get().add(t * a_row), a_row) };
                    quant::quantize_activations(vt, &x[t * cols..(t + 1) * cols], ar)
                        .expect("sizes checked above");
                }
            });
        }
        &scratch[..need]
    };

    let w_row = w.row_bytes();
    let nb = cols / w.ty.block_size();
    let (tok_chunk, row_block) = if n == 1 {
        (1, rows)
    } else {
        let t = (PREFILL_ACT_BYTES / a_row.max(1)).clamp(4, 256) / 4 * 4;
        // Even, so that two-row kernels pair every row.
        let r = (PREFILL_W_BYTES / w_row.max(1)).clamp(2, 64) & !1;
        (t, r)
    };
    let tile_fn = k.tile_for(n);
    let w_ptr = Shared(w.data.as_ptr());
    let a_ptr = Shared(acts.as_ptr());
    let o_ptr = Shared(out.as_mut_ptr());
    pool.run(|ith, nth| {
        let my_rows = split_range(rows, ith, nth);
        let mut t0 = 0;
        while t0 < n {
            let toks = tok_chunk.min(n - t0);
            let mut r0 = my_rows.start;
            while r0 < my_rows.end {
                let nr = row_block.min(my_rows.end - r0);
                // SAFETY: rows r0..r0+nr and tokens t0..t0+toks are in bounds of `w.data`,
                // the activations and `out`; only this thread writes these rows of `out`.
                unsafe {
                    let tile = kernel::Tile {
                        w: w_ptr.get().add(r0 * w_row),
                        w_stride: w_row,
                        rows: nr,
                        a: a_ptr.get().add(t0 * a_row),
                        a_stride: a_row,
                        toks,
                        out: o_ptr.get().add(t0 * rows + r0),
                        out_stride: rows,
                        nb,
                    };
                    tile_fn(&tile);
                }
                r0 += nr;
            }
            t0 += toks;
        }
    });
}

/// Dequantizes a whole number of blocks of type `ty` from `src` into `dst`.
///
/// Supports the 11 weight types of [`GgmlType::is_supported`] (and the activation formats
/// Q8_1 and Q8_K). `src` must hold whole blocks and `dst` exactly their elements.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    quant::dequantize(ty, src, dst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testutil::*;

    fn levels() -> Vec<SimdLevel> {
        SimdLevel::ALL
            .into_iter()
            .filter(|&l| l <= cpu::detected_level())
            .collect()
    }

    /// `out[t][r]` from the quantized activations and dequantized weights, in f64, with the
    /// tolerance the kernels are held to (see `quant_tests::dot_matches_f64_reference`).
    fn naive(w: &QMatrix<'_>, x: &[f32], n: usize) -> Vec<(f64, f64)> {
        let vt = w.ty.vec_dot_type();
        let a_row = quant::row_bytes(vt, w.cols).unwrap();
        let mut res = vec![(0.0, 0.0); n * w.rows];
        for t in 0..n {
            let mut a = vec![0u8; a_row];
            quant::quantize_activations(vt, &x[t * w.cols..(t + 1) * w.cols], &mut a).unwrap();
            let ad = dequant_f64(vt, &a, w.cols);
            for r in 0..w.rows {
                let wd = dequant_f64(w.ty, w.row(r), w.cols);
                let (s, mag) = dot_f64(&wd, &ad);
                let tol = 2e-5 * mag + q8_1_sum_slack(w.ty, w.row(r), &a) + 1e-7;
                res[t * w.rows + r] = (s, tol);
            }
        }
        res
    }

    #[test]
    fn matmul_matches_naive_for_every_type_level_and_pool() {
        let mut rng = Rng(10);
        let pools = [ThreadPool::new(1), ThreadPool::new(3)];
        let mut scratch = Vec::new();
        for ty in WEIGHT_TYPES {
            let col_counts: Vec<usize> = match ty.block_size() {
                1 => vec![7, 33],
                bs => vec![bs, 3 * bs, 7 * bs],
            };
            for cols in col_counts {
                for rows in [1, 13] {
                    let data = random_matrix(&mut rng, ty, rows, cols);
                    let w = QMatrix::new(ty, rows, cols, &data).unwrap();
                    for n in [1, 2, 3, 17] {
                        let x = rng.activations(n * cols);
                        let want = naive(&w, &x, n);
                        for pool in &pools {
                            for level in levels() {
                                let mut out = vec![f32::NAN; n * rows];
                                matmul_with(level, pool, &w, &x, n, &mut out, &mut scratch);
                                for (i, (&got, &(s, tol))) in out.iter().zip(&want).enumerate() {
                                    assert!(
                                        (got as f64 - s).abs() <= tol,
                                        "{ty} {rows}x{cols} n={n} threads={} {level} \
                                         out[{i}]: {got} vs {s}",
                                        pool.n_threads()
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Many rows and tokens, so that row blocks, token chunks, token groups of four and
    /// remainders all occur; every level must agree with the portable kernels.
    #[test]
    fn large_matmul_simd_matches_portable() {
        let mut rng = Rng(11);
        let pool = ThreadPool::new(3);
        let mut scratch = Vec::new();
        for (ty, rows, cols, n) in [
            (GgmlType::Q4_K, 151, 512, 263),
            (GgmlType::Q6_K, 67, 768, 70),
            (GgmlType::Q4_1, 301, 576, 45),
            (GgmlType::Q8_0, 97, 1024, 9),
            (GgmlType::F16, 29, 200, 11),
        ] {
            let data = random_matrix(&mut rng, ty, rows, cols);
            let w = QMatrix::new(ty, rows, cols, &data).unwrap();
            let x = rng.activations(n * cols);
            let mut want = vec![0f32; n * rows];
            matmul_with(
                SimdLevel::Portable,
                &pool,
                &w,
                &x,
                n,
                &mut want,
                &mut scratch,
            );
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0);
            for level in levels() {
                let mut out = vec![f32::NAN; n * rows];
                matmul_with(level, &pool, &w, &x, n, &mut out, &mut scratch);
                for (i, (&g, &e)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-5 * scale,
                        "{ty} {level} out[{i}]: {g} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn f32_matmul_matches_plain_loops() {
        let mut rng = Rng(12);
        let (rows, cols, n) = (5, 19, 4);
        let wf: Vec<f32> = (0..rows * cols).map(|_| rng.range(-1.0, 1.0)).collect();
        let data: Vec<u8> = wf.iter().flat_map(|v| v.to_le_bytes()).collect();
        let w = QMatrix::new(GgmlType::F32, rows, cols, &data).unwrap();
        let x = rng.activations(n * cols);
        let mut out = vec![0f32; n * rows];
        let mut scratch = Vec::new();
        matmul(&ThreadPool::new(2), &w, &x, n, &mut out, &mut scratch);
        assert!(scratch.is_empty(), "F32 activations are used in place");
        for t in 0..n {
            for r in 0..rows {
                let e: f32 = (0..cols).map(|c| wf[r * cols + c] * x[t * cols + c]).sum();
                let got = out[t * rows + r];
                assert!(
                    (got - e).abs() <= 1e-5 * (1.0 + e.abs()),
                    "[{t}][{r}] {got} vs {e}"
                );
            }
        }
    }

    #[test]
    fn warm_scratch_is_not_reallocated() {
        let mut rng = Rng(13);
        let data = random_matrix(&mut rng, GgmlType::Q4_K, 8, 512);
        let w = QMatrix::new(GgmlType::Q4_K, 8, 512, &data).unwrap();
        let pool = ThreadPool::new(1);
        let mut scratch = Vec::new();
        let x = rng.activations(4 * 512);
        let mut out = vec![0f32; 4 * 8];
        matmul(&pool, &w, &x, 4, &mut out, &mut scratch);
        assert_eq!(scratch.len(), scratch_bytes(&w, 4));
        let ptr = scratch.as_ptr();
        let first = out.clone();
        matmul(&pool, &w, &x[..512], 1, &mut out[..8], &mut scratch);
        matmul(&pool, &w, &x, 4, &mut out, &mut scratch);
        assert_eq!(scratch.as_ptr(), ptr);
        assert_eq!(out, first);
    }

    #[test]
    fn empty_products_do_nothing() {
        let pool = ThreadPool::new(2);
        let data = vec![0u8; 0];
        let w = QMatrix::new(GgmlType::Q4_0, 0, 64, &data).unwrap();
        let mut scratch = Vec::new();
        matmul(&pool, &w, &[0.0; 64], 1, &mut [], &mut scratch);
        let data = vec![0u8; 18 * 2];
        let w = QMatrix::new(GgmlType::Q4_0, 1, 64, &data).unwrap();
        matmul(&pool, &w, &[], 0, &mut [], &mut scratch);
    }

    #[test]
    #[should_panic(expected = "matmul: out has")]
    fn wrong_output_size_panics() {
        let data = vec![0u8; 18 * 2];
        let w = QMatrix::new(GgmlType::Q4_0, 1, 64, &data).unwrap();
        matmul(
            &ThreadPool::new(1),
            &w,
            &[0.0; 64],
            1,
            &mut [0.0; 2],
            &mut Vec::new(),
        );
    }

    #[test]
    fn qmatrix_and_dequantize_row_validate() {
        assert!(matches!(
            QMatrix::new(GgmlType::Q4_K, 2, 100, &[0u8; 288]),
            Err(Error::BadRowLength { .. })
        ));
        assert!(matches!(
            QMatrix::new(GgmlType::Q4_K, 2, 256, &[0u8; 287]),
            Err(Error::BadBufferSize { .. })
        ));
        assert!(matches!(
            QMatrix::new(GgmlType::IQ2_XS, 1, 256, &[0u8; 74]),
            Err(Error::UnsupportedType(_))
        ));
        let mut rng = Rng(14);
        for ty in WEIGHT_TYPES {
            let cols = 2 * ty.block_size().max(16);
            let row = random_row(&mut rng, ty, cols);
            let mut y = vec![f32::NAN; cols];
            dequantize_row(ty, &row, &mut y).unwrap();
            assert!(y.iter().all(|v| v.is_finite()), "{ty}");
            assert!(dequantize_row(ty, &row, &mut y[1..]).is_err(), "{ty}");
            if ty.type_size() > 1 {
                assert!(dequantize_row(ty, &row[1..], &mut y).is_err(), "{ty}");
            }
        }
    }

    #[test]
    fn set_simd_level_lowers_and_restores() {
        assert_eq!(
            cpu::set_simd_level(Some(SimdLevel::Portable)),
            SimdLevel::Portable
        );
        assert_eq!(cpu::simd_level(), SimdLevel::Portable);
        assert_eq!(cpu::set_simd_level(None), cpu::detected_level());
    }

    /// Throughput probe, not a test: `cargo test --release -p shoal-kernels -- --ignored
    /// --nocapture throughput`. Prints GB/s of weights streamed by decode and GMAC/s of
    /// prefill for the shapes of the two benchmark models. With `SHOAL_BENCH_THREADS=1` the
    /// times are the calling thread's CPU time; with more threads, wall time.
    /// Nanoseconds this thread has run on a CPU (Linux), so that a probe on a busy machine
    /// measures the work and not the waiting.
    #[cfg(target_os = "linux")]
    fn thread_cpu_ns() -> Option<u64> {
        #[repr(C)]
        struct Timespec {
            sec: i64,
            nsec: i64,
        }
        unsafe extern "C" {
            fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
        }
        const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
        let mut ts = Timespec { sec: 0, nsec: 0 };
        // SAFETY: `ts` is a valid timespec for the call to fill.
        let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        (rc == 0).then(|| ts.sec as u64 * 1_000_000_000 + ts.nsec as u64)
    }

    #[cfg(not(target_os = "linux"))]
    fn thread_cpu_ns() -> Option<u64> {
        None
    }

    fn timed(mut f: impl FnMut()) -> f64 {
        let (t, c) = (std::time::Instant::now(), thread_cpu_ns());
        f();
        match (c, thread_cpu_ns()) {
            (Some(a), Some(b)) if b > a => (b - a) as f64 * 1e-9,
            _ => t.elapsed().as_secs_f64(),
        }
    }

    #[test]
    #[ignore]
    fn throughput() {
        let mut rng = Rng(99);
        let threads: usize = std::env::var("SHOAL_BENCH_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2);
        let pool = ThreadPool::new(threads);
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            for _ in 0..1000 {
                pool.run(|_, _| {});
            }
            best = best.min(t.elapsed().as_secs_f64() / 1000.0);
        }
        println!(
            "pool.run of an empty job with {threads} threads: {:.2} us",
            best * 1e6
        );
        let mut scratch = Vec::new();
        for (ty, rows, cols) in [
            (GgmlType::Q4_1, 1536, 576),
            (GgmlType::Q4_1, 576, 1536),
            (GgmlType::Q8_0, 49152, 576),
            (GgmlType::Q5_0, 4864, 896),
            (GgmlType::Q4_K, 896, 4864),
            (GgmlType::Q6_K, 896, 4864),
        ] {
            let data = random_matrix(&mut rng, ty, rows, cols);
            let w = QMatrix::new(ty, rows, cols, &data).unwrap();
            let n = 128;
            let x1 = rng.activations(cols);
            let xn = rng.activations(n * cols);
            let mut out = vec![0f32; n * rows];
            let iters = (200_000_000 / data.len()).clamp(3, 2000);
            let levels: Vec<SimdLevel> = levels()
                .into_iter()
                .filter(|&l| l != SimdLevel::Portable)
                .collect();
            // Best of several alternating rounds, to see through other load on the machine.
            let mut best = vec![(f64::MAX, f64::MAX); levels.len()];
            for _round in 0..5 {
                for (li, &level) in levels.iter().enumerate() {
                    let dt = timed(|| {
                        for _ in 0..iters {
                            matmul_with(level, &pool, &w, &x1, 1, &mut out[..rows], &mut scratch);
                        }
                    }) / iters as f64;
                    let pdt =
                        timed(|| matmul_with(level, &pool, &w, &xn, n, &mut out, &mut scratch));
                    best[li] = (best[li].0.min(dt), best[li].1.min(pdt));
                }
            }
            for (li, &level) in levels.iter().enumerate() {
                let (dt, pdt) = best[li];
                let gbs = data.len() as f64 / dt / 1e9;
                let gmac = (rows * cols * n) as f64 / pdt / 1e9;
                println!(
                    "{ty} {rows}x{cols} {level:>8}: decode {:8.1} us {gbs:6.1} GB/s | \
                     prefill n={n} {:8.2} ms {gmac:6.1} GMAC/s",
                    dt * 1e6,
                    pdt * 1e3
                );
            }
        }
    }
}
