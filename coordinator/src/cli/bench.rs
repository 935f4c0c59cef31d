//! `shoal bench`: prefill and decode speed, measured the way llama-bench measures them.
//!
//! pp: `n_prompt` random tokens evaluated in one step on an empty sequence. tg: `n_gen` single
//! token steps starting from an empty sequence. Each is repeated `reps` times after one
//! warm-up run; the figure is the mean of tokens/s, with the standard deviation.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use shoal_model::arch::Config;
use shoal_model::engine::PREFILL_CHUNK;
use shoal_model::executor::{SeqChunk, ShardExecutor, StageInput};
use shoal_model::gguf::GgufFile;
use shoal_model::sampling::Rng;
use shoal_model::weights::{ShardSpec, Weights};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[arg(long, short)]
    model: PathBuf,
    #[arg(long, short)]
    threads: Option<usize>,
    /// Prompt tokens for the prefill test (0 skips it).
    #[arg(long, short = 'p', default_value_t = 512)]
    n_prompt: usize,
    /// Generated tokens for the decode test (0 skips it).
    #[arg(long, short = 'n', default_value_t = 128)]
    n_gen: usize,
    #[arg(long, short, default_value_t = 3)]
    reps: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let m = v.iter().sum::<f64>() / v.len().max(1) as f64;
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len().max(1) as f64;
    (m, var.sqrt())
}

pub fn run(a: BenchArgs) -> Result<()> {
    let threads = a.threads.unwrap_or_else(super::default_threads);
    let file = Arc::new(GgufFile::open(&a.model)?);
    let config = Config::from_gguf(&file)?;
    let weights = Arc::new(Weights::load(Arc::clone(&file), ShardSpec::full(config.n_layer))?);
    super::prefault(&file);
    let n_ctx = (a.n_prompt.max(a.n_gen) + 16).max(64);
    let mut exec = ShardExecutor::new(weights, threads, n_ctx);
    let mut rng = Rng::new(1234);
    let mut tok = || (rng.next_u64() % config.n_vocab as u64) as u32;
    let reps = a.reps.max(1);

    let mut pp = Vec::new();
    if a.n_prompt > 0 {
        let prompt: Vec<u32> = (0..a.n_prompt).map(|_| tok()).collect();
        for r in 0..=reps {
            exec.add_sequence(0);
            let t0 = Instant::now();
            for chunk in prompt.chunks(PREFILL_CHUNK) {
                exec.forward(&[SeqChunk { seq: 0, n_tokens: chunk.len() }], StageInput::Tokens(chunk))?;
            }
            let dt = t0.elapsed().as_secs_f64();
            if r > 0 {
                pp.push(a.n_prompt as f64 / dt);
            }
        }
    }
    let mut tg = Vec::new();
    if a.n_gen > 0 {
        for r in 0..=reps {
            exec.add_sequence(0);
            let mut t = tok();
            let t0 = Instant::now();
            for _ in 0..a.n_gen {
                exec.forward(&[SeqChunk { seq: 0, n_tokens: 1 }], StageInput::Tokens(&[t]))?;
                t = tok();
            }
            let dt = t0.elapsed().as_secs_f64();
            if r > 0 {
                tg.push(a.n_gen as f64 / dt);
            }
        }
    }
    let (ppm, pps) = mean_std(&pp);
    let (tgm, tgs) = mean_std(&tg);
    let name = a.model.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    if a.json {
        let j = serde_json::json!({
            "model": name, "threads": threads, "n_prompt": a.n_prompt, "n_gen": a.n_gen,
            "reps": reps, "pp_tok_s": ppm, "pp_tok_s_std": pps, "tg_tok_s": tgm, "tg_tok_s_std": tgs,
        });
        println!("{j}");
    } else {
        println!("| model | threads | test | tok/s |");
        println!("|---|---|---|---|");
        if a.n_prompt > 0 {
            println!("| {name} | {threads} | pp{} | {ppm:.2} ± {pps:.2} |", a.n_prompt);
        }
        if a.n_gen > 0 {
            println!("| {name} | {threads} | tg{} | {tgm:.2} ± {tgs:.2} |", a.n_gen);
        }
    }
    Ok(())
}
