//! `qwen2`: the Qwen2/Qwen2.5 decoder.
//!
//! The llama block with two differences: Q, K and V projections carry biases
//! (`attn_{q,k,v}.bias`), and RoPE rotates halves (NEOX mode). Follows llama.cpp
//! `src/models/qwen2.cpp` and Hugging Face `modeling_qwen2.py`.

use super::{ArchTraits, RopeKind};

pub const TRAITS: ArchTraits = ArchTraits { rope: RopeKind::Neox, qkv_bias: true, qk_norm: false };
