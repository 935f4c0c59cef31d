//! The single-process engine: one shard holding the whole model, a tokenizer, a chat
//! template, and the generation loop (prefill in chunks, decode, stop strings, max tokens,
//! streaming text that is always valid UTF-8).
//!
//! `shoal run` and the tests use it directly; the distributed path reuses the same pieces
//! (executor, sampler, [`StopMatcher`]) split across processes.

use std::path::Path;
use std::sync::Arc;

use crate::arch::Config;
use crate::chat::{ChatMessage, ChatTemplate};
use crate::executor::{SeqChunk, ShardExecutor, StageInput, StageOutput};
use crate::gguf::GgufFile;
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::weights::{ShardSpec, Weights};
use crate::{Error, Result};

/// Tokens per prefill step (llama.cpp's default `n_ubatch`).
pub const PREFILL_CHUNK: usize = 512;

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One generation request.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt_tokens: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Stop at the vocabulary's end-of-generation tokens (off to reproduce raw greedy runs).
    pub stop_at_eog: bool,
}

/// The result of a generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub n_prompt: usize,
}

/// Finds stop strings in streamed text and holds back text that might start one.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), ..Default::default() }
    }

    /// Adds text; returns (text safe to emit now, whether a stop string was hit).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.text.push_str(piece);
        let search_from = self.emitted.saturating_sub(self.stops.iter().map(|s| s.len()).max().unwrap_or(0));
        let search_from = floor_boundary(&self.text, search_from);
        let hit = self.stops.iter().filter_map(|s| self.text[search_from..].find(s.as_str()).map(|i| i + search_from)).min();
        if let Some(at) = hit {
            let out = self.text[self.emitted..at.max(self.emitted)].to_string();
            self.text.truncate(at);
            self.emitted = self.text.len();
            return (out, true);
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            let longest = (1..s.len()).rev().find(|&k| s.is_char_boundary(k) && self.text.ends_with(&s[..k]));
            hold = hold.max(longest.unwrap_or(0));
        }
        let safe = floor_boundary(&self.text, self.text.len() - hold).max(self.emitted);
        let out = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        (out, false)
    }

    /// Text held back at the end (no stop string came).
    pub fn finish(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }

    /// All text accepted so far, stop string excluded.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Turns sampled tokens into a completion: stops at end-of-generation tokens (when asked), at
/// stop strings and at `max_tokens`, and hands out text only when it is valid UTF-8 and cannot
/// be the start of a stop string. Shared by the single-process engine and the pipeline driver,
/// so both end generations the same way.
pub struct TokenStream<'a> {
    tok: &'a Tokenizer,
    req: &'a GenerateRequest,
    tokens: Vec<u32>,
    dec: StreamDecoder,
    stops: StopMatcher,
    finish: FinishReason,
}

impl<'a> TokenStream<'a> {
    pub fn new(tok: &'a Tokenizer, req: &'a GenerateRequest) -> Self {
        TokenStream {
            tok,
            req,
            tokens: Vec::new(),
            dec: StreamDecoder::new(),
            stops: StopMatcher::new(req.stop.clone()),
            finish: FinishReason::Length,
        }
    }

    /// Accepts one sampled token, passing any text now decided to `on_text`. Returns whether
    /// generation goes on.
    pub fn push(&mut self, id: u32, on_text: &mut dyn FnMut(&str)) -> bool {
        if self.req.stop_at_eog && self.tok.is_eog(id) {
            self.finish = FinishReason::Stop;
            return false;
        }
        self.tokens.push(id);
        let (out, hit) = self.stops.push(&self.dec.push(&self.tok.token_bytes(id, false)));
        if !out.is_empty() {
            on_text(&out);
        }
        if hit {
            self.finish = FinishReason::Stop;
            return false;
        }
        self.tokens.len() < self.req.max_tokens
    }

    /// Tokens accepted so far.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Flushes held-back text (when no stop string ended the generation) and returns it all.
    pub fn finish(mut self, on_text: &mut dyn FnMut(&str)) -> Generation {
        if self.finish == FinishReason::Length {
            let (out, _) = self.stops.push(&self.dec.finish());
            on_text(&out);
            on_text(&self.stops.finish());
        }
        Generation {
            tokens: self.tokens,
            text: self.stops.text().to_string(),
            finish: self.finish,
            n_prompt: self.req.prompt_tokens.len(),
        }
    }
}

/// One decode step of one sequence on a shard that holds the whole model.
fn decode_step(exec: &mut ShardExecutor, seq: u64, token: u32) -> Result<Vec<f32>> {
    match exec.forward(&[SeqChunk { seq, n_tokens: 1 }], StageInput::Tokens(&[token]))? {
        StageOutput::Logits(l) => Ok(l),
        StageOutput::Hidden(_) => unreachable!("a full shard has the head"),
    }
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// A whole model in this process.
pub struct Engine {
    pub file: Arc<GgufFile>,
    pub config: Config,
    pub tokenizer: Tokenizer,
    pub chat: Option<ChatTemplate>,
    exec: ShardExecutor,
    next_seq: u64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("config", &self.config).field("exec", &self.exec).finish()
    }
}

impl Engine {
    /// Opens `path` and prepares every layer. `n_ctx` of 0 means the trained context, capped
    /// at 4096 like llama.cpp's default.
    pub fn load(path: impl AsRef<Path>, n_threads: usize, n_ctx: usize) -> Result<Engine> {
        let file = Arc::new(GgufFile::open(path)?);
        let config = Config::from_gguf(&file)?;
        let weights = Arc::new(Weights::load(Arc::clone(&file), ShardSpec::full(config.n_layer))?);
        let tokenizer = Tokenizer::from_gguf(&file)?;
        if tokenizer.n_vocab() != config.n_vocab {
            return Err(Error::Tokenizer(format!(
                "vocabulary of {} tokens but the model has {} rows of embeddings",
                tokenizer.n_vocab(),
                config.n_vocab
            )));
        }
        let chat = ChatTemplate::from_gguf(&file, &tokenizer)?;
        let n_ctx = if n_ctx == 0 { config.n_ctx_train.min(4096) } else { n_ctx };
        let exec = ShardExecutor::new(weights, n_threads, n_ctx);
        Ok(Engine { file, config, tokenizer, chat, exec, next_seq: 0 })
    }

    pub fn executor(&mut self) -> &mut ShardExecutor {
        &mut self.exec
    }

    /// Formats a conversation with the model's chat template.
    pub fn apply_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        let t = self.chat.as_ref().ok_or_else(|| Error::ChatTemplate("the model file has no chat template".into()))?;
        t.render(messages, true)
    }

    /// Tokenizes a prompt as llama.cpp does for raw completion (BOS if the vocab adds it).
    /// Special-token text is parsed only for chat-formatted prompts.
    pub fn tokenize(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, true, parse_special)
    }

    /// Runs the prompt through the model and returns the last position's logits.
    pub fn prefill(&mut self, seq: u64, tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(Error::InvalidRequest("empty prompt".into()));
        }
        let mut logits = Vec::new();
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            let out = self.exec.forward(&[SeqChunk { seq, n_tokens: chunk.len() }], StageInput::Tokens(chunk))?;
            if let StageOutput::Logits(l) = out {
                logits = l;
            }
        }
        Ok(logits)
    }

    /// One decode step for one sequence.
    pub fn decode(&mut self, seq: u64, token: u32) -> Result<Vec<f32>> {
        decode_step(&mut self.exec, seq, token)
    }

    /// Generates a completion; `on_text` receives valid UTF-8 pieces as they are decided.
    pub fn generate(&mut self, req: &GenerateRequest, mut on_text: impl FnMut(&str)) -> Result<Generation> {
        req.params.validate().map_err(Error::InvalidRequest)?;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.exec.add_sequence(seq);
        let r = self.generate_seq(seq, req, &mut on_text);
        self.exec.release(seq);
        r
    }

    fn generate_seq(&mut self, seq: u64, req: &GenerateRequest, on_text: &mut dyn FnMut(&str)) -> Result<Generation> {
        let n_ctx = self.exec.n_ctx();
        if req.prompt_tokens.len() >= n_ctx {
            return Err(Error::InvalidRequest(format!(
                "prompt of {} tokens does not fit the context of {n_ctx}",
                req.prompt_tokens.len()
            )));
        }
        let mut sampler = Sampler::new(req.params.clone());
        sampler.accept(&req.prompt_tokens);
        let mut logits = self.prefill(seq, &req.prompt_tokens)?;
        let mut stream = TokenStream::new(&self.tokenizer, req);
        if req.max_tokens > 0 {
            loop {
                let id = sampler.sample(&logits);
                if !stream.push(id, on_text) || req.prompt_tokens.len() + stream.len() >= n_ctx {
                    break;
                }
                logits = decode_step(&mut self.exec, seq, id)?;
            }
        }
        Ok(stream.finish(on_text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (o, hit) = m.push(p);
            out += &o;
            if hit {
                return (out, true);
            }
        }
        out += &m.finish();
        (out, false)
    }

    #[test]
    fn stop_string_split_across_pieces_is_cut() {
        assert_eq!(run(&["END"], &["hello E", "N", "D tail"]), ("hello ".to_string(), true));
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".to_string(), true));
    }

    #[test]
    fn held_back_text_is_released_when_no_stop_comes() {
        assert_eq!(run(&["END"], &["hello E", "N", "x"]), ("hello ENx".to_string(), false));
        assert_eq!(run(&[], &["é", "ü"]), ("éü".to_string(), false));
    }

    #[test]
    fn multibyte_stop_strings_work() {
        assert_eq!(run(&["ü!"], &["aé", "ü", "!z"]), ("aé".to_string(), true));
    }
}
