//! `llama`: the Llama 2/3 decoder (SmolLM2 uses it, with tied embeddings).
//!
//! Pre-norm blocks: RMSNorm → Q/K/V (no bias) → RoPE in normal (adjacent pair) mode, since the
//! GGUF converter permutes Q and K rows for it → grouped-query attention → output projection
//! → residual; RMSNorm → SwiGLU FFN → residual. Follows llama.cpp `src/models/llama.cpp`.
//! `output.weight` may be absent, in which case the head reuses `token_embd.weight`.

use super::{ArchTraits, RopeKind};

pub const TRAITS: ArchTraits = ArchTraits { rope: RopeKind::Normal, qkv_bias: false };
