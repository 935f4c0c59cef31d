//! A pipeline of workers as the coordinator sees it, and the generation loop over it.
//!
//! The coordinator sends token ids, chunk shapes and (once per sequence) sampling parameters
//! into stage 0 over one `Forward` stream per request; activations go stage to stage; the
//! last stage samples and the token ids come back up the chain on the same stream. One
//! result arrives per frame, in order, so the loop waits for each step's answer. A dead
//! stage shows up as an error on that stream (the stage before it notices the broken link
//! or the HTTP/2 keepalive times out, 3 s), and every wait is also bounded by
//! [`STEP_TIMEOUT`], so the coordinator never hangs.

use std::path::Path;
use std::time::Duration;

use shoal_kernels::codec::Codec;
use shoal_model::arch::Config;
use shoal_model::engine::{GenerateRequest, Generation, PREFILL_CHUNK, TokenStream};
use shoal_model::gguf::GgufFile;
use shoal_model::tokenizer::Tokenizer;
use shoal_proto::v1::{self, worker_client::WorkerClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
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
        .map_err(|e| conn(format!("{e}: {}", source_chain(&e))))?;
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

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = String::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &c.to_string();
        cur = c.source();
        if cur.is_some() {
            s += ": ";
        }
    }
    s
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
    next_seq: u64,
    next_step: u64,
}

/// One sampled token as it came back.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: Option<f32>,
}

impl Pipeline {
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
        Ok(Pipeline { stages, n_ctx, next_seq: 1, next_step: 0 })
    }

    /// Runs a prompt and `max` decode steps, returning each sampled token (the first from
    /// the prompt's last position). `keep_going` sees each token and may stop early.
    pub async fn sample_loop(
        &mut self,
        req: &GenerateRequest,
        logprobs: bool,
        mut keep_going: impl FnMut(&Sampled, usize) -> bool,
    ) -> Result<Vec<Sampled>> {
        req.params.validate().map_err(|m| Error::Model(shoal_model::Error::InvalidRequest(m)))?;
        let prompt = &req.prompt_tokens;
        if prompt.is_empty() {
            return Err(shoal_model::Error::InvalidRequest("empty prompt".into()).into());
        }
        if prompt.len() >= self.n_ctx {
            return Err(shoal_model::Error::InvalidRequest(format!(
                "prompt of {} tokens does not fit the context of {}",
                prompt.len(),
                self.n_ctx
            ))
            .into());
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let (tx, rx) = mpsc::channel::<v1::ForwardFrame>(4);
        let mut client = self.stages[0].0.client.clone();
        let first = self.stages[0].0.addr.clone();
        let r = async {
            let mut results =
                client.forward(ReceiverStream::new(rx)).await.map_err(|s| stage_err(&first, s))?.into_inner();
            let mut out = Vec::new();
            let n_chunks = prompt.len().div_ceil(PREFILL_CHUNK);
            let mut last = None;
            for (i, chunk) in prompt.chunks(PREFILL_CHUNK).enumerate() {
                let starts = if i == 0 {
                    vec![v1::SeqStart {
                        seq,
                        sampling: Some(shoal_worker::service::params_to_wire(&req.params, logprobs)),
                        history: prompt.clone(),
                    }]
                } else {
                    Vec::new()
                };
                last = self.step(&tx, &mut results, seq, chunk.to_vec(), i + 1 == n_chunks, starts).await?;
            }
            let mut s = last.ok_or_else(|| Error::Stage("the last stage sampled no token".into()))?;
            loop {
                out.push(s);
                if !keep_going(&s, out.len()) || prompt.len() + out.len() >= self.n_ctx {
                    break;
                }
                s = self
                    .step(&tx, &mut results, seq, vec![s.token], true, Vec::new())
                    .await?
                    .ok_or_else(|| Error::Stage("the last stage sampled no token".into()))?;
            }
            Ok(out)
        }
        .await;
        drop(tx);
        self.release(seq).await;
        r
    }

    async fn step(
        &mut self,
        tx: &mpsc::Sender<v1::ForwardFrame>,
        results: &mut tonic::Streaming<v1::ForwardResult>,
        seq: u64,
        tokens: Vec<u32>,
        sample: bool,
        starts: Vec<v1::SeqStart>,
    ) -> Result<Option<Sampled>> {
        let step = self.next_step;
        self.next_step += 1;
        let first = self.stages[0].0.addr.clone();
        let stage_err = |s: tonic::Status| stage_err(&first, s);
        let frame = v1::ForwardFrame {
            step,
            chunks: vec![v1::Chunk { seq, n_tokens: tokens.len() as u32, sample }],
            starts,
            input: Some(v1::forward_frame::Input::Tokens(v1::TokenIds { ids: tokens })),
        };
        if tx.send(frame).await.is_err() {
            // The stream is gone; its error (if any) is the better message.
            return match tokio::time::timeout(Duration::from_secs(5), results.message()).await {
                Ok(Err(s)) => Err(stage_err(s)),
                _ => Err(Error::Stage("the stream to the first stage closed".into())),
            };
        }
        let r = tokio::time::timeout(STEP_TIMEOUT, results.message())
            .await
            .map_err(|_| Error::Timeout(STEP_TIMEOUT))?
            .map_err(stage_err)?
            .ok_or_else(|| Error::Stage("the first stage closed the stream".into()))?;
        if r.step != step {
            return Err(Error::Stage(format!("answer for step {} while waiting for {step}", r.step)));
        }
        Ok(r.tokens.iter().find(|t| t.seq == seq).map(|t| Sampled { token: t.token, logprob: t.logprob }))
    }

    /// Drops a sequence's KV on every stage; best effort, bounded in time.
    async fn release(&mut self, seq: u64) {
        for (w, _) in &mut self.stages {
            let _ = tokio::time::timeout(Duration::from_secs(2), w.client.release(v1::ReleaseRequest { seqs: vec![seq] })).await;
        }
    }

    /// Generates a completion like [`shoal_model::engine::Engine::generate`], token for
    /// token: the same stop rules, the same streamed text.
    pub async fn generate(
        &mut self,
        tok: &Tokenizer,
        req: &GenerateRequest,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let mut stream = TokenStream::new(tok, req);
        if req.max_tokens > 0 {
            self.sample_loop(req, false, |s, _| stream.push(s.token, &mut on_text)).await?;
        }
        Ok(stream.finish(&mut on_text))
    }
}

/// A failure on the stream to the first stage. Stages name the next stage when a link
/// breaks; a broken link to the first stage itself is named here.
fn stage_err(first: &str, s: tonic::Status) -> Error {
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
