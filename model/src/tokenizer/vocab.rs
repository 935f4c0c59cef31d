//! Builds a [`Tokenizer`] from GGUF metadata, following `llama_vocab::impl::load`.
//!
//! Owns the defaults llama.cpp applies per tokenizer model and pre-tokenizer, the token
//! attributes derived from `tokenizer.ggml.token_type`, the special ids (from metadata, then
//! detected by text), the end-of-generation set, the order in which special tokens are
//! partitioned out of text, and the piece of every token.
//!
//! Where llama.cpp iterates its `unordered_map` of texts (EOT/FIM detection), this iterates ids
//! in ascending order, which makes the choice deterministic; the EOG set does not depend on it.

use std::collections::{BTreeSet, HashMap};

use super::bpe::Bpe;
use super::pretok::{self, PreTokenizer};
use super::unicode::byte_decode;
use super::{Model, TokenData, Tokenizer, attr};
use crate::gguf::{Array, GgufFile};
use crate::{Error, Result};

fn tok_err(msg: impl Into<String>) -> Error {
    Error::Tokenizer(msg.into())
}

const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
    "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>", "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>", "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>", "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
];

/// Special ids, in llama.cpp's `special_token_types` order.
#[derive(Default)]
struct Specials {
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    fim_pre: Option<u32>,
    fim_suf: Option<u32>,
    fim_mid: Option<u32>,
    fim_pad: Option<u32>,
    fim_rep: Option<u32>,
    fim_sep: Option<u32>,
}

/// The first id in `eog` whose text is one of `texts`.
fn find_in(eog: &BTreeSet<u32>, tokens: &[TokenData], texts: &[&str]) -> Option<u32> {
    eog.iter().copied().find(|&i| texts.contains(&tokens[i as usize].text.as_str()))
}

fn opt_bool(f: &GgufFile, key: &str) -> Option<bool> {
    f.get(key).and_then(|v| v.as_bool())
}

pub(super) fn load(f: &GgufFile) -> Result<Tokenizer> {
    let model_name = f.require_str("tokenizer.ggml.model")?;
    let pre_name = f.get_str("tokenizer.ggml.pre")?.unwrap_or("");
    let is_bpe = match model_name {
        "gpt2" => true,
        "llama" => false,
        other => {
            return Err(tok_err(format!(
                "unsupported tokenizer model {other:?} \
                 (shoal supports \"gpt2\" byte-level BPE and \"llama\" SentencePiece)"
            )));
        }
    };

    let mut sp = Specials::default();
    let pre_cfg;
    let (mut add_bos, mut add_eos, mut add_space_prefix);
    if is_bpe {
        sp.bos = Some(11);
        sp.eos = Some(11);
        pre_cfg = if pre_name.is_empty() {
            tracing::warn!("GGUF has no tokenizer.ggml.pre: using the default pre-tokenizer; quality may suffer");
            pretok::default_config()
        } else {
            pretok::config_for(pre_name).unwrap_or_else(|| {
                tracing::warn!(pre = pre_name, "unknown pre-tokenizer: using the default GPT-2 one");
                pretok::default_config()
            })
        };
        if pre_cfg.no_default_bos {
            sp.bos = None;
        }
        add_space_prefix = false;
        add_bos = pre_cfg.add_bos;
        add_eos = false;
    } else {
        sp.bos = Some(1);
        sp.eos = Some(2);
        pre_cfg = pretok::default_config();
        add_space_prefix = true;
        add_bos = true;
        add_eos = false;
    }
    if let Some(v) = opt_bool(f, "tokenizer.ggml.add_space_prefix") {
        add_space_prefix = v;
    }

    let texts = match f.get_array("tokenizer.ggml.tokens")? {
        Some(Array::String(v)) => v,
        Some(_) => return Err(tok_err("tokenizer.ggml.tokens is not an array of strings")),
        None => return Err(Error::MissingMetadata("tokenizer.ggml.tokens".into())),
    };
    let n = texts.len();
    if n == 0 || n >= u32::MAX as usize / 2 {
        return Err(tok_err(format!("vocab of {n} tokens")));
    }
    let scores: Vec<f32> = match f.get_array("tokenizer.ggml.scores")? {
        None => vec![0.0; n],
        Some(Array::F32(v)) if v.len() >= n => v[..n].to_vec(),
        Some(Array::I32(v)) if v.len() >= n => v[..n].iter().map(|&x| x as f32).collect(),
        Some(a) => return Err(tok_err(format!("tokenizer.ggml.scores: {} f32/i32 values for {n} tokens", a.len()))),
    };
    let types: Option<&[i32]> = match f.get_array("tokenizer.ggml.token_type")? {
        None => None,
        Some(Array::I32(v)) if v.len() >= n => Some(&v[..n]),
        Some(a) => return Err(tok_err(format!("tokenizer.ggml.token_type: {} i32 values for {n} tokens", a.len()))),
    };

    let mut tokens = Vec::with_capacity(n);
    let mut token_to_id = HashMap::with_capacity(n);
    for (i, t) in texts.iter().enumerate() {
        let text = if t.is_empty() {
            tracing::warn!(id = i, "empty token text");
            format!("[EMPTY_{i}]")
        } else {
            t.clone()
        };
        let a = match types.map(|ty| ty[i]) {
            None | Some(1) => attr::NORMAL,
            Some(2) => attr::UNKNOWN,
            Some(3) => attr::CONTROL,
            Some(4) => attr::USER_DEFINED,
            Some(5) => attr::UNUSED,
            Some(6) => attr::BYTE,
            Some(_) => 0,
        };
        // Later duplicates win, as with llama.cpp's `token_to_id[word] = i`.
        token_to_id.insert(text.clone(), i as u32);
        tokens.push(TokenData { text, attr: a });
    }

    let model = if is_bpe {
        let merges = match f.get_array("tokenizer.ggml.merges")? {
            Some(Array::String(v)) => v,
            Some(_) => return Err(tok_err("tokenizer.ggml.merges is not an array of strings")),
            None => return Err(tok_err("BPE vocab without tokenizer.ggml.merges")),
        };
        let pre = PreTokenizer::new(pre_cfg.regexes).map_err(tok_err)?;
        Model::Bpe(Box::new(Bpe::new(&token_to_id, n as u32, merges, pre, pre_cfg.ignore_merges)))
    } else {
        let byte_tokens = std::array::from_fn(|b| {
            let hex = format!("<0x{b:02X}>");
            token_to_id.get(&hex).copied().or_else(|| {
                // llama.cpp falls back to the byte itself as a one-character string.
                (b < 0x80).then(|| token_to_id.get(&(b as u8 as char).to_string()).copied()).flatten()
            })
        });
        Model::Spm { scores, byte_tokens: Box::new(byte_tokens) }
    };

    // Special ids from metadata. A default out of range is dropped; a bad value keeps the default.
    let read_id = |key: &str, slot: &mut Option<u32>| {
        if slot.is_some_and(|id| id as usize >= n) {
            *slot = None;
        }
        match f.get(key).and_then(|v| v.as_u64()) {
            Some(id) if (id as usize) < n => *slot = Some(id as u32),
            Some(id) => tracing::warn!(key, id, "special token id out of vocab range, ignored"),
            None => {}
        }
    };
    read_id("tokenizer.ggml.bos_token_id", &mut sp.bos);
    read_id("tokenizer.ggml.eos_token_id", &mut sp.eos);
    read_id("tokenizer.ggml.eot_token_id", &mut sp.eot);
    read_id("tokenizer.ggml.eom_token_id", &mut sp.eom);
    read_id("tokenizer.ggml.fim_pre_token_id", &mut sp.fim_pre);
    read_id("tokenizer.ggml.fim_suf_token_id", &mut sp.fim_suf);
    read_id("tokenizer.ggml.fim_mid_token_id", &mut sp.fim_mid);
    read_id("tokenizer.ggml.fim_pad_token_id", &mut sp.fim_pad);
    read_id("tokenizer.ggml.fim_rep_token_id", &mut sp.fim_rep);
    read_id("tokenizer.ggml.fim_sep_token_id", &mut sp.fim_sep);
    // Deprecated names.
    read_id("tokenizer.ggml.prefix_token_id", &mut sp.fim_pre);
    read_id("tokenizer.ggml.suffix_token_id", &mut sp.fim_suf);
    read_id("tokenizer.ggml.middle_token_id", &mut sp.fim_mid);
    if let Some(v) = opt_bool(f, "tokenizer.ggml.add_bos_token") {
        add_bos = v;
    }
    if let Some(v) = opt_bool(f, "tokenizer.ggml.add_eos_token") {
        add_eos = v;
    }

    // Detect EOT, EOM and FIM tokens by text; each found one is forced to be a control token.
    let unique = |i: usize, t: &TokenData| token_to_id.get(&t.text) == Some(&(i as u32));
    let ids: Vec<usize> = (0..n).filter(|&i| unique(i, &tokens[i])).collect();
    {
        let groups: [(&mut Option<u32>, &[&str]); 8] = [
            (&mut sp.eot, EOT_TEXTS),
            (&mut sp.eom, EOM_TEXTS),
            (&mut sp.fim_pre, FIM_PRE_TEXTS),
            (&mut sp.fim_suf, FIM_SUF_TEXTS),
            (&mut sp.fim_mid, FIM_MID_TEXTS),
            (&mut sp.fim_pad, FIM_PAD_TEXTS),
            (&mut sp.fim_rep, FIM_REP_TEXTS),
            (&mut sp.fim_sep, FIM_SEP_TEXTS),
        ];
        for (slot, names) in groups {
            if slot.is_some() {
                continue;
            }
            if let Some(&i) = ids.iter().find(|&&i| names.contains(&tokens[i].text.as_str())) {
                *slot = Some(i as u32);
                tokens[i].attr |= attr::CONTROL;
            }
        }
    }
    // Control tokens named "unused" are unused.
    for &i in &ids {
        if tokens[i].attr & attr::CONTROL != 0 && tokens[i].text.contains("unused") {
            tokens[i].attr |= attr::UNUSED;
        }
    }

    // The end-of-generation set.
    let mut eog = BTreeSet::new();
    eog.extend([sp.fim_pad, sp.fim_rep, sp.fim_sep].into_iter().flatten());
    for &i in &ids {
        if EOG_TEXTS.contains(&tokens[i].text.as_str()) {
            eog.insert(i as u32);
            tokens[i].attr |= attr::CONTROL;
        }
    }
    // gpt-oss: these always render.
    for &i in &ids {
        if ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"].contains(&tokens[i].text.as_str()) {
            tokens[i].attr = attr::USER_DEFINED;
        }
    }
    eog.extend([sp.eos, sp.eot, sp.eom].into_iter().flatten());
    // o200k_harmony and solar-open: "<|end|>" ends a message, not the generation.
    let call = find_in(&eog, &tokens, &["<|call|>", "<|calls|>"]).is_some();
    let ret = find_in(&eog, &tokens, &["<|return|>"]).is_some();
    let flush = find_in(&eog, &tokens, &["<|flush|>"]).is_some();
    if let Some(end) = find_in(&eog, &tokens, &["<|end|>"]).filter(|_| call && (ret || flush)) {
        eog.remove(&end);
        tokens[end as usize].attr = attr::USER_DEFINED;
    }
    // gemma4 and plamo have a normal "</s>".
    if let Some(s) = find_in(&eog, &tokens, &["</s>"])
        && find_in(&eog, &tokens, &["<|tool_response>", "<|plamo:eos|>"]).is_some()
    {
        eog.remove(&s);
        tokens[s as usize].attr = attr::NORMAL;
    }

    // Special tokens are partitioned out of text longest first (ties: lower id first;
    // llama.cpp's std::sort leaves ties unspecified).
    let mut special: Vec<u32> = (0..n as u32)
        .filter(|&i| tokens[i as usize].attr & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0)
        .collect();
    special.sort_by_key(|&i| std::cmp::Reverse(tokens[i as usize].text.len()));

    // Every token's piece, as llama_token_to_piece(special = true) renders it.
    let pieces = tokens
        .iter()
        .map(|t| {
            let a = t.attr;
            if a & (attr::UNKNOWN | attr::CONTROL | attr::USER_DEFINED) != 0 {
                t.text.as_bytes().into()
            } else if a & attr::NORMAL != 0 {
                if is_bpe { byte_decode(&t.text).into() } else { t.text.replace('\u{2581}', " ").into_bytes().into() }
            } else if a & attr::BYTE != 0 {
                let hex = t.text.get(3..5).unwrap_or("");
                // strtol: the longest valid hex prefix, 0 if none.
                let digits = hex.find(|c: char| !c.is_ascii_hexdigit()).map_or(hex, |p| &hex[..p]);
                vec![u8::from_str_radix(digits, 16).unwrap_or(0)].into()
            } else {
                Box::default()
            }
        })
        .collect();

    // Per-model attributes llama.cpp sets by name (Phi-3 strips spaces after special tokens).
    let general_name = f.get_str("general.name").ok().flatten().unwrap_or("").to_lowercase();
    if general_name.contains("phi-3") || general_name.contains("phi3") {
        for &i in &special {
            tokens[i as usize].attr |= attr::RSTRIP;
        }
        for (text, on) in [("</s>", true), ("<unk>", false), ("<s>", false), ("<|endoftext|>", false)] {
            if let Some(&i) = token_to_id.get(text) {
                let a = &mut tokens[i as usize].attr;
                *a = if on { *a | attr::RSTRIP } else { *a & !attr::RSTRIP };
            }
        }
    }

    Ok(Tokenizer {
        model,
        tokens,
        token_to_id,
        bos: sp.bos,
        eos: sp.eos,
        add_bos,
        add_eos,
        add_space_prefix,
        eog,
        special,
        pieces,
    })
}
