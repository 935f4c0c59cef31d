//! What this machine has: cores, memory, a measured memory bandwidth, model files.

use std::path::Path;
use std::time::Instant;

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

/// The whole inventory; `bandwidth` comes from [`memory_bandwidth`], measured once.
pub fn inventory(node_name: &str, models_dir: &Path, bandwidth: u64) -> v1::Inventory {
    let (total, free) = ram();
    v1::Inventory {
        node_name: node_name.to_string(),
        cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get()) as u32,
        ram_total_bytes: total,
        ram_free_bytes: free,
        memory_bandwidth_bytes_per_s: bandwidth,
        devices: Vec::new(),
        models: models(models_dir),
    }
}
