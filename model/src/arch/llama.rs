//! `llama`: the Llama 2/3 decoder (SmolLM2 uses it, with tied embeddings).
//!
//! Pre-norm blocks: RMSNorm → Q/K/V (no bias) → RoPE in normal (adjacent pair) mode, since the
//! GGUF converter permutes Q and K rows for it → grouped-query attention → output projection
//! → residual; RMSNorm → SwiGLU FFN → residual. Follows llama.cpp `src/models/llama.cpp`.
//! `output.weight` may be absent, in which case the head reuses `token_embd.weight`.
//!
//! With `llama.expert_count` > 0 it is **Mixtral**: every FFN is a set of routed experts
//! (stacked `ffn_{gate,up,down}_exps`, router `ffn_gate_inp`), the top `expert_used_count`
//! of a softmax over all experts chosen per token and their weights renormalized, which is a
//! softmax over the chosen ones (llama.cpp's `build_moe_ffn` with `norm_w`).

use super::{ArchTraits, RopeKind};

pub const TRAITS: ArchTraits = ArchTraits { rope: RopeKind::Normal, qkv_bias: false, qk_norm: false };
