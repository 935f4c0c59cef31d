//! `shoal run --workers N` / `--worker ADDR...`: the same completion through a pipeline.
//!
//! With `--workers N`, starts N `shoal worker` children on 127.0.0.1 (each maps the same
//! file from the model's directory) and kills them when this returns, on error too; with
//! `--worker ADDR` (repeated), uses running workers, which must hold a file of the same name
//! and identity. Plans and loads the model, runs the generation loop over the pipeline and
//! prints exactly what single-process `shoal run` prints.

use anyhow::{Context, Result};
use shoal_coordinator::cluster::scheduler::{Scheduler, SchedulerConfig};
use shoal_model::chat::ChatTemplate;
use shoal_model::gguf::GgufFile;
use shoal_model::tokenizer::Tokenizer;

use super::RunArgs;

pub fn run(a: RunArgs) -> Result<()> {
    let path = a.model.canonicalize().with_context(|| a.model.display().to_string())?;
    if path.is_dir() {
        anyhow::bail!("{}: is a directory", path.display());
    }
    let file = GgufFile::open(&path)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let chat = ChatTemplate::from_gguf(&file, &tokenizer)?;
    let req = super::request(&a, &tokenizer, chat.as_ref())?;
    let (cluster, addrs) = a.cluster.workers(&path)?;
    let rt = crate::cli::cluster::runtime()?;
    let opts = a.cluster.load_options(&path, a.threads, a.ctx)?;
    let r = rt.block_on(async {
        let p = crate::cli::cluster::load(&addrs, &file, &opts).await?;
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
