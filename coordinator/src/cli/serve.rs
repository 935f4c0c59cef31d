//! `shoal serve`: the coordinator. It runs the embedded registry (gRPC `shoal.v1.Coordinator`
//! on `--listen`: workers `--join` it, `shoal status` asks it), gathers its workers (local
//! processes with `--workers N`, running ones with `--worker ADDR`, or the first
//! `--min-workers` that join), plans and loads the model over them, and serves the
//! OpenAI-compatible API on `--http` through the step scheduler.
//!
//! Prints `registry on ADDR` once the registry listens and `serving on http://ADDR` once the
//! model is loaded, both on stdout. Ctrl-C (or SIGTERM) stops it; local workers die with it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use shoal_coordinator::api::{self, ApiState};
use shoal_coordinator::jobs::{self, Jobs};
use shoal_coordinator::metrics::Metrics;
use shoal_coordinator::cluster::pipeline::{LoadOptions, Pipeline};
use shoal_coordinator::cluster::etcd;
use shoal_coordinator::cluster::recovery::{EtcdPlan, Recovery};
use shoal_coordinator::cluster::registry::{self, Registry};
use shoal_coordinator::cluster::scheduler::{Scheduler, SchedulerConfig};
use shoal_model::chat::ChatTemplate;
use shoal_model::gguf::GgufFile;
use shoal_model::tokenizer::Tokenizer;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Path of the GGUF model file (the coordinator reads its header and tokenizer; each
    /// worker maps its own copy, under the same file name, from its models dir).
    #[arg(long, short, env = "SHOAL_MODEL")]
    model: PathBuf,
    /// Address of the registry (gRPC) that workers join and `shoal status` asks.
    #[arg(long, default_value = "0.0.0.0:7000")]
    listen: String,
    /// Address of the OpenAI-compatible HTTP API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: String,
    /// Find workers in etcd (`URL[,URL]`) instead of waiting for their `--join`: workers
    /// started with the same --etcd register there under a lease (docs/operations.md).
    #[arg(long, value_name = "URL[,URL]")]
    etcd: Option<String>,
    /// Key prefix of this cluster in etcd.
    #[arg(long, default_value = shoal_coordinator::cluster::etcd::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// Without --workers/--worker: how many joined workers to wait for before loading.
    #[arg(long, default_value_t = 1)]
    min_workers: usize,
    /// Longest wait for --min-workers to join, in seconds.
    #[arg(long, default_value_t = 600)]
    wait_secs: u64,
    /// Compute threads per worker (default: each remote worker's cores; local workers
    /// share this machine's).
    #[arg(long, short)]
    threads: Option<usize>,
    /// Context length per sequence (default: the model's, at most 4096).
    #[arg(long, default_value_t = 0)]
    ctx: usize,
    /// Most sequences generating at once; more requests wait their turn.
    #[arg(long, default_value_t = 64)]
    max_seqs: usize,
    /// The model id of the API (default: the file name without `.gguf`).
    #[arg(long)]
    model_id: Option<String>,
    /// An API key clients must send as `Authorization: Bearer KEY` (repeatable). Required
    /// (this or --api-keys-file) unless --http is a loopback address.
    #[arg(long = "api-key", env = "SHOAL_API_KEY", value_name = "KEY")]
    api_keys: Vec<String>,
    /// A file of API keys, one per line (`#` comments and blank lines ignored).
    #[arg(long)]
    api_keys_file: Option<PathBuf>,
    /// Most requests generating at once; more get 429 with Retry-After.
    #[arg(long, default_value_t = 256)]
    max_concurrent_requests: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 8 << 20)]
    max_body_bytes: usize,
    /// Largest file upload (`POST /v1/files`, batch inputs) in bytes.
    #[arg(long, default_value_t = 200 << 20)]
    max_file_bytes: usize,
    /// KV cache budget of each stage in MiB: requests are admitted while the worst case of
    /// every running sequence (prompt + max_tokens) fits, and wait otherwise (default: the
    /// memory the planner leaves free on each worker after its weights).
    #[arg(long)]
    kv_budget_mib: Option<u64>,
    /// Most requests waiting for admission; more get 429 with Retry-After.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Where files and batch jobs live, durable across restarts (default:
    /// $XDG_STATE_HOME/shoal, else ~/.local/state/shoal). One server per directory.
    #[arg(long, env = "SHOAL_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Most batch-job lines generating at once (default: half of --max-seqs); they always
    /// yield to interactive requests.
    #[arg(long)]
    batch_parallel: Option<usize>,
    /// When a worker is lost, fail the requests it was serving instead of pausing them and
    /// forming the pipeline again over the workers left (docs/operations.md).
    #[arg(long)]
    no_recovery: bool,
    /// Longest a recovery waits for enough workers to hold the model again (a replacement
    /// joining) before the paused requests fail, in seconds.
    #[arg(long, default_value_t = 300)]
    recovery_wait_secs: u64,
    #[command(flatten)]
    cluster: super::cluster::ClusterArgs,
}

/// The API keys from the flags and the keys file; an error when the API listens beyond
/// loopback without any.
fn api_keys(a: &ServeArgs) -> Result<Option<Arc<std::collections::HashSet<String>>>> {
    let mut keys: std::collections::HashSet<String> = a.api_keys.iter().map(|k| k.trim().to_string()).filter(|k| !k.is_empty()).collect();
    if let Some(f) = &a.api_keys_file {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading API keys from {}", f.display()))?;
        keys.extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string));
    }
    if !keys.is_empty() {
        return Ok(Some(Arc::new(keys)));
    }
    let loopback = a
        .http
        .parse::<std::net::SocketAddr>()
        .map(|s| s.ip().is_loopback())
        .unwrap_or_else(|_| a.http.starts_with("localhost:"));
    if !loopback {
        anyhow::bail!("--http {} is not a loopback address: give --api-key or --api-keys-file", a.http);
    }
    Ok(None)
}

pub fn run(a: ServeArgs) -> Result<()> {
    let keys = api_keys(&a)?;
    let state_dir = a.state_dir.clone().unwrap_or_else(jobs::default_dir);
    let open_jobs = |dir: &std::path::Path| -> Result<Arc<Jobs>> {
        Ok(Arc::new(Jobs::open(dir).with_context(|| format!("opening the state directory {}", dir.display()))?))
    };
    // In etcd mode coordinators elect a leader, and a standby may share the leader's state
    // directory: it is opened once this one leads.
    let early_jobs = if a.etcd.is_none() { Some(open_jobs(&state_dir)?) } else { None };
    let path = a.model.canonicalize().with_context(|| a.model.display().to_string())?;
    if path.is_dir() {
        anyhow::bail!("{}: is a directory", path.display());
    }
    let file = GgufFile::open(&path)?;
    let tokenizer = Arc::new(Tokenizer::from_gguf(&file)?);
    let chat = ChatTemplate::from_gguf(&file, &tokenizer)?.map(Arc::new);
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let model_id = a.model_id.clone().unwrap_or_else(|| file_name.trim_end_matches(".gguf").to_string());
    let (local, given) = if a.cluster.enabled() { a.cluster.workers(&path).map(|(l, g)| (l, Some(g)))? } else { (None, None) };
    let mut opts = a.cluster.load_options(&path, a.threads, a.ctx)?;
    opts.parallel = a.max_seqs.max(1) as u64;
    if let Some(mib) = a.kv_budget_mib {
        // Workers refuse a step beyond it too: a second guard behind the scheduler's.
        opts.kv_budget = mib << 20;
    }
    let rt = super::cluster::runtime()?;
    let r = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&a.listen).await.with_context(|| format!("listening on {}", a.listen))?;
        let reg_addr = listener.local_addr()?;
        shoal_proto::security::get().check_listen(reg_addr)?;
        let reg = Registry::new(reg_addr.to_string());
        let reg2 = reg.clone();
        tokio::spawn(async move {
            if let Err(e) = registry::serve_registry(listener, reg2).await {
                tracing::error!("registry: {e}");
            }
        });
        if let Some(urls) = a.etcd.clone() {
            let (prefix, reg3) = (a.etcd_prefix.clone(), reg.clone());
            tokio::spawn(async move {
                let never = shoal_coordinator::cluster::etcd::follow(urls, prefix, reg3).await;
                match never {}
            });
        }
        super::print_stdout(&format!("registry on {reg_addr}\n"))?;
        let header = &file.bytes()[..(file.header().data_offset as usize).min(file.bytes().len())];
        let identity = shoal_proto::model_identity(header, file.file_size());
        reg.set_model(&file_name, &identity);
        if let Some(urls) = &a.etcd {
            lead(urls, &a.etcd_prefix, &reg_addr.to_string(), &reg).await;
        }
        let jobs = match early_jobs {
            Some(j) => j,
            // A leader that lost its lease exits, releasing the directory: wait for that.
            None => open_jobs_when_free(&state_dir).await?,
        };
        let joined_opts = LoadOptions { reorder: true, ..opts.clone() };
        let adopted = match &a.etcd {
            Some(urls) if given.is_none() => adopt(urls, &a.etcd_prefix, &identity, &reg, &file, &joined_opts).await,
            _ => None,
        };
        let pipeline = match (&given, adopted) {
            (_, Some(p)) => p,
            (Some(addrs), None) => {
                reg.set_state("loading");
                Pipeline::connect_and_load(addrs, &file, &opts).await?
            }
            (None, None) => {
                reg.set_state(&format!("waiting for {} worker(s) to join", a.min_workers));
                eprintln!("shoal: waiting for {} worker(s) to join {reg_addr}", a.min_workers);
                let workers = reg.wait_for(a.min_workers.max(1), Duration::from_secs(a.wait_secs)).await?;
                reg.set_state("loading");
                // Joined workers come in no particular order: the planner picks it.
                Pipeline::load(workers, &file, &joined_opts).await?
            }
        };
        reg.set_pipeline(&pipeline);
        if let Some(urls) = &a.etcd {
            let stages = registry::StageInfo::of(&pipeline);
            match shoal_coordinator::cluster::etcd::publish_plan(urls, &a.etcd_prefix, &file_name, &identity, &stages).await {
                Ok(version) => eprintln!("shoal: plan version {version} published in etcd"),
                Err(e) => tracing::warn!("publishing the plan in etcd: {e}"),
            }
        }
        for (w, p) in &pipeline.stages {
            eprintln!("shoal: stage {} layers {:?}{}{}", w.addr, p.layers, if p.embed { " +embed" } else { "" }, if p.head { " +head" } else { "" });
        }
        let kv_budget: Vec<u64> = (0..pipeline.stages.len())
            .map(|i| a.kv_budget_mib.map_or_else(|| pipeline.kv_room(i), |m| m << 20))
            .collect();
        for (i, b) in kv_budget.iter().enumerate() {
            eprintln!(
                "shoal: stage {i} KV budget {:.0} MiB ({} tokens)",
                *b as f64 / (1u64 << 20) as f64,
                b / pipeline.kv_bytes_per_token(i).max(1)
            );
        }
        let max_seqs = a.max_seqs.max(1);
        let background = a.batch_parallel.unwrap_or(max_seqs / 2).clamp(1, max_seqs);
        let cfg = SchedulerConfig { max_seqs, kv_budget, max_waiting: a.max_queue, background_seqs: background, ..SchedulerConfig::default() };
        let recovery = (!a.no_recovery).then(|| Recovery {
            registry: Some(reg.clone()),
            // Workers named with --worker are not in the registry: keep them in view.
            seeds: if given.is_some() { pipeline.stages.iter().map(|(w, _)| w.clone()).collect() } else { Vec::new() },
            opts: opts.clone(),
            kv_budget: a.kv_budget_mib.map(|m| m << 20),
            etcd: a.etcd.clone().map(|urls| EtcdPlan { urls, prefix: a.etcd_prefix.clone(), model_file: file_name.clone() }),
            wait: Duration::from_secs(a.recovery_wait_secs),
        });
        let scheduler = Scheduler::start_with(pipeline, cfg, recovery);
        let state = Arc::new(ApiState {
            scheduler,
            tokenizer: Arc::clone(&tokenizer),
            chat: chat.clone(),
            model: model_id,
            api_keys: keys,
            slots: Arc::new(tokio::sync::Semaphore::new(a.max_concurrent_requests.max(1))),
            metrics: Arc::new(Metrics::default()),
            registry: Some(reg.clone()),
            jobs: Some(Arc::clone(&jobs)),
        });
        tokio::spawn(jobs::runner(Arc::clone(&state), background));
        let limits = api::Limits { max_body_bytes: a.max_body_bytes, max_file_bytes: a.max_file_bytes };
        let http = tokio::net::TcpListener::bind(&a.http).await.with_context(|| format!("listening on {}", a.http))?;
        reg.set_state("serving");
        super::print_stdout(&format!("serving on http://{}\n", http.local_addr()?))?;
        axum::serve(http, api::router(state, limits)).with_graceful_shutdown(shutdown()).await.context("serving HTTP")?;
        eprintln!("shoal: shutting down");
        Ok::<_, anyhow::Error>(())
    });
    drop(local);
    r
}

/// Waits until this coordinator leads the cluster at `prefix` (etcd election); a lost
/// leadership later ends the process, so two never drive the workers at once.
async fn lead(urls: &str, prefix: &str, me: &str, reg: &Registry) {
    reg.set_state("standby: waiting to lead");
    eprintln!("shoal: standby: waiting to lead the cluster at {prefix} (etcd election)");
    let leadership = loop {
        match etcd::campaign(urls, prefix, me).await {
            Ok(l) => break l,
            Err(e) => {
                tracing::warn!("etcd election: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    eprintln!("shoal: leading the cluster at {prefix} ({})", leadership.key);
    tokio::spawn(async move {
        if let Ok(why) = leadership.lost.await {
            eprintln!("shoal: lost the leadership of the cluster: {why}; exiting so another coordinator can lead");
            std::process::exit(1);
        }
    });
}

/// Opens the state directory, waiting up to twice the leader lease while another
/// coordinator (a leader that lost its lease and is exiting) still holds it.
async fn open_jobs_when_free(dir: &std::path::Path) -> Result<Arc<Jobs>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2 * etcd::LEADER_TTL_S as u64);
    loop {
        match Jobs::open(dir) {
            Ok(j) => return Ok(Arc::new(j)),
            Err(jobs::Error::Locked(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("opening the state directory {}", dir.display()))),
        }
    }
}

/// Takes over the pipeline the previous leader published in etcd when it is still there:
/// the same model, every stage's worker alive. Workers that hold their shard keep it (and
/// nothing is loaded again when none changed). `None`: plan afresh.
async fn adopt(urls: &str, prefix: &str, identity: &str, reg: &Registry, file: &GgufFile, opts: &LoadOptions) -> Option<Pipeline> {
    let (plan, version) = match etcd::read_plan(urls, prefix).await {
        Ok(Some(p)) => p,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!("reading the plan from etcd: {e}");
            return None;
        }
    };
    if plan.model_identity != identity {
        eprintln!("shoal: the plan in etcd (version {version}) is for another model file: planning afresh");
        return None;
    }
    // The membership is read from etcd in the background: give it a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let workers = loop {
        let live = reg.live();
        let found: Option<Vec<_>> = plan.stages.iter().map(|s| live.iter().find(|w| w.addr == s.addr).cloned()).collect();
        if let Some(w) = found {
            break w;
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!("shoal: not every stage of the plan in etcd (version {version}) is alive: planning afresh");
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    reg.set_state("taking over the pipeline");
    let layout: Vec<std::ops::Range<usize>> = plan.stages.iter().map(|s| s.layer_start..s.layer_end).collect();
    match Pipeline::adopt_layout(workers, &layout, file, &LoadOptions { reorder: false, ..opts.clone() }).await {
        Ok(p) => {
            eprintln!("shoal: took over plan version {version} from etcd");
            Some(p)
        }
        Err(e) => {
            eprintln!("shoal: could not take over the plan in etcd (version {version}): {e}; planning afresh");
            None
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
