//! `shoal worker`: serve one shard of a model over gRPC, optionally joining a coordinator
//! (`--join`), which then dials the worker back at its advertise address.

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
    /// Coordinator to join (`HOST:PORT`); the worker re-joins every heartbeat and keeps
    /// retrying while the coordinator is unreachable.
    #[arg(long, value_name = "COORDINATOR_ADDR")]
    join: Option<String>,
    /// Register in etcd (`URL[,URL]`) under a lease for a coordinator started with the same
    /// --etcd to find (instead of, or as well as, --join).
    #[arg(long, value_name = "URL[,URL]")]
    etcd: Option<String>,
    /// Key prefix of the cluster in etcd.
    #[arg(long, default_value = shoal_coordinator::cluster::etcd::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// Address the coordinator and the other stages should dial to reach this worker
    /// (default: the bound listen address; required with --join when listening on
    /// 0.0.0.0 or [::]).
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// Where shards run: `auto` (GPU 0 when the build has the cuda feature and the machine a
    /// GPU, else the CPU), `cpu`, or `cuda:N`. A load may name another.
    #[arg(long, default_value = "auto")]
    device: String,
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
        let advertise = match a.advertise {
            Some(adv) => adv,
            None if (a.join.is_some() || a.etcd.is_some()) && addr.ip().is_unspecified() => anyhow::bail!(
                "--listen {} binds every interface, so the coordinator cannot know where to dial this \
                 worker: pass --advertise HOST:PORT (e.g. --advertise my-host.lan:{})",
                a.listen,
                addr.port()
            ),
            None => addr.to_string(),
        };
        shoal_proto::security::get().check_listen(addr)?;
        let name = a.name.unwrap_or_else(|| addr.to_string());
        shoal_worker::service::parse_device(&a.device).map_err(anyhow::Error::msg)?;
        let svc = WorkerService::new(WorkerConfig { node_name: name.clone(), models_dir: a.models_dir, device: a.device });
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {addr}")?;
        out.flush()?;
        drop(out);
        if let Some(urls) = a.etcd.clone() {
            let (prefix, adv, node) = (a.etcd_prefix.clone(), advertise.clone(), name.clone());
            tokio::spawn(async move {
                let never = shoal_coordinator::cluster::etcd::register(urls, prefix, adv, node).await;
                match never {}
            });
        }
        let serve = shoal_worker::serve(listener, svc);
        match a.join {
            None => serve.await?,
            // Serves while joining; a refusal ends the process, a serving error too.
            Some(coordinator) => tokio::select! {
                r = serve => r?,
                r = shoal_worker::join::join_loop(coordinator, advertise, name) => match r {
                    Err(e) => return Err(e.into()),
                    Ok(never) => match never {},
                },
            },
        }
        Ok(())
    })
}
