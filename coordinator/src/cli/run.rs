//! `shoal run`: one prompt, one completion, in this process.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use shoal_model::chat::{ChatMessage, ChatTemplate};
use shoal_model::engine::{Engine, GenerateRequest, Generation};
use shoal_model::sampling::SamplingParams;
use shoal_model::tokenizer::Tokenizer;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Path of the GGUF model file.
    #[arg(long, short, env = "SHOAL_MODEL")]
    model: PathBuf,
    /// Compute threads (default: all cores).
    #[arg(long, short)]
    threads: Option<usize>,
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Seed of the sampler (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this text is generated (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Context length (default: the model's, at most 4096).
    #[arg(long, default_value_t = 0)]
    ctx: usize,
    /// Format the prompt as a user message with the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long)]
    system: Option<String>,
    /// Keep generating past end-of-generation tokens (raw greedy runs, like llama-bench).
    #[arg(long)]
    ignore_eos: bool,
    /// Print timings and peak memory to stderr when done.
    #[arg(long)]
    print_stats: bool,
    #[command(flatten)]
    pub cluster: super::cluster::ClusterArgs,
    /// The prompt.
    prompt: String,
}

mod cluster;

pub fn run(a: RunArgs) -> Result<()> {
    if a.cluster.enabled() {
        return cluster::run(a);
    }
    let threads = a.threads.unwrap_or_else(super::default_threads);
    let mut engine = Engine::load(&a.model, threads, a.ctx)?;
    super::prefault(&engine.file);
    let req = request(&a, &engine.tokenizer, engine.chat.as_ref())?;
    let mut sink = StdoutSink::new();
    let t0 = std::time::Instant::now();
    let g = engine.generate(&req, |piece| sink.write(piece))?;
    sink.finish()?;
    if a.print_stats {
        print_stats(&g, t0.elapsed().as_secs_f64(), 0);
    }
    Ok(())
}

/// The generation `a` asks for: sampling parameters checked, the prompt tokenized raw (BOS as
/// the vocabulary wants) or, with `--chat`, formatted by the model's template.
pub(super) fn request(a: &RunArgs, tok: &Tokenizer, chat: Option<&ChatTemplate>) -> Result<GenerateRequest> {
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty,
        seed: a.seed,
        ..SamplingParams::default()
    };
    params.validate().map_err(anyhow::Error::msg)?;
    let prompt_tokens = if a.chat {
        let chat = chat.ok_or_else(|| {
            shoal_model::Error::ChatTemplate("the model file has no chat template".into())
        })?;
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(ChatMessage { role: "system".into(), content: s.clone() });
        }
        messages.push(ChatMessage { role: "user".into(), content: a.prompt.clone() });
        // The template writes BOS itself when the model wants one.
        tok.encode(&chat.render(&messages, true)?, false, true)?
    } else {
        tok.encode(&a.prompt, true, false)?
    };
    Ok(GenerateRequest {
        prompt_tokens,
        params,
        max_tokens: a.max_tokens,
        stop: a.stop.clone(),
        stop_at_eog: !a.ignore_eos,
    })
}

/// Streams completion text to stdout, keeping the first write error for the end.
pub(super) struct StdoutSink {
    out: std::io::StdoutLock<'static>,
    err: Option<std::io::Error>,
}

impl StdoutSink {
    pub(super) fn new() -> Self {
        StdoutSink { out: std::io::stdout().lock(), err: None }
    }

    pub(super) fn write(&mut self, piece: &str) {
        if self.err.is_none()
            && let Err(e) = self.out.write_all(piece.as_bytes()).and_then(|_| self.out.flush())
        {
            self.err = Some(e);
        }
    }

    /// Ends the completion with a newline; reports a failed write.
    pub(super) fn finish(mut self) -> Result<()> {
        if let Some(e) = self.err.take() {
            return Err(e).context("writing to stdout");
        }
        writeln!(self.out).context("writing to stdout")
    }
}

/// The `--print-stats` line on stderr.
pub(super) fn print_stats(g: &Generation, seconds: f64, workers: usize) {
    eprintln!(
        "shoal: prompt_tokens={} generated_tokens={} finish={} seconds={seconds:.3} \
         peak_rss_bytes={} workers={workers}",
        g.n_prompt,
        g.tokens.len(),
        g.finish.as_str(),
        super::peak_rss_bytes().unwrap_or(0),
    );
}
