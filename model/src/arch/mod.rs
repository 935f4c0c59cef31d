//! Model architectures: hyperparameters from GGUF metadata and each architecture's tensor
//! layout and quirks.
//!
//! Nothing here is hard-coded per model: every size comes from `{arch}.*` metadata keys, with
//! the defaults llama.cpp applies when a key is absent. Each architecture is one file that says
//! how it differs from the common pre-norm decoder block run by [`crate::executor`].

pub mod llama;
pub mod qwen2;
pub mod qwen3;

use crate::gguf::GgufFile;
use crate::{Error, Result};

/// Architectures shoal can run, as named by `general.architecture`.
pub const SUPPORTED: &[&str] = &["llama", "qwen2", "qwen3", "qwen3moe"];

/// How RoPE pairs dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeKind {
    /// Adjacent pairs (x[2i], x[2i+1]): llama.
    Normal,
    /// Halves (x[i], x[i + n/2]): qwen2, GPT-NeoX.
    Neox,
}

/// Per-architecture facts the executor needs beyond the hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArchTraits {
    pub rope: RopeKind,
    /// Q, K and V projections carry a bias (qwen2).
    pub qkv_bias: bool,
    /// Q and K are RMS-normalized per head before RoPE (qwen3).
    pub qk_norm: bool,
}

/// Routed experts in place of the dense FFN (`{arch}.expert_count` > 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeConfig {
    pub n_expert: usize,
    /// Experts each token is routed to (top-k).
    pub n_used: usize,
    /// Hidden width of one expert's SwiGLU.
    pub n_ff: usize,
}

/// Architecture plus hyperparameters of a decoder-only transformer.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub arch: String,
    pub traits: ArchTraits,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub rms_eps: f32,
    pub rope_freq_base: f32,
    pub rope_freq_scale: f32,
    pub n_rot: usize,
    /// Routed experts; `None`: a dense FFN of width `n_ff`.
    pub moe: Option<MoeConfig>,
}

impl Config {
    /// Reads the hyperparameters of `f`'s architecture.
    pub fn from_gguf(f: &GgufFile) -> Result<Config> {
        let arch = f.require_str("general.architecture")?.to_string();
        let traits = match arch.as_str() {
            "llama" => llama::TRAITS,
            "qwen2" => qwen2::TRAITS,
            "qwen3" | "qwen3moe" => qwen3::TRAITS,
            _ => return Err(Error::UnsupportedArchitecture(arch)),
        };
        let key = |k: &str| format!("{arch}.{k}");
        let usize_of = |k: &str| -> Result<usize> {
            let v = f.require_u64(&key(k))?;
            usize::try_from(v).map_err(|_| Error::Metadata { key: key(k), msg: "too large".into() })
        };
        let opt_usize = |k: &str| -> Result<Option<usize>> {
            Ok(f.get_u64(&key(k))?.map(|v| v as usize))
        };
        let n_layer = usize_of("block_count")?;
        let n_embd = usize_of("embedding_length")?;
        let n_expert = opt_usize("expert_count")?.unwrap_or(0);
        // qwen3moe has no dense FFN, so no feed_forward_length of its own.
        let n_ff = match opt_usize("feed_forward_length")? {
            Some(v) => v,
            None if n_expert > 0 => 0,
            None => usize_of("feed_forward_length")?,
        };
        let n_head = usize_of("attention.head_count")?;
        let n_head_kv = opt_usize("attention.head_count_kv")?.unwrap_or(n_head);
        let bad = |k: &str, msg: &str| Error::Metadata { key: key(k), msg: msg.to_string() };
        if n_layer == 0 || n_layer > 4096 {
            return Err(bad("block_count", "must be between 1 and 4096"));
        }
        if n_head == 0 || n_embd == 0 || n_embd % n_head != 0 {
            return Err(bad("attention.head_count", "must divide embedding_length"));
        }
        if n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(bad("attention.head_count_kv", "must divide attention.head_count"));
        }
        let head_dim = opt_usize("attention.key_length")?.unwrap_or(n_embd / n_head);
        if head_dim == 0 || head_dim % 2 != 0 || head_dim > 1024 {
            return Err(bad("attention.key_length", "head size must be even and at most 1024"));
        }
        if let Some(vl) = opt_usize("attention.value_length")?
            && vl != head_dim
        {
            return Err(bad("attention.value_length", "must equal the key length"));
        }
        let n_rot = opt_usize("rope.dimension_count")?.unwrap_or(head_dim);
        if n_rot > head_dim || n_rot % 2 != 0 {
            return Err(bad("rope.dimension_count", "must be even and at most the head size"));
        }
        let n_vocab = match opt_usize("vocab_size")? {
            Some(v) => v,
            None => f
                .get_array("tokenizer.ggml.tokens")?
                .map(|a| a.len())
                .ok_or_else(|| Error::MissingMetadata(key("vocab_size")))?,
        };
        let rms_eps = f.get_f32(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5);
        let rope_freq_base = f.get_f32(&key("rope.freq_base"))?.unwrap_or(10000.0);
        let rope_freq_scale = match f.get_str(&key("rope.scaling.type"))? {
            None | Some("none") => 1.0,
            Some("linear") => {
                let factor = f.get_f32(&key("rope.scaling.factor"))?.unwrap_or(1.0);
                if factor > 0.0 { 1.0 / factor } else { 1.0 }
            }
            Some(other) => {
                return Err(bad("rope.scaling.type", &format!("scaling {other:?} is not supported")));
            }
        };
        let n_ctx_train = opt_usize("context_length")?.unwrap_or(2048);
        let moe = if n_expert > 0 {
            let n_used = opt_usize("expert_used_count")?.ok_or_else(|| Error::MissingMetadata(key("expert_used_count")))?;
            if n_expert > 1024 {
                return Err(bad("expert_count", "at most 1024 experts"));
            }
            if n_used == 0 || n_used > n_expert {
                return Err(bad("expert_used_count", "must be between 1 and expert_count"));
            }
            let n_ff_exp = opt_usize("expert_feed_forward_length")?.unwrap_or(n_ff);
            if n_ff_exp == 0 {
                return Err(bad("expert_feed_forward_length", "must be positive"));
            }
            Some(MoeConfig { n_expert, n_used, n_ff: n_ff_exp })
        } else {
            if arch == "qwen3moe" {
                return Err(Error::MissingMetadata(key("expert_count")));
            }
            None
        };
        Ok(Config {
            arch,
            traits,
            n_layer,
            n_embd,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            n_vocab,
            n_ctx_train,
            rms_eps,
            rope_freq_base,
            rope_freq_scale,
            n_rot,
            moe,
        })
    }

    /// Width of the K (and V) projection output.
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Width of the Q projection output.
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Bytes of KV cache per token per layer (f16 K and V).
    pub fn kv_bytes_per_token_layer(&self) -> usize {
        2 * self.kv_dim() * 2
    }
}
