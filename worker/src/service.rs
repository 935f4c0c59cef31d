//! The gRPC service of a worker: `shoal.v1.Worker`.
//!
//! `Forward` is where the pipeline runs. For each incoming stream the worker opens one
//! `Forward` stream to the next stage (after a `Hello`), and runs two tasks: one reads a
//! frame, validates it, runs it on the compute thread and sends the output hidden states
//! down; the other relays the next stage's results (sampled tokens) back up this stream's
//! response. The last stage samples and answers itself. So results travel back up the
//! chain, and the first stage's caller (the coordinator) sees every stage's failure as an
//! error on its one stream. A bad frame ends its stream with INVALID_ARGUMENT; the worker
//! keeps serving every other stream.

use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use shoal_kernels::codec::{self, Codec};
use shoal_model::executor::SeqChunk;
use shoal_model::gguf::GgufFile;
use shoal_model::sampling::SamplingParams;
use shoal_model::weights::{ShardSpec, Weights};
use shoal_proto::v1::{self, worker_client::WorkerClient, worker_server};
use tokio::sync::{mpsc as tmpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::compute::{self, Input, Job, Output, Start, Step};
use crate::{Error, Result};

/// Most tokens in one frame (a prefill chunk is 512).
pub const MAX_FRAME_TOKENS: usize = 8192;
/// Most alternatives a sequence may ask for with its log-probabilities (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Most sampler draws a restarted sequence may say it made (`SeqStart.draws_done`): more
/// than any context holds positions.
pub const MAX_DRAWS_DONE: u64 = 1 << 24;
/// Most chunks (sequences) in one frame.
pub const MAX_FRAME_CHUNKS: usize = 1024;

/// How a worker was started.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub node_name: String,
    pub models_dir: PathBuf,
    /// Where shards run unless a load says otherwise: "auto" (GPU 0 when there is one),
    /// "cpu" or "cuda:N".
    pub device: String,
}

/// Parses a device name: `None` for the CPU, `Some(None)` for "auto", `Some(Some(n))` for
/// "cuda:N".
pub fn parse_device(s: &str) -> std::result::Result<Option<Option<usize>>, String> {
    match s {
        "cpu" => Ok(None),
        "auto" => Ok(Some(None)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(|n| Some(Some(n)))
            .ok_or_else(|| format!("unknown device {s:?} (expected auto, cpu or cuda:N)")),
    }
}

/// A loaded shard and its compute thread.
#[derive(Debug)]
struct Loaded {
    jobs: mpsc::Sender<Job>,
    n_embd: usize,
    embed: bool,
    next: Option<String>,
    codec: Codec,
    // What Stats reports about the shard.
    layers: (u32, u32),
    head: bool,
    shard_bytes: u64,
    // The request it was loaded with (model_hash: the file's identity).
    request: v1::LoadShardRequest,
}

/// The service: a handle on the state every RPC shares.
#[derive(Clone, Debug)]
pub struct WorkerService(Arc<Inner>);

impl std::ops::Deref for WorkerService {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// The state shared by every RPC.
#[derive(Debug)]
pub struct Inner {
    cfg: WorkerConfig,
    /// This machine's GPUs, or why there are none (probed once at start).
    gpus: (Vec<v1::Device>, String),
    bandwidth: u64,
    // Kernel calibrations by thread count, measured once each.
    calibrations: Mutex<std::collections::HashMap<u32, v1::KernelCalibration>>,
    shard: Mutex<Option<Arc<Loaded>>>,
    // Set instead of `shard` when loaded as an expert host.
    experts: crate::experts::Slot,
    rejected: std::sync::atomic::AtomicU64,
    // Shards loaded since start.
    loads: std::sync::atomic::AtomicU64,
    // The channel Stats times a Health call on, and the next stage it leads to.
    next_probe: tokio::sync::Mutex<Option<(String, WorkerClient<shoal_proto::security::Channel>)>>,
    // Open `Results` streams by route (last stage only).
    routes: Mutex<std::collections::HashMap<u64, ResultTx>>,
}

type ResultTx = tmpsc::Sender<std::result::Result<v1::ForwardResult, Status>>;

impl WorkerService {
    /// Measures the memory bandwidth once and returns the service.
    pub fn new(cfg: WorkerConfig) -> WorkerService {
        let gpus = crate::inventory::gpus();
        match gpus.0.as_slice() {
            [] => tracing::info!("no GPU ({}): shards run on the CPU", gpus.1),
            devs => {
                for d in devs {
                    tracing::info!(ordinal = d.ordinal, name = %d.name, memory = d.memory_total_bytes, bandwidth = d.bandwidth_bytes_per_s, "GPU");
                }
            }
        }
        WorkerService(Arc::new(Inner {
            cfg,
            gpus,
            bandwidth: crate::inventory::memory_bandwidth(),
            calibrations: Default::default(),
            shard: Mutex::new(None),
            experts: Mutex::new(None),
            rejected: Default::default(),
            loads: Default::default(),
            next_probe: Default::default(),
            routes: Default::default(),
        }))
    }
}

impl Inner {
    fn loaded(&self) -> Result<Arc<Loaded>> {
        self.shard.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or(Error::NotLoaded)
    }

    fn resolve(&self, name: &str) -> Result<PathBuf> {
        let bad = |m: &str| Error::BadModelPath(name.to_string(), m.to_string());
        let rel = Path::new(name);
        if name.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(bad("must be a plain path inside the models dir (no `/`, `..` or `.` at the start)"));
        }
        let dir = self.cfg.models_dir.canonicalize()?;
        let p = dir.join(rel).canonicalize().map_err(|e| bad(&e.to_string()))?;
        if !p.starts_with(&dir) {
            return Err(bad("resolves outside the models dir"));
        }
        Ok(p)
    }

    fn load(&self, r: v1::LoadShardRequest) -> Result<v1::LoadShardReply> {
        let path = self.resolve(&r.model_file)?;
        let file = Arc::new(GgufFile::open(&path)?);
        let header = &file.bytes()[..(file.header().data_offset as usize).min(file.bytes().len())];
        let have = shoal_proto::model_identity(header, file.file_size());
        if !r.model_hash.is_empty() && r.model_hash != have {
            return Err(Error::HashMismatch { file: r.model_file, have, want: r.model_hash });
        }
        let n_threads =
            if r.n_threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { r.n_threads as usize };
        if r.experts_only {
            // An expert host: the layers' routed experts only, served by RunExperts.
            let spec = ShardSpec { layers: r.layer_start as usize..r.layer_end as usize, embed: false, head: false };
            if spec.layers.is_empty() {
                return Err(Error::InvalidFrame("an expert host of no layers".into()));
            }
            let weights = Arc::new(Weights::load(file, spec)?);
            let reply = load_reply(have, &weights);
            let host = crate::experts::ExpertHost::new(weights, n_threads)?;
            tracing::info!(layers = ?host.layers(), "serving routed experts");
            *self.shard.lock().unwrap_or_else(|e| e.into_inner()) = None;
            *self.experts.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(host));
            self.loads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(reply);
        }
        let spec = ShardSpec { layers: r.layer_start as usize..r.layer_end as usize, embed: r.embed, head: r.head };
        if spec.layers.is_empty() && !r.embed && !r.head {
            return Err(Error::InvalidFrame("an empty shard".into()));
        }
        let tp = tp_of(&r)?;
        let weights = Arc::new(Weights::load_tp(file, spec, tp)?);
        let c = &weights.config;
        let n_ctx = if r.n_ctx == 0 { c.n_ctx_train.min(4096) } else { r.n_ctx as usize };
        let attn_threads = if r.attn_threads == 0 { n_threads } else { r.attn_threads as usize };
        let mut reply = load_reply(have.clone(), &weights);
        let mut group: Option<compute::GroupSetup> = None;
        if let Some((rank, size, _)) = tp {
            if rank > 0 {
                // A follower: joins its leader and runs what it broadcasts; no stage of its own.
                let coll = crate::collective::TcpCollective::join(&r.tp_leader, rank, size, &r.tp_secret, TP_JOIN_TIMEOUT)?;
                let mut exec = shoal_model::executor::ShardExecutor::new(weights, n_threads, n_ctx);
                exec.set_attention_numerics(shoal_kernels::attention::AttnNumerics::GgmlFlash { n_ctx, n_threads: attn_threads });
                exec.set_group(Box::new(coll))?;
                std::thread::Builder::new().name("shoal-tp-follower".into()).spawn(move || match exec.follow() {
                    Ok(()) => tracing::info!(rank, "the tensor-parallel leader ended the group"),
                    Err(e) => tracing::warn!(rank, "tensor-parallel rank stopped: {e}"),
                })?;
                tracing::info!(rank, size, leader = %r.tp_leader, "following a tensor-parallel leader");
                *self.shard.lock().unwrap_or_else(|e| e.into_inner()) = None;
                *self.experts.lock().unwrap_or_else(|e| e.into_inner()) = None;
                self.loads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(reply);
            }
            // The leader: listens for the other ranks; the compute thread waits for them.
            let listener = std::net::TcpListener::bind("0.0.0.0:0")?;
            reply.tp_port = u32::from(listener.local_addr()?.port());
            let secret = r.tp_secret.clone();
            group = Some(Box::new(move || {
                let c = crate::collective::TcpCollective::lead(listener, size, &secret, TP_JOIN_TIMEOUT)?;
                Ok(Box::new(c) as Box<dyn shoal_model::tp::Collective>)
            }));
        }
        let gpu = self.gpu_for(&r, tp.is_some())?;
        if let Some(g) = &gpu {
            let name = self.gpus.0.iter().find(|d| d.ordinal as usize == g.ordinal).map_or("", |d| d.name.as_str());
            reply.device = format!("cuda:{} ({name})", g.ordinal);
        }
        let codec = codec_of(r.activation_dtype)?;
        let request = v1::LoadShardRequest { model_hash: have.clone(), ..r.clone() };
        // Routed experts on an expert host: the compute thread calls it through this runtime.
        let remote: Option<Box<dyn shoal_model::executor::RemoteExperts>> = match r.expert_host.as_str() {
            "" => None,
            addr => Some(Box::new(crate::experts::RemoteClient::new(
                addr.to_string(),
                codec,
                tokio::runtime::Handle::try_current().map_err(|e| Error::InvalidFrame(e.to_string()))?,
            ))),
        };
        let loaded = Loaded {
            n_embd: c.n_embd,
            embed: r.embed,
            next: (!r.next_stage.is_empty()).then_some(r.next_stage),
            codec,
            layers: (r.layer_start, r.layer_end),
            head: r.head,
            shard_bytes: reply.shard_bytes,
            jobs: compute::spawn(weights, n_threads, n_ctx, attn_threads, r.kv_budget_bytes, remote, group, gpu)?,
            request,
        };
        *self.shard.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(loaded));
        *self.experts.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.loads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(reply)
    }

    /// The GPU a shard runs on: the request's device, else the worker's default; "auto" picks
    /// GPU 0 when there is one (a tensor-parallel rank stays on the CPU), an explicit
    /// "cuda:N" must exist.
    fn gpu_for(&self, r: &v1::LoadShardRequest, tp: bool) -> Result<Option<compute::GpuChoice>> {
        let name = if r.device.is_empty() { self.cfg.device.as_str() } else { r.device.as_str() };
        let ordinal = match parse_device(name).map_err(Error::InvalidFrame)? {
            None => return Ok(None),
            Some(None) if tp => return Ok(None),
            Some(None) => match self.gpus.0.first() {
                Some(d) => d.ordinal as usize,
                None => return Ok(None),
            },
            Some(Some(n)) => {
                if tp {
                    return Err(Error::InvalidFrame("a tensor-parallel rank runs on the CPU".into()));
                }
                if !self.gpus.0.iter().any(|d| d.ordinal as usize == n) {
                    let why = if self.gpus.1.is_empty() { format!("{} GPUs", self.gpus.0.len()) } else { self.gpus.1.clone() };
                    return Err(Error::InvalidFrame(format!("device cuda:{n} is not on this worker ({why})")));
                }
                n
            }
        };
        Ok(Some(compute::GpuChoice { ordinal, experts_in_host_ram: r.experts_in_host_ram }))
    }

    /// Times a Health call to the next stage at `addr` on a channel kept for this, at most
    /// [`NEXT_STAGE_PROBE_TIMEOUT`] in all (connecting included). Nanoseconds, or why not.
    async fn probe_next(&self, addr: &str) -> std::result::Result<u64, String> {
        let probe = async {
            let mut slot = self.next_probe.lock().await;
            let client = match slot.as_mut() {
                Some((a, c)) if a == addr => c,
                _ => {
                    *slot = None;
                    let ch = connect(addr).await.map_err(|e| shoal_proto::error_chain(&e))?;
                    let mut c = WorkerClient::new(ch);
                    // Untimed: the first call may still be setting the connection up.
                    c.health(v1::HealthRequest {}).await.map_err(|s| s.message().to_string())?;
                    &mut slot.insert((addr.to_string(), c)).1
                }
            };
            let t = Instant::now();
            let r = client.health(v1::HealthRequest {}).await;
            let ns = t.elapsed().as_nanos().clamp(1, u64::MAX as u128) as u64;
            match r {
                Ok(_) => Ok(ns),
                Err(s) => {
                    *slot = None;
                    Err(s.message().to_string())
                }
            }
        };
        tokio::time::timeout(NEXT_STAGE_PROBE_TIMEOUT, probe)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {NEXT_STAGE_PROBE_TIMEOUT:?}")))
    }
}

/// Longest Stats waits for the next stage's Health.
pub const NEXT_STAGE_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Longest a rank of a tensor-parallel group waits for the others to join.
pub const TP_JOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The tensor-parallel rank, size and mode a `LoadShard` asks for (`None`: no group).
fn tp_of(r: &v1::LoadShardRequest) -> Result<Option<(usize, usize, shoal_model::tp::TpMode)>> {
    let (rank, size) = (r.tp_rank as usize, r.tp_size as usize);
    if size <= 1 {
        return if rank == 0 { Ok(None) } else { Err(Error::InvalidFrame(format!("tensor-parallel rank {rank} of {size}"))) };
    }
    if rank >= size || size > 64 {
        return Err(Error::InvalidFrame(format!("tensor-parallel rank {rank} of {size}")));
    }
    if !(16..=256).contains(&r.tp_secret.len()) {
        return Err(Error::InvalidFrame(format!("a tensor-parallel secret of {} bytes (16 to 256)", r.tp_secret.len())));
    }
    if rank > 0 && r.tp_leader.is_empty() {
        return Err(Error::InvalidFrame("a tensor-parallel rank without its leader's address".into()));
    }
    if !r.expert_host.is_empty() {
        return Err(Error::InvalidFrame("a tensor-parallel stage runs its routed experts itself".into()));
    }
    let mode = match r.tp_mode.as_str() {
        "" => shoal_model::tp::TpMode::Exact,
        m => m.parse().map_err(Error::InvalidFrame)?,
    };
    Ok(Some((rank, size, mode)))
}

/// What `LoadShard` answers for `weights` loaded from a file of identity `have`.
fn load_reply(have: String, weights: &Weights) -> v1::LoadShardReply {
    let c = &weights.config;
    v1::LoadShardReply {
        model_hash: have,
        n_layer: c.n_layer as u32,
        n_embd: c.n_embd as u32,
        n_vocab: c.n_vocab as u32,
        shard_bytes: weights.bytes_per_step(),
        tp_port: 0,
        device: "cpu".into(),
    }
}

pub(crate) fn codec_of(d: i32) -> Result<Codec> {
    match v1::ActivationDtype::try_from(d) {
        Ok(v1::ActivationDtype::F32) => Ok(Codec::F32),
        Ok(v1::ActivationDtype::Bf16) => Ok(Codec::Bf16),
        Ok(v1::ActivationDtype::Q8) => Ok(Codec::Q8),
        Ok(v1::ActivationDtype::Unspecified) | Err(_) => {
            Err(Error::InvalidFrame(format!("unknown activation dtype {d}")))
        }
    }
}

/// The wire dtype of a codec.
pub fn dtype_of(c: Codec) -> v1::ActivationDtype {
    match c {
        Codec::F32 => v1::ActivationDtype::F32,
        Codec::Bf16 => v1::ActivationDtype::Bf16,
        Codec::Q8 => v1::ActivationDtype::Q8,
    }
}

/// Why a connection to a peer could not be made.
#[derive(Debug)]
pub enum ConnectError {
    /// This process's security settings forbid it (plaintext beyond loopback) or are unusable.
    Security(shoal_proto::security::SecurityError),
    Transport(tonic::transport::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Security(e) => e.fmt(f),
            ConnectError::Transport(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConnectError::Security(_) => None,
            ConnectError::Transport(e) => e.source(),
        }
    }
}

/// Connects to a peer with keepalives that notice a dead host within a few seconds, with
/// this process's security (mutual TLS and the join token; see `shoal_proto::security`).
pub async fn connect(addr: &str) -> std::result::Result<shoal_proto::security::Channel, ConnectError> {
    let sec = shoal_proto::security::get();
    let ch = sec
        .endpoint(addr)
        .map_err(ConnectError::Security)?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(ConnectError::Transport)?;
    Ok(shoal_proto::security::with_token(ch))
}

/// Checks a frame against the shard and turns it into a step.
fn to_step(sh: &Loaded, f: v1::ForwardFrame, buf: &mut Vec<f32>) -> Result<Step> {
    let bad = |m: String| Error::InvalidFrame(m);
    if f.chunks.is_empty() || f.chunks.len() > MAX_FRAME_CHUNKS {
        return Err(bad(format!("{} chunks (1..={MAX_FRAME_CHUNKS})", f.chunks.len())));
    }
    let n: usize = f.chunks.iter().map(|c| c.n_tokens as usize).sum();
    if n == 0 || n > MAX_FRAME_TOKENS {
        return Err(bad(format!("{n} tokens in the frame (1..={MAX_FRAME_TOKENS})")));
    }
    let input = match f.input {
        Some(v1::forward_frame::Input::Tokens(t)) => {
            if !sh.embed {
                return Err(bad("token ids sent to a stage without the embedding".into()));
            }
            if t.ids.len() != n {
                return Err(bad(format!("{} token ids for chunks totalling {n} tokens", t.ids.len())));
            }
            Input::Tokens(t.ids)
        }
        Some(v1::forward_frame::Input::Hidden(a)) => {
            if sh.embed {
                return Err(bad("hidden states sent to the embedding stage".into()));
            }
            let c = codec_of(a.dtype)?;
            if a.n_tokens as usize != n {
                return Err(bad(format!("activations of {} tokens for chunks totalling {n}", a.n_tokens)));
            }
            if a.dim as usize != sh.n_embd {
                return Err(bad(format!("activation dim {} but the model's n_embd is {}", a.dim, sh.n_embd)));
            }
            codec::decode(c, &a.data, n, sh.n_embd, buf)?;
            Input::Hidden(std::mem::take(buf))
        }
        None => return Err(bad("a frame without input".into())),
    };
    let mut starts = Vec::with_capacity(f.starts.len());
    for s in f.starts {
        // A sequence cannot have drawn more samples than a context holds positions; the
        // bound keeps a hostile frame from spinning the sampler for hours.
        if s.draws_done > MAX_DRAWS_DONE {
            return Err(bad(format!("sequence {}: draws_done {} (at most {MAX_DRAWS_DONE})", s.seq, s.draws_done)));
        }
        // No parameters: greedy.
        let Some(p) = s.sampling else {
            starts.push(Start {
                seq: s.seq,
                params: SamplingParams::greedy(),
                want_logprobs: false,
                top_logprobs: 0,
                history: s.history,
                draws_done: s.draws_done,
            });
            continue;
        };
        let params = SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k as usize,
            top_p: p.top_p,
            min_p: p.min_p,
            repeat_penalty: p.repeat_penalty,
            repeat_last_n: p.repeat_last_n as usize,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            seed: p.seed,
        };
        params.validate().map_err(|m| bad(format!("sequence {}: {m}", s.seq)))?;
        if p.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(bad(format!("sequence {}: top_logprobs {} (at most {MAX_TOP_LOGPROBS})", s.seq, p.top_logprobs)));
        }
        starts.push(Start {
            seq: s.seq,
            params,
            want_logprobs: p.logprobs,
            top_logprobs: p.top_logprobs as usize,
            history: s.history,
            draws_done: s.draws_done,
        });
    }
    let chunks = f.chunks.iter().map(|c| SeqChunk { seq: c.seq, n_tokens: c.n_tokens as usize }).collect();
    let sample = f.chunks.iter().map(|c| c.sample).collect();
    Ok(Step { chunks, sample, starts, input })
}

async fn run_job<T>(sh: &Loaded, make: impl FnOnce(oneshot::Sender<T>) -> Job) -> Result<T> {
    let (tx, rx) = oneshot::channel();
    sh.jobs.send(make(tx)).map_err(|_| Error::ComputeGone)?;
    rx.await.map_err(|_| Error::ComputeGone)
}

type ResultStream = Pin<Box<dyn tokio_stream::Stream<Item = std::result::Result<v1::ForwardResult, Status>> + Send>>;

#[tonic::async_trait]
impl worker_server::Worker for WorkerService {
    async fn hello(&self, req: Request<v1::HelloRequest>) -> std::result::Result<Response<v1::HelloReply>, Status> {
        let r = req.into_inner();
        if !shoal_proto::is_compatible(r.protocol_major, r.protocol_minor) {
            return Err(Error::IncompatibleProtocol { peer: r.protocol_major, ours: shoal_proto::PROTOCOL_MAJOR }.into());
        }
        let h = shoal_proto::hello(self.cfg.node_name.clone());
        Ok(Response::new(v1::HelloReply {
            protocol_major: h.protocol_major,
            protocol_minor: h.protocol_minor,
            node_name: h.node_name,
            capabilities: h.capabilities,
        }))
    }

    async fn get_inventory(&self, req: Request<v1::InventoryRequest>) -> std::result::Result<Response<v1::Inventory>, Status> {
        let r = req.into_inner();
        let mut inv = crate::inventory::inventory(&self.cfg.node_name, &self.cfg.models_dir, self.bandwidth, &self.gpus);
        if r.calibrate {
            crate::inventory::check_probes(&r.probes, r.attention.as_ref()).map_err(Status::invalid_argument)?;
            let threads = if r.threads == 0 { inv.cpu_cores } else { r.threads.min(1024) };
            let cached = self.calibrations.lock().expect("calibrations lock").get(&threads).cloned();
            let cal = match cached {
                Some(c) => c,
                None => {
                    let c = tokio::task::spawn_blocking(move || crate::inventory::calibrate(threads as usize))
                        .await
                        .map_err(|e| Status::internal(format!("calibration failed: {e}")))?;
                    tracing::info!(threads, call_us = c.call_overhead_s * 1e6, wake_us = c.wake_s * 1e6, "calibrated the matrix kernels");
                    self.calibrations.lock().expect("calibrations lock").insert(threads, c.clone());
                    c
                }
            };
            let mut cal = cal;
            if !r.probes.is_empty() || r.attention.is_some() {
                let (probes, attention) = (r.probes, r.attention);
                let (probe_s, attn) = tokio::task::spawn_blocking(move || {
                    let p = crate::inventory::probe_blocks(threads as usize, &probes);
                    (p, attention.map(|a| crate::inventory::probe_attention(threads as usize, &a)))
                })
                .await
                .map_err(|e| Status::internal(format!("calibration failed: {e}")))?;
                tracing::info!(threads, probe_us = ?probe_s.iter().map(|s| (s * 1e6) as u64).collect::<Vec<_>>(), attention = ?attn, "timed the model's blocks");
                cal.probe_s = probe_s;
                if let Some((fixed, per_pos)) = attn {
                    cal.attention_fixed_s = fixed;
                    cal.attention_per_position_s = per_pos;
                }
            }
            inv.calibration = Some(cal);
        }
        Ok(Response::new(inv))
    }

    async fn load_shard(&self, req: Request<v1::LoadShardRequest>) -> std::result::Result<Response<v1::LoadShardReply>, Status> {
        let r = req.into_inner();
        tracing::info!(file = %r.model_file, layers = ?(r.layer_start..r.layer_end), embed = r.embed, head = r.head, "load shard");
        let this = self.clone();
        let reply = tokio::task::spawn_blocking(move || this.load(r))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(reply))
    }

    type ForwardStream = ResultStream;

    async fn forward(
        &self,
        req: Request<Streaming<v1::ForwardFrame>>,
    ) -> std::result::Result<Response<Self::ForwardStream>, Status> {
        let sh = self.loaded()?;
        let mut inbound = req.into_inner();
        let (up_tx, up_rx) = tmpsc::channel::<std::result::Result<v1::ForwardResult, Status>>(64);

        // The stream to the next stage, and a task relaying its results up.
        let down = match &sh.next {
            None => None,
            Some(addr) => {
                let ns = |msg: String| Status::from(Error::NextStage { addr: addr.clone(), msg });
                let ch = connect(addr).await.map_err(|e| ns(e.to_string()))?;
                let mut client = WorkerClient::new(ch)
                    .max_decoding_message_size(shoal_proto::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(shoal_proto::MAX_MESSAGE_BYTES);
                client.hello(shoal_proto::hello(self.cfg.node_name.clone())).await.map_err(|e| ns(e.message().to_string()))?;
                let (dtx, drx) = tmpsc::channel::<v1::ForwardFrame>(64);
                let mut results =
                    client.forward(ReceiverStream::new(drx)).await.map_err(|e| ns(e.message().to_string()))?.into_inner();
                let relay_tx = up_tx.clone();
                let addr = addr.clone();
                tokio::spawn(async move {
                    loop {
                        match results.message().await {
                            Ok(Some(r)) => {
                                if relay_tx.send(Ok(r)).await.is_err() {
                                    break;
                                }
                            }
                            Ok(None) => break,
                            Err(s) => {
                                // A frame the next stage refused keeps its code; a broken link
                                // becomes UNAVAILABLE naming the stage.
                                use tonic::Code as C;
                                let (code, msg) = match s.code() {
                                    C::InvalidArgument | C::FailedPrecondition | C::ResourceExhausted => {
                                        (s.code(), s.message().to_string())
                                    }
                                    _ if s.message().starts_with("next stage") => (C::Unavailable, s.message().to_string()),
                                    _ => (C::Unavailable, format!("next stage {addr} failed: {}", s.message())),
                                };
                                let _ = relay_tx.send(Err(Status::new(code, msg))).await;
                                break;
                            }
                        }
                    }
                });
                Some(dtx)
            }
        };

        let this = self.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut enc = Vec::new();
            let mut route_seen = 0u64;
            // Sequences started on this stream belong to it and end with it (a coordinator
            // that died, or gave up on the stream, leaves no KV behind): the compute thread
            // knows which are still live.
            static STREAMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            let stream_id = STREAMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            loop {
                let frame = match inbound.message().await {
                    Ok(Some(f)) => f,
                    Ok(None) | Err(_) => break,
                };
                let step_id = frame.step;
                let route = frame.route;
                if route != 0 {
                    route_seen = route;
                }
                let span = tracing::debug_span!("forward", step = step_id, chunks = frame.chunks.len());
                let r: Result<()> = async {
                    let step = to_step(&sh, frame, &mut buf)?;
                    let chunks: Vec<v1::Chunk> = step
                        .chunks
                        .iter()
                        .zip(&step.sample)
                        .map(|(c, &s)| v1::Chunk { seq: c.seq, n_tokens: c.n_tokens as u32, sample: s })
                        .collect();
                    let starts_msg: Vec<v1::SeqStart> = step
                        .starts
                        .iter()
                        .map(|s| v1::SeqStart {
                            seq: s.seq,
                            sampling: Some(params_to_wire(&s.params, s.want_logprobs, s.top_logprobs)),
                            history: s.history.clone(),
                            draws_done: s.draws_done,
                        })
                        .collect();
                    let out = run_job(&sh, |tx| Job::Step(stream_id, step, tx)).await??;
                    match (out, &down) {
                        (Output::Hidden(h), Some(dtx)) => {
                            let n: usize = chunks.iter().map(|c| c.n_tokens as usize).sum();
                            codec::encode(sh.codec, &h, n, sh.n_embd, &mut enc)?;
                            let frame = v1::ForwardFrame {
                                step: step_id,
                                route,
                                chunks,
                                starts: starts_msg,
                                input: Some(v1::forward_frame::Input::Hidden(v1::Activations {
                                    dtype: dtype_of(sh.codec) as i32,
                                    n_tokens: n as u32,
                                    dim: sh.n_embd as u32,
                                    data: std::mem::take(&mut enc),
                                })),
                            };
                            dtx.send(frame).await.map_err(|_| Error::NextStage {
                                addr: sh.next.clone().unwrap_or_default(),
                                msg: "the stream to the next stage closed".into(),
                            })?;
                            buf = h;
                        }
                        (Output::Tokens(t), _) => {
                            let tokens = t
                                .into_iter()
                                .map(|o| v1::SampledToken {
                                    seq: o.seq,
                                    token: o.token,
                                    logprob: o.logprob,
                                    top: o.top.into_iter().map(|(token, logprob)| v1::TokenLogprob { token, logprob }).collect(),
                                })
                                .collect();
                            let result = v1::ForwardResult { step: step_id, tokens };
                            if route == 0 {
                                let _ = up_tx.send(Ok(result)).await;
                            } else {
                                // Straight to the caller's Results stream.
                                let tx = this.routes.lock().unwrap_or_else(|e| e.into_inner()).get(&route).cloned();
                                let tx = tx.ok_or_else(|| {
                                    Error::InvalidFrame(format!("no Results stream is open for route {route}"))
                                })?;
                                if tx.send(Ok(result)).await.is_err() {
                                    return Err(Error::InvalidFrame(format!("the Results stream of route {route} closed")));
                                }
                            }
                        }
                        (Output::Hidden(_), None) => {
                            return Err(Error::InvalidFrame(
                                "this stage has no head and no next stage: LoadShard is incomplete".into(),
                            ));
                        }
                    }
                    Ok(())
                }
                .instrument(span)
                .await;
                if let Err(e) = r {
                    if matches!(e, Error::InvalidFrame(_) | Error::Codec(_) | Error::Model(_)) {
                        this.rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    tracing::warn!(step = step_id, "forward: {e}");
                    let _ = up_tx.send(Err(e.into())).await;
                    break;
                }
            }
            if route_seen != 0 {
                this.routes.lock().unwrap_or_else(|e| e.into_inner()).remove(&route_seen);
            }
            if let Ok(n) = run_job(&sh, |tx| Job::EndStream(stream_id, tx)).await
                && n > 0
            {
                tracing::info!(released = n, "the stream ended: its sequences' KV is freed");
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(up_rx))))
    }

    async fn run_experts(&self, req: Request<v1::ExpertRequest>) -> std::result::Result<Response<v1::ExpertReply>, Status> {
        let host = self.experts.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or_else(|| {
            Status::failed_precondition("this worker is not an expert host: LoadShard with experts_only first")
        })?;
        let r = req.into_inner();
        let out = tokio::task::spawn_blocking(move || host.run(r)).await.map_err(|e| Status::internal(e.to_string()))?;
        if let Err(e) = &out {
            tracing::warn!("run experts: {e}");
        }
        Ok(Response::new(out?))
    }

    async fn release(&self, req: Request<v1::ReleaseRequest>) -> std::result::Result<Response<v1::ReleaseReply>, Status> {
        let sh = self.loaded()?;
        let seqs = req.into_inner().seqs;
        let released = run_job(&sh, |tx| Job::Release(seqs, tx)).await?;
        Ok(Response::new(v1::ReleaseReply { released }))
    }

    async fn health(&self, _: Request<v1::HealthRequest>) -> std::result::Result<Response<v1::HealthReply>, Status> {
        Ok(Response::new(v1::HealthReply { serving: true, loaded: self.loaded().is_ok() }))
    }

    type ResultsStream = ResultStream;

    async fn results(&self, req: Request<v1::ResultsRequest>) -> std::result::Result<Response<Self::ResultsStream>, Status> {
        let route = req.into_inner().route;
        let sh = self.loaded()?;
        if sh.next.is_some() {
            return Err(Status::failed_precondition("Results is served by the last stage only"));
        }
        if route == 0 {
            return Err(Status::invalid_argument("route 0 means relay up the chain; pick a non-zero route"));
        }
        let (tx, rx) = tmpsc::channel(64);
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.retain(|_, t| !t.is_closed());
        if routes.contains_key(&route) {
            return Err(Status::already_exists(format!("route {route} is taken")));
        }
        routes.insert(route, tx);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stats(&self, _: Request<v1::StatsRequest>) -> std::result::Result<Response<v1::StatsReply>, Status> {
        let rejected = self.rejected.load(std::sync::atomic::Ordering::Relaxed);
        let sh = self.loaded().ok();
        let c = match &sh {
            Some(sh) => run_job(sh, Job::Stats).await?,
            None => compute::Counters::default(),
        };
        let next = sh.as_ref().and_then(|sh| sh.next.clone()).unwrap_or_default();
        let (next_stage_rtt_ns, next_stage_error) = match next.as_str() {
            "" => (0, String::new()),
            addr => match self.probe_next(addr).await {
                Ok(ns) => (ns, String::new()),
                Err(e) => (0, e),
            },
        };
        Ok(Response::new(v1::StatsReply {
            steps: c.steps,
            tokens: c.tokens,
            compute_ns: c.compute_ns,
            sequences: c.sequences,
            kv_bytes: c.kv_bytes,
            frames_rejected: rejected,
            next_stage_rtt_ns,
            next_stage: next,
            next_stage_error,
            loaded: sh.is_some(),
            layer_start: sh.as_ref().map_or(0, |s| s.layers.0),
            layer_end: sh.as_ref().map_or(0, |s| s.layers.1),
            embed: sh.as_ref().is_some_and(|s| s.embed),
            head: sh.as_ref().is_some_and(|s| s.head),
            shard_bytes: sh.as_ref().map_or(0, |s| s.shard_bytes),
            model_hash: sh.as_ref().map_or_else(String::new, |s| s.request.model_hash.clone()),
            n_ctx: sh.as_ref().map_or(0, |s| s.request.n_ctx),
            activation_dtype: sh.as_ref().map_or(0, |s| s.request.activation_dtype),
            n_threads: sh.as_ref().map_or(0, |s| s.request.n_threads),
            attn_threads: sh.as_ref().map_or(0, |s| s.request.attn_threads),
            kv_budget_bytes: sh.as_ref().map_or(0, |s| s.request.kv_budget_bytes),
            loads: self.loads.load(std::sync::atomic::Ordering::Relaxed),
        }))
    }
}

/// Sampling parameters as they travel.
pub fn params_to_wire(p: &SamplingParams, logprobs: bool, top_logprobs: usize) -> v1::SamplingParams {
    v1::SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k as u32,
        top_p: p.top_p,
        min_p: p.min_p,
        repeat_penalty: p.repeat_penalty,
        repeat_last_n: p.repeat_last_n as u32,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        seed: p.seed,
        logprobs,
        top_logprobs: top_logprobs as u32,
    }
}

/// Serves `svc` on `listener` until the process ends, with this process's security:
/// mutual TLS against the cluster CA and the join token on every request when configured.
pub async fn serve(listener: tokio::net::TcpListener, svc: WorkerService) -> Result<()> {
    let sec = shoal_proto::security::get();
    // `Server::tcp_nodelay` applies only to listeners tonic binds itself: set it on each
    // accepted socket here, or small replies wait for the peer's delayed ACK (40 ms).
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |r| {
        r.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    });
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = sec.server_tls() {
        server = server.tls_config(tls)?;
    }
    let svc = worker_server::WorkerServer::new(svc)
        .max_decoding_message_size(shoal_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(shoal_proto::MAX_MESSAGE_BYTES);
    server
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(1)))
        .http2_keepalive_timeout(Some(Duration::from_secs(3)))
        .add_service(tonic::service::interceptor::InterceptedService::new(svc, sec.require_token()))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
