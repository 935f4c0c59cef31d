//! A pipeline of workers as the coordinator sees it: connect (Hello, Inventory), plan and
//! load the shards. The generation loop over it is the [`super::scheduler`].
//!
//! A dead stage shows up as an error on the scheduler's stream (the stage before it notices
//! the broken link or the HTTP/2 keepalive times out, 3 s), and every wait is also bounded
//! by [`STEP_TIMEOUT`], so the coordinator never hangs.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::time::{Duration, Instant};

use shoal_kernels::codec::Codec;
use shoal_model::arch::Config;
use shoal_model::gguf::GgufFile;
use shoal_model::tp::TpMode;
use shoal_proto::v1::{self, worker_client::WorkerClient};
use shoal_proto::security::Channel;

use shoal_planner::cluster::{KernelRates, LiveWorker};
use shoal_planner::model::MatShape;
use shoal_planner::place::{self, Search, Unit};
use shoal_planner::{Cluster, ModelDesc, Plan, PlanError, Workload};

use super::{Error, Result};

/// One pipeline stage: the worker's index and the part of the model it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagePlan {
    pub worker: usize,
    pub layers: Range<usize>,
    pub embed: bool,
    pub head: bool,
}

/// Longest wait for one step's answer (a prefill chunk of a large model on a slow CPU).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(600);

/// A connected worker that answered Hello.
#[derive(Debug, Clone)]
pub struct Worker {
    pub addr: String,
    pub hello: v1::HelloReply,
    pub inventory: v1::Inventory,
    client: WorkerClient<Channel>,
}

/// How to load the model onto the workers.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Model file name inside each worker's models dir.
    pub model_file: String,
    /// Context length; 0: the model's, at most 4096 (like `shoal run`).
    pub n_ctx: usize,
    /// Compute threads per worker; 0: all its cores.
    pub n_threads: usize,
    /// Threads attention rounds for (the reference run's); 0: n_threads.
    pub attn_threads: usize,
    pub codec: Codec,
    /// Most KV bytes per stage; 0: unlimited.
    pub kv_budget: u64,
    /// Per-worker compute threads (in the order given), overriding `n_threads`.
    pub worker_threads: Vec<usize>,
    /// Concurrent sequences the plan is sized for.
    pub parallel: u64,
    /// Split layers evenly (in the given order) instead of by the planner's optimizer.
    pub even: bool,
    /// Let the optimizer choose the order of the stages (workers that joined, rather than
    /// addresses given in pipeline order).
    pub reorder: bool,
    /// Run every MoE layer's routed experts on this worker (an expert host) instead of in
    /// the stages; the stages keep the routers.
    pub expert_host: Option<String>,
    /// Tensor-parallel stages: a stage's worker address → the workers that join it as
    /// ranks 1, 2, ... (its leader is rank 0 and the stage the pipeline sees).
    pub tp_followers: HashMap<String, Vec<String>>,
    pub tp_mode: TpMode,
}

/// Splits `--worker` addresses where `A+B+C` is one tensor-parallel stage (A its leader):
/// the stage addresses, and each leader's followers.
pub fn tp_groups(addrs: &[String]) -> (Vec<String>, HashMap<String, Vec<String>>) {
    let mut leaders = Vec::with_capacity(addrs.len());
    let mut followers = HashMap::new();
    for a in addrs {
        let mut parts = a.split('+').map(str::trim).filter(|p| !p.is_empty()).map(String::from);
        let Some(leader) = parts.next() else { continue };
        let rest: Vec<String> = parts.collect();
        if !rest.is_empty() {
            followers.insert(leader.clone(), rest);
        }
        leaders.push(leader);
    }
    (leaders, followers)
}

/// The host part of a worker address (`http://h:p`, `h:p`, `[v6]:p`).
fn host_of(addr: &str) -> &str {
    let a = addr.trim_start_matches("http://").trim_start_matches("https://");
    a.rsplit_once(':').map_or(a, |(h, _)| h)
}

impl LoadOptions {
    /// Compute threads of the `i`-th worker (0: all its cores).
    pub fn threads_of(&self, i: usize) -> usize {
        self.worker_threads.get(i).copied().unwrap_or(self.n_threads)
    }
}

/// Connects to `addr`, says Hello, reads the inventory.
pub async fn connect(addr: &str) -> Result<Worker> {
    let conn = |msg: String| Error::Connect { addr: addr.to_string(), msg };
    // The same channel settings (timeouts, keepalives) as between stages.
    let ch = shoal_worker::service::connect(addr)
        .await
        .map_err(|e| conn(shoal_proto::error_chain(&e)))?;
    let mut client = WorkerClient::new(ch)
        .max_decoding_message_size(shoal_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(shoal_proto::MAX_MESSAGE_BYTES);
    let hello = client
        .hello(shoal_proto::hello("coordinator"))
        .await
        .map_err(|s| Error::Refused { addr: addr.to_string(), msg: s.message().to_string() })?
        .into_inner();
    if !shoal_proto::is_compatible(hello.protocol_major, hello.protocol_minor) {
        return Err(Error::Refused {
            addr: addr.to_string(),
            msg: format!("it speaks protocol {}.{}, this coordinator {}", hello.protocol_major, hello.protocol_minor, shoal_proto::PROTOCOL_MAJOR),
        });
    }
    let inventory = client.get_inventory(v1::InventoryRequest::default()).await.map_err(|s| conn(s.message().to_string()))?.into_inner();
    Ok(Worker { addr: addr.to_string(), hello, inventory, client })
}

impl Worker {
    /// A client on the worker's channel (clones share the connection).
    pub fn client(&self) -> WorkerClient<Channel> {
        self.client.clone()
    }
}

/// The blocks of `model` a worker is asked to time: each distinct shape of a layer's dense
/// matrices, then the head's; none over the worker's size limit, at most its count.
pub fn probes_for(model: &ModelDesc) -> Vec<Vec<MatShape>> {
    let mut out: Vec<Vec<MatShape>> = Vec::new();
    let fits = |mats: &Vec<MatShape>| {
        let bytes: u64 = mats
            .iter()
            .map(|m| shoal_kernels::quant::row_bytes(m.ty, m.cols as usize).map_or(u64::MAX, |r| r as u64).saturating_mul(m.rows))
            .fold(0, u64::saturating_add);
        !mats.is_empty() && bytes <= shoal_worker::inventory::MAX_PROBE_BYTES
    };
    for mats in model.layers().into_iter().map(|l| l.mats).chain(std::iter::once(model.head_mats())) {
        if out.len() < shoal_worker::inventory::MAX_PROBES && fits(&mats) && !out.contains(&mats) {
            out.push(mats);
        }
    }
    out
}

/// What the planner needs of a live worker: its inventory with the kernels calibrated on
/// `threads` and `model`'s blocks timed (see [`probes_for`]), and its round trip (best of
/// three Health calls).
pub async fn live_worker(w: &Worker, threads: usize, model: &ModelDesc) -> Result<LiveWorker> {
    let mut c = w.client();
    let err = |s: tonic::Status| Error::Connect { addr: w.addr.clone(), msg: s.message().to_string() };
    let probes = probes_for(model);
    let shape = |m: &MatShape| v1::MatrixShape { r#type: m.ty.name().to_string(), rows: m.rows, cols: m.cols };
    let attention = (model.head_dim_k == model.head_dim_v).then(|| v1::AttentionShape {
        n_head: model.n_head.min(u32::MAX as u64) as u32,
        n_head_kv: model.n_head_kv.min(u32::MAX as u64) as u32,
        head_dim: model.head_dim_k.min(u32::MAX as u64) as u32,
    });
    let req = v1::InventoryRequest {
        calibrate: true,
        threads: threads as u32,
        probes: probes.iter().map(|p| v1::ShapeProbe { matrices: p.iter().map(shape).collect() }).collect(),
        attention,
    };
    let inv = c.get_inventory(req).await.map_err(err)?.into_inner();
    let mut rtts = Vec::new();
    for _ in 0..7 {
        tokio::time::sleep(Duration::from_millis(3)).await;
        let t = Instant::now();
        c.health(v1::HealthRequest {}).await.map_err(err)?;
        rtts.push(t.elapsed().as_secs_f64());
    }
    rtts.sort_by(f64::total_cmp);
    let rtt = rtts[rtts.len() / 2];
    tracing::info!(addr = %w.addr, rtt_us = ?rtts.iter().map(|s| (s * 1e6) as u64).collect::<Vec<_>>(), "health round trips");
    let rates = inv.calibration.map(|cal| {
        let rate = |f: fn(&v1::KernelRate) -> f64| {
            cal.rates.iter().filter_map(|r| Some((shoal_kernels::GgmlType::from_name(&r.r#type)?, f(r)))).collect()
        };
        KernelRates {
            single: rate(|r| r.single_bytes_per_s),
            batch: rate(|r| r.batch_bytes_per_s),
            row: rate(|r| r.row_overhead_s),
            batch_rows: cal.batch_rows,
            call_overhead_s: cal.call_overhead_s,
            wake_s: cal.wake_s,
            elementwise_s: cal.elementwise_s,
            handoff_s: cal.handoff_s,
            probes: probes.iter().cloned().zip(cal.probe_s.iter().copied()).filter(|p| p.1 > 0.0).collect(),
            attention: (cal.attention_per_position_s > 0.0 || cal.attention_fixed_s > 0.0)
                .then_some((cal.attention_fixed_s, cal.attention_per_position_s)),
        }
    });
    Ok(LiveWorker { name: w.addr.clone(), ram_free: inv.ram_free_bytes, bandwidth: inv.memory_bandwidth_bytes_per_s as f64, rates, rtt_s: rtt })
}

/// Plans `model` over live workers (in the given order): the planner's optimum, or with
/// `even` the even split in the given order, judged by the same cost model.
pub fn plan_live(model: &ModelDesc, live: &[LiveWorker], w: &Workload, even: bool, reorder: bool) -> Result<Plan> {
    let cluster = Cluster::from_workers("workers", live);
    let fail = |e: PlanError| Error::Plan(e.to_string());
    if !even {
        let search = Search { tensor_parallel: false, reorder, use_all: true };
        return place::plan(model, &cluster, w, &search).map_err(fail);
    }
    let (n, s) = (model.n_layer, live.len());
    if s == 0 {
        return Err(Error::Plan("no workers to place the model on".into()));
    }
    if s > n {
        return Err(Error::Plan(format!("{s} workers but the model has only {n} layers")));
    }
    let mut start = 0;
    let stages: Vec<(Unit, Range<usize>)> = (0..s)
        .map(|k| {
            let len = n / s + usize::from(k < n % s);
            start += len;
            (Unit { host: k, gpus: vec![] }, start - len..start)
        })
        .collect();
    (1..=w.parallel.min(s as u64).max(1))
        .filter_map(|g| place::evaluate(model, &cluster, w, &stages, g))
        .min_by(|a, b| a.objective_s.total_cmp(&b.objective_s))
        .ok_or_else(|| match place::plan(model, &cluster, w, &Search { tensor_parallel: false, reorder: false, use_all: true }) {
            Err(e) => fail(e),
            Ok(_) => Error::Plan("an even split of the layers does not fit the workers' memory".into()),
        })
}

/// A loaded pipeline: stage 0 first.
#[derive(Clone, Debug)]
pub struct Pipeline {
    pub stages: Vec<(Worker, StagePlan)>,
    pub n_ctx: usize,
    /// The plan it was loaded with, with its predictions.
    pub plan: Plan,
    /// What the plan was made from, to plan again for another workload (`Coordinator.Plan`)
    /// or over other workers (recovery).
    pub planning: Planning,
    /// Compute threads of each stage's worker.
    pub threads: Vec<usize>,
    /// The model identity every stage loaded ([`shoal_proto::model_identity`]).
    pub identity: String,
}

/// The inputs of a live plan.
#[derive(Clone, Debug)]
pub struct Planning {
    pub model: ModelDesc,
    /// In the order the workers were given (a plan's `unit.host` indexes this).
    pub live: Vec<LiveWorker>,
    pub workload: Workload,
    pub even: bool,
    pub reorder: bool,
}

impl Pipeline {
    /// KV bytes one token takes on stage `i` (f16 K and V of each of its layers).
    pub fn kv_bytes_per_token(&self, i: usize) -> u64 {
        let layers = self.stages.get(i).map_or(0, |(_, p)| p.layers.len());
        (self.planning.model.kv_bytes_per_token_layer(2.0) * layers as f64) as u64
    }

    /// KV bytes stage `i` has room for: the memory the plan may use on its worker (its free
    /// RAM when it joined, less a reserve) less the shard's weights and scratch space, shared
    /// with the other stages at the same host address (workers on one machine report the
    /// same free RAM).
    pub fn kv_room(&self, i: usize) -> u64 {
        let Some(s) = self.plan.stages.get(i) else { return 0 };
        let node = |j: usize| {
            self.stages.get(j).map(|(w, _)| w.addr.rsplit_once(':').map_or(w.addr.as_str(), |(h, _)| h))
        };
        let peers = (0..self.stages.len()).filter(|&j| node(j) == node(i)).count().max(1) as u64;
        let room = s.capacity.saturating_sub(s.weight_bytes + s.scratch_bytes);
        room / peers
    }
}

impl Planning {
    /// The plan for another context length or parallelism (0: unchanged).
    pub fn replan(&self, ctx: u64, parallel: u64) -> Result<Plan> {
        let mut w = self.workload.clone();
        if ctx > 0 {
            w.ctx = ctx;
        }
        if parallel > 0 {
            w.parallel = parallel;
        }
        plan_live(&self.model, &self.live, &w, self.even, self.reorder)
    }
}

/// One sampled token as it came back.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: Option<f32>,
    /// With `top_logprobs`: the most likely tokens and their log-probabilities.
    pub top: Vec<(u32, f32)>,
}

/// What planning over some workers starts from.
pub struct Measured {
    pub planning: Planning,
    pub threads: Vec<usize>,
    pub n_ctx: usize,
    pub identity: String,
}

/// Measures `workers` (each calibrated on its threads, the model's blocks timed) for
/// planning `model` with `opts`.
pub async fn measure(workers: &[Worker], model: &GgufFile, opts: &LoadOptions) -> Result<Measured> {
    let config = Config::from_gguf(model)?;
    let name = model.path().file_name().and_then(|n| n.to_str()).unwrap_or("model");
    let desc = ModelDesc::from_header(name, model.header()).map_err(|e| Error::Plan(e.to_string()))?;
    let n_ctx = if opts.n_ctx == 0 { config.n_ctx_train.min(4096) } else { opts.n_ctx };
    let threads: Vec<usize> = (0..workers.len()).map(|i| opts.threads_of(i)).collect();
    // One at a time: workers on one host would disturb each other's measurements.
    let mut live = Vec::with_capacity(workers.len());
    for (w, &t) in workers.iter().zip(&threads) {
        live.push(live_worker(w, t, &desc).await?);
    }
    let mut wl = Workload::new(n_ctx as u64, opts.parallel);
    wl.act_bytes = match opts.codec {
        Codec::F32 => 4.0,
        Codec::Bf16 => 2.0,
        Codec::Q8 => 1.0,
    };
    let header = &model.bytes()[..(model.header().data_offset as usize).min(model.bytes().len())];
    let identity = shoal_proto::model_identity(header, model.file_size());
    let planning = Planning { model: desc, live, workload: wl, even: opts.even, reorder: opts.reorder };
    Ok(Measured { planning, threads, n_ctx, identity })
}

impl Pipeline {
    /// Connects to the workers at `addrs` (pipeline order) and loads the model on them.
    pub async fn connect_and_load(addrs: &[String], model: &GgufFile, opts: &LoadOptions) -> Result<Pipeline> {
        let mut workers = Vec::with_capacity(addrs.len());
        for addr in addrs {
            workers.push(connect(addr).await?);
        }
        Pipeline::load(workers, model, opts).await
    }

    /// Plans `workers` over `model` (the coordinator's own copy, read for its header) and
    /// loads every shard.
    pub async fn load(workers: Vec<Worker>, model: &GgufFile, opts: &LoadOptions) -> Result<Pipeline> {
        let m = measure(&workers, model, opts).await?;
        Pipeline::load_on(workers, m.threads, m.planning, m.n_ctx, m.identity, opts).await
    }

    /// [`Pipeline::adopt`] after measuring `workers` (stage order) for the planner.
    pub async fn adopt_layout(workers: Vec<Worker>, layout: &[Range<usize>], model: &GgufFile, opts: &LoadOptions) -> Result<Pipeline> {
        let m = measure(&workers, model, opts).await?;
        Pipeline::adopt(workers, m.threads, m.planning, layout, m.n_ctx, m.identity, opts).await
    }

    /// Plans `planning` over `workers` (measured in `planning.live`, same order; `threads`
    /// each) and sends every stage its `LoadShard`. A shard replaces whatever the worker held,
    /// KV included.
    pub async fn load_on(
        workers: Vec<Worker>,
        threads: Vec<usize>,
        planning: Planning,
        n_ctx: usize,
        identity: String,
        opts: &LoadOptions,
    ) -> Result<Pipeline> {
        let plan = plan_live(&planning.model, &planning.live, &planning.workload, planning.even, planning.reorder)?;
        Pipeline::place(workers, threads, planning, plan, n_ctx, identity, opts, false).await
    }

    /// Takes over the pipeline a previous coordinator ran: `workers` in stage order with
    /// the layers `layout` gives each (from the plan it published), judged by the cost
    /// model for the predictions. A stage whose worker already holds exactly that shard
    /// (same model, layers, next stage, context, codec and threads, per its `Stats`) keeps
    /// it, KV and all: nothing is loaded again when the plan is unchanged.
    pub async fn adopt(
        workers: Vec<Worker>,
        threads: Vec<usize>,
        planning: Planning,
        layout: &[Range<usize>],
        n_ctx: usize,
        identity: String,
        opts: &LoadOptions,
    ) -> Result<Pipeline> {
        if layout.len() != workers.len() {
            return Err(Error::Plan(format!("{} stages for {} workers", layout.len(), workers.len())));
        }
        let cluster = Cluster::from_workers("workers", &planning.live);
        let stages: Vec<(Unit, Range<usize>)> =
            layout.iter().enumerate().map(|(k, r)| (Unit { host: k, gpus: vec![] }, r.clone())).collect();
        let w = &planning.workload;
        let plan = (1..=w.parallel.min(stages.len() as u64).max(1))
            .filter_map(|g| place::evaluate(&planning.model, &cluster, w, &stages, g))
            .min_by(|a, b| a.objective_s.total_cmp(&b.objective_s))
            .ok_or_else(|| Error::Plan("the published plan does not fit these workers".into()))?;
        Pipeline::place(workers, threads, planning, plan, n_ctx, identity, opts, true).await
    }

    /// Sends each stage of `plan` its shard; with `reuse`, not to a worker that holds it.
    #[allow(clippy::too_many_arguments)]
    async fn place(
        workers: Vec<Worker>,
        threads: Vec<usize>,
        planning: Planning,
        plan: Plan,
        n_ctx: usize,
        identity: String,
        opts: &LoadOptions,
        reuse: bool,
    ) -> Result<Pipeline> {
        tracing::info!(
            stages = plan.stages.len(),
            decode_tok_s = plan.prediction.decode_tok_s_single,
            "planned {}",
            plan.stages.iter().map(|s| format!("{}:{:?}", s.label, s.layers)).collect::<Vec<_>>().join(" ")
        );
        let dtype = match opts.codec {
            Codec::F32 => v1::ActivationDtype::F32,
            Codec::Bf16 => v1::ActivationDtype::Bf16,
            Codec::Q8 => v1::ActivationDtype::Q8,
        };
        let mut slots: Vec<Option<Worker>> = workers.into_iter().map(Some).collect();
        let mut stages: Vec<(Worker, StagePlan)> = Vec::with_capacity(plan.stages.len());
        let mut stage_threads = Vec::with_capacity(plan.stages.len());
        for s in &plan.stages {
            let w = slots.get_mut(s.unit.host).and_then(Option::take).ok_or_else(|| Error::Plan("a worker is planned twice".into()))?;
            stage_threads.push(threads.get(s.unit.host).copied().unwrap_or(opts.n_threads));
            stages.push((w, StagePlan { worker: s.unit.host, layers: s.layers.clone(), embed: s.embed, head: s.head }));
        }
        let addrs: Vec<String> = stages.iter().map(|(w, _)| w.addr.clone()).collect();
        if let Some(host) = &opts.expert_host {
            // The expert host first: every layer's routed experts, on all its cores.
            let h = connect(host).await?;
            let req = v1::LoadShardRequest {
                model_file: opts.model_file.clone(),
                model_hash: identity.clone(),
                layer_start: 0,
                layer_end: planning.model.n_layer as u32,
                experts_only: true,
                activation_dtype: dtype as i32,
                ..Default::default()
            };
            h.client().load_shard(req).await.map_err(|s| Error::Load { addr: host.clone(), msg: s.message().to_string() })?;
        }
        for (i, (w, p)) in stages.iter_mut().enumerate() {
            let req = v1::LoadShardRequest {
                model_file: opts.model_file.clone(),
                model_hash: identity.clone(),
                layer_start: p.layers.start as u32,
                layer_end: p.layers.end as u32,
                embed: p.embed,
                head: p.head,
                kv_budget_bytes: opts.kv_budget,
                n_ctx: n_ctx as u32,
                n_threads: stage_threads[i] as u32,
                next_stage: addrs.get(i + 1).cloned().unwrap_or_default(),
                activation_dtype: dtype as i32,
                attn_threads: opts.attn_threads as u32,
                experts_only: false,
                expert_host: opts.expert_host.clone().unwrap_or_default(),
                ..Default::default()
            };
            let followers = opts.tp_followers.get(&w.addr).cloned().unwrap_or_default();
            // (Stats does not say which expert host a stage uses, nor who its ranks are:
            // with either, always load.)
            if reuse && opts.expert_host.is_none() && followers.is_empty() && holds(w, &req).await {
                tracing::info!(addr = %w.addr, layers = ?p.layers, "the worker holds this shard already: kept");
                continue;
            }
            let mut req = req;
            if !followers.is_empty() {
                req.tp_rank = 0;
                req.tp_size = followers.len() as u32 + 1;
                req.tp_secret = shoal_proto::security::random_hex(32).map_err(|e| Error::Plan(e.to_string()))?.into_bytes();
                req.tp_mode = match opts.tp_mode {
                    TpMode::Exact => "exact".into(),
                    TpMode::Sum => "sum".into(),
                };
            }
            let reply = w
                .client
                .load_shard(req.clone())
                .await
                .map_err(|s| Error::Load { addr: w.addr.clone(), msg: s.message().to_string() })?
                .into_inner();
            // The other ranks join the leader's group listener; each holds its slice.
            let leader = format!("{}:{}", host_of(&w.addr), reply.tp_port);
            for (r, f) in followers.iter().enumerate() {
                let fw = connect(f).await?;
                let freq = v1::LoadShardRequest {
                    tp_rank: r as u32 + 1,
                    tp_leader: leader.clone(),
                    next_stage: String::new(),
                    head: false,
                    ..req.clone()
                };
                fw.client().load_shard(freq).await.map_err(|s| Error::Load { addr: f.clone(), msg: s.message().to_string() })?;
                tracing::info!(leader = %w.addr, rank = r + 1, addr = %f, "tensor-parallel rank loaded");
            }
        }
        Ok(Pipeline { stages, n_ctx, plan, planning, threads: stage_threads, identity })
    }

    /// Drops sequences' KV on every stage, in a background task; best effort, bounded in
    /// time (a stage that is gone has dropped them anyway).
    pub fn release_in_background(&self, seqs: Vec<u64>) {
        if seqs.is_empty() {
            return;
        }
        let clients: Vec<_> = self.stages.iter().map(|(w, _)| w.client()).collect();
        tokio::spawn(async move {
            for mut c in clients {
                let req = v1::ReleaseRequest { seqs: seqs.clone() };
                let _ = tokio::time::timeout(Duration::from_secs(2), c.release(req)).await;
            }
        });
    }
}

/// Whether `w` holds exactly the shard `req` would load (its `Stats`, protocol 1.4).
async fn holds(w: &Worker, req: &v1::LoadShardRequest) -> bool {
    let Ok(Ok(st)) = tokio::time::timeout(Duration::from_secs(5), w.client().stats(v1::StatsRequest {})).await else {
        return false;
    };
    let st = st.into_inner();
    st.loaded
        && st.model_hash == req.model_hash
        && st.layer_start == req.layer_start
        && st.layer_end == req.layer_end
        && st.embed == req.embed
        && st.head == req.head
        && st.next_stage == req.next_stage
        && st.n_ctx == req.n_ctx
        && st.activation_dtype == req.activation_dtype
        && st.n_threads == req.n_threads
        && st.attn_threads == req.attn_threads
        && st.kv_budget_bytes == req.kv_budget_bytes
}

/// A failure on the stream to the first stage. Stages name the next stage when a link
/// breaks; a broken link to the first stage itself is named here.
pub(crate) fn stage_err(first: &str, s: tonic::Status) -> Error {
    use tonic::Code as C;
    match s.code() {
        C::Unknown | C::Internal | C::Cancelled | C::Unavailable if !s.message().starts_with("next stage") => {
            Error::Stage(format!("first stage {first} failed: {} ({:?})", s.message(), s.code()))
        }
        C::InvalidArgument | C::FailedPrecondition | C::ResourceExhausted | C::OutOfRange => {
            Error::StageRefused(format!("{} ({:?})", s.message(), s.code()))
        }
        _ => Error::Stage(format!("{} ({:?})", s.message(), s.code())),
    }
}

/// Reads a local model file's name relative to `dir`, for `LoadShard`.
pub fn file_name_in(path: &Path) -> Option<String> {
    path.file_name().and_then(|n| n.to_str()).map(str::to_string)
}
