//! Tokenizers built from GGUF metadata, matching llama.cpp's `llama-vocab.cpp` token for token.
//!
//! Supports `tokenizer.ggml.model` "gpt2" (byte-level BPE with a pre-tokenizer chosen by
//! `tokenizer.ggml.pre`, see [`pretok`]) and "llama" (SentencePiece, see [`spm`]). Encoding first
//! partitions the text on special-token strings (llama.cpp's `tokenizer_st_partition`):
//! user-defined tokens always, control and unknown tokens only with `parse_special`; then each
//! remaining text fragment is tokenized on its own.
//!
//! Key decisions: every token's rendered bytes are computed once at load; `decode` is the
//! plain concatenation of those bytes (what a streaming server emits), so it does not apply
//! llama_detokenize's SentencePiece leading-space removal or `clean_spaces` rewriting. This
//! module must not know about models, sampling or the network.

mod bpe;
mod pretok;
mod spm;
mod stream;
mod unicode;
mod unicode_table;
mod vocab;

use std::collections::{BTreeSet, HashMap};
use std::fmt;

pub use stream::StreamDecoder;

use crate::gguf::GgufFile;
use crate::{Error, Result};

/// Token attributes, as llama.cpp's `llama_token_attr` bits.
mod attr {
    pub(crate) const UNKNOWN: u32 = 1 << 0;
    pub(crate) const UNUSED: u32 = 1 << 1;
    pub(crate) const NORMAL: u32 = 1 << 2;
    pub(crate) const CONTROL: u32 = 1 << 3;
    pub(crate) const USER_DEFINED: u32 = 1 << 4;
    pub(crate) const BYTE: u32 = 1 << 5;
    pub(crate) const LSTRIP: u32 = 1 << 7;
    pub(crate) const RSTRIP: u32 = 1 << 8;
}

struct TokenData {
    text: String,
    attr: u32,
}

enum Model {
    Bpe(Box<bpe::Bpe>),
    Spm { scores: Vec<f32>, byte_tokens: Box<[Option<u32>; 256]> },
}

/// A vocabulary and the algorithm to apply it.
pub struct Tokenizer {
    model: Model,
    tokens: Vec<TokenData>,
    token_to_id: HashMap<String, u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    eog: BTreeSet<u32>,
    /// Control, user-defined and unknown tokens, longest text first.
    special: Vec<u32>,
    /// `llama_token_to_piece(id, special = true)` of every token.
    pieces: Vec<Box<[u8]>>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("model", &match self.model {
                Model::Bpe(_) => "bpe",
                Model::Spm { .. } => "spm",
            })
            .field("n_vocab", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish()
    }
}

/// A piece of the text being encoded: a special token, or a byte range still to tokenize.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Frag {
    Token(u32),
    Text(usize, usize),
}

/// C's `isspace` in the "C" locale, which llama.cpp uses for LSTRIP/RSTRIP.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

impl Tokenizer {
    pub fn from_gguf(f: &GgufFile) -> Result<Tokenizer> {
        vocab::load(f)
    }

    /// Like llama_tokenize: `add_special` adds BOS (and EOS) when the vocab says so;
    /// `parse_special` lets control-token texts in `text` become their ids.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        let frags = self.partition(text, parse_special);
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.push(self.bos.ok_or_else(|| Error::Tokenizer("the vocab adds BOS but has no BOS token".into()))?);
        }
        match &self.model {
            Model::Spm { scores, byte_tokens } => {
                let mut prev_special = true;
                let mut buf = String::new();
                for frag in frags {
                    match frag {
                        Frag::Text(s, e) => {
                            buf.clear();
                            if self.add_space_prefix && prev_special {
                                buf.push(' ');
                            }
                            buf.push_str(&text[s..e]);
                            let escaped = buf.replace(' ', "\u{2581}");
                            spm::encode(&escaped, &self.token_to_id, scores, byte_tokens, &mut out)
                                .map_err(Error::Tokenizer)?;
                            prev_special = false;
                        }
                        Frag::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                    }
                }
            }
            Model::Bpe(bpe) => {
                for frag in frags {
                    match frag {
                        Frag::Text(s, e) => {
                            bpe.encode(&text[s..e], &self.token_to_id, &mut out).map_err(Error::Tokenizer)?
                        }
                        Frag::Token(id) => out.push(id),
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.push(self.eos.ok_or_else(|| Error::Tokenizer("the vocab adds EOS but has no EOS token".into()))?);
        }
        Ok(out)
    }

    /// Splits `text` on special-token strings, longest token first (`tokenizer_st_partition`).
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Frag> {
        if text.is_empty() {
            return Vec::new();
        }
        let bytes = text.as_bytes();
        let mut frags = vec![Frag::Text(0, text.len())];
        let mut next = Vec::new();
        for &id in &self.special {
            let tok = &self.tokens[id as usize];
            if !parse_special && tok.attr & (attr::CONTROL | attr::UNKNOWN) != 0 {
                continue;
            }
            let needle = tok.text.as_str();
            if !frags.iter().any(|f| matches!(*f, Frag::Text(s, e) if text[s..e].contains(needle))) {
                continue;
            }
            next.clear();
            for frag in frags.drain(..) {
                let Frag::Text(mut s, e) = frag else {
                    next.push(frag);
                    continue;
                };
                while let Some(p) = text[s..e].find(needle) {
                    let m = s + p;
                    let mut left_end = m;
                    if tok.attr & attr::LSTRIP != 0 {
                        while left_end > s && is_c_space(bytes[left_end - 1]) {
                            left_end -= 1;
                        }
                    }
                    if left_end > s {
                        next.push(Frag::Text(s, left_end));
                    }
                    next.push(Frag::Token(id));
                    s = m + needle.len();
                    if tok.attr & attr::RSTRIP != 0 {
                        while s < e && is_c_space(bytes[s]) {
                            s += 1;
                        }
                    }
                }
                if s < e {
                    next.push(Frag::Text(s, e));
                }
            }
            std::mem::swap(&mut frags, &mut next);
        }
        frags
    }

    /// Raw bytes of one token as llama_token_to_piece renders it: byte-level BPE decoded to
    /// bytes, SentencePiece `▁` as space and `<0xXX>` as the byte; control and unknown tokens
    /// render their text only when `special` is true. Unknown ids render as nothing.
    pub fn token_bytes(&self, id: u32, special: bool) -> Vec<u8> {
        let Some(t) = self.tokens.get(id as usize) else { return Vec::new() };
        if !special && t.attr & (attr::UNKNOWN | attr::CONTROL) != 0 {
            return Vec::new();
        }
        self.pieces[id as usize].to_vec()
    }

    /// The concatenated pieces of `ids`, as lossy UTF-8.
    pub fn decode(&self, ids: &[u32], special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            match self.tokens.get(id as usize) {
                Some(t) if special || t.attr & (attr::UNKNOWN | attr::CONTROL) == 0 => {
                    bytes.extend_from_slice(&self.pieces[id as usize])
                }
                _ => {}
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn n_vocab(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Whether `id` ends generation: EOS, EOT, EOM and the tokens llama.cpp recognises by text
    /// (`<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`, FIM pad/repo/sep, …).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// Whether encoding with `add_special` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The token's text as stored in the vocab (byte-level or `▁`-escaped).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(|t| t.text.as_str())
    }

    /// The id of the token whose vocab text is `text`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{Array, Builder, Value};

    fn tiny_spm() -> Tokenizer {
        let texts = ["<unk>", "<s>", "</s>", "▁", "a", "b", "▁a", "<0x0A>", "<sep>", "▁b"];
        let types = [2, 3, 3, 1, 1, 1, 1, 6, 4, 1];
        let bytes = Builder::new()
            .kv("tokenizer.ggml.model", Value::String("llama".into()))
            .kv("tokenizer.ggml.tokens", Value::Array(Array::String(texts.map(String::from).to_vec())))
            .kv("tokenizer.ggml.scores", Value::Array(Array::F32(vec![0.0; 10])))
            .kv("tokenizer.ggml.token_type", Value::Array(Array::I32(types.to_vec())))
            .build();
        let dir = std::env::temp_dir().join(format!("shoal-tok-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny-spm.gguf");
        std::fs::write(&path, bytes).unwrap();
        Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap()
    }

    #[test]
    fn tokenizer_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<crate::chat::ChatTemplate>();
    }

    #[test]
    fn spm_adds_bos_and_prefix_space_and_partitions_user_tokens() {
        let t = tiny_spm();
        assert_eq!(t.encode("a", true, false).unwrap(), [1, 6]);
        // User-defined tokens are split out even without parse_special; text after any special
        // token gets the prefix space again.
        assert_eq!(t.encode("a<sep>b", false, false).unwrap(), [6, 8, 9]);
        // Without parse_special "</s>" is text, and this vocab has no byte token for '<'.
        assert!(t.encode("a</s>b", false, false).is_err());
        assert_eq!(t.encode("a</s>b", false, true).unwrap(), [6, 2, 9]);
        assert_eq!(t.encode("a\n", false, false).unwrap(), [6, 7]);
        assert_eq!(t.decode(&[1, 6, 7, 8], false), " a\n<sep>");
        assert_eq!(t.decode(&[1, 6], true), "<s> a");
        assert!(t.is_eog(2) && !t.is_eog(1));
        assert_eq!(t.encode("", true, false).unwrap(), [1]);
    }
}
