//! What this machine has: cores, memory, a measured memory bandwidth, model files.

use std::path::Path;
use std::time::Instant;

use shoal_kernels::matmul::{QMatrix, matmul};
use shoal_kernels::quant::row_bytes;
use shoal_kernels::{GgmlType, ThreadPool, ops};
use shoal_proto::v1;

/// Bytes per second of a large memcpy (bytes read + bytes written), best of a few runs.
/// A rough probe (~50 ms): enough for the planner to tell a DDR4 laptop from a server.
pub fn memory_bandwidth() -> u64 {
    const N: usize = 64 << 20;
    let src = vec![1u8; N];
    let mut dst = vec![0u8; N];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (2.0 * N as f64 / best.max(1e-9)) as u64
}

/// (total, available) RAM in bytes from `/proc/meminfo`; zeros where it is unreadable.
pub fn ram() -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string("/proc/meminfo") else { return (0, 0) };
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// `*.gguf` files directly in `dir`, sorted by name.
pub fn models(dir: &Path) -> Vec<v1::ModelFile> {
    let mut out: Vec<v1::ModelFile> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let md = e.metadata().ok()?;
            (md.is_file() && name.ends_with(".gguf")).then_some(v1::ModelFile { name, size_bytes: md.len() })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// This machine's GPUs as inventory devices (memory and a measured copy bandwidth), or
/// why there are none: a machine without a driver is a fact, reported, not an error.
pub fn gpus() -> (Vec<v1::Device>, String) {
    #[cfg(feature = "cuda")]
    {
        match shoal_kernels::cuda::probe(true) {
            Ok(g) => (
                g.into_iter()
                    .map(|i| v1::Device {
                        kind: "cuda".into(),
                        name: i.name,
                        memory_total_bytes: i.total_bytes,
                        memory_free_bytes: i.free_bytes,
                        bandwidth_bytes_per_s: i.bandwidth_bytes_per_s as u64,
                        ordinal: i.ordinal as u32,
                        compute_capability: format!("{}.{}", i.compute_capability.0, i.compute_capability.1),
                    })
                    .collect(),
                String::new(),
            ),
            Err(e) => (Vec::new(), e.to_string()),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        (Vec::new(), "built without the cuda feature".into())
    }
}

/// The whole inventory; `bandwidth` comes from [`memory_bandwidth`], measured once, and
/// `gpus` from [`gpus`].
pub fn inventory(node_name: &str, models_dir: &Path, bandwidth: u64, gpus: &(Vec<v1::Device>, String)) -> v1::Inventory {
    let (total, free) = ram();
    v1::Inventory {
        node_name: node_name.to_string(),
        cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get()) as u32,
        ram_total_bytes: total,
        ram_free_bytes: free,
        memory_bandwidth_bytes_per_s: bandwidth,
        devices: gpus.0.clone(),
        models: models(models_dir),
        calibration: None,
        gpu_note: gpus.1.clone(),
    }
}

/// Weight types the calibration measures (the types of the GGUF quantizations shoal serves).
const CALIBRATED: &[GgmlType] = &[
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::F16,
];
/// Rows of activations of the batched measurement.
const BATCH_ROWS: usize = 32;

/// Measures the matrix kernels on `threads` compute threads: for each weight type, the
/// bytes per second of one activation row against weights streamed from memory (64 MiB of
/// matrices, more than a last-level cache), and the bytes × rows per second of a 32-row
/// batch; the fixed cost of a call; and the time to wake parked threads. About half a
/// second; the planner turns it into each stage's predicted step time.
pub fn calibrate(threads: usize) -> v1::KernelCalibration {
    let pool = ThreadPool::new(threads.max(1));
    const ARENA: usize = 64 << 20;
    const MATRIX: usize = 4 << 20;
    const COLS: usize = 2048;
    let x = vec![0.5f32; BATCH_ROWS * COLS];
    let mut scratch = Vec::new();
    let mut out = vec![0f32; BATCH_ROWS * (MATRIX / 256)];
    let mut rates = Vec::new();
    // Seconds per row of one activation row against weights streamed from the arena, and
    // seconds per row × token of a 32-row batch on one matrix.
    let mut measure = |ty: GgmlType, cols: usize, batch: bool| -> Option<(f64, usize)> {
        let row = row_bytes(ty, cols).ok()?;
        let rows = ((MATRIX / row).max(2) & !1).min(out.len() / BATCH_ROWS);
        let m_bytes = rows * row;
        // 0x3C bytes: every f16 scale is 1.06, so no value is NaN or subnormal.
        let arena = vec![0x3Cu8; (ARENA / m_bytes).max(1) * m_bytes];
        let mats: Vec<QMatrix<'_>> = arena.chunks_exact(m_bytes).filter_map(|d| QMatrix::new(ty, rows, cols, d).ok()).collect();
        let first = mats.first()?;
        // The median pass (a batch is one short call, so it gets more of them).
        let mut passes = Vec::new();
        for rep in 0..if batch { 16 } else { 4 } {
            let t = Instant::now();
            if batch {
                matmul(&pool, first, &x[..BATCH_ROWS * cols], BATCH_ROWS, &mut out[..BATCH_ROWS * rows], &mut scratch);
            } else {
                for m in &mats {
                    matmul(&pool, m, &x[..cols], 1, &mut out[..rows], &mut scratch);
                }
            }
            if rep > 0 {
                passes.push(t.elapsed().as_secs_f64());
            }
        }
        let n_rows = if batch { rows * BATCH_ROWS } else { rows * mats.len() };
        Some((median(&mut passes) / n_rows as f64, row))
    };
    for &ty in CALIBRATED {
        let (Some((t_long, b_long)), Some((t_short, b_short)), Some((t_batch, b_batch))) =
            (measure(ty, COLS, false), measure(ty, 512, false), measure(ty, COLS, true))
        else {
            continue;
        };
        // t = bytes / rate + row_overhead, from the two row lengths.
        let (mut rate, mut row_overhead) = ((b_long - b_short) as f64 / (t_long - t_short), 0.0);
        if rate.is_finite() && rate > 0.0 {
            row_overhead = (t_short - b_short as f64 / rate).max(0.0);
        } else {
            rate = b_long as f64 / t_long;
        }
        rates.push(v1::KernelRate {
            r#type: ty.name().to_string(),
            single_bytes_per_s: rate,
            batch_bytes_per_s: b_batch as f64 / t_batch,
            row_overhead_s: row_overhead,
        });
    }
    // The fixed cost of a call: a small Q8_0 matrix (in cache) less its bytes at the
    // streaming rate.
    // (Best of five batches of calls: a stray interruption must not count.)
    let (rows, cols) = (16, 512);
    let small = vec![0x3Cu8; rows * row_bytes(GgmlType::Q8_0, cols).unwrap_or(0)];
    let mut call_overhead_s = 0.0;
    if let Ok(m) = QMatrix::new(GgmlType::Q8_0, rows, cols, &small) {
        let mut out = vec![0f32; rows];
        let mut best = f64::MAX;
        for _ in 0..5 {
            let n = 100;
            let t = Instant::now();
            for _ in 0..n {
                matmul(&pool, &m, &x[..cols], 1, &mut out, &mut scratch);
            }
            best = best.min(t.elapsed().as_secs_f64() / n as f64);
        }
        call_overhead_s = best;
    }
    // Waking parked threads, as every step after the first does.
    let mut wake_s = 0.0;
    let n = 10;
    for _ in 0..n {
        pool.park();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let t = Instant::now();
        pool.run(|_, _| {});
        wake_s += t.elapsed().as_secs_f64() / n as f64;
    }
    // Vector work: a norm, a SwiGLU and an add per pass, 3 × 4096 elements.
    let (mut a, b, w) = (vec![0.5f32; 4096], vec![0.25f32; 4096], vec![1.0f32; 4096]);
    let mut o = vec![0f32; 4096];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..50 {
            ops::rms_norm(&a, &w, 1e-5, &mut o);
            ops::swiglu_inplace(&mut o, &b);
            ops::add_inplace(&mut a, &o);
            a.fill(0.5);
        }
        best = best.min(t.elapsed().as_secs_f64() / (50.0 * 3.0 * 4096.0));
    }
    let elementwise_s = best;
    // Handing a step to a compute thread and back.
    let (to, from) = (std::sync::mpsc::channel::<u32>(), std::sync::mpsc::channel::<u32>());
    let (tx, rx_back) = (to.0, from.1);
    let (rx, tx_back) = (to.1, from.0);
    let echo = std::thread::spawn(move || {
        while let Ok(v) = rx.recv() {
            if tx_back.send(v).is_err() {
                break;
            }
        }
    });
    let mut handoff_s = f64::MAX;
    for i in 0..20 {
        std::thread::sleep(std::time::Duration::from_micros(500));
        let t = Instant::now();
        let ok = tx.send(i).is_ok() && rx_back.recv().is_ok();
        if ok {
            handoff_s = handoff_s.min(t.elapsed().as_secs_f64());
        }
    }
    drop(tx);
    let _ = echo.join();
    v1::KernelCalibration {
        threads: pool.n_threads() as u32,
        rates,
        batch_rows: BATCH_ROWS as u32,
        call_overhead_s,
        wake_s,
        elementwise_s,
        handoff_s: if handoff_s == f64::MAX { 0.0 } else { handoff_s },
        ..Default::default()
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Most probes one request may ask for, and most bytes of matrices in one.
pub const MAX_PROBES: usize = 16;
pub const MAX_PROBE_BYTES: u64 = 512 << 20;
const MAX_PROBE_MATRICES: usize = 64;

/// Checks a calibration request's probes before any memory is allocated for them.
pub fn check_probes(probes: &[v1::ShapeProbe], attention: Option<&v1::AttentionShape>) -> Result<(), String> {
    if probes.len() > MAX_PROBES {
        return Err(format!("{} probes, at most {MAX_PROBES}", probes.len()));
    }
    for (i, p) in probes.iter().enumerate() {
        if p.matrices.len() > MAX_PROBE_MATRICES {
            return Err(format!("probe {i} has {} matrices, at most {MAX_PROBE_MATRICES}", p.matrices.len()));
        }
        let mut total = 0u64;
        for m in &p.matrices {
            let ty = GgmlType::from_name(&m.r#type).ok_or_else(|| format!("probe {i}: unknown type {:?}", m.r#type))?;
            if m.rows == 0 || m.cols == 0 || m.cols > 1 << 20 {
                return Err(format!("probe {i}: a {}x{} matrix", m.rows, m.cols));
            }
            let row = row_bytes(ty, m.cols as usize).map_err(|e| format!("probe {i}: {e}"))? as u64;
            total = total.saturating_add(row.saturating_mul(m.rows));
        }
        if total > MAX_PROBE_BYTES {
            return Err(format!("probe {i} has {total} bytes of matrices, at most {MAX_PROBE_BYTES}"));
        }
    }
    if let Some(a) = attention {
        let ok = a.n_head_kv > 0 && a.n_head % a.n_head_kv == 0 && a.n_head <= 1024 && (1..=1024).contains(&a.head_dim);
        if !ok {
            return Err(format!("attention shape of {} heads, {} kv heads, head dim {}", a.n_head, a.n_head_kv, a.head_dim));
        }
    }
    Ok(())
}

/// Times one activation row through each probe's matrices on `threads` threads, in the
/// order given, the way a block runs them: copies of the probe fill at least 64 MiB, so the
/// weights stream from memory as a model's do; the median pass of a quarter of a second.
/// Returns seconds per probe (0 where a matrix cannot be built). [`check_probes`] first.
pub fn probe_blocks(threads: usize, probes: &[v1::ShapeProbe]) -> Vec<f64> {
    const ARENA: u64 = 64 << 20;
    let pool = ThreadPool::new(threads.max(1));
    let mut scratch = Vec::new();
    probes
        .iter()
        .map(|p| {
            let mats: Option<Vec<(GgmlType, usize, usize, usize)>> = p
                .matrices
                .iter()
                .map(|m| {
                    let ty = GgmlType::from_name(&m.r#type)?;
                    let row = row_bytes(ty, m.cols as usize).ok()?;
                    Some((ty, m.rows as usize, m.cols as usize, row * m.rows as usize))
                })
                .collect();
            let Some(mats) = mats.filter(|m| !m.is_empty()) else { return 0.0 };
            let bytes: u64 = mats.iter().map(|m| m.3 as u64).sum();
            let copies = (ARENA / bytes.max(1)).max(1) as usize;
            // 0x3C bytes: every f16 scale is 1.06, so no value is NaN or subnormal.
            let data: Vec<Vec<u8>> = (0..copies).flat_map(|_| mats.iter().map(|m| vec![0x3Cu8; m.3])).collect();
            // The matrices of every copy, in block order.
            let Ok(arena) = data
                .iter()
                .zip(mats.iter().cycle())
                .map(|(d, &(ty, rows, cols, _))| QMatrix::new(ty, rows, cols, d))
                .collect::<Result<Vec<_>, _>>()
            else {
                return 0.0;
            };
            let x = vec![0.5f32; mats.iter().map(|m| m.2).max().unwrap_or(0)];
            let mut out = vec![0f32; mats.iter().map(|m| m.1).max().unwrap_or(0)];
            // The median pass, not the best: the plan predicts a sustained rate, and on a
            // machine whose memory is shared the best pass is the lucky one. Passes go on
            // for a quarter of a second (at least eight), to span the machine's swings.
            let mut passes = Vec::new();
            let start = Instant::now();
            for rep in 0.. {
                if rep > 8 && start.elapsed().as_secs_f64() > 0.25 {
                    break;
                }
                let t = Instant::now();
                for m in &arena {
                    matmul(&pool, m, &x[..m.cols], 1, &mut out[..m.rows], &mut scratch);
                }
                if rep > 0 {
                    passes.push(t.elapsed().as_secs_f64() / copies as f64);
                }
            }
            median(&mut passes)
        })
        .collect()
}

/// Times one token's attention (ggml's flash-attention numerics, as the executor runs it)
/// over 128 and 1024 cached positions of `shape` on `threads` threads: (fixed seconds,
/// seconds per position). [`check_probes`] first.
pub fn probe_attention(threads: usize, shape: &v1::AttentionShape) -> (f64, f64) {
    use shoal_kernels::attention::{AttnNumerics, AttnShape, attention_with};
    let pool = ThreadPool::new(threads.max(1));
    let (nh, nkv, hd) = (shape.n_head as usize, shape.n_head_kv as usize, shape.head_dim as usize);
    let numerics = AttnNumerics::GgmlFlash { n_ctx: 4096, n_threads: pool.n_threads() };
    let time = |n_past: usize| {
        let q = vec![0.1f32; nh * hd];
        let kv = vec![half::f16::from_f32(0.1); (n_past + 1) * nkv * hd];
        let mut out = vec![0f32; nh * hd];
        let shape = AttnShape { n_tok: 1, n_past, n_head: nh, n_kv_head: nkv, head_dim: hd, scale: 0.125 };
        let mut passes = Vec::new();
        for _ in 0..7 {
            let n = 20;
            let t = Instant::now();
            for _ in 0..n {
                attention_with(numerics, &pool, &q, &kv, &kv, &shape, &mut out);
            }
            passes.push(t.elapsed().as_secs_f64() / n as f64);
        }
        median(&mut passes)
    };
    let (short, long) = (time(128), time(1024));
    let per_pos = ((long - short) / 896.0).max(0.0);
    ((short - 128.0 * per_pos).max(0.0), per_pos)
}
