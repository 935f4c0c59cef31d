//! The CUDA backend (feature `cuda`): GPU twins of this crate's kernels, compiled at run time
//! with NVRTC for the device at hand.
//!
//! cudarc loads `libcuda`, `libnvrtc` and `libnccl` when first used, so a `cuda` build runs on
//! machines without them; every entry point checks that the library is there first
//! ([`driver_present`], [`nvrtc_present`]) because cudarc panics when it is not. A machine
//! without a driver is a normal fact ([`GpuError::NoDriver`]), not a failure.
//!
//! The sources live in `kernels/cuda/*.cu`, each compiled with `common.cuh` in front of it
//! (no toolkit headers, see there). [`Gpu`] owns one device's context, stream and loaded
//! functions, and launches them on device buffers ([`DevBuf`]); the shapes each op takes are
//! the CPU functions' (`ops`, `matmul`, `attention`, `codec`), so the model's GPU path is the
//! CPU path with device pointers. Launches are asynchronous on one stream; copies to and from
//! the host go through pinned staging buffers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PinnedHostSlice, PushKernelArg, ValidAsZeroBits};
use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::GgmlType;
use crate::quant::row_bytes;

/// Prepended to every source.
pub const COMMON: &str = include_str!("../cuda/common.cuh");

/// Every kernel source: (name, text without [`COMMON`]).
pub const SOURCES: &[(&str, &str)] = &[
    ("quant", include_str!("../cuda/quant.cu")),
    ("ops", include_str!("../cuda/ops.cu")),
    ("attention", include_str!("../cuda/attention.cu")),
    ("codec", include_str!("../cuda/codec.cu")),
];

/// Architectures CI compiles every source for (RTX 30xx and H100/H200); at run time a
/// worker compiles for its own device's compute capability.
pub const CHECKED_ARCHS: &[&str] = &["compute_86", "compute_90"];

/// What can go wrong on the GPU path.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no CUDA driver library (libcuda.so) on this machine")]
    NoDriver,
    #[error("no CUDA device")]
    NoDevice,
    #[error("no NVRTC library (libnvrtc.so.12): put a CUDA 12 NVRTC on LD_LIBRARY_PATH")]
    NoNvrtc,
    #[error("CUDA: {0}")]
    Driver(String),
    #[error("NVRTC could not compile {unit} for {arch}:\n{log}")]
    Compile { unit: &'static str, arch: String, log: String },
    #[error("{0} is not supported on the GPU")]
    Unsupported(String),
    #[error("GPU op {op}: {msg}")]
    Shape { op: &'static str, msg: String },
}

impl From<cudarc::driver::DriverError> for GpuError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        GpuError::Driver(e.to_string())
    }
}

pub type GpuResult<T> = std::result::Result<T, GpuError>;

/// Whether the CUDA driver library can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether the NVRTC library can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether the NCCL library can be loaded.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// The `extern "C"` kernels a source defines, in order. A kernel named `stem##NAME` inside a
/// `#define MACRO(T, NAME)` is expanded once per `MACRO(T, suffix)` line.
pub fn kernel_names(src: &str) -> Vec<String> {
    const KERNEL: &str = "__global__ void ";
    let mut out = Vec::new();
    let mut current_macro = String::new();
    let mut stems: Vec<(String, String)> = Vec::new();
    for line in src.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("#define ") {
            current_macro = rest.split('(').next().unwrap_or("").trim().to_string();
        }
        if let Some(i) = line.find(KERNEL) {
            let name: String = line[i + KERNEL.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '#')
                .collect();
            match name.strip_suffix("##NAME") {
                Some(stem) => stems.push((current_macro.clone(), stem.to_string())),
                None => out.push(name),
            }
        } else if let Some((mac, args)) = line.split_once('(')
            && !line.starts_with('#')
        {
            let suffix = args.rsplit(',').next().unwrap_or("").trim().trim_end_matches(')').trim();
            for (_, stem) in stems.iter().filter(|(m, _)| m == mac.trim()) {
                out.push(format!("{stem}{suffix}"));
            }
        }
    }
    out
}

/// A source with [`COMMON`] in front of it.
pub fn full_source(src: &str) -> String {
    format!("{COMMON}\n{src}")
}

/// Compiles source `unit` (one of [`SOURCES`]) to PTX for `arch` (e.g. `compute_86`).
pub fn compile(unit: &'static str, src: &str, arch: &str) -> GpuResult<Ptx> {
    if !nvrtc_present() {
        return Err(GpuError::NoNvrtc);
    }
    let opts = CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        name: Some(format!("{unit}.cu")),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(full_source(src), opts).map_err(|e| {
        let log = match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => other.to_string(),
        };
        GpuError::Compile { unit, arch: arch.to_string(), log }
    })
}

/// One GPU as the inventory reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub compute_capability: (i32, i32),
    /// Measured device-to-device copy rate (bytes read + written per second); 0 if not
    /// measured.
    pub bandwidth_bytes_per_s: f64,
}

/// The GPUs of this machine, each with its copy bandwidth measured (`measure`); an error
/// says why there are none ([`GpuError::NoDriver`], [`GpuError::NoDevice`], ...).
pub fn probe(measure: bool) -> GpuResult<Vec<GpuInfo>> {
    if !driver_present() {
        return Err(GpuError::NoDriver);
    }
    let n = CudaContext::device_count()?;
    if n <= 0 {
        return Err(GpuError::NoDevice);
    }
    let mut out = Vec::new();
    for i in 0..n as usize {
        let ctx = CudaContext::new(i)?;
        let (free, total) = ctx.mem_get_info()?;
        let bandwidth = if measure { copy_bandwidth(&ctx).unwrap_or(0.0) } else { 0.0 };
        out.push(GpuInfo {
            ordinal: i,
            name: ctx.name()?,
            total_bytes: total as u64,
            free_bytes: free as u64,
            compute_capability: ctx.compute_capability()?,
            bandwidth_bytes_per_s: bandwidth,
        });
    }
    Ok(out)
}

/// Device-to-device copies of 256 MiB, best of 5: bytes read + written per second.
fn copy_bandwidth(ctx: &Arc<CudaContext>) -> GpuResult<f64> {
    const BYTES: usize = 256 << 20;
    let stream = ctx.default_stream();
    let src = stream.alloc_zeros::<u8>(BYTES)?;
    let mut dst = stream.alloc_zeros::<u8>(BYTES)?;
    stream.memcpy_dtod(&src, &mut dst)?;
    stream.synchronize()?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        stream.memcpy_dtod(&src, &mut dst)?;
        stream.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * BYTES as f64 / best)
}

/// A device buffer of `T` with its raw address (launches take addresses, so ops can work
/// on a range of a buffer: [`DevBuf::at`]).
#[derive(Debug)]
pub struct DevBuf<T> {
    s: CudaSlice<T>,
    ptr: u64,
}

impl<T: DeviceRepr> DevBuf<T> {
    fn new(s: CudaSlice<T>, stream: &Arc<CudaStream>) -> Self {
        let ptr = {
            let (ptr, _guard) = s.device_ptr(stream);
            ptr
        };
        DevBuf { s, ptr }
    }

    pub fn len(&self) -> usize {
        self.s.len()
    }

    pub fn is_empty(&self) -> bool {
        self.s.len() == 0
    }

    /// The address of element `i` (`i <= len`).
    pub fn at(&self, i: usize) -> u64 {
        debug_assert!(i <= self.len());
        self.ptr + (i * std::mem::size_of::<T>()) as u64
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

/// A weight matrix on the device in its GGUF block format: `rows` rows of `cols`, row `r` at
/// `ptr + r * row_bytes`.
#[derive(Clone, Copy, Debug)]
pub struct MatView {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub ptr: u64,
}

impl MatView {
    pub fn row_bytes(&self) -> usize {
        row_bytes(self.ty, self.cols).unwrap_or(0)
    }

    /// Rows `[r0, r0 + n)`.
    pub fn rows(&self, r0: usize, n: usize) -> MatView {
        MatView { rows: n, ptr: self.ptr + (r0 * self.row_bytes()) as u64, ..*self }
    }
}

/// The weight types the GPU computes with.
pub const TYPES: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// The kernel-name suffix of a weight type the GPU computes with, or `None`.
pub fn type_suffix(ty: GgmlType) -> Option<&'static str> {
    Some(match ty {
        GgmlType::F32 => "f32",
        GgmlType::F16 => "f16",
        GgmlType::BF16 => "bf16",
        GgmlType::Q4_0 => "q4_0",
        GgmlType::Q4_1 => "q4_1",
        GgmlType::Q5_0 => "q5_0",
        GgmlType::Q5_1 => "q5_1",
        GgmlType::Q8_0 => "q8_0",
        GgmlType::Q4_K => "q4_k",
        GgmlType::Q5_K => "q5_k",
        GgmlType::Q6_K => "q6_k",
        _ => return None,
    })
}

/// Whether a `ty` matrix of `cols` columns runs on the GPU (every type above, rows a whole
/// number of 32-element sub-blocks).
pub fn supports(ty: GgmlType, cols: usize) -> bool {
    type_suffix(ty).is_some() && cols.is_multiple_of(32) && row_bytes(ty, cols).is_ok()
}

/// Threads per block of the element-wise kernels.
const EW: u32 = 256;

fn blocks(n: usize, per: usize) -> u32 {
    n.div_ceil(per).max(1) as u32
}

fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// One GPU: context, stream, compiled kernels and staging buffers.
pub struct Gpu {
    pub info: GpuInfo,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    funcs: HashMap<String, CudaFunction>,
    /// Per weight type: its `mv_`, `mm_` and `dequantize_` kernels (looked up once, not per
    /// launch).
    typed: HashMap<GgmlType, [CudaFunction; 3]>,
    /// Page-locked staging for uploads (write-combined) and downloads.
    up: Option<PinnedHostSlice<u8>>,
    down: Option<PinnedHostSlice<u8>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("info", &self.info).finish()
    }
}

impl Gpu {
    /// Opens GPU `ordinal` and compiles every kernel for it (a second or two).
    pub fn open(ordinal: usize) -> GpuResult<Gpu> {
        let info = probe(false)?.into_iter().nth(ordinal).ok_or(GpuError::NoDevice)?;
        let ctx = CudaContext::new(ordinal)?;
        // One stream: launches are ordered, so cudarc's per-buffer events are not needed.
        // SAFETY: nothing of this context is used from another stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let (major, minor) = info.compute_capability;
        let arch = format!("compute_{major}{minor}");
        let mut funcs = HashMap::new();
        for (unit, src) in SOURCES {
            let ptx = compile(unit, src, &arch)?;
            let module = ctx.load_module(ptx)?;
            for name in kernel_names(src) {
                let f = module.load_function(&name)?;
                funcs.insert(name, f);
            }
        }
        let mut typed = HashMap::new();
        for ty in TYPES {
            let s = type_suffix(ty).expect("listed types have kernels");
            let get = |stem: &str| funcs.get(&format!("{stem}{s}")).cloned().ok_or_else(|| GpuError::Unsupported(format!("kernel {stem}{s}")));
            typed.insert(ty, [get("mv_")?, get("mm_")?, get("dequantize_")?]);
        }
        Ok(Gpu { info, ctx, stream, funcs, typed, up: None, down: None })
    }

    /// Kernel `which` (0: `mv_`, 1: `mm_`, 2: `dequantize_`) of a `ty` matrix of `cols`.
    fn typed(&self, ty: GgmlType, cols: usize, which: usize) -> GpuResult<&CudaFunction> {
        self.typed
            .get(&ty)
            .filter(|_| supports(ty, cols))
            .map(|f| &f[which])
            .ok_or_else(|| GpuError::Unsupported(format!("{} weights of {cols} columns", ty.name())))
    }

    fn f(&self, name: &str) -> GpuResult<&CudaFunction> {
        self.funcs.get(name).ok_or_else(|| GpuError::Unsupported(format!("kernel {name}")))
    }

    /// Waits for every queued launch and copy.
    pub fn sync(&self) -> GpuResult<()> {
        Ok(self.stream.synchronize()?)
    }

    /// Device memory (free, total) now.
    pub fn mem_info(&self) -> GpuResult<(usize, usize)> {
        Ok(self.ctx.mem_get_info()?)
    }

    /// A zeroed buffer of `n` elements.
    pub fn alloc<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> GpuResult<DevBuf<T>> {
        let s = self.stream.alloc_zeros::<T>(n.max(1))?;
        Ok(DevBuf::new(s, &self.stream))
    }

    /// A buffer holding a copy of `src` (weights at load time: a pageable copy).
    pub fn upload_new<T: DeviceRepr + ValidAsZeroBits>(&self, src: &[T]) -> GpuResult<DevBuf<T>> {
        if src.is_empty() {
            return self.alloc(1);
        }
        let s = self.stream.clone_htod(src)?;
        Ok(DevBuf::new(s, &self.stream))
    }

    /// Grows `buf` to at least `n` elements (contents not kept).
    pub fn ensure<T: DeviceRepr + ValidAsZeroBits>(&self, buf: &mut DevBuf<T>, n: usize) -> GpuResult<()> {
        if buf.len() < n {
            *buf = self.alloc(n.next_power_of_two())?;
        }
        Ok(())
    }

    fn staging(slot: &mut Option<PinnedHostSlice<u8>>, ctx: &Arc<CudaContext>, bytes: usize, write_combined: bool) -> GpuResult<()> {
        if slot.as_ref().is_none_or(|p| p.len() < bytes) {
            let flags = if write_combined { cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED } else { 0 };
            // SAFETY: page-locked host memory, only used through this struct.
            *slot = Some(unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes.next_power_of_two(), flags)? });
        }
        Ok(())
    }

    /// Copies `src` to `dst` at element `off` through pinned memory (asynchronous on the
    /// stream once staged).
    pub fn upload<T: DeviceRepr + Copy>(&mut self, src: &[T], dst: &DevBuf<T>, off: usize) -> GpuResult<()> {
        if off + src.len() > dst.len() {
            return Err(GpuError::Shape { op: "upload", msg: format!("{} + {} > {}", off, src.len(), dst.len()) });
        }
        let bytes = std::mem::size_of_val(src);
        if bytes == 0 {
            return Ok(());
        }
        // The previous upload may still be reading the staging buffer.
        self.stream.synchronize()?;
        Self::staging(&mut self.up, &self.ctx, bytes, true)?;
        let pin = self.up.as_mut().expect("staged");
        let host = pin.as_mut_slice()?;
        // SAFETY: plain-old-data `T` viewed as bytes.
        let raw = unsafe { std::slice::from_raw_parts(src.as_ptr() as *const u8, bytes) };
        host[..bytes].copy_from_slice(raw);
        // SAFETY: `dst` holds `off + src.len()` elements (checked above); the pinned buffer
        // outlives the copy (the next use of it synchronizes on its event).
        unsafe {
            cudarc::driver::result::memcpy_htod_async(dst.at(off), &host[..bytes], self.stream.cu_stream())?;
        }
        Ok(())
    }

    /// Copies `dst.len()` elements of `src` from element `off`, waiting for the stream.
    pub fn download<T: DeviceRepr + Copy>(&mut self, src: &DevBuf<T>, off: usize, dst: &mut [T]) -> GpuResult<()> {
        if off + dst.len() > src.len() {
            return Err(GpuError::Shape { op: "download", msg: format!("{} + {} > {}", off, dst.len(), src.len()) });
        }
        let bytes = std::mem::size_of_val(dst);
        if bytes == 0 {
            return Ok(());
        }
        Self::staging(&mut self.down, &self.ctx, bytes, false)?;
        let pin = self.down.as_mut().expect("staged");
        let host = pin.as_mut_slice()?;
        // SAFETY: `src` holds the range (checked above); synchronized before reading.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut host[..bytes], src.at(off), self.stream.cu_stream())?;
        }
        self.stream.synchronize()?;
        // SAFETY: plain-old-data `T` viewed as bytes.
        let out = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut u8, bytes) };
        out.copy_from_slice(&host[..bytes]);
        Ok(())
    }

    /// Device-to-device copy of `n` elements.
    pub fn copy<T: DeviceRepr>(&self, src: u64, dst: u64, n: usize) -> GpuResult<()> {
        if n == 0 {
            return Ok(());
        }
        // SAFETY: callers pass addresses of live buffers holding `n` elements.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(dst, src, n * std::mem::size_of::<T>(), self.stream.cu_stream())?;
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Matrices

    /// Bytes of activations `n × cols` quantized for weights of type `ty`.
    pub fn act_bytes(ty: GgmlType, cols: usize, n: usize) -> usize {
        row_bytes(ty.vec_dot_type(), cols).unwrap_or(0) * n
    }

    /// `y: (n, w.rows) = x: (n, w.cols) · wᵀ`, quantizing `x` into `q` first (grown as
    /// needed) exactly as the CPU does. `x` and `y` are addresses of f32 rows.
    pub fn matmul(&self, w: &MatView, x: u64, n: usize, y: u64, q: &mut DevBuf<u8>) -> GpuResult<()> {
        // Decode (a few tokens): one launch row per token; prefill: 8 tokens per weight read.
        let (which, grid_y) = if n < 4 { (0, n) } else { (1, n.div_ceil(8)) };
        let f = self.typed(w.ty, w.cols, which)?;
        if n == 0 || w.rows == 0 {
            return Ok(());
        }
        let vdt = w.ty.vec_dot_type();
        let arb = row_bytes(vdt, w.cols).map_err(|e| GpuError::Shape { op: "matmul", msg: e.to_string() })?;
        let a = if vdt == GgmlType::F32 {
            x
        } else {
            self.ensure(q, arb * n)?;
            self.quantize(vdt, x, w.cols, n, q.ptr())?;
            q.ptr()
        };
        let wrb = w.row_bytes() as i64;
        let (rows, cols, nn, arb) = (w.rows as i32, w.cols as i32, n as i32, arb as i64);
        const WARPS: usize = 4;
        let mut b = self.stream.launch_builder(f);
        b.arg(&w.ptr).arg(&a).arg(&y).arg(&rows).arg(&cols).arg(&nn).arg(&wrb).arg(&arb);
        // SAFETY: the kernel reads `rows` weight rows and `n` activation rows and writes
        // `(n, rows)` floats at `y`; callers size the buffers.
        unsafe { b.launch(cfg((blocks(w.rows, WARPS), grid_y as u32, 1), (WARPS * 32) as u32)) }?;
        Ok(())
    }

    /// Quantizes `(n, cols)` f32 rows at `x` into format `ty` (a vec_dot_type) at `out`.
    pub fn quantize(&self, ty: GgmlType, x: u64, cols: usize, n: usize, out: u64) -> GpuResult<()> {
        let (c, nn) = (cols as i32, n as i32);
        match ty {
            GgmlType::Q8_0 | GgmlType::Q8_1 | GgmlType::Q8_K => {
                let (name, per) = match ty {
                    GgmlType::Q8_0 => ("quantize_q8_0", 32),
                    GgmlType::Q8_1 => ("quantize_q8_1", 32),
                    _ => ("quantize_q8_k", 256),
                };
                let warps = (cols / per) * n;
                let mut b = self.stream.launch_builder(self.f(name)?);
                b.arg(&x).arg(&out).arg(&c).arg(&nn);
                // SAFETY: `warps` blocks of `per` elements in, the same blocks out.
                unsafe { b.launch(cfg((blocks(warps, 8), 1, 1), 256)) }?;
            }
            GgmlType::F16 | GgmlType::BF16 => {
                let count = (cols * n) as i64;
                let name = if ty == GgmlType::F16 { "quantize_f16" } else { "quantize_bf16" };
                let mut b = self.stream.launch_builder(self.f(name)?);
                b.arg(&x).arg(&out).arg(&count);
                // SAFETY: `count` elements in and out.
                unsafe { b.launch(cfg((blocks(count as usize, EW as usize), 1, 1), EW)) }?;
            }
            _ => return Err(GpuError::Unsupported(format!("activations as {}", ty.name()))),
        }
        Ok(())
    }

    /// Rows of `w` dequantized to f32: row `ids[t]` into row t of `y` (`ids`: device u32s),
    /// or rows `0..n` when `ids` is 0.
    pub fn dequantize_rows(&self, w: &MatView, ids: u64, n: usize, y: u64) -> GpuResult<()> {
        let f = self.typed(w.ty, w.cols, 2)?;
        let (c, nn, wrb) = (w.cols as i32, n as i32, w.row_bytes() as i64);
        let mut b = self.stream.launch_builder(f);
        b.arg(&w.ptr).arg(&ids).arg(&y).arg(&c).arg(&nn).arg(&wrb);
        // SAFETY: `n` rows of `cols` out; ids (when given) index rows of `w`.
        unsafe { b.launch(cfg((blocks(n * w.cols / 32, 128), 1, 1), 128)) }?;
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Element-wise and row-wise ops (shapes as in `ops.rs`)

    /// RMSNorm of `n` rows of `dim` at `x` into `y`, weight `w` of `wdim` (= dim, or head_dim
    /// for per-head norms) floats.
    pub fn rms_norm(&self, x: u64, w: u64, y: u64, n: usize, dim: usize, wdim: usize, eps: f32) -> GpuResult<()> {
        if n == 0 {
            return Ok(());
        }
        let (d, wd) = (dim as i32, wdim as i32);
        let mut b = self.stream.launch_builder(self.f("rms_norm")?);
        b.arg(&x).arg(&w).arg(&y).arg(&d).arg(&wd).arg(&eps);
        // SAFETY: `n` rows of `dim` in and out.
        unsafe { b.launch(cfg((n as u32, 1, 1), 256)) }?;
        Ok(())
    }

    /// RoPE in place on `(n, n_heads * head_dim)` at `x` with `(n, n_rot)` cos/sin rows at `cs`.
    pub fn rope(&self, x: u64, cs: u64, n: usize, n_heads: usize, head_dim: usize, n_rot: usize, neox: bool) -> GpuResult<()> {
        if n == 0 || n_heads == 0 || n_rot == 0 {
            return Ok(());
        }
        if n_rot / 2 > 1024 || n_rot > head_dim {
            return Err(GpuError::Shape { op: "rope", msg: format!("n_rot {n_rot}, head_dim {head_dim}") });
        }
        let (h, hd, r, nx) = (n_heads as i32, head_dim as i32, n_rot as i32, neox as i32);
        let mut b = self.stream.launch_builder(self.f("rope")?);
        b.arg(&x).arg(&cs).arg(&h).arg(&hd).arg(&r).arg(&nx);
        // SAFETY: `n` tokens of `n_heads` heads in place.
        unsafe { b.launch(cfg((n as u32, n_heads as u32, 1), (n_rot / 2) as u32)) }?;
        Ok(())
    }

    fn elementwise(&self, name: &str, a: u64, b2: u64, count: usize) -> GpuResult<()> {
        if count == 0 {
            return Ok(());
        }
        let c = count as i64;
        let mut b = self.stream.launch_builder(self.f(name)?);
        b.arg(&a).arg(&b2).arg(&c);
        // SAFETY: `count` elements of each.
        unsafe { b.launch(cfg((blocks(count, EW as usize), 1, 1), EW)) }?;
        Ok(())
    }

    /// `g = silu(g) * u` over `count` floats.
    pub fn swiglu(&self, g: u64, u: u64, count: usize) -> GpuResult<()> {
        self.elementwise("swiglu", g, u, count)
    }

    /// `x += y` over `count` floats.
    pub fn add(&self, x: u64, y: u64, count: usize) -> GpuResult<()> {
        self.elementwise("add", x, y, count)
    }

    /// f32 → f16 of `count` values (a KV cache append).
    pub fn f32_to_f16(&self, src: u64, dst: u64, count: usize) -> GpuResult<()> {
        self.elementwise("f32_to_f16", src, dst, count)
    }

    /// Adds the `dim` floats at `bias` to each of the `count / dim` rows at `x`.
    pub fn add_bias(&self, x: u64, bias: u64, dim: usize, count: usize) -> GpuResult<()> {
        if count == 0 {
            return Ok(());
        }
        let (d, c) = (dim as i32, count as i64);
        let mut b = self.stream.launch_builder(self.f("add_bias")?);
        b.arg(&x).arg(&bias).arg(&d).arg(&c);
        // SAFETY: `count` floats of `x`, `dim` of `bias`.
        unsafe { b.launch(cfg((blocks(count, EW as usize), 1, 1), EW)) }?;
        Ok(())
    }

    /// `gather_rows` / `scatter_rows`: `n` rows of `dim` moved by the u32 indices at `ids`.
    pub fn move_rows(&self, scatter: bool, x: u64, ids: u64, y: u64, dim: usize, n: usize) -> GpuResult<()> {
        if n == 0 {
            return Ok(());
        }
        let (d, nn) = (dim as i32, n as i32);
        let mut b = self.stream.launch_builder(self.f(if scatter { "scatter_rows" } else { "gather_rows" })?);
        b.arg(&x).arg(&ids).arg(&y).arg(&d).arg(&nn);
        // SAFETY: `n` rows of `dim`; indices are rows of the other side.
        unsafe { b.launch(cfg((blocks(n * dim, EW as usize), 1, 1), EW)) }?;
        Ok(())
    }

    /// Routed experts' outputs `ys: (n·k, dim)` weighted by `w: (n·k)` into `out: (n, dim)`.
    pub fn moe_combine(&self, ys: u64, w: u64, out: u64, k: usize, dim: usize, n: usize) -> GpuResult<()> {
        if n == 0 {
            return Ok(());
        }
        let (kk, d, nn) = (k as i32, dim as i32, n as i32);
        let mut b = self.stream.launch_builder(self.f("moe_combine")?);
        b.arg(&ys).arg(&w).arg(&out).arg(&kk).arg(&d).arg(&nn);
        // SAFETY: shapes as documented.
        unsafe { b.launch(cfg((blocks(n * dim, EW as usize), 1, 1), EW)) }?;
        Ok(())
    }

    /// Causal attention of a chunk of `n_tok` tokens at positions `n_past..` over the f16 KV
    /// cache of one layer (`k`, `v`: `(positions, n_kv·hd)`), `q` and `out`: `(n_tok, n_head·hd)`.
    pub fn attention(&self, q: u64, k: u64, v: u64, out: u64, n_tok: usize, n_past: usize, n_head: usize, n_kv: usize, hd: usize, scale: f32) -> GpuResult<()> {
        if n_tok == 0 || n_head == 0 {
            return Ok(());
        }
        if hd > 256 || n_kv == 0 || !n_head.is_multiple_of(n_kv) {
            return Err(GpuError::Shape { op: "attention", msg: format!("{n_head} heads, {n_kv} KV heads of {hd}") });
        }
        let (p, h, kv, d) = (n_past as i32, n_head as i32, n_kv as i32, hd as i32);
        let mut b = self.stream.launch_builder(self.f("attention")?);
        b.arg(&q).arg(&k).arg(&v).arg(&out).arg(&p).arg(&h).arg(&kv).arg(&d).arg(&scale);
        // SAFETY: the cache holds `n_past + n_tok` positions; shapes as documented.
        unsafe { b.launch(cfg((n_head as u32, n_tok as u32, 1), 128)) }?;
        Ok(())
    }

    /// The activation codec on the device: encodes `(n, dim)` f32 at `x` into `out` (BF16: n·dim
    /// u16; Q8: n f32 scales then n·dim i8), byte-identical to [`crate::codec::encode`].
    pub fn encode(&self, codec: crate::codec::Codec, x: u64, n: usize, dim: usize, out: u64) -> GpuResult<()> {
        use crate::codec::Codec;
        match codec {
            Codec::F32 => self.copy::<f32>(x, out, n * dim),
            Codec::Bf16 => self.elementwise("quantize_bf16", x, out, n * dim),
            Codec::Q8 => {
                if n == 0 {
                    return Ok(());
                }
                let (d, nn) = (dim as i32, n as i32);
                let mut b = self.stream.launch_builder(self.f("encode_q8")?);
                b.arg(&x).arg(&out).arg(&d).arg(&nn);
                // SAFETY: `n` rows in; `n·(4 + dim)` bytes out.
                unsafe { b.launch(cfg((n as u32, 1, 1), 256)) }?;
                Ok(())
            }
        }
    }

    /// Decodes a frame (already checked by [`crate::codec::decode`]'s rules on the host) at
    /// `bytes` into `(n, dim)` f32 at `x`.
    pub fn decode(&self, codec: crate::codec::Codec, bytes: u64, n: usize, dim: usize, x: u64) -> GpuResult<()> {
        use crate::codec::Codec;
        match codec {
            Codec::F32 => self.copy::<f32>(bytes, x, n * dim),
            Codec::Bf16 => self.elementwise("decode_bf16", bytes, x, n * dim),
            Codec::Q8 => {
                if n == 0 {
                    return Ok(());
                }
                let (d, nn) = (dim as i32, n as i32);
                let mut b = self.stream.launch_builder(self.f("decode_q8")?);
                b.arg(&bytes).arg(&x).arg(&d).arg(&nn);
                // SAFETY: `n·(4 + dim)` bytes in, `n·dim` floats out.
                unsafe { b.launch(cfg((blocks(n * dim, EW as usize), 1, 1), EW)) }?;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests;
