//! Built-in catalogue of published model configurations, so `shoal plan` can size a model
//! with no file at hand.
//!
//! One table of Hugging Face `config.json` values ([`entries`]) and one generator that turns
//! an entry and a quantization into the tensor list llama.cpp would write: names and shapes as
//! `convert_hf_to_gguf.py` emits them, types as `llama-quant.cpp` picks them.
//!
//! Reference: llama.cpp `ggml-org/llama.cpp@0c1e57098` (vendored in llama-cpp-python 0.3.36):
//! `src/llama-quant.cpp` (`tensor_allows_quantization`, `llama_tensor_get_type_impl`,
//! `tensor_type_fallback`), `conversion/base.py` (`prepare_tensors`: which tensors stay F32),
//! `conversion/llama.py` (stacked Mixtral experts, `rope_freqs`). Only the rules that matter
//! for these six models at these four quantizations are reproduced; docs/planner-catalog.md
//! lists them. The catalogue reads no files and needs no network.

use shoal_kernels::GgmlType;

use crate::{ModelDesc, PlanError, TensorDesc};

/// The feed-forward part of every block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ffn {
    /// `intermediate_size`.
    Dense { n_ff: u64 },
    /// `num_experts` (`num_local_experts`), `num_experts_per_tok`, and the width of one
    /// expert (`moe_intermediate_size`, or `intermediate_size` for Mixtral).
    Moe {
        n_expert: u64,
        n_expert_used: u64,
        n_ff_exp: u64,
    },
}

/// One published model configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Lookup key, e.g. `qwen3-235b-a22b`.
    pub key: &'static str,
    pub display: &'static str,
    /// The `config.json` the values come from.
    pub source: &'static str,
    /// GGUF `general.architecture`.
    pub arch: &'static str,
    /// `num_hidden_layers`.
    pub n_layer: usize,
    /// `hidden_size`.
    pub n_embd: u64,
    /// `num_attention_heads`, `num_key_value_heads`, `head_dim`.
    pub n_head: u64,
    pub n_head_kv: u64,
    pub head_dim: u64,
    /// `vocab_size`.
    pub n_vocab: u64,
    /// `max_position_embeddings`.
    pub n_ctx_train: u64,
    pub ffn: Ffn,
    /// `tie_word_embeddings`: no `output.weight`, the head reuses `token_embd`.
    pub tied: bool,
    /// Per-head RMSNorm on Q and K (Qwen3): `attn_q_norm`, `attn_k_norm`.
    pub qk_norm: bool,
    /// `rope_scaling.rope_type == "llama3"`: the converter adds `rope_freqs.weight`.
    pub rope_freqs: bool,
}

const LLAMA_3_1_70B: Entry = Entry {
    key: "llama-3.1-70b",
    display: "Llama 3.1 70B",
    source: "https://huggingface.co/meta-llama/Llama-3.1-70B/blob/main/config.json",
    arch: "llama",
    n_layer: 80,
    n_embd: 8192,
    n_head: 64,
    n_head_kv: 8,
    head_dim: 128,
    n_vocab: 128256,
    n_ctx_train: 131072,
    ffn: Ffn::Dense { n_ff: 28672 },
    tied: false,
    qk_norm: false,
    rope_freqs: true,
};

static ENTRIES: [Entry; 6] = [
    LLAMA_3_1_70B,
    Entry {
        key: "llama-3.1-405b",
        display: "Llama 3.1 405B",
        source: "https://huggingface.co/meta-llama/Llama-3.1-405B/blob/main/config.json",
        n_layer: 126,
        n_embd: 16384,
        n_head: 128,
        ffn: Ffn::Dense { n_ff: 53248 },
        ..LLAMA_3_1_70B
    },
    Entry {
        key: "qwen3-32b",
        display: "Qwen3 32B",
        source: "https://huggingface.co/Qwen/Qwen3-32B/blob/main/config.json",
        arch: "qwen3",
        n_layer: 64,
        n_embd: 5120,
        n_head: 64,
        n_head_kv: 8,
        head_dim: 128,
        n_vocab: 151936,
        n_ctx_train: 40960,
        ffn: Ffn::Dense { n_ff: 25600 },
        tied: false,
        qk_norm: true,
        rope_freqs: false,
    },
    Entry {
        key: "qwen3-235b-a22b",
        display: "Qwen3 235B-A22B",
        source: "https://huggingface.co/Qwen/Qwen3-235B-A22B/blob/main/config.json",
        arch: "qwen3moe",
        n_layer: 94,
        n_embd: 4096,
        n_head: 64,
        n_head_kv: 4,
        head_dim: 128,
        n_vocab: 151936,
        n_ctx_train: 40960,
        ffn: Ffn::Moe {
            n_expert: 128,
            n_expert_used: 8,
            n_ff_exp: 1536,
        },
        tied: false,
        qk_norm: true,
        rope_freqs: false,
    },
    Entry {
        key: "qwen3-coder-480b-a35b",
        display: "Qwen3-Coder 480B-A35B Instruct",
        source: "https://huggingface.co/Qwen/Qwen3-Coder-480B-A35B-Instruct/blob/main/config.json",
        arch: "qwen3moe",
        n_layer: 62,
        n_embd: 6144,
        n_head: 96,
        n_head_kv: 8,
        head_dim: 128,
        n_vocab: 151936,
        n_ctx_train: 262144,
        ffn: Ffn::Moe {
            n_expert: 160,
            n_expert_used: 8,
            n_ff_exp: 2560,
        },
        tied: false,
        qk_norm: true,
        rope_freqs: false,
    },
    // The base v0.1 as converted by mistral-community (vocab 32000), the source of the widely
    // used GGUFs; Mistral's Instruct v0.1 has the v3 tokenizer (32768), 0.007% more weights.
    Entry {
        key: "mixtral-8x22b",
        display: "Mixtral 8x22B v0.1",
        source: "https://huggingface.co/mistral-community/Mixtral-8x22B-v0.1/blob/main/config.json",
        arch: "llama",
        n_layer: 56,
        n_embd: 6144,
        n_head: 48,
        n_head_kv: 8,
        head_dim: 128,
        n_vocab: 32000,
        n_ctx_train: 65536,
        ffn: Ffn::Moe {
            n_expert: 8,
            n_expert_used: 2,
            n_ff_exp: 16384,
        },
        tied: false,
        qk_norm: false,
        rope_freqs: false,
    },
];

impl Entry {
    /// Routed experts and experts a token uses; (0, 0) for a dense model.
    pub fn experts(&self) -> (u64, u64) {
        match self.ffn {
            Ffn::Dense { .. } => (0, 0),
            Ffn::Moe {
                n_expert,
                n_expert_used,
                ..
            } => (n_expert, n_expert_used),
        }
    }
}

/// Every catalogued model.
pub fn entries() -> &'static [Entry] {
    &ENTRIES
}

/// The quantizations the catalogue can describe, as llama.cpp's `llama-quantize` names them.
pub const QUANTS: &[&str] = &["f16", "q8_0", "q6_k", "q4_k_m"];

/// A `LLAMA_FTYPE_MOSTLY_*` file type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ftype {
    F16,
    Q8_0,
    Q6K,
    Q4KM,
}

impl Ftype {
    fn parse(s: &str) -> Option<Ftype> {
        Some(match s {
            "f16" => Ftype::F16,
            "q8_0" => Ftype::Q8_0,
            "q6_k" => Ftype::Q6K,
            "q4_k_m" => Ftype::Q4KM,
            _ => return None,
        })
    }

    /// `llama_ftype_get_default_type`.
    fn default_type(self) -> GgmlType {
        match self {
            Ftype::F16 => GgmlType::F16,
            Ftype::Q8_0 => GgmlType::Q8_0,
            Ftype::Q6K => GgmlType::Q6_K,
            Ftype::Q4KM => GgmlType::Q4_K,
        }
    }
}

/// Looks up `MODEL:QUANT` (`qwen3-235b-a22b:q4_k_m`), case-insensitive; `MODEL-QUANT`
/// (`Qwen3-235B-A22B-Q4_K_M`, the GGUF file-name style) is accepted too.
pub fn lookup(spec: &str) -> Result<ModelDesc, PlanError> {
    let s = spec.trim().trim_end_matches(".gguf").to_ascii_lowercase();
    let (model, quant) = match s.rsplit_once(':') {
        Some(mq) => mq,
        None => QUANTS
            .iter()
            .find_map(|q| {
                s.strip_suffix(q)
                    .and_then(|m| m.strip_suffix('-'))
                    .map(|m| (m, *q))
            })
            .ok_or_else(|| {
                PlanError::Catalog(format!(
                    "{spec:?} names no quantization: expected MODEL:QUANT with QUANT one of {}",
                    QUANTS.join(", ")
                ))
            })?,
    };
    let entry = entries().iter().find(|e| e.key == model).ok_or_else(|| {
        let keys: Vec<&str> = entries().iter().map(|e| e.key).collect();
        PlanError::Catalog(format!(
            "unknown model {model:?} in {spec:?}; the catalogue has: {}",
            keys.join(", ")
        ))
    })?;
    let ftype = Ftype::parse(quant).ok_or_else(|| {
        PlanError::Catalog(format!(
            "unknown quantization {quant:?} in {spec:?}; known: {}",
            QUANTS.join(", ")
        ))
    })?;
    build(entry, ftype, &format!("{}:{quant}", entry.key))
}

/// The tensors of `e` as a llama.cpp GGUF of type `ftype` holds them.
fn build(e: &Entry, ftype: Ftype, name: &str) -> Result<ModelDesc, PlanError> {
    let (n_expert, n_expert_used) = e.experts();
    let tensors = shapes(e)
        .into_iter()
        .map(|(name, dims)| TensorDesc::new(&name, &dims, tensor_type(e, ftype, &name, &dims)))
        .collect::<Result<Vec<_>, _>>()?;
    let m = ModelDesc {
        name: name.to_string(),
        arch: e.arch.to_string(),
        n_layer: e.n_layer,
        n_embd: e.n_embd,
        n_head: e.n_head,
        n_head_kv: e.n_head_kv,
        head_dim_k: e.head_dim,
        head_dim_v: e.head_dim,
        n_vocab: e.n_vocab,
        n_ctx_train: e.n_ctx_train,
        n_expert,
        n_expert_used,
        tensors,
    };
    m.validate()?;
    Ok(m)
}

/// Names and ggml shapes (`dims[0]` contiguous) in file order, as `convert_hf_to_gguf.py`
/// writes them.
fn shapes(e: &Entry) -> Vec<(String, Vec<u64>)> {
    let (embd, vocab) = (e.n_embd, e.n_vocab);
    let q = e.n_head * e.head_dim;
    let kv = e.n_head_kv * e.head_dim;
    let mut t: Vec<(String, Vec<u64>)> = vec![("token_embd.weight".into(), vec![embd, vocab])];
    if e.rope_freqs {
        // One factor per rotary frequency pair.
        t.push(("rope_freqs.weight".into(), vec![e.head_dim / 2]));
    }
    for l in 0..e.n_layer {
        let mut add = |n: &str, d: &[u64]| t.push((format!("blk.{l}.{n}.weight"), d.to_vec()));
        add("attn_norm", &[embd]);
        // x: (n_tokens, n_embd) · attn_q: (q, n_embd) -> (n_tokens, q)
        add("attn_q", &[embd, q]);
        add("attn_k", &[embd, kv]);
        add("attn_v", &[embd, kv]);
        add("attn_output", &[q, embd]);
        if e.qk_norm {
            add("attn_q_norm", &[e.head_dim]);
            add("attn_k_norm", &[e.head_dim]);
        }
        add("ffn_norm", &[embd]);
        match e.ffn {
            Ffn::Dense { n_ff } => {
                add("ffn_gate", &[embd, n_ff]);
                add("ffn_up", &[embd, n_ff]);
                add("ffn_down", &[n_ff, embd]);
            }
            Ffn::Moe {
                n_expert, n_ff_exp, ..
            } => {
                // Router logits: (n_tokens, n_embd) -> (n_tokens, n_expert).
                add("ffn_gate_inp", &[embd, n_expert]);
                // All experts stacked on the outermost axis.
                add("ffn_gate_exps", &[embd, n_ff_exp, n_expert]);
                add("ffn_up_exps", &[embd, n_ff_exp, n_expert]);
                add("ffn_down_exps", &[n_ff_exp, embd, n_expert]);
            }
        }
    }
    t.push(("output_norm.weight".into(), vec![embd]));
    if !e.tied {
        t.push(("output.weight".into(), vec![embd, vocab]));
    }
    t
}

/// `use_more_bits` in llama-quant.cpp: the first and last eighth of the layers, and every
/// third layer in between.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The type llama.cpp stores tensor `name` in for `ftype`.
fn tensor_type(e: &Entry, ftype: Ftype, name: &str, dims: &[u64]) -> GgmlType {
    // conversion/base.py keeps 1-D tensors, `*_norm.weight` and `ffn_gate_inp` (the router)
    // in F32, and llama-quant.cpp's `tensor_allows_quantization` leaves exactly those as they
    // are (1-D, `_norm.weight`, "do not quantize expert gating tensors").
    if dims.len() < 2 || name.ends_with("_norm.weight") || name.contains("ffn_gate_inp.weight") {
        return GgmlType::F32;
    }
    let base = ftype.default_type();
    // F16 is not a quantized type: `llama_tensor_get_type` applies no mixture rule to it.
    if base == GgmlType::F16 {
        return base;
    }
    let layer = crate::model::classify(name).0.unwrap_or(0);
    let (n_layer, n_expert) = (e.n_layer, e.experts().0);
    // `load_arch_hparams` (models/llama.cpp): a llama with 80 layers and GQA is LLM_TYPE_70B;
    // one with 8 experts is 8x7B or 8x22B instead; no other catalogued model is 70B.
    let type_70b = e.arch == "llama" && n_expert != 8 && e.n_layer == 80 && e.n_head != e.n_head_kv;
    let q4km = ftype == Ftype::Q4KM;
    let ty = if name == "output.weight" || (e.tied && name == "token_embd.weight") {
        // Output rule: Q8_0 when a row is not whole K-quant blocks, else Q6_K unless the
        // default is already Q8_0 (so q8_0 keeps Q8_0, q6_k and q4_k_m get Q6_K).
        if !dims[0].is_multiple_of(base.block_size() as u64) || base == GgmlType::Q8_0 {
            GgmlType::Q8_0
        } else {
            GgmlType::Q6_K
        }
    } else if name.contains("attn_v.weight") {
        // n_attention_wv counts attn_v tensors (one a layer); i_attention_wv is their index in
        // file order, which is layer order here.
        let mut t = base;
        if q4km && use_more_bits(layer, n_layer) {
            t = GgmlType::Q6_K;
        }
        // "In the 70B model we have 8 heads sharing the same attn_v weights": Q4_K -> Q5_K.
        if type_70b && t == GgmlType::Q4_K {
            t = GgmlType::Q5_K;
        }
        // "for the 8-expert model, bumping this to Q8_0 trades just ~128MB" (all ftypes).
        if n_expert == 8 {
            t = GgmlType::Q8_0;
        }
        t
    } else if name.contains("attn_k.weight") && n_expert == 8 {
        // The same 8-expert bump for attn_k.
        GgmlType::Q8_0
    } else if name.contains("ffn_down") && q4km && use_more_bits(layer, n_layer) {
        // Q4_K_M ffn_down: Q6_K on use_more_bits layers. n_ffn_down is n_layer; with experts
        // (n_expert > 1) the layer comes from the tensor name, so `_exps` counts once a layer.
        GgmlType::Q6_K
    } else if name.contains("attn_output.weight") && n_expert == 8 && q4km {
        // 8-expert attn_output: Q5_K for Q4_K_M (and the other low-bit mixtures).
        GgmlType::Q5_K
    } else {
        base
    };
    fallback(ty, dims[0])
}

/// `tensor_type_fallback`: a K-quant whose row (`ne[0]`) is not whole 256-blocks falls back
/// to a 32-block type, and to F16 when even that does not divide the row.
fn fallback(ty: GgmlType, ncols: u64) -> GgmlType {
    if ncols.is_multiple_of(ty.block_size() as u64) {
        return ty;
    }
    let alt = match ty {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other,
    };
    if ncols.is_multiple_of(alt.block_size() as u64) {
        alt
    } else {
        GgmlType::F16
    }
}

/// The smaller quantizations of a catalogue model named `key:quant`, largest first (the
/// alternatives [`crate::place::suggest`] tries); empty for models not from the catalogue.
pub fn smaller(name: &str) -> Vec<ModelDesc> {
    let Some((key, quant)) = name.rsplit_once(':') else { return Vec::new() };
    let Some(pos) = QUANTS.iter().position(|q| *q == quant) else { return Vec::new() };
    QUANTS[pos + 1..].iter().filter_map(|q| lookup(&format!("{key}:{q}")).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Role;

    fn all() -> impl Iterator<Item = (&'static Entry, &'static str, ModelDesc)> {
        entries().iter().flat_map(|e| {
            QUANTS
                .iter()
                .map(move |q| (e, *q, lookup(&format!("{}:{q}", e.key)).unwrap()))
        })
    }

    fn gb(bytes: u64) -> f64 {
        bytes as f64 / 1e9
    }

    /// (total, active) parameters, in billions: experts count `n_expert_used / n_expert`.
    fn params(m: &ModelDesc) -> (f64, f64) {
        let mut total = 0.0;
        let mut active = 0.0;
        for t in &m.tensors {
            let n = t.n_elements() as f64;
            total += n;
            active += if t.role == Role::Experts {
                n * m.n_expert_used as f64 / m.n_expert as f64
            } else {
                n
            };
        }
        (total / 1e9, active / 1e9)
    }

    fn close(got: f64, want: f64, tol: f64) -> bool {
        (got - want).abs() <= tol * want
    }

    #[test]
    fn every_entry_and_quant_builds_and_validates() {
        for (e, q, m) in all() {
            m.validate().unwrap();
            let per_layer = match (e.ffn, e.qk_norm) {
                (Ffn::Dense { .. }, false) => 9,
                (Ffn::Dense { .. }, true) => 11,
                (Ffn::Moe { .. }, false) => 10,
                (Ffn::Moe { .. }, true) => 12,
            };
            let ends = 3 + usize::from(e.rope_freqs) - usize::from(e.tied);
            assert_eq!(
                m.tensors.len(),
                ends + per_layer * e.n_layer,
                "{}:{q}",
                e.key
            );
            assert_eq!(m.name, format!("{}:{q}", e.key));
            assert_eq!(m.layers().len(), e.n_layer);
        }
    }

    /// Tensor counts printed by llama.cpp when loading published GGUFs (sources in
    /// docs/planner-catalog.md); Mixtral's is computed, not checked against a file.
    #[test]
    fn tensor_counts_match_llama_cpp_load_logs() {
        let n = |s: &str| lookup(s).unwrap().tensors.len();
        assert_eq!(n("llama-3.1-70b:q4_k_m"), 724);
        assert_eq!(n("llama-3.1-405b:q4_k_m"), 1138);
        assert_eq!(n("qwen3-32b:q4_k_m"), 707);
        assert_eq!(n("qwen3-235b-a22b:q4_k_m"), 1131);
        assert_eq!(n("qwen3-coder-480b-a35b:q4_k_m"), 747);
        assert_eq!(n("mixtral-8x22b:q4_k_m"), 563);
    }

    fn count_types(m: &ModelDesc, ty: GgmlType) -> usize {
        m.tensors.iter().filter(|t| t.ty == ty).count()
    }

    /// unsloth's Qwen3-235B-A22B Q4_K_M as llama.cpp loads it: "type f32: 471, q4_K: 567,
    /// q6_K: 93", "model params = 235.094 B", "model size = 132.386 GiB".
    #[test]
    fn qwen3_235b_q4_k_m_matches_its_load_log_exactly() {
        let m = lookup("qwen3-235b-a22b:q4_k_m").unwrap();
        assert_eq!(count_types(&m, GgmlType::F32), 471);
        assert_eq!(count_types(&m, GgmlType::Q4_K), 567);
        assert_eq!(count_types(&m, GgmlType::Q6_K), 93);
        assert!((params(&m).0 - 235.094).abs() < 0.001);
        let gib = m.total_bytes() as f64 / (1u64 << 30) as f64;
        assert!((gib - 132.386).abs() < 0.001, "{gib} GiB");
    }

    /// ubergarm's Qwen3-Coder-480B BF16 GGUF loads as "type f32: 311, bf16: 436"; our F16 has
    /// the same split (BF16 and F16 are both 2 bytes).
    #[test]
    fn qwen3_coder_480b_f16_split_matches_the_bf16_gguf() {
        let m = lookup("qwen3-coder-480b-a35b:f16").unwrap();
        assert_eq!(
            (
                count_types(&m, GgmlType::F32),
                count_types(&m, GgmlType::F16)
            ),
            (311, 436)
        );
    }

    /// The Llama shapes against real files of another type: llama.cpp's Q4_0 puts every
    /// matrix in Q4_0 but the output (Q6_K). Load logs: 70B "f32: 162", "70.55 B",
    /// "37.22 GiB"; 405B "f32: 254", "405.85 B", "213.13 GiB".
    #[test]
    fn llama_shapes_match_q4_0_load_logs() {
        for (key, f32s, billions, gib) in [
            ("llama-3.1-70b", 162, 70.55, 37.22),
            ("llama-3.1-405b", 254, 405.85, 213.13),
        ] {
            let m = lookup(&format!("{key}:f16")).unwrap();
            assert_eq!(count_types(&m, GgmlType::F32), f32s, "{key}");
            assert!((params(&m).0 - billions).abs() < 0.005, "{key}");
            let bytes: u64 = m
                .tensors
                .iter()
                .map(|t| match t.ty {
                    GgmlType::F16 if t.name == "output.weight" => {
                        GgmlType::Q6_K.bytes_for(t.n_elements()).unwrap()
                    }
                    GgmlType::F16 => GgmlType::Q4_0.bytes_for(t.n_elements()).unwrap(),
                    _ => t.bytes,
                })
                .sum();
            let got = bytes as f64 / (1u64 << 30) as f64;
            assert!(
                (got - gib).abs() < 0.005,
                "{key}: {got} GiB, log says {gib}"
            );
        }
    }

    /// Totals from the model cards (Hugging Face "Model size"); active from the names.
    #[test]
    fn parameter_counts_match_published_totals() {
        let want = [
            ("llama-3.1-70b", 70.6, 70.6),
            ("llama-3.1-405b", 405.9, 405.9),
            ("qwen3-32b", 32.8, 32.8),
            ("qwen3-235b-a22b", 235.1, 22.0),
            ("qwen3-coder-480b-a35b", 480.0, 35.0),
            ("mixtral-8x22b", 140.6, 39.0),
        ];
        for (key, total, active) in want {
            let (t, a) = params(&lookup(&format!("{key}:f16")).unwrap());
            assert!(
                close(t, total, 0.01),
                "{key}: {t:.2}B total, published {total}B"
            );
            // "A22B", "A35B", "39B active" are rounded labels: 3%.
            assert!(
                close(a, active, 0.03),
                "{key}: {a:.2}B active, published ~{active}B"
            );
        }
    }

    /// Published file sizes (GB = 1e9 bytes), within 2%; sources in docs/planner-catalog.md.
    #[test]
    fn total_bytes_match_published_gguf_sizes() {
        let want = [
            ("llama-3.1-70b:q4_k_m", 42.52),
            ("llama-3.1-70b:q6_k", 57.89),
            ("llama-3.1-70b:q8_0", 74.98),
            ("qwen3-32b:q4_k_m", 19.8),
            ("qwen3-32b:q8_0", 34.82),
            ("qwen3-32b:f16", 65.5),
            ("qwen3-235b-a22b:q4_k_m", 142.0),
            ("qwen3-coder-480b-a35b:q4_k_m", 290.0),
            ("mixtral-8x22b:q4_k_m", 85.58),
        ];
        for (spec, published) in want {
            let got = gb(lookup(spec).unwrap().total_bytes());
            assert!(
                close(got, published, 0.02),
                "{spec}: {got:.2} GB, published {published} GB"
            );
        }
    }

    #[test]
    fn q4_k_m_follows_llama_quant_rules() {
        let ty = |m: &ModelDesc, n: &str| m.tensors.iter().find(|t| t.name == n).unwrap().ty;
        let count = |m: &ModelDesc, suffix: &str, want: GgmlType| {
            m.tensors
                .iter()
                .filter(|t| t.name.ends_with(suffix) && t.ty == want)
                .count()
        };
        // use_more_bits over 80 layers: 0..10, 70..80, and 20 of the 60 in between.
        assert_eq!((0..80).filter(|&i| use_more_bits(i, 80)).count(), 40);

        let llama = lookup("llama-3.1-70b:q4_k_m").unwrap();
        assert_eq!(ty(&llama, "token_embd.weight"), GgmlType::Q4_K);
        assert_eq!(ty(&llama, "output.weight"), GgmlType::Q6_K);
        assert_eq!(ty(&llama, "rope_freqs.weight"), GgmlType::F32);
        assert_eq!(ty(&llama, "blk.0.attn_norm.weight"), GgmlType::F32);
        // LLM_TYPE_70B: the attn_v that use_more_bits leaves at Q4_K go to Q5_K.
        assert_eq!(count(&llama, "attn_v.weight", GgmlType::Q6_K), 40);
        assert_eq!(count(&llama, "attn_v.weight", GgmlType::Q5_K), 40);
        assert_eq!(count(&llama, "ffn_down.weight", GgmlType::Q6_K), 40);
        assert_eq!(ty(&llama, "blk.10.ffn_down.weight"), GgmlType::Q4_K);

        // 405B is not LLM_TYPE_70B: no Q5_K anywhere.
        let big = lookup("llama-3.1-405b:q4_k_m").unwrap();
        assert!(big.tensors.iter().all(|t| t.ty != GgmlType::Q5_K));

        let mixtral = lookup("mixtral-8x22b:q4_k_m").unwrap();
        assert_eq!(count(&mixtral, "attn_v.weight", GgmlType::Q8_0), 56);
        assert_eq!(count(&mixtral, "attn_k.weight", GgmlType::Q8_0), 56);
        assert_eq!(count(&mixtral, "attn_output.weight", GgmlType::Q5_K), 56);
        assert_eq!(count(&mixtral, "ffn_gate_inp.weight", GgmlType::F32), 56);
        assert_eq!(ty(&mixtral, "blk.0.ffn_down_exps.weight"), GgmlType::Q6_K);
        assert_eq!(ty(&mixtral, "blk.7.ffn_down_exps.weight"), GgmlType::Q4_K);

        let qwen = lookup("qwen3-235b-a22b:q4_k_m").unwrap();
        assert_eq!(ty(&qwen, "blk.50.attn_output.weight"), GgmlType::Q4_K);
        assert_eq!(ty(&qwen, "blk.0.attn_q_norm.weight"), GgmlType::F32);
        assert_eq!(ty(&qwen, "blk.0.ffn_gate_inp.weight"), GgmlType::F32);
        assert_eq!(ty(&qwen, "blk.0.ffn_up_exps.weight"), GgmlType::Q4_K);
    }

    #[test]
    fn q8_0_keeps_the_output_at_q8_0_and_mixtral_attention_at_q8_0() {
        let m = lookup("llama-3.1-70b:q8_0").unwrap();
        assert!(
            m.tensors
                .iter()
                .all(|t| matches!(t.ty, GgmlType::Q8_0 | GgmlType::F32))
        );
        let m = lookup("mixtral-8x22b:q6_k").unwrap();
        let v = m
            .tensors
            .iter()
            .find(|t| t.name == "blk.3.attn_v.weight")
            .unwrap();
        assert_eq!(v.ty, GgmlType::Q8_0);
        let o = m
            .tensors
            .iter()
            .find(|t| t.name == "output.weight")
            .unwrap();
        assert_eq!(o.ty, GgmlType::Q6_K);
    }

    #[test]
    fn f16_has_only_f16_matrices() {
        for (e, _, m) in all().filter(|(_, q, _)| *q == "f16") {
            for t in &m.tensors {
                let want = if t.dims.len() < 2 || t.role == Role::Router {
                    GgmlType::F32
                } else {
                    GgmlType::F16
                };
                assert_eq!(t.ty, want, "{}: {}", e.key, t.name);
            }
        }
    }

    #[test]
    fn k_quant_rows_that_are_not_whole_blocks_fall_back() {
        assert_eq!(fallback(GgmlType::Q4_K, 4096), GgmlType::Q4_K);
        assert_eq!(fallback(GgmlType::Q4_K, 4096 + 32), GgmlType::Q5_0);
        assert_eq!(fallback(GgmlType::Q6_K, 160), GgmlType::Q8_0);
        assert_eq!(fallback(GgmlType::Q5_K, 96), GgmlType::Q5_1);
        assert_eq!(fallback(GgmlType::Q6_K, 100), GgmlType::F16);
    }

    #[test]
    fn lookup_accepts_both_spellings() {
        let a = lookup("qwen3-235b-a22b:q4_k_m").unwrap();
        let b = lookup("Qwen3-235B-A22B-Q4_K_M").unwrap();
        let c = lookup(" QWEN3-235B-A22B:Q4_K_M ").unwrap();
        let d = lookup("Qwen3-235B-A22B-Q4_K_M.gguf").unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(a, d);
        assert_eq!(a.name, "qwen3-235b-a22b:q4_k_m");
        assert_eq!(
            (a.n_expert, a.n_expert_used, a.arch.as_str()),
            (128, 8, "qwen3moe")
        );
        assert_eq!(
            lookup("llama-3.1-70b-f16").unwrap().name,
            "llama-3.1-70b:f16"
        );
    }

    #[test]
    fn unknown_model_lists_the_catalogue() {
        let Err(PlanError::Catalog(msg)) = lookup("llama-2-70b:q4_k_m") else {
            panic!("expected a catalog error")
        };
        for e in entries() {
            assert!(msg.contains(e.key), "{msg}");
        }
    }

    #[test]
    fn unknown_quant_lists_the_quants() {
        for spec in ["qwen3-32b:q2_k", "qwen3-32b", "qwen3-32b-q5_k_m"] {
            let Err(PlanError::Catalog(msg)) = lookup(spec) else {
                panic!("{spec}: expected a catalog error")
            };
            for q in QUANTS {
                assert!(msg.contains(q), "{spec}: {msg}");
            }
        }
    }

    /// Prints the table in docs/planner-catalog.md
    /// (`cargo test -p shoal-planner catalog::tests::print_sizes -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn print_sizes() {
        for e in entries() {
            let (t, a) = params(&lookup(&format!("{}:f16", e.key)).unwrap());
            let sizes: Vec<String> = QUANTS
                .iter()
                .map(|q| {
                    format!(
                        "{:.2}",
                        gb(lookup(&format!("{}:{q}", e.key)).unwrap().total_bytes())
                    )
                })
                .collect();
            println!("| {} | {t:.2}B | {a:.2}B | {} |", e.key, sizes.join(" | "));
        }
    }
}
