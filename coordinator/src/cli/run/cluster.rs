//! `shoal run --workers N` / `--worker ADDR...`: the same completion through a pipeline.
//!
//! With `--workers N`, starts N `shoal worker` children on 127.0.0.1 (each maps the same
//! file from the model's directory) and kills them when this returns, on error too; with
//! `--worker ADDR` (repeated), uses running workers, which must hold a file of the same name
//! and identity. Plans and loads the model, runs the generation loop over the pipeline and
//! prints exactly what single-process `shoal run` prints.

use std::io::Write;

use anyhow::{Context, Result};
use shoal_coordinator::cluster::local::LocalCluster;
use shoal_coordinator::cluster::pipeline::{self, LoadOptions, Pipeline};
use shoal_model::chat::{ChatMessage, ChatTemplate};
use shoal_model::engine::GenerateRequest;
use shoal_model::gguf::GgufFile;
use shoal_model::sampling::SamplingParams;
use shoal_model::tokenizer::Tokenizer;

use super::RunArgs;

pub fn run(a: RunArgs) -> Result<()> {
    let threads = a.threads.unwrap_or_else(crate::cli::default_threads);
    let path = a.model.canonicalize().with_context(|| a.model.display().to_string())?;
    if path.is_dir() {
        anyhow::bail!("{}: is a directory", path.display());
    }
    let file = GgufFile::open(&path)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
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
        let chat = ChatTemplate::from_gguf(&file, &tokenizer)?
            .ok_or_else(|| shoal_model::Error::ChatTemplate("the model file has no chat template".into()))?;
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(ChatMessage { role: "system".into(), content: s.clone() });
        }
        messages.push(ChatMessage { role: "user".into(), content: a.prompt.clone() });
        tokenizer.encode(&chat.render(&messages, true)?, false, true)?
    } else {
        tokenizer.encode(&a.prompt, true, false)?
    };
    let req = GenerateRequest {
        prompt_tokens,
        params,
        max_tokens: a.max_tokens,
        stop: a.stop.clone(),
        stop_at_eog: !a.ignore_eos,
    };
    let dir = path.parent().context("the model path has no directory")?;
    let model_file = pipeline::file_name_in(&path).context("the model file name is not UTF-8")?;
    let local = a.worker.is_empty();
    let cluster = if local {
        let exe = std::env::current_exe().context("finding the shoal binary")?;
        Some(LocalCluster::start(&exe, a.workers, dir)?)
    } else {
        None
    };
    let addrs = cluster.as_ref().map_or_else(|| a.worker.clone(), LocalCluster::addrs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let opts = LoadOptions {
        model_file,
        n_ctx: a.ctx,
        n_threads: threads,
        attn_threads: threads,
        codec: a.codec,
        kv_budget: 0,
        // Local workers share one machine's bandwidth: split evenly.
        even: local,
    };
    let r = rt.block_on(async {
        let mut workers = Vec::new();
        for addr in &addrs {
            workers.push(pipeline::connect(addr).await?);
        }
        let mut p = Pipeline::load(workers, &file, &opts).await?;
        let mut out = std::io::stdout().lock();
        let t0 = std::time::Instant::now();
        let mut write_err = None;
        let g = p
            .generate(&tokenizer, &req, |piece| {
                if write_err.is_none()
                    && let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush())
                {
                    write_err = Some(e);
                }
            })
            .await?;
        if let Some(e) = write_err {
            return Err(anyhow::Error::from(e).context("writing to stdout"));
        }
        writeln!(out)?;
        Ok::<_, anyhow::Error>((g, t0.elapsed().as_secs_f64()))
    });
    drop(cluster);
    let (g, dt) = r?;
    if a.print_stats {
        eprintln!(
            "shoal: prompt_tokens={} generated_tokens={} finish={} seconds={dt:.3} peak_rss_bytes={} workers={}",
            g.n_prompt,
            g.tokens.len(),
            g.finish.as_str(),
            crate::cli::peak_rss_bytes().unwrap_or(0),
            addrs.len()
        );
    }
    Ok(())
}
