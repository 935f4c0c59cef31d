//! Matrix × vector (decode) and 128-token matrix × matrix (prefill) for the weight types and
//! shapes of the benchmark models (SmolLM2-135M Q4_1/Q8_0, Qwen2.5-0.5B Q4_K/Q6_K/Q5_0/Q8_0),
//! on a pool of 2 threads, at every SIMD level this CPU has.
//!
//! `cargo bench -p shoal-benches --bench matmul`. Decode reports bytes of weights streamed
//! per second; prefill reports multiply-adds per second.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use shoal_kernels::cpu::{SimdLevel, detected_level};
use shoal_kernels::matmul::{QMatrix, matmul_with};
use shoal_kernels::{GgmlType, ThreadPool};

/// Deterministic random bytes (splitmix64).
fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) as u8
        })
        .collect()
}

/// A random weight matrix with valid, small f16 scales (random quant bits otherwise).
fn weights(ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let n = rows * ty.bytes_for(cols as u64).expect("whole blocks") as usize;
    let mut data = bytes(ty.id() as u64, n);
    // f16 0x1400 = 2^-10; scales at these offsets of each block.
    let scale_offsets: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => unreachable!("bench types only"),
    };
    for block in data.chunks_exact_mut(ty.type_size()) {
        for &o in scale_offsets {
            block[o..o + 2].copy_from_slice(&0x1400u16.to_le_bytes());
        }
    }
    data
}

fn activations(n: usize) -> Vec<f32> {
    bytes(7, n)
        .into_iter()
        .map(|b| (b as f32 - 127.5) / 64.0)
        .collect()
}

fn bench_matmul(c: &mut Criterion) {
    let pool = ThreadPool::new(2);
    let levels: Vec<SimdLevel> = SimdLevel::ALL
        .into_iter()
        .filter(|&l| l <= detected_level() && l != SimdLevel::Portable)
        .collect();
    let shapes = [
        (GgmlType::Q4_1, 1536, 576),
        (GgmlType::Q8_0, 49152, 576),
        (GgmlType::Q5_0, 4864, 896),
        (GgmlType::Q4_K, 896, 4864),
        (GgmlType::Q6_K, 896, 4864),
    ];
    let mut scratch = Vec::new();
    for (ty, rows, cols) in shapes {
        let data = weights(ty, rows, cols);
        let w = QMatrix::new(ty, rows, cols, &data).expect("valid matrix");
        let name = format!("{ty} {rows}x{cols}");

        let mut g = c.benchmark_group("matvec");
        g.throughput(Throughput::Bytes(data.len() as u64));
        let x = activations(cols);
        let mut out = vec![0f32; rows];
        for &level in &levels {
            g.bench_with_input(BenchmarkId::new(&name, level), &level, |b, &level| {
                b.iter(|| matmul_with(level, &pool, &w, &x, 1, &mut out, &mut scratch))
            });
        }
        g.finish();

        let n = 128;
        let mut g = c.benchmark_group("matmul128");
        g.sample_size(10);
        g.throughput(Throughput::Elements((rows * cols * n) as u64));
        let x = activations(n * cols);
        let mut out = vec![0f32; n * rows];
        for &level in &levels {
            g.bench_with_input(BenchmarkId::new(&name, level), &level, |b, &level| {
                b.iter(|| matmul_with(level, &pool, &w, &x, n, &mut out, &mut scratch))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench_matmul);
criterion_main!(benches);
