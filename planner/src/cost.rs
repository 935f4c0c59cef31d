//! The memory model and the roofline.
//!
//! Memory of a stage = weights of its tensors + KV cache (context × parallel sequences ×
//! `n_head_kv × (head_dim_k + head_dim_v) × bytes` per layer) + scratch for a prefill chunk
//! and the logits + a safety margin. Time of a block on a device = the larger of bytes read ÷
//! bandwidth and FLOPs ÷ compute (or, on a live worker, bytes ÷ the kernel rate measured per
//! weight type), + attention over the KV cache + a fixed per-block overhead. See
//! `docs/planner.md`.

use crate::cluster::{Device, KernelRates};
use crate::model::{Ends, LayerDesc, ModelDesc, TypeBytes};

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

/// Measured-rate version of the roofline: one row streams the touched bytes at the single-row
/// rate plus a fixed cost per touched matrix row; a batch costs rows × bytes at the batched
/// rate; whichever is slower.
fn rated(r: &KernelRates, s: &crate::model::TypeShare, tokens: f64, touch: f64, work: f64) -> f64 {
    let bytes = s.bytes as f64;
    let single = bytes * touch / r.single_rate(s.ty) + s.rows as f64 * touch * r.row_overhead(s.ty);
    single.max(tokens * bytes * work / r.batch_rate(s.ty))
}

/// Seconds of one layer's attention that reads `positions` cached positions from memory and
/// computes `pairs` (query, position) products.
pub fn attention_time(d: &Device, c: &ModelCost, positions: f64, pairs: f64) -> f64 {
    (c.kv_per_token_layer * positions / d.bandwidth).max(c.attn_flops_per_pos * pairs / d.flops)
}

/// Fixed cost per block per step: kernel launches, or on live workers the measured cost of
/// each matrix product call.
pub fn layer_overhead(d: &Device) -> f64 {
    match &d.rates {
        Some(r) => DISPATCHES_PER_LAYER * r.call_overhead_s,
        None => d.layer_overhead_s,
    }
}

/// Single-threaded vector work of one block for `tokens` tokens (measured on live workers;
/// hidden in `layer_overhead_s` elsewhere).
pub fn vector_work(d: &Device, c: &ModelCost, tokens: f64) -> f64 {
    d.rates.as_ref().map_or(0.0, |r| r.elementwise_s * c.vector_elems * tokens)
}

/// Decode time of one block's dense part on `d` for a batch of `tokens` sequences.
pub fn dense_decode(d: &Device, c: &ModelCost, l: &LayerDesc, tokens: f64, w: &Workload) -> f64 {
    matmul_time(d, &l.dense, l.dense_flops, tokens, 1.0, 1.0)
        + attention_time(d, c, w.mean_ctx() * tokens, w.mean_ctx() * tokens)
        + layer_overhead(d)
        + vector_work(d, c, tokens)
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
    matmul_time(d, &l.dense, l.dense_flops, tokens, 1.0, 1.0)
        + attention_time(d, c, tokens, tokens * tokens / 2.0)
        + layer_overhead(d)
        + vector_work(d, c, tokens)
}

/// Time of the head (output norm + matrix) for `tokens` rows.
pub fn head_time(d: &Device, c: &ModelCost, tokens: f64) -> f64 {
    matmul_time(d, &c.head_types, c.ends.head_flops, tokens, 1.0, 1.0)
        + layer_overhead(d) / DISPATCHES_PER_LAYER.max(1.0)
}

/// Fixed cost of a stage per step: waking its compute threads (measured on live workers).
pub fn step_overhead(d: &Device) -> f64 {
    d.rates.as_ref().map_or(0.0, |r| r.wake_s + r.handoff_s)
}
