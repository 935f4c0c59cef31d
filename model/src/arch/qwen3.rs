//! `qwen3` and `qwen3moe`: the Qwen3 decoders.
//!
//! The llama block with NEOX RoPE, no Q/K/V biases, and **QK-norm**: after the Q and K
//! projections, each head's vector is RMS-normalized and scaled by `attn_q_norm.weight` /
//! `attn_k_norm.weight` (one weight per head dimension, shared by the heads) before RoPE.
//! `qwen3moe` replaces every FFN with routed experts (`expert_count`, top `expert_used_count`
//! of a softmax over all experts, the chosen weights renormalized to sum to 1, no shared
//! expert; each expert a SwiGLU of width `expert_feed_forward_length`). Follows llama.cpp
//! `src/models/qwen3.cpp` / `qwen3moe.cpp` and Hugging Face `modeling_qwen3(_moe).py`.

use super::{ArchTraits, RopeKind};

pub const TRAITS: ArchTraits = ArchTraits { rope: RopeKind::Neox, qkv_bias: false, qk_norm: true };
