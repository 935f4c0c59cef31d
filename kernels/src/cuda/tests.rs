//! The CUDA backend against the CPU reference.
//!
//! The compile test needs only NVRTC (CI installs it from the `nvidia-cuda-nvrtc-cu12` wheel
//! and sets `SHOAL_REQUIRE_NVRTC=1`, which turns a missing library into a failure). The rest
//! need a GPU and say so when skipping. Tolerances: quantizers and the codec are bit-exact;
//! matrix products agree within 1e-5 of the row's largest |output| (same integers, only the
//! f32 order of the sub-block sums differs); norms, RoPE and SwiGLU within 1e-6 relative;
//! attention within 1e-4 of the output scale (f32 online softmax vs the CPU's f16 query).

use super::*;
use crate::ThreadPool;
use crate::matmul::{QMatrix, matmul_with};
use crate::quant::testutil::{Rng, WEIGHT_TYPES, random_matrix};
use crate::cpu::SimdLevel;

fn gpu() -> Option<Gpu> {
    if !driver_present() {
        eprintln!("skipped: no CUDA driver on this machine");
        return None;
    }
    match Gpu::open(0) {
        Ok(g) => Some(g),
        Err(GpuError::NoDevice) => {
            eprintln!("skipped: no CUDA device");
            None
        }
        Err(e) => panic!("a CUDA driver is present but GPU 0 did not open: {e}"),
    }
}

#[test]
fn every_kernel_source_compiles_to_ptx_for_sm86_and_sm90() {
    if !nvrtc_present() {
        assert!(
            std::env::var_os("SHOAL_REQUIRE_NVRTC").is_none(),
            "SHOAL_REQUIRE_NVRTC is set but libnvrtc.so.12 cannot be loaded (LD_LIBRARY_PATH={:?})",
            std::env::var_os("LD_LIBRARY_PATH")
        );
        eprintln!("skipped: no NVRTC library (scripts/install-deps fetches one)");
        return;
    }
    let mut n_kernels = 0;
    for (unit, src) in SOURCES {
        let names = kernel_names(src);
        assert!(!names.is_empty(), "{unit}: no kernels found");
        for arch in CHECKED_ARCHS {
            let ptx = compile(unit, src, arch).unwrap_or_else(|e| panic!("{e}"));
            let text = ptx.to_src();
            let target = format!(".target sm_{}", &arch["compute_".len()..]);
            assert!(text.contains(&target), "{unit} for {arch}: no `{target}` in the PTX");
            for name in &names {
                assert!(text.contains(&format!(".entry {name}(")), "{unit} for {arch}: kernel {name} missing from the PTX");
            }
        }
        n_kernels += names.len();
    }
    // 11 types × (mv, mm, dequantize) + 5 quantizers + ops + attention + codec.
    assert!(n_kernels >= 33 + 5 + 8 + 1 + 4, "{n_kernels} kernels");
}

#[test]
fn kernel_names_expand_the_per_type_macros() {
    let names = kernel_names(SOURCES[0].1);
    for ty in WEIGHT_TYPES {
        let s = type_suffix(ty).expect("every weight type runs on the GPU");
        for stem in ["mv_", "mm_", "dequantize_"] {
            assert!(names.contains(&format!("{stem}{s}")), "{stem}{s} in {names:?}");
        }
    }
    assert!(names.contains(&"quantize_q8_k".to_string()));
    let mut a = TYPES.to_vec();
    let mut b = WEIGHT_TYPES.to_vec();
    a.sort();
    b.sort();
    assert_eq!(a, b, "the GPU covers every CPU weight type");
}

#[test]
fn no_driver_is_reported_not_a_panic() {
    match probe(true) {
        Err(GpuError::NoDriver) => assert!(!driver_present()),
        Err(GpuError::NoDevice) => assert!(driver_present()),
        Ok(gpus) => {
            assert!(!gpus.is_empty());
            for g in gpus {
                assert!(g.total_bytes > 0 && !g.name.is_empty(), "{g:?}");
            }
        }
        Err(e) => panic!("probe: {e}"),
    }
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// Largest |a - b| over the largest |b|.
fn norm_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let d = a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    d / max_abs(b).max(1e-30)
}

#[test]
fn quantized_matmul_matches_the_cpu_for_every_type() {
    let Some(mut g) = gpu() else { return };
    let pool = ThreadPool::new(1);
    let mut rng = Rng(7);
    let (rows, cols) = (67, 512);
    for ty in WEIGHT_TYPES {
        let w = random_matrix(&mut rng, ty, rows, cols);
        let dw = g.upload_new(&w).unwrap();
        let view = MatView { ty, rows, cols, ptr: dw.ptr() };
        for n in [1, 3, 9, 17] {
            let x = rng.activations(n * cols);
            let mut want = vec![0f32; n * rows];
            let qm = QMatrix::new(ty, rows, cols, &w).unwrap();
            matmul_with(SimdLevel::Portable, &pool, &qm, &x, n, &mut want, &mut Vec::new());
            let dx = g.upload_new(&x).unwrap();
            let dy = g.alloc::<f32>(n * rows).unwrap();
            let mut q = g.alloc::<u8>(1).unwrap();
            g.matmul(&view, dx.ptr(), n, dy.ptr(), &mut q).unwrap();
            let mut got = vec![0f32; n * rows];
            g.download(&dy, 0, &mut got).unwrap();
            let e = norm_err(&got, &want);
            eprintln!("matmul {} n={n}: normalized error {e:.2e}", ty.name());
            assert!(e <= 1e-5, "{} n={n}: normalized error {e}", ty.name());
        }
    }
}

#[test]
fn activation_quantizers_are_bit_exact() {
    let Some(mut g) = gpu() else { return };
    let mut rng = Rng(11);
    let (n, cols) = (5, 768);
    let x = rng.activations(n * cols);
    let dx = g.upload_new(&x).unwrap();
    for ty in [GgmlType::Q8_0, GgmlType::Q8_1, GgmlType::Q8_K, GgmlType::F16, GgmlType::BF16] {
        let rb = row_bytes(ty, cols).unwrap();
        let mut want = vec![0u8; n * rb];
        for t in 0..n {
            crate::quant::quantize_activations(ty, &x[t * cols..(t + 1) * cols], &mut want[t * rb..(t + 1) * rb]).unwrap();
        }
        let out = g.alloc::<u8>(n * rb).unwrap();
        g.quantize(ty, dx.ptr(), cols, n, out.ptr()).unwrap();
        let mut got = vec![0u8; n * rb];
        g.download(&out, 0, &mut got).unwrap();
        assert!(got == want, "{}: GPU activation blocks differ from the CPU's", ty.name());
    }
}

#[test]
fn dequantized_rows_match_the_cpu() {
    let Some(mut g) = gpu() else { return };
    let mut rng = Rng(3);
    let (rows, cols) = (10, 512);
    for ty in WEIGHT_TYPES {
        let w = random_matrix(&mut rng, ty, rows, cols);
        let dw = g.upload_new(&w).unwrap();
        let ids: Vec<u32> = vec![7, 0, 9, 7];
        let dids = g.upload_new(&ids).unwrap();
        let dy = g.alloc::<f32>(ids.len() * cols).unwrap();
        let view = MatView { ty, rows, cols, ptr: dw.ptr() };
        g.dequantize_rows(&view, dids.ptr(), ids.len(), dy.ptr()).unwrap();
        let mut got = vec![0f32; ids.len() * cols];
        g.download(&dy, 0, &mut got).unwrap();
        let rb = row_bytes(ty, cols).unwrap();
        for (t, &r) in ids.iter().enumerate() {
            let mut want = vec![0f32; cols];
            crate::matmul::dequantize_row(ty, &w[r as usize * rb..(r as usize + 1) * rb], &mut want).unwrap();
            let e = norm_err(&got[t * cols..(t + 1) * cols], &want);
            assert!(e <= 1e-6, "{} row {r}: {e}", ty.name());
        }
    }
}

#[test]
fn norm_rope_swiglu_add_match_the_cpu() {
    let Some(mut g) = gpu() else { return };
    let mut rng = Rng(5);
    let (n, dim) = (3, 576);
    let x = rng.activations(n * dim);
    let w: Vec<f32> = (0..dim).map(|_| rng.range(0.5, 1.5)).collect();
    let (dx, dw, dy) = (g.upload_new(&x).unwrap(), g.upload_new(&w).unwrap(), g.alloc::<f32>(n * dim).unwrap());
    g.rms_norm(dx.ptr(), dw.ptr(), dy.ptr(), n, dim, dim, 1e-5).unwrap();
    let mut got = vec![0f32; n * dim];
    g.download(&dy, 0, &mut got).unwrap();
    let mut want = vec![0f32; n * dim];
    for t in 0..n {
        crate::ops::rms_norm(&x[t * dim..(t + 1) * dim], &w, 1e-5, &mut want[t * dim..(t + 1) * dim]);
    }
    assert!(norm_err(&got, &want) <= 1e-6, "rms_norm {}", norm_err(&got, &want));

    // RoPE, both pairings, with the CPU's cos/sin rows: bit-exact.
    let (heads, hd) = (9, 64);
    let rope = crate::ops::RopeCache::new(hd, 10000.0, 1.0);
    for neox in [false, true] {
        let q = rng.activations(n * heads * hd);
        let mut cs = vec![0f32; n * hd];
        for t in 0..n {
            rope.cos_sin(17 + t, &mut cs[t * hd..(t + 1) * hd]);
        }
        let (dq, dcs) = (g.upload_new(&q).unwrap(), g.upload_new(&cs).unwrap());
        g.rope(dq.ptr(), dcs.ptr(), n, heads, hd, hd, neox).unwrap();
        let mut got = vec![0f32; q.len()];
        g.download(&dq, 0, &mut got).unwrap();
        let mut want = q.clone();
        for t in 0..n {
            rope.rope(&mut want[t * heads * hd..(t + 1) * heads * hd], heads, hd, 17 + t, neox);
        }
        assert!(got == want, "rope neox={neox}: not bit-exact ({})", norm_err(&got, &want));
    }

    let (gate, up) = (rng.activations(n * dim), rng.activations(n * dim));
    let (dg, du) = (g.upload_new(&gate).unwrap(), g.upload_new(&up).unwrap());
    g.swiglu(dg.ptr(), du.ptr(), n * dim).unwrap();
    g.add(dg.ptr(), du.ptr(), n * dim).unwrap();
    let mut got = vec![0f32; n * dim];
    g.download(&dg, 0, &mut got).unwrap();
    let want: Vec<f32> = gate.iter().zip(&up).map(|(&a, &b)| crate::ops::silu(a) * b + b).collect();
    assert!(norm_err(&got, &want) <= 1e-6, "swiglu + add {}", norm_err(&got, &want));
}

#[test]
fn attention_matches_the_cpu_reference() {
    let Some(mut g) = gpu() else { return };
    let mut rng = Rng(9);
    let pool = ThreadPool::new(1);
    let (n_head, n_kv, hd) = (8, 2, 64);
    for (n_past, n_tok) in [(0, 1), (0, 7), (37, 1), (300, 5)] {
        let total = n_past + n_tok;
        let k: Vec<half::f16> = rng.activations(total * n_kv * hd).into_iter().map(half::f16::from_f32).collect();
        let v: Vec<half::f16> = rng.activations(total * n_kv * hd).into_iter().map(half::f16::from_f32).collect();
        let q = rng.activations(n_tok * n_head * hd);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut want = vec![0f32; q.len()];
        crate::attention::attention(&pool, &q, &k, &v, n_tok, n_past, n_head, n_kv, hd, scale, &mut want);
        let kb: Vec<u16> = k.iter().map(|h| h.to_bits()).collect();
        let vb: Vec<u16> = v.iter().map(|h| h.to_bits()).collect();
        let (dq, dk, dv) = (g.upload_new(&q).unwrap(), g.upload_new(&kb).unwrap(), g.upload_new(&vb).unwrap());
        let dout = g.alloc::<f32>(q.len()).unwrap();
        g.attention(dq.ptr(), dk.ptr(), dv.ptr(), dout.ptr(), n_tok, n_past, n_head, n_kv, hd, scale).unwrap();
        let mut got = vec![0f32; q.len()];
        g.download(&dout, 0, &mut got).unwrap();
        let e = norm_err(&got, &want);
        eprintln!("attention n_past={n_past} n_tok={n_tok}: normalized error {e:.2e}");
        assert!(e <= 1e-3, "attention n_past={n_past} n_tok={n_tok}: {e}");
    }
}

#[test]
fn codec_on_the_gpu_is_byte_identical() {
    let Some(mut g) = gpu() else { return };
    use crate::codec::{Codec, encode};
    let mut rng = Rng(13);
    let (n, dim) = (4, 896);
    let x = rng.activations(n * dim);
    let dx = g.upload_new(&x).unwrap();
    for codec in [Codec::F32, Codec::Bf16, Codec::Q8] {
        let mut want = Vec::new();
        encode(codec, &x, n, dim, &mut want).unwrap();
        let out = g.alloc::<u8>(want.len()).unwrap();
        g.encode(codec, dx.ptr(), n, dim, out.ptr()).unwrap();
        let mut got = vec![0u8; want.len()];
        g.download(&out, 0, &mut got).unwrap();
        assert!(got == want, "{codec}: GPU frame differs");
        let back = g.alloc::<f32>(n * dim).unwrap();
        g.decode(codec, out.ptr(), n, dim, back.ptr()).unwrap();
        let mut dec = vec![0f32; n * dim];
        g.download(&back, 0, &mut dec).unwrap();
        let mut want_dec = Vec::new();
        crate::codec::decode(codec, &want, n, dim, &mut want_dec).unwrap();
        assert!(dec == want_dec, "{codec}: GPU decode differs");
    }
}
