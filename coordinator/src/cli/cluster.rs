//! The flags that send a command through a pipeline of workers, shared by `run`, `bench`
//! and `serve`, and the start-up they have in common.

use std::path::Path;

use anyhow::{Context, Result};
use shoal_coordinator::cluster::local::LocalCluster;
use shoal_coordinator::cluster::pipeline::{self, LoadOptions, Pipeline};
use shoal_kernels::codec::Codec;
use shoal_model::gguf::GgufFile;

#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Run through N local worker processes (a pipeline of N stages on 127.0.0.1) instead
    /// of in this process.
    #[arg(long, default_value_t = 0, conflicts_with = "worker")]
    pub workers: usize,
    /// Run through already running workers at these addresses (repeatable, in pipeline
    /// order); each must have the model file, under the same name, in its models dir.
    /// `A+B+C` makes one tensor-parallel stage of three ranks (A the stage, B and C
    /// holding a third of each of its layers each); stages may differ in size.
    #[arg(long, value_name = "ADDR[+ADDR...]")]
    pub worker: Vec<String>,
    /// How tensor-parallel stages split a block's output: `exact` (every bit of one worker's
    /// output; more traffic) or `sum` (Megatron all-reduce of partial sums).
    #[arg(long, default_value = "exact")]
    pub tp_mode: shoal_model::tp::TpMode,
    /// Activation codec between stages: f32 (exact), bf16 or q8.
    #[arg(long, default_value = "f32")]
    pub codec: Codec,
    /// Compute threads of each worker, in order (e.g. `2,1,1`); overrides --threads.
    #[arg(long, value_delimiter = ',', value_name = "N,N,...")]
    pub worker_threads: Vec<usize>,
    /// A Mixture-of-Experts model: run every layer's routed experts on this worker (an expert
    /// host, e.g. a machine with much RAM), not in the stages, which keep the routers. One
    /// round trip per MoE layer per step, for the whole batch, in the --codec.
    #[arg(long, value_name = "ADDR")]
    pub expert_host: Option<String>,
}

impl ClusterArgs {
    /// Whether the command runs through workers.
    pub fn enabled(&self) -> bool {
        self.workers > 0 || !self.worker.is_empty()
    }

    /// Starts the local workers (`--workers N`, each serving the model's directory) or
    /// takes the given addresses; the local workers die with the returned handle.
    pub fn workers(&self, model: &Path) -> Result<(Option<LocalCluster>, Vec<String>)> {
        if !self.worker.is_empty() {
            return Ok((None, pipeline::tp_groups(&self.worker).0));
        }
        let dir = model.parent().context("the model path has no directory")?;
        let exe = std::env::current_exe().context("finding the shoal binary")?;
        let c = LocalCluster::start(&exe, self.workers, dir)?;
        let addrs = c.addrs();
        Ok((Some(c), addrs))
    }

    /// Load options for `model`. `threads` (`--threads`) is each worker's compute threads;
    /// without it, local workers share this machine's cores (cores / N each, so concurrent
    /// stages do not oversubscribe them) and remote workers use all of their own. Attention
    /// rounds as a single process with `threads` (default: this machine's cores) would, so
    /// `--codec f32` output equals `shoal run`'s.
    pub fn load_options(&self, model: &Path, threads: Option<usize>, n_ctx: usize) -> Result<LoadOptions> {
        let cores = super::default_threads();
        let n_threads = match threads {
            Some(t) => t,
            None if self.worker.is_empty() => (cores / self.workers.max(1)).max(1),
            None => 0,
        };
        Ok(LoadOptions {
            model_file: pipeline::file_name_in(model).context("the model file name is not UTF-8")?,
            n_ctx,
            n_threads,
            attn_threads: threads.unwrap_or(cores),
            codec: self.codec,
            kv_budget: 0,
            worker_threads: self.worker_threads.clone(),
            parallel: 1,
            // Local workers share one machine: split evenly unless their threads differ.
            even: self.workers > 0 && self.worker_threads.windows(2).all(|w| w[0] == w[1]),
            reorder: false,
            expert_host: self.expert_host.clone(),
            tp_followers: pipeline::tp_groups(&self.worker).1,
            tp_mode: self.tp_mode,
        })
    }
}

/// A multi-threaded runtime for the async side of a cluster command (the compute happens
/// in the workers).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting the async runtime")
}

/// Connects and loads: the common start of a cluster command.
pub async fn load(addrs: &[String], file: &GgufFile, opts: &LoadOptions) -> Result<Pipeline> {
    Ok(Pipeline::connect_and_load(addrs, file, opts).await?)
}
