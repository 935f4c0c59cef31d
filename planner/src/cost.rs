//! The memory model and the roofline.
//!
//! Memory of a stage = weights of its tensors + KV cache (context × parallel sequences ×
//! `n_head_kv × (head_dim_k + head_dim_v) × bytes` per layer) + scratch for a prefill chunk
//! and the logits + a safety margin. Time of a block on a device = the larger of bytes read ÷
//! bandwidth and FLOPs ÷ compute (or, on a live worker, bytes ÷ the kernel rate measured per
//! weight type), + attention over the KV cache + a fixed per-block overhead. See
//! `docs/planner.md`.

use crate::cluster::{Device, KernelRates};
use crate::model::{Ends, LayerDesc, MatShape, ModelDesc, TypeBytes};

/// Matrix-product-like calls per block in shoal's CPU executor (Q, K, V, the attention, O,
/// gate, up, down), each paying the measured fixed cost of a call.
pub const DISPATCHES_PER_LAYER: f64 = 8.0;

/// What the plan is sized for.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Workload {
    /// Context length per sequence (KV cache is sized for it).
    pub ctx: u64,
    /// Concurrent sequences.
    pub parallel: u64,
    /// Bytes per KV element (2: f16).
    pub kv_bytes: f64,
    /// Bytes per activation element on the wire between stages (4: f32 codec).
    pub act_bytes: f64,
    /// Prompt tokens per prefill frame.
    pub prefill_chunk: u64,
    /// Extra memory kept free, as a fraction of what a device's share needs.
    pub margin: f64,
}

impl Workload {
    pub fn new(ctx: u64, parallel: u64) -> Workload {
        Workload {
            ctx,
            parallel: parallel.max(1),
            kv_bytes: 2.0,
            act_bytes: 4.0,
            prefill_chunk: 512,
            margin: 0.03,
        }
    }

    /// Mean context a decode step attends over (half-full caches on average).
    pub fn mean_ctx(&self) -> f64 {
        (self.ctx as f64 / 2.0).max(1.0)
    }
}

/// Everything the cost functions need about a model, computed once.
#[derive(Clone, Debug)]
pub struct ModelCost {
    pub layers: Vec<LayerDesc>,
    pub ends: Ends,
    pub head_types: TypeBytes,
    pub head_mats: Vec<MatShape>,
    pub n_embd: f64,
    /// Widest FFN (dense or one expert): sizes the scratch.
    pub n_ff: f64,
    pub n_vocab: f64,
    pub kv_per_token_layer: f64,
    /// Attention FLOPs per token per cached position per layer (QKᵀ and AV).
    pub attn_flops_per_pos: f64,
    pub expert_share: f64,
    pub n_expert: u64,
    pub n_expert_used: u64,
    pub tied_head: bool,
    /// Elements of vector work per token per block: two norms and two residual adds over
    /// the embedding, RoPE on Q and K, K and V to f16, SwiGLU over the FFN width.
    pub vector_elems: f64,
}

impl ModelCost {
    pub fn new(m: &ModelDesc, w: &Workload) -> ModelCost {
        let mut head_types = TypeBytes::default();
        for t in m.tensors.iter().filter(|t| t.role == crate::Role::Head) {
            head_types.add(t.ty, t.bytes, t.rows());
        }
        if m.tied_head()
            && let Some(e) = m.tensors.iter().find(|t| t.role == crate::Role::Embed)
        {
            head_types.add(e.ty, e.bytes, e.rows());
        }
        let n_ff = m
            .tensors
            .iter()
            .filter(|t| t.name.contains("ffn_up"))
            .map(|t| t.dims.get(1).copied().unwrap_or(0))
            .max()
            .unwrap_or(4 * m.n_embd) as f64;
        ModelCost {
            layers: m.layers(),
            ends: m.ends(),
            head_types,
            head_mats: m.head_mats(),
            n_embd: m.n_embd as f64,
            n_ff,
            n_vocab: m.n_vocab as f64,
            kv_per_token_layer: m.kv_bytes_per_token_layer(w.kv_bytes),
            attn_flops_per_pos: 2.0 * m.n_head as f64 * (m.head_dim_k + m.head_dim_v) as f64,
            expert_share: if m.n_expert > 0 {
                m.n_expert_used as f64 / m.n_expert as f64
            } else {
                1.0
            },
            n_expert: m.n_expert,
            n_expert_used: m.n_expert_used,
            tied_head: m.tied_head(),
            vector_elems: 4.0 * m.n_embd as f64
                + (m.n_head + 3 * m.n_head_kv) as f64 * m.head_dim_k as f64
                + n_ff,
        }
    }

    /// Expected share of all experts that `tokens` tokens touch (uniform routing).
    pub fn expert_touch(&self, tokens: f64) -> f64 {
        if self.n_expert == 0 {
            return 1.0;
        }
        1.0 - (1.0 - self.expert_share).powf(tokens.max(1.0))
    }

    /// KV bytes one layer holds for the workload.
    pub fn kv_layer(&self, w: &Workload) -> f64 {
        self.kv_per_token_layer * w.ctx as f64 * w.parallel as f64
    }

    /// Scratch of a stage: activations of one prefill chunk through the widest layer, and the
    /// logits of every sequence on the head stage.
    pub fn scratch(&self, w: &Workload, head: bool) -> f64 {
        let rows = w.prefill_chunk.max(w.parallel) as f64;
        let acts = rows * (8.0 * self.n_embd + 3.0 * self.n_ff) * 4.0;
        acts + if head {
            self.n_vocab * w.parallel as f64 * 4.0
        } else {
            0.0
        }
    }
}

/// Seconds to multiply `tokens` activation rows by weights of `bytes` (per type) on `d`,
/// where a batch touches `touch` of the bytes and computes on `work` of them per token.
pub fn matmul_time(
    d: &Device,
    types: &TypeBytes,
    flops: f64,
    tokens: f64,
    touch: f64,
    work: f64,
) -> f64 {
    match &d.rates {
        Some(r) => types.0.iter().map(|s| rated(r, s, tokens, touch, work)).sum(),
        None => {
            let bytes = types.total() as f64 * touch;
            (bytes / d.bandwidth).max(tokens * flops * work / d.flops)
        }
    }
}

/// [`matmul_time`] of dense matrices whose exact shapes are `mats`: on a live worker that
/// timed them (`KernelRates::probes`), one row costs the measured time (calls included)
/// and a batch the larger of that and its bytes at the batched rates. The flag says whether
/// the probe was used, so the caller does not charge the calls twice.
pub fn dense_matmul_time(d: &Device, types: &TypeBytes, mats: &[MatShape], flops: f64, tokens: f64) -> (f64, bool) {
    match d.rates.as_ref().and_then(|r| Some((r, r.probe(mats)?))) {
        Some((r, single)) => {
            let batched: f64 = types.0.iter().map(|s| tokens * s.bytes as f64 / r.batch_rate(s.ty)).sum();
            (single.max(batched), true)
        }
        None => (matmul_time(d, types, flops, tokens, 1.0, 1.0), false),
    }
}

/// Measured-rate version of the roofline: one row streams the touched bytes at the single-row
/// rate plus a fixed cost per touched matrix row; a batch costs rows × bytes at the batched
/// rate; whichever is slower.
fn rated(r: &KernelRates, s: &crate::model::TypeShare, tokens: f64, touch: f64, work: f64) -> f64 {
    let bytes = s.bytes as f64;
    let single = bytes * touch / r.single_rate(s.ty) + s.rows as f64 * touch * r.row_overhead(s.ty);
    single.max(tokens * bytes * work / r.batch_rate(s.ty))
}

/// Seconds of one layer's attention for `queries` query tokens that read `positions` cached
/// positions from memory and compute `pairs` (query, position) products: on a live worker
/// that timed the model's attention, its measured cost per query and per pair; elsewhere
/// the FLOPs at the device's compute; never less than the cache bytes at its bandwidth.
pub fn attention_time(d: &Device, c: &ModelCost, queries: f64, positions: f64, pairs: f64) -> f64 {
    let compute = match d.rates.as_ref().and_then(|r| r.attention) {
        Some((fixed, per_pos)) => queries * fixed + pairs * per_pos,
        None => c.attn_flops_per_pos * pairs / d.flops,
    };
    (c.kv_per_token_layer * positions / d.bandwidth).max(compute)
}

/// Fixed cost per block per step: kernel launches, or on live workers the measured cost of
/// each matrix product call; for `calls` of a block's [`DISPATCHES_PER_LAYER`] calls.
pub fn layer_overhead(d: &Device, calls: f64) -> f64 {
    match &d.rates {
        Some(r) => calls * r.call_overhead_s,
        None => d.layer_overhead_s * calls / DISPATCHES_PER_LAYER,
    }
}

/// Single-threaded vector work of one block for `tokens` tokens (measured on live workers;
/// hidden in `layer_overhead_s` elsewhere).
pub fn vector_work(d: &Device, c: &ModelCost, tokens: f64) -> f64 {
    d.rates.as_ref().map_or(0.0, |r| r.elementwise_s * c.vector_elems * tokens)
}

/// One block's dense matrices, attention and fixed costs on `d` for `tokens` query tokens
/// over `positions` cached positions with `pairs` products.
fn dense_block(d: &Device, c: &ModelCost, l: &LayerDesc, tokens: f64, positions: f64, pairs: f64) -> f64 {
    let (mm, probed) = dense_matmul_time(d, &l.dense, &l.mats, l.dense_flops, tokens);
    // A probe timed the block's matrix calls; the attention call is left.
    let calls = if probed { (DISPATCHES_PER_LAYER - l.mats.len() as f64).max(1.0) } else { DISPATCHES_PER_LAYER };
    mm + attention_time(d, c, tokens, positions, pairs) + layer_overhead(d, calls) + vector_work(d, c, tokens)
}

/// Decode time of one block's dense part on `d` for a batch of `tokens` sequences.
pub fn dense_decode(d: &Device, c: &ModelCost, l: &LayerDesc, tokens: f64, w: &Workload) -> f64 {
    let pos = w.mean_ctx() * tokens;
    dense_block(d, c, l, tokens, pos, pos)
}

/// Time of one block's routed experts on `d` for `tokens` tokens (decode or prefill: a batch
/// touches the share of experts its tokens pick and computes k/n of them per token).
pub fn experts_time(d: &Device, c: &ModelCost, l: &LayerDesc, tokens: f64) -> f64 {
    if l.experts.is_empty() {
        return 0.0;
    }
    matmul_time(d, &l.experts, l.expert_flops, tokens, c.expert_touch(tokens), c.expert_share)
}

/// Prefill time of one block without its routed experts, for a chunk of `tokens` tokens.
pub fn dense_prefill(d: &Device, c: &ModelCost, l: &LayerDesc, tokens: f64) -> f64 {
    dense_block(d, c, l, tokens, tokens, tokens * tokens / 2.0)
}

/// Time of the head (output norm + matrix) for `tokens` rows.
pub fn head_time(d: &Device, c: &ModelCost, tokens: f64) -> f64 {
    let (mm, probed) = dense_matmul_time(d, &c.head_types, &c.head_mats, c.ends.head_flops, tokens);
    mm + if probed { 0.0 } else { layer_overhead(d, 1.0) }
}

/// Fixed cost of a stage per step: waking its compute threads (measured on live workers).
pub fn step_overhead(d: &Device) -> f64 {
    d.rates.as_ref().map_or(0.0, |r| r.wake_s + r.handoff_s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::DeviceKind;
    use shoal_kernels::GgmlType;

    fn live_cpu(probes: Vec<(Vec<MatShape>, f64)>, attention: Option<(f64, f64)>) -> Device {
        let rates = KernelRates {
            single: vec![(GgmlType::Q4_K, 20e9), (GgmlType::Q6_K, 20e9)],
            batch: vec![(GgmlType::Q4_K, 100e9), (GgmlType::Q6_K, 100e9)],
            batch_rows: 32,
            call_overhead_s: 2e-6,
            probes,
            attention,
            ..KernelRates::default()
        };
        Device {
            name: "CPU".into(),
            kind: DeviceKind::Cpu,
            memory: 1 << 40,
            reserve: 0,
            bandwidth: 50e9,
            flops: 1e12,
            layer_overhead_s: 20e-6,
            rates: Some(rates),
        }
    }

    #[test]
    fn a_probed_block_costs_its_measured_time() {
        let m = crate::catalog::lookup("qwen3-32b:q4_k_m").unwrap();
        let w = Workload::new(4096, 1);
        let c = ModelCost::new(&m, &w);
        let l = &c.layers[0];
        // Q, K, V, O, gate, up, down: the matrices in the block, none of the norms.
        assert_eq!(l.mats.len(), 7, "{:?}", l.mats);
        assert_eq!(c.head_mats.len(), 1);
        let unprobed = dense_decode(&live_cpu(vec![], None), &c, l, 1.0, &w);
        // With the block's shapes timed at 5 ms, one token costs those 5 ms, one call for
        // the attention and the rest as before.
        let d = live_cpu(vec![(l.mats.clone(), 5e-3)], None);
        let rest = attention_time(&d, &c, 1.0, w.mean_ctx(), w.mean_ctx()) + 2e-6 + vector_work(&d, &c, 1.0);
        assert!((dense_decode(&d, &c, l, 1.0, &w) - (5e-3 + rest)).abs() < 1e-12);
        assert!((unprobed - 5e-3 - rest).abs() > 1e-4, "the probe must change the figure: {unprobed}");
        // Another shape is not matched; a batch costs at least its bytes at the batched rate.
        let other = live_cpu(vec![(c.head_mats.clone(), 5e-3)], None);
        assert_eq!(dense_decode(&other, &c, l, 1.0, &w), unprobed);
        let big = 10_000.0;
        let batched = l.dense.total() as f64 * big / 100e9;
        assert!(dense_matmul_time(&d, &l.dense, &l.mats, l.dense_flops, big).0 >= batched);
        // Measured attention: fixed + per position, per query.
        let a = live_cpu(vec![], Some((1e-6, 1e-8)));
        let t = attention_time(&a, &c, 2.0, 2.0 * 1000.0, 2.0 * 1000.0);
        let floor = c.kv_per_token_layer * 2000.0 / 50e9;
        assert!((t - (2e-6_f64 + 2000.0 * 1e-8).max(floor)).abs() < 1e-15, "{t}");
    }
}
