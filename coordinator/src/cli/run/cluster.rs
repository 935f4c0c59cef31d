//! `shoal run --workers N` / `--worker ADDR...`: the same completion through a pipeline.
//!
//! With `--workers N`, starts N `shoal worker` children on 127.0.0.1 (each maps the same
//! file from the model's directory) and kills them when this returns, on error too; with
//! `--worker ADDR` (repeated), uses running workers, which must hold a file of the same name
//! and identity. Plans and loads the model, runs the generation loop over the pipeline and
//! prints exactly what single-process `shoal run` prints.

use anyhow::{Context, Result};
use shoal_coordinator::cluster::local::LocalCluster;
use shoal_coordinator::cluster::pipeline::{self, LoadOptions, Pipeline};
use shoal_coordinator::cluster::scheduler::{Scheduler, SchedulerConfig};
use shoal_model::chat::ChatTemplate;
use shoal_model::gguf::GgufFile;
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
    let chat = ChatTemplate::from_gguf(&file, &tokenizer)?;
    let req = super::request(&a, &tokenizer, chat.as_ref())?;
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
        let p = Pipeline::load(workers, &file, &opts).await?;
        let sched = Scheduler::start(p, SchedulerConfig::default());
        let mut sink = super::StdoutSink::new();
        let t0 = std::time::Instant::now();
        let g = sched.generate(&tokenizer, &req, |piece| sink.write(piece)).await?;
        sink.finish()?;
        Ok::<_, anyhow::Error>((g, t0.elapsed().as_secs_f64()))
    });
    drop(cluster);
    let (g, dt) = r?;
    if a.print_stats {
        super::print_stats(&g, dt, addrs.len());
    }
    Ok(())
}
