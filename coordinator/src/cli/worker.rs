//! `shoal worker`: serve one shard of a model over gRPC.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use shoal_worker::{WorkerConfig, WorkerService};

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// Address to listen on (`127.0.0.1:0` picks a free port; the bound address is printed
    /// on stdout as `listening on ADDR`).
    #[arg(long, default_value = "0.0.0.0:7070")]
    listen: String,
    /// Directory holding the model files this worker may load.
    #[arg(long, env = "SHOAL_MODELS_DIR")]
    models_dir: PathBuf,
    /// Name reported in Hello and Inventory (default: the listen address).
    #[arg(long)]
    name: Option<String>,
    /// Exit when stdin reaches end-of-file (set by a parent that started this worker, so
    /// the worker cannot outlive it).
    #[arg(long, hide = true)]
    exit_with_parent: bool,
}

pub fn run(a: WorkerArgs) -> Result<()> {
    if !a.models_dir.is_dir() {
        anyhow::bail!("models dir {} is not a directory", a.models_dir.display());
    }
    if a.exit_with_parent {
        std::thread::spawn(|| {
            let mut sink = [0u8; 64];
            let mut stdin = std::io::stdin();
            while matches!(std::io::Read::read(&mut stdin, &mut sink), Ok(n) if n > 0) {}
            std::process::exit(0);
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&a.listen).await.with_context(|| format!("listening on {}", a.listen))?;
        let addr = listener.local_addr()?;
        let name = a.name.unwrap_or_else(|| addr.to_string());
        let svc = WorkerService::new(WorkerConfig { node_name: name, models_dir: a.models_dir });
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {addr}")?;
        out.flush()?;
        drop(out);
        shoal_worker::serve(listener, svc).await?;
        Ok(())
    })
}
