//! A pipeline of workers as the coordinator sees it: connect (Hello, Inventory), plan and
//! load the shards. The generation loop over it is the [`super::scheduler`].
//!
//! A dead stage shows up as an error on the scheduler's stream (the stage before it notices
//! the broken link or the HTTP/2 keepalive times out, 3 s), and every wait is also bounded
//! by [`STEP_TIMEOUT`], so the coordinator never hangs.

use std::path::Path;
use std::time::Duration;

use shoal_kernels::codec::Codec;
use shoal_model::arch::Config;
use shoal_model::gguf::GgufFile;
use shoal_proto::v1::{self, worker_client::WorkerClient};
use tonic::transport::Channel;

use super::planner::{self, ModelSizes, StagePlan, WorkerCaps};
use super::{Error, Result};

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
    /// Split layers evenly instead of by measured bandwidth (workers on one machine).
    pub even: bool,
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
    let inventory = client.get_inventory(v1::InventoryRequest {}).await.map_err(|s| conn(s.message().to_string()))?.into_inner();
    Ok(Worker { addr: addr.to_string(), hello, inventory, client })
}

impl Worker {
    /// A client on the worker's channel (clones share the connection).
    pub fn client(&self) -> WorkerClient<Channel> {
        self.client.clone()
    }
}

/// Sizes of each block, the embedding and the head, from the tensor table.
pub fn model_sizes(file: &GgufFile, n_layer: usize) -> ModelSizes {
    let mut m = ModelSizes { layers: vec![0; n_layer], embed: 0, head: 0 };
    for t in file.tensors() {
        if let Some(rest) = t.name.strip_prefix("blk.") {
            if let Some(i) = rest.split('.').next().and_then(|i| i.parse::<usize>().ok()).filter(|&i| i < n_layer) {
                m.layers[i] += t.size;
            }
        } else if t.name == "token_embd.weight" {
            m.embed += t.size;
        } else {
            m.head += t.size;
        }
    }
    if !file.tensors().iter().any(|t| t.name == "output.weight") {
        m.head += m.embed; // tied embeddings: the last stage maps the embedding too
    }
    m
}

/// A loaded pipeline: stage 0 first.
#[derive(Debug)]
pub struct Pipeline {
    pub stages: Vec<(Worker, StagePlan)>,
    pub n_ctx: usize,
}

/// One sampled token as it came back.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: Option<f32>,
    /// With `top_logprobs`: the most likely tokens and their log-probabilities.
    pub top: Vec<(u32, f32)>,
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
        let config = Config::from_gguf(model)?;
        let sizes = model_sizes(model, config.n_layer);
        let caps: Vec<WorkerCaps> = workers
            .iter()
            .map(|w| WorkerCaps {
                name: w.addr.clone(),
                free_bytes: w.inventory.ram_free_bytes,
                bandwidth: if opts.even { 1 } else { w.inventory.memory_bandwidth_bytes_per_s },
            })
            .collect();
        let plan = planner::plan(&sizes, &caps).map_err(Error::Plan)?;
        let header = &model.bytes()[..(model.header().data_offset as usize).min(model.bytes().len())];
        let hash = shoal_proto::model_identity(header, model.file_size());
        let n_ctx = if opts.n_ctx == 0 { config.n_ctx_train.min(4096) } else { opts.n_ctx };
        let dtype = match opts.codec {
            Codec::F32 => v1::ActivationDtype::F32,
            Codec::Bf16 => v1::ActivationDtype::Bf16,
            Codec::Q8 => v1::ActivationDtype::Q8,
        };
        let mut stages: Vec<(Worker, StagePlan)> = workers.into_iter().zip(plan).collect();
        let addrs: Vec<String> = stages.iter().map(|(w, _)| w.addr.clone()).collect();
        for (i, (w, p)) in stages.iter_mut().enumerate() {
            let req = v1::LoadShardRequest {
                model_file: opts.model_file.clone(),
                model_hash: hash.clone(),
                layer_start: p.layers.start as u32,
                layer_end: p.layers.end as u32,
                embed: p.embed,
                head: p.head,
                kv_budget_bytes: opts.kv_budget,
                n_ctx: n_ctx as u32,
                n_threads: opts.n_threads as u32,
                next_stage: addrs.get(i + 1).cloned().unwrap_or_default(),
                activation_dtype: dtype as i32,
                attn_threads: opts.attn_threads as u32,
            };
            w.client
                .load_shard(req)
                .await
                .map_err(|s| Error::Load { addr: w.addr.clone(), msg: s.message().to_string() })?;
        }
        Ok(Pipeline { stages, n_ctx })
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

/// A failure on the stream to the first stage. Stages name the next stage when a link
/// breaks; a broken link to the first stage itself is named here.
pub(crate) fn stage_err(first: &str, s: tonic::Status) -> Error {
    use tonic::Code as C;
    match s.code() {
        C::Unknown | C::Internal | C::Cancelled | C::Unavailable if !s.message().starts_with("next stage") => {
            Error::Stage(format!("first stage {first} failed: {} ({:?})", s.message(), s.code()))
        }
        _ => Error::Stage(format!("{} ({:?})", s.message(), s.code())),
    }
}

/// Reads a local model file's name relative to `dir`, for `LoadShard`.
pub fn file_name_in(path: &Path) -> Option<String> {
    path.file_name().and_then(|n| n.to_str()).map(str::to_string)
}
