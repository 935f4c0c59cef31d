//! The compute thread: owns the shard's executor, its KV cache and the samplers.
//!
//! The executor holds a spinning thread pool and per-sequence caches, so it lives on one OS
//! thread and the async side talks to it with typed messages ([`Job`]) over a channel; a
//! step's reply comes back on a oneshot. Steps run in arrival order. This module must not
//! know about gRPC.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Instant;

use shoal_kernels::attention::AttnNumerics;
use shoal_model::executor::{SeqChunk, ShardExecutor, StageInput, StageOutput};
use shoal_model::sampling::{Sampler, SamplingParams, logprobs};
use shoal_model::weights::Weights;
use tokio::sync::oneshot;

use crate::{Error, Result};

/// What a step feeds the shard.
#[derive(Debug)]
pub enum Input {
    Tokens(Vec<u32>),
    Hidden(Vec<f32>),
}

/// A sequence that starts (or restarts) with this step.
#[derive(Debug)]
pub struct Start {
    pub seq: u64,
    pub params: SamplingParams,
    pub want_logprobs: bool,
    /// With `want_logprobs`: how many of the most likely tokens to return too.
    pub top_logprobs: usize,
    pub history: Vec<u32>,
    /// Random draws its sampler made before (a sequence restarted on a new pipeline).
    pub draws_done: u64,
}

/// One step: chunks with their sample flags, new sequences, input.
#[derive(Debug)]
pub struct Step {
    pub chunks: Vec<SeqChunk>,
    pub sample: Vec<bool>,
    pub starts: Vec<Start>,
    pub input: Input,
}

/// What a step produced.
#[derive(Debug)]
pub enum Output {
    /// Hidden states `(n_tokens, n_embd)` for the next stage.
    Hidden(Vec<f32>),
    /// One per chunk that asked to sample.
    Tokens(Vec<SampledOut>),
}

/// A token sampled on this (last) stage.
#[derive(Debug)]
pub struct SampledOut {
    pub seq: u64,
    pub token: u32,
    pub logprob: Option<f32>,
    /// The most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Counters for `Stats`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub steps: u64,
    pub tokens: u64,
    pub compute_ns: u64,
    pub sequences: u32,
    pub kv_bytes: u64,
}

/// A message to the compute thread.
#[derive(Debug)]
pub enum Job {
    /// A step of the `Forward` stream with this id (its new sequences belong to it).
    Step(u64, Step, oneshot::Sender<Result<Output>>),
    Release(Vec<u64>, oneshot::Sender<u32>),
    /// The `Forward` stream with this id ended: free the sequences it started that are
    /// still here.
    EndStream(u64, oneshot::Sender<u32>),
    Stats(oneshot::Sender<Counters>),
}

/// Sets up a tensor-parallel leader's group, on the compute thread (it waits for the other
/// ranks to join).
pub type GroupSetup = Box<dyn FnOnce() -> shoal_model::Result<Box<dyn shoal_model::tp::Collective>> + Send>;

/// A shard to run on a GPU.
#[derive(Clone, Copy, Debug)]
pub struct GpuChoice {
    pub ordinal: usize,
    pub experts_in_host_ram: bool,
}

#[cfg(feature = "cuda")]
fn use_gpu(exec: &mut ShardExecutor, g: GpuChoice) -> shoal_model::Result<()> {
    use shoal_model::gpu::ExpertPlacement;
    let place = if g.experts_in_host_ram { ExpertPlacement::HostRam } else { ExpertPlacement::Gpu };
    exec.use_gpu(g.ordinal, place)?;
    tracing::info!(gpu = exec.gpu_name().unwrap_or(""), ?place, "shard on the GPU");
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn use_gpu(_: &mut ShardExecutor, _: GpuChoice) -> shoal_model::Result<()> {
    Err(shoal_model::Error::Gpu("this worker was built without the cuda feature".into()))
}

/// Starts the compute thread for `weights` (on `gpu` when given: its weights are copied there
/// before this returns); it ends when every sender is dropped.
pub fn spawn(
    weights: Arc<Weights>,
    n_threads: usize,
    n_ctx: usize,
    attn_threads: usize,
    kv_budget: u64,
    remote: Option<Box<dyn shoal_model::executor::RemoteExperts>>,
    group: Option<GroupSetup>,
    gpu: Option<GpuChoice>,
) -> Result<mpsc::Sender<Job>> {
    let (tx, rx) = mpsc::channel::<Job>();
    let (ready_tx, ready_rx) = mpsc::channel::<shoal_model::Result<()>>();
    std::thread::Builder::new().name("shoal-compute".into()).spawn(move || {
        let mut exec = ShardExecutor::new(weights, n_threads, n_ctx);
        exec.set_attention_numerics(AttnNumerics::GgmlFlash { n_ctx, n_threads: attn_threads });
        // The GPU context lives on this thread: load there and say how it went.
        let ready = gpu.map_or(Ok(()), |g| use_gpu(&mut exec, g));
        let failed = ready.is_err();
        let _ = ready_tx.send(ready);
        if failed {
            return;
        }
        if let Some(r) = remote {
            exec.set_remote_experts(r);
        }
        // A leader whose group did not form answers every step with why, rather than
        // computing a fraction of each layer.
        let group_err = group.and_then(|setup| match setup().and_then(|g| exec.set_group(g)) {
            Ok(()) => None,
            Err(e) => {
                tracing::error!("tensor-parallel group: {e}");
                Some(e.to_string())
            }
        });
        let mut st = State {
            exec,
            samplers: HashMap::new(),
            owners: HashMap::new(),
            kv_budget,
            counters: Counters::default(),
            group_err,
        };
        while let Ok(job) = rx.recv() {
            match job {
                Job::Step(stream, step, reply) => {
                    for s in &step.starts {
                        st.owners.insert(s.seq, stream);
                    }
                    let r = st.step(step);
                    let _ = reply.send(r);
                    // Other stages on this host need the cores until the next step comes.
                    st.exec.park_threads();
                }
                Job::Release(seqs, reply) => {
                    let n = seqs.iter().filter(|&&s| {
                        st.samplers.remove(&s);
                        st.owners.remove(&s);
                        st.exec.release(s)
                    });
                    let _ = reply.send(n.count() as u32);
                }
                Job::EndStream(stream, reply) => {
                    let seqs: Vec<u64> = st.owners.iter().filter(|e| *e.1 == stream).map(|e| *e.0).collect();
                    let n = seqs.iter().filter(|&&s| {
                        st.samplers.remove(&s);
                        st.owners.remove(&s);
                        st.exec.release(s)
                    });
                    let _ = reply.send(n.count() as u32);
                }
                Job::Stats(reply) => {
                    let mut c = st.counters;
                    c.kv_bytes = st.exec.kv_bytes() as u64;
                    c.sequences = st.samplers.len() as u32;
                    let _ = reply.send(c);
                }
            }
        }
    })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(tx),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(Error::ComputeGone),
    }
}

struct State {
    exec: ShardExecutor,
    samplers: HashMap<u64, (Sampler, Option<usize>)>,
    /// The stream that started each live sequence.
    owners: HashMap<u64, u64>,
    kv_budget: u64,
    counters: Counters,
    group_err: Option<String>,
}

impl State {
    fn step(&mut self, step: Step) -> Result<Output> {
        let t0 = Instant::now();
        if let Some(e) = &self.group_err {
            return Err(shoal_model::Error::Collective(e.clone()).into());
        }
        // Sequences are checked before anything changes, so a bad frame leaves no trace.
        for ch in &step.chunks {
            if self.exec.seq_len(ch.seq).is_none() && !step.starts.iter().any(|s| s.seq == ch.seq) {
                return Err(shoal_model::Error::UnknownSequence(ch.seq).into());
            }
        }
        let n: usize = step.chunks.iter().map(|c| c.n_tokens).sum();
        if self.kv_budget > 0 {
            let c = &self.exec.weights().config;
            let per_token = (self.exec.weights().layers.len() * c.kv_dim() * 2 * 2) as u64;
            let want = self.exec.kv_bytes() as u64 + per_token * n as u64;
            if want > self.kv_budget {
                return Err(Error::KvBudget { budget: self.kv_budget, want });
            }
        }
        for s in step.starts {
            self.exec.add_sequence(s.seq);
            let mut sampler = Sampler::new(s.params);
            sampler.accept(&s.history);
            sampler.skip_draws(s.draws_done);
            self.samplers.insert(s.seq, (sampler, s.want_logprobs.then_some(s.top_logprobs)));
        }
        let input = match &step.input {
            Input::Tokens(t) => StageInput::Tokens(t),
            Input::Hidden(h) => StageInput::Hidden(h),
        };
        let out = self.exec.forward(&step.chunks, input)?;
        self.counters.steps += 1;
        self.counters.tokens += n as u64;
        let out = match out {
            StageOutput::Hidden(h) => Output::Hidden(h),
            StageOutput::Logits(l) => {
                let n_vocab = l.len() / step.chunks.len();
                let mut toks = Vec::new();
                for (i, ch) in step.chunks.iter().enumerate() {
                    if !step.sample[i] {
                        continue;
                    }
                    let row = &l[i * n_vocab..(i + 1) * n_vocab];
                    let (sampler, want_lp) =
                        self.samplers.get_mut(&ch.seq).ok_or(shoal_model::Error::UnknownSequence(ch.seq))?;
                    let id = sampler.sample(row);
                    let (logprob, top) = match *want_lp {
                        Some(k) => {
                            let (lp, top) = logprobs(row, id, k);
                            (Some(lp), top)
                        }
                        None => (None, Vec::new()),
                    };
                    toks.push(SampledOut { seq: ch.seq, token: id, logprob, top });
                }
                Output::Tokens(toks)
            }
        };
        self.counters.compute_ns += t0.elapsed().as_nanos() as u64;
        Ok(out)
    }
}
