//! The shard executor's GPU path (feature `cuda`): the same decoder block as
//! [`crate::executor`], run with `shoal_kernels::cuda` on one NVIDIA GPU.
//!
//! At load the shard's matrices are copied to device memory as stored in the GGUF file (the
//! kernels compute on the blocks; nothing is dequantized ahead of time), with the norm
//! weights and biases as f32. The token embedding stays in host memory: a step dequantizes
//! its rows on the CPU and uploads `(n, n_embd)` floats. Each sequence's KV cache lives on the
//! device as f16, grown in steps up to `n_ctx`. Routed experts run on the device, or in host
//! RAM with the CPU kernels ([`ExpertPlacement::HostRam`], for MoE models whose experts do
//! not fit the GPU), or on a remote expert host; the router always runs on the device and the
//! top-k choice is made on the host by the CPU path's own code, so every placement routes the
//! same way.
//!
//! The numerics follow the CPU path: activations are quantized to the same integers before
//! each product, RoPE uses the CPU's cos/sin rows, and the experts are combined in slot order.
//! What differs is the order of f32 additions (a warp reduces in a tree) and attention, which
//! is an f32 online softmax here; the kernel tests state the tolerances.

use std::collections::HashMap;

use shoal_kernels::ThreadPool;
use shoal_kernels::cuda::{DevBuf, Gpu, GpuError, MatView, supports};
use shoal_kernels::ops::RopeCache;

use crate::arch::RopeKind;
use crate::executor::{ExpertScratch, RemoteExperts, SeqChunk, StageInput, StageOutput, route, run_experts, stage_input};
use crate::weights::{Matrix, Weights};
use crate::{Error, Result};

fn gerr(e: GpuError) -> Error {
    Error::Gpu(e.to_string())
}

/// Where a GPU shard's routed experts live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ExpertPlacement {
    /// In GPU memory with the rest of the layer.
    #[default]
    Gpu,
    /// In host RAM (the mapped file), run by the CPU kernels; the router stays on the GPU.
    HostRam,
}

impl std::str::FromStr for ExpertPlacement {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "gpu" => Ok(ExpertPlacement::Gpu),
            "host" | "cpu" => Ok(ExpertPlacement::HostRam),
            _ => Err(format!("unknown expert placement {s:?} (expected gpu or host)")),
        }
    }
}

/// A matrix in device memory.
struct DMat {
    _buf: DevBuf<u8>,
    v: MatView,
}

struct GpuLayer {
    attn_norm: DevBuf<f32>,
    wq: DMat,
    wk: DMat,
    wv: DMat,
    wo: DMat,
    bias: Option<[DevBuf<f32>; 3]>,
    qk_norm: Option<[DevBuf<f32>; 2]>,
    ffn_norm: DevBuf<f32>,
    /// Dense FFN, or every expert stacked; `None` when the experts stay in host RAM.
    ffn: Option<[DMat; 3]>,
    router: Option<DMat>,
}

/// One sequence's KV cache: per layer, `cap` positions of `kv_dim` f16 values.
struct Cache {
    cap: usize,
    k: Vec<DevBuf<u16>>,
    v: Vec<DevBuf<u16>>,
}

/// Device activation buffers, grown to the largest step seen.
struct Bufs {
    x: DevBuf<f32>,
    xn: DevBuf<f32>,
    q: DevBuf<f32>,
    k: DevBuf<f32>,
    v: DevBuf<f32>,
    att: DevBuf<f32>,
    tmp: DevBuf<f32>,
    gate: DevBuf<f32>,
    up: DevBuf<f32>,
    cs: DevBuf<f32>,
    logits: DevBuf<f32>,
    /// Routed experts: per-(token, slot) outputs, their weights, gathered inputs, outputs.
    ys: DevBuf<f32>,
    wts: DevBuf<f32>,
    gx: DevBuf<f32>,
    gy: DevBuf<f32>,
    quant: DevBuf<u8>,
    ids: DevBuf<u32>,
}

/// Host-side buffers of a step.
#[derive(Default)]
struct HostBufs {
    x: Vec<f32>,
    cs: Vec<f32>,
    router: Vec<f32>,
    chosen: Vec<(usize, f32)>,
    xn: Vec<f32>,
    tmp: Vec<f32>,
    ids: Vec<u32>,
    wts: Vec<f32>,
    experts: ExpertScratch,
}

/// A shard's weights, KV caches and buffers on one GPU.
pub struct GpuShard {
    g: Gpu,
    layers: Vec<GpuLayer>,
    output: Option<(DevBuf<f32>, DMat)>,
    caches: HashMap<u64, Cache>,
    b: Bufs,
    h: HostBufs,
    n_ctx: usize,
    experts: ExpertPlacement,
    weight_bytes: u64,
}

impl std::fmt::Debug for GpuShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuShard").field("gpu", &self.g.info.name).field("weight_bytes", &self.weight_bytes).finish()
    }
}

fn upload_mat(g: &Gpu, w: &Weights, m: &Matrix, what: &str, bytes: &mut u64) -> Result<DMat> {
    if !supports(m.ty, m.cols) {
        return Err(Error::Gpu(format!("{what}: {} × {} of {} does not run on the GPU", m.rows, m.cols, m.ty.name())));
    }
    let data = w.qmatrix(m).data;
    *bytes += data.len() as u64;
    let buf = g.upload_new(data).map_err(|e| Error::Gpu(format!("{what}: {e}")))?;
    Ok(DMat { v: MatView { ty: m.ty, rows: m.rows, cols: m.cols, ptr: buf.ptr() }, _buf: buf })
}

fn upload_vec(g: &Gpu, v: &[f32], bytes: &mut u64) -> Result<DevBuf<f32>> {
    *bytes += (v.len() * 4) as u64;
    g.upload_new(v).map_err(gerr)
}

impl GpuShard {
    /// Copies `w`'s layers and head to GPU `ordinal` (opening it and compiling the kernels).
    pub fn load(w: &Weights, ordinal: usize, n_ctx: usize, experts: ExpertPlacement) -> Result<GpuShard> {
        if w.tp.is_some() {
            return Err(Error::Gpu("a tensor-parallel rank runs on the CPU path".into()));
        }
        let g = Gpu::open(ordinal).map_err(gerr)?;
        let c = &w.config;
        if c.head_dim > 256 || !c.n_rot.is_multiple_of(2) {
            return Err(Error::Gpu(format!("head_dim {} / n_rot {} do not run on the GPU", c.head_dim, c.n_rot)));
        }
        let mut bytes = 0u64;
        let mut layers = Vec::with_capacity(w.layers.len());
        for (i, lw) in w.layers.iter().enumerate() {
            let l = w.spec.layers.start + i;
            let m = |m: &Matrix, name: &str, bytes: &mut u64| upload_mat(&g, w, m, &format!("blk.{l}.{name}"), bytes);
            let bias = match (&lw.bq, &lw.bk, &lw.bv) {
                (Some(q), Some(k), Some(v)) => Some([upload_vec(&g, q, &mut bytes)?, upload_vec(&g, k, &mut bytes)?, upload_vec(&g, v, &mut bytes)?]),
                _ => None,
            };
            let qk_norm = match (&lw.q_norm, &lw.k_norm) {
                (Some(q), Some(k)) => Some([upload_vec(&g, q, &mut bytes)?, upload_vec(&g, k, &mut bytes)?]),
                _ => None,
            };
            let ffn = if lw.moe.is_some() && experts == ExpertPlacement::HostRam {
                None
            } else {
                Some([m(&lw.w_gate, "ffn_gate", &mut bytes)?, m(&lw.w_up, "ffn_up", &mut bytes)?, m(&lw.w_down, "ffn_down", &mut bytes)?])
            };
            let router = match &lw.moe {
                Some(moe) => Some(m(&moe.router, "ffn_gate_inp", &mut bytes)?),
                None => None,
            };
            layers.push(GpuLayer {
                attn_norm: upload_vec(&g, &lw.attn_norm, &mut bytes)?,
                wq: m(&lw.wq, "attn_q", &mut bytes)?,
                wk: m(&lw.wk, "attn_k", &mut bytes)?,
                wv: m(&lw.wv, "attn_v", &mut bytes)?,
                wo: m(&lw.wo, "attn_output", &mut bytes)?,
                bias,
                qk_norm,
                ffn_norm: upload_vec(&g, &lw.ffn_norm, &mut bytes)?,
                ffn,
                router,
            });
        }
        let output = match (&w.output_norm, &w.output) {
            (Some(norm), Some(out)) => Some((upload_vec(&g, norm, &mut bytes)?, upload_mat(&g, w, out, "output", &mut bytes)?)),
            _ => None,
        };
        let a = |g: &Gpu| g.alloc::<f32>(1).map_err(gerr);
        let b = Bufs {
            x: a(&g)?,
            xn: a(&g)?,
            q: a(&g)?,
            k: a(&g)?,
            v: a(&g)?,
            att: a(&g)?,
            tmp: a(&g)?,
            gate: a(&g)?,
            up: a(&g)?,
            cs: a(&g)?,
            logits: a(&g)?,
            ys: a(&g)?,
            wts: a(&g)?,
            gx: a(&g)?,
            gy: a(&g)?,
            quant: g.alloc::<u8>(1).map_err(gerr)?,
            ids: g.alloc::<u32>(1).map_err(gerr)?,
        };
        g.sync().map_err(gerr)?;
        Ok(GpuShard { g, layers, output, caches: HashMap::new(), b, h: HostBufs::default(), n_ctx, experts, weight_bytes: bytes })
    }

    /// The device's name.
    pub fn device_name(&self) -> &str {
        &self.g.info.name
    }

    /// Bytes of weights copied to the device.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Where the routed experts run.
    pub fn experts(&self) -> ExpertPlacement {
        self.experts
    }

    /// Starts (or resets) a sequence's cache; device memory is taken at its first step.
    pub fn add_sequence(&mut self, seq: u64) {
        self.caches.insert(seq, Cache { cap: 0, k: Vec::new(), v: Vec::new() });
    }

    pub fn release(&mut self, seq: u64) {
        self.caches.remove(&seq);
    }

    /// Bytes of device memory the KV caches hold.
    pub fn kv_bytes(&self, kv_dim: usize) -> usize {
        self.caches.values().map(|c| c.cap * kv_dim * 2 * 2 * c.k.len()).sum()
    }

    /// Grows a cache to hold `need` positions, keeping its first `keep`.
    fn reserve(g: &Gpu, cache: &mut Cache, n_layers: usize, kv_dim: usize, need: usize, keep: usize, n_ctx: usize) -> Result<()> {
        if cache.cap >= need && cache.k.len() == n_layers {
            return Ok(());
        }
        let cap = need.max(cache.cap * 2).max(256).min(n_ctx.max(need));
        let mut k = Vec::with_capacity(n_layers);
        let mut v = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            let (nk, nv) = (g.alloc::<u16>(cap * kv_dim).map_err(gerr)?, g.alloc::<u16>(cap * kv_dim).map_err(gerr)?);
            if let (Some(ok), Some(ov)) = (cache.k.get(l), cache.v.get(l)) {
                g.copy::<u16>(ok.ptr(), nk.ptr(), keep * kv_dim).map_err(gerr)?;
                g.copy::<u16>(ov.ptr(), nv.ptr(), keep * kv_dim).map_err(gerr)?;
            }
            k.push(nk);
            v.push(nv);
        }
        cache.k = k;
        cache.v = v;
        cache.cap = cap;
        Ok(())
    }

    /// One step (see [`crate::executor::ShardExecutor::forward`]); `n_past[i]` is chunk i's
    /// position before the step. Chunks are checked by the caller.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        w: &Weights,
        rope: &RopeCache,
        chunks: &[SeqChunk],
        n_past: &[usize],
        input: StageInput<'_>,
        pool: &ThreadPool,
        mut remote: Option<&mut Box<dyn RemoteExperts>>,
        expert_tokens: &mut Vec<u64>,
    ) -> Result<StageOutput> {
        let c = &w.config;
        let (e, hd) = (c.n_embd, c.head_dim);
        let (n_head, n_kv) = (c.n_head, c.n_head_kv);
        let (qd, kvd) = (n_head * hd, n_kv * hd);
        let n: usize = chunks.iter().map(|ch| ch.n_tokens).sum();
        let (g, b, h) = (&mut self.g, &mut self.b, &mut self.h);

        // Input rows on the host (the CPU path's own checks), then one upload.
        h.x.resize(n * e, 0.0);
        stage_input(w, input, n, &mut h.x)?;
        for (buf, len) in [(&mut b.x, n * e), (&mut b.xn, n * e), (&mut b.tmp, n * e), (&mut b.q, n * qd), (&mut b.att, n * qd), (&mut b.k, n * kvd), (&mut b.v, n * kvd)] {
            g.ensure(buf, len).map_err(gerr)?;
        }
        g.upload(&h.x, &b.x, 0).map_err(gerr)?;

        // RoPE angles of every token, from the CPU's table.
        let n_rot = rope.n_rot();
        h.cs.resize(n * n_rot, 0.0);
        let mut t = 0;
        for (ch, &p0) in chunks.iter().zip(n_past) {
            for j in 0..ch.n_tokens {
                rope.cos_sin(p0 + j, &mut h.cs[t * n_rot..(t + 1) * n_rot]);
                t += 1;
            }
        }
        g.ensure(&mut b.cs, n * n_rot).map_err(gerr)?;
        g.upload(&h.cs, &b.cs, 0).map_err(gerr)?;
        for (ch, &p0) in chunks.iter().zip(n_past) {
            let cache = self.caches.get_mut(&ch.seq).ok_or(Error::UnknownSequence(ch.seq))?;
            Self::reserve(g, cache, self.layers.len(), kvd, p0 + ch.n_tokens, p0, self.n_ctx)?;
        }

        let eps = c.rms_eps;
        let scale = 1.0 / (hd as f32).sqrt();
        let neox = c.traits.rope == RopeKind::Neox;
        for (li, (lw, gl)) in w.layers.iter().zip(&self.layers).enumerate() {
            // Attention block.
            g.rms_norm(b.x.ptr(), gl.attn_norm.ptr(), b.xn.ptr(), n, e, e, eps).map_err(gerr)?;
            g.matmul(&gl.wq.v, b.xn.ptr(), n, b.q.ptr(), &mut b.quant).map_err(gerr)?;
            g.matmul(&gl.wk.v, b.xn.ptr(), n, b.k.ptr(), &mut b.quant).map_err(gerr)?;
            g.matmul(&gl.wv.v, b.xn.ptr(), n, b.v.ptr(), &mut b.quant).map_err(gerr)?;
            if let Some([bq, bk, bv]) = &gl.bias {
                g.add_bias(b.q.ptr(), bq.ptr(), qd, n * qd).map_err(gerr)?;
                g.add_bias(b.k.ptr(), bk.ptr(), kvd, n * kvd).map_err(gerr)?;
                g.add_bias(b.v.ptr(), bv.ptr(), kvd, n * kvd).map_err(gerr)?;
            }
            if let Some([qn, kn]) = &gl.qk_norm {
                g.rms_norm(b.q.ptr(), qn.ptr(), b.q.ptr(), n * n_head, hd, hd, eps).map_err(gerr)?;
                g.rms_norm(b.k.ptr(), kn.ptr(), b.k.ptr(), n * n_kv, hd, hd, eps).map_err(gerr)?;
            }
            g.rope(b.q.ptr(), b.cs.ptr(), n, n_head, hd, n_rot, neox).map_err(gerr)?;
            g.rope(b.k.ptr(), b.cs.ptr(), n, n_kv, hd, n_rot, neox).map_err(gerr)?;
            let mut t0 = 0;
            for (ch, &p0) in chunks.iter().zip(n_past) {
                let cache = &self.caches[&ch.seq];
                let nt = ch.n_tokens;
                g.f32_to_f16(b.k.at(t0 * kvd), cache.k[li].at(p0 * kvd), nt * kvd).map_err(gerr)?;
                g.f32_to_f16(b.v.at(t0 * kvd), cache.v[li].at(p0 * kvd), nt * kvd).map_err(gerr)?;
                g.attention(b.q.at(t0 * qd), cache.k[li].ptr(), cache.v[li].ptr(), b.att.at(t0 * qd), nt, p0, n_head, n_kv, hd, scale).map_err(gerr)?;
                t0 += nt;
            }
            g.matmul(&gl.wo.v, b.att.ptr(), n, b.tmp.ptr(), &mut b.quant).map_err(gerr)?;
            g.add(b.x.ptr(), b.tmp.ptr(), n * e).map_err(gerr)?;

            // Feed-forward block.
            g.rms_norm(b.x.ptr(), gl.ffn_norm.ptr(), b.xn.ptr(), n, e, e, eps).map_err(gerr)?;
            match (&lw.moe, &gl.ffn) {
                (None, Some([gate, up, down])) => {
                    let ff = gate.v.rows;
                    g.ensure(&mut b.gate, n * ff).map_err(gerr)?;
                    g.ensure(&mut b.up, n * ff).map_err(gerr)?;
                    g.matmul(&gate.v, b.xn.ptr(), n, b.gate.ptr(), &mut b.quant).map_err(gerr)?;
                    g.matmul(&up.v, b.xn.ptr(), n, b.up.ptr(), &mut b.quant).map_err(gerr)?;
                    g.swiglu(b.gate.ptr(), b.up.ptr(), n * ff).map_err(gerr)?;
                    g.matmul(&down.v, b.gate.ptr(), n, b.tmp.ptr(), &mut b.quant).map_err(gerr)?;
                }
                (Some(moe), ffn) => {
                    let (ne, k) = (moe.n_expert, moe.n_used);
                    let router = gl.router.as_ref().expect("loaded with the layer");
                    g.ensure(&mut b.logits, n * ne).map_err(gerr)?;
                    g.matmul(&router.v, b.xn.ptr(), n, b.logits.ptr(), &mut b.quant).map_err(gerr)?;
                    h.router.resize(n * ne, 0.0);
                    g.download(&b.logits, 0, &mut h.router).map_err(gerr)?;
                    route(&mut h.router, ne, k, &mut h.chosen, expert_tokens);
                    match (ffn, remote.as_mut()) {
                        (Some(ffn), None) => Self::device_experts(g, b, h, ffn, ne, k, e, n)?,
                        (_, remote) => {
                            // Experts in host RAM or on an expert host: xn down, output up.
                            h.xn.resize(n * e, 0.0);
                            g.download(&b.xn, 0, &mut h.xn).map_err(gerr)?;
                            h.tmp.resize(n * e, 0.0);
                            let layer = w.spec.layers.start + li;
                            match remote {
                                Some(r) => r.run(layer, &h.xn, n, &h.chosen, &mut h.tmp)?,
                                None => run_experts(pool, w, lw, moe, &h.xn, n, &h.chosen, &mut h.tmp, &mut h.experts),
                            }
                            g.upload(&h.tmp, &b.tmp, 0).map_err(gerr)?;
                        }
                    }
                }
                (None, None) => unreachable!("a dense layer always has its FFN on the device"),
            }
            g.add(b.x.ptr(), b.tmp.ptr(), n * e).map_err(gerr)?;
        }

        let Some((norm, out)) = &self.output else {
            let mut hidden = vec![0f32; n * e];
            g.download(&b.x, 0, &mut hidden).map_err(gerr)?;
            return Ok(StageOutput::Hidden(hidden));
        };
        // The last token of each chunk: gather, norm, head.
        let nc = chunks.len();
        h.ids.clear();
        let mut t_last = 0;
        for ch in chunks {
            t_last += ch.n_tokens;
            h.ids.push((t_last - 1) as u32);
        }
        g.ensure(&mut b.ids, nc).map_err(gerr)?;
        g.upload(&h.ids, &b.ids, 0).map_err(gerr)?;
        g.ensure(&mut b.gx, nc * e).map_err(gerr)?;
        g.move_rows(false, b.x.ptr(), b.ids.ptr(), b.gx.ptr(), e, nc).map_err(gerr)?;
        g.rms_norm(b.gx.ptr(), norm.ptr(), b.gx.ptr(), nc, e, e, eps).map_err(gerr)?;
        let vocab = out.v.rows;
        g.ensure(&mut b.logits, nc * vocab).map_err(gerr)?;
        g.matmul(&out.v, b.gx.ptr(), nc, b.logits.ptr(), &mut b.quant).map_err(gerr)?;
        let mut logits = vec![0f32; nc * vocab];
        g.download(&b.logits, 0, &mut logits).map_err(gerr)?;
        Ok(StageOutput::Logits(logits))
    }

    /// Routed experts on the device: each chosen expert runs its SwiGLU once over the tokens
    /// routed to it; outputs land in their (token, slot) rows and are combined in slot order.
    #[allow(clippy::too_many_arguments)]
    fn device_experts(g: &mut Gpu, b: &mut Bufs, h: &mut HostBufs, ffn: &[DMat; 3], ne: usize, k: usize, e: usize, n: usize) -> Result<()> {
        let [gate, up, down] = ffn;
        let ff = gate.v.rows / ne;
        let pairs = n * k;
        // (token, slot) pairs grouped by expert: token indices, then slot rows, in one upload.
        let mut by: Vec<usize> = (0..pairs).collect();
        by.sort_by_key(|&i| h.chosen[i].0);
        h.ids.clear();
        h.ids.extend(by.iter().map(|&i| (i / k) as u32));
        h.ids.extend(by.iter().map(|&i| i as u32));
        h.wts.clear();
        h.wts.extend(h.chosen.iter().map(|c| c.1));
        g.ensure(&mut b.ids, 2 * pairs).map_err(gerr)?;
        g.upload(&h.ids, &b.ids, 0).map_err(gerr)?;
        g.ensure(&mut b.wts, pairs).map_err(gerr)?;
        g.upload(&h.wts, &b.wts, 0).map_err(gerr)?;
        for buf in [&mut b.ys, &mut b.gx, &mut b.gy] {
            g.ensure(buf, pairs * e).map_err(gerr)?;
        }
        g.ensure(&mut b.gate, pairs * ff).map_err(gerr)?;
        g.ensure(&mut b.up, pairs * ff).map_err(gerr)?;
        let mut j0 = 0;
        for group in by.chunk_by(|&a, &c| h.chosen[a].0 == h.chosen[c].0) {
            let (x, m) = (h.chosen[group[0]].0, group.len());
            g.move_rows(false, b.xn.ptr(), b.ids.at(j0), b.gx.ptr(), e, m).map_err(gerr)?;
            g.matmul(&gate.v.rows(x * ff, ff), b.gx.ptr(), m, b.gate.ptr(), &mut b.quant).map_err(gerr)?;
            g.matmul(&up.v.rows(x * ff, ff), b.gx.ptr(), m, b.up.ptr(), &mut b.quant).map_err(gerr)?;
            g.swiglu(b.gate.ptr(), b.up.ptr(), m * ff).map_err(gerr)?;
            g.matmul(&down.v.rows(x * e, e), b.gate.ptr(), m, b.gy.ptr(), &mut b.quant).map_err(gerr)?;
            g.move_rows(true, b.gy.ptr(), b.ids.at(pairs + j0), b.ys.ptr(), e, m).map_err(gerr)?;
            j0 += m;
        }
        g.moe_combine(b.ys.ptr(), b.wts.ptr(), b.tmp.ptr(), k, e, n).map_err(gerr)
    }
}
