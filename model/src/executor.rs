//! The shard executor: runs layers [a, b) of a decoder for a batch of sequences.
//!
//! One step takes a list of chunks, one per sequence (`n_tokens` = 1 for decode, more for a
//! prefill chunk), concatenated into one activation matrix so every weight matrix is read once
//! per step for the whole batch. Each sequence has its own KV cache (f16, like llama.cpp's
//! default) for the shard's layers, and its own position, which the executor tracks: every
//! stage of a pipeline sees the same chunks in the same order, so positions need not travel.
//!
//! Input is token ids when the shard holds the embedding, hidden states otherwise; output is
//! the last token's logits of each chunk when the shard holds the head, hidden states
//! otherwise. Follows llama.cpp's `llm_build_llama` graph (pre-norm, SwiGLU, GQA).
//! This module must not know about the network: the worker wires it to gRPC.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use half::f16;
use shoal_kernels::attention::{AttnNumerics, AttnShape, attention_with, f32_to_f16_row};
use shoal_kernels::matmul::{dequantize_row, matmul};
use shoal_kernels::ops::{RopeCache, add_bias_rows, add_inplace, rms_norm, swiglu_inplace};
use shoal_kernels::ThreadPool;

use crate::arch::RopeKind;
use crate::tp::{self, Collective, Op, TpMode, TpSlice};
use crate::weights::{LayerWeights, Matrix, MoeWeights, Weights};
use crate::{Error, Result};

/// One sequence's part of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqChunk {
    pub seq: u64,
    pub n_tokens: usize,
}

/// What a step consumes.
#[derive(Clone, Copy, Debug)]
pub enum StageInput<'a> {
    /// Token ids, one per token of the chunks (the shard holds the embedding).
    Tokens(&'a [u32]),
    /// Hidden states `(n_tokens, n_embd)` from the previous stage.
    Hidden(&'a [f32]),
}

/// What a step produces.
#[derive(Clone, Debug, PartialEq)]
pub enum StageOutput {
    /// Hidden states `(n_tokens, n_embd)` for the next stage.
    Hidden(Vec<f32>),
    /// Logits `(n_chunks, n_vocab)` of the last token of each chunk.
    Logits(Vec<f32>),
}

/// KV cache of one sequence for the shard's layers: `k[l]`, `v[l]` are `(n_past, kv_dim)`.
#[derive(Debug, Default)]
struct SeqCache {
    n_past: usize,
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
}

/// Activation buffers reused across steps, grown to the largest batch seen.
#[derive(Debug, Default)]
struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    tmp: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    quant: Vec<u8>,
    /// Routed experts: router logits, the chosen (expert, weight) per token and slot, and
    /// [`run_experts`]'s buffers.
    router: Vec<f32>,
    chosen: Vec<(usize, f32)>,
    experts: ExpertScratch,
    /// One head's vector while it is QK-normalized.
    head: Vec<f32>,
    /// Exact tensor parallelism: a gathered activation, and this rank's rows of an output.
    gather: Vec<f32>,
    part: Vec<f32>,
    /// Tokens routed to each expert so far, over all layers (load balance).
    expert_tokens: Vec<u64>,
}

fn grow(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// Runs a shard of a model for batches of sequences.
pub struct ShardExecutor {
    weights: Arc<Weights>,
    pool: ThreadPool,
    rope: RopeCache,
    n_ctx: usize,
    attn: AttnNumerics,
    seqs: HashMap<u64, SeqCache>,
    s: Scratch,
    /// Where the routed experts run when not here ([`ShardExecutor::set_remote_experts`]).
    remote: Option<Box<dyn RemoteExperts>>,
    /// The other ranks of this stage's tensor-parallel group ([`ShardExecutor::set_group`]).
    group: Option<Box<dyn Collective>>,
    /// Leader: sequence bookkeeping the other ranks get with the next step.
    pending: Vec<u8>,
    /// The shard on a GPU ([`ShardExecutor::use_gpu`]): steps run there.
    #[cfg(feature = "cuda")]
    gpu: Option<crate::gpu::GpuShard>,
}

impl std::fmt::Debug for ShardExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardExecutor")
            .field("spec", &self.weights.spec)
            .field("n_ctx", &self.n_ctx)
            .field("sequences", &self.seqs.len())
            .finish()
    }
}

impl ShardExecutor {
    /// An executor over `weights` with `n_threads` compute threads and at most `n_ctx`
    /// positions per sequence.
    ///
    /// Attention rounds like llama.cpp's default CPU path (flash attention, f16 KV, see
    /// [`AttnNumerics::GgmlFlash`]) for a llama.cpp context of `n_ctx` cells and `n_threads`
    /// threads, so that greedy output matches llama.cpp token for token even where the top
    /// two logits are within float noise. [`Self::set_attention_numerics`] changes that.
    pub fn new(weights: Arc<Weights>, n_threads: usize, n_ctx: usize) -> ShardExecutor {
        let c = &weights.config;
        let rope = RopeCache::new(c.n_rot, c.rope_freq_base, c.rope_freq_scale);
        ShardExecutor {
            weights,
            pool: ThreadPool::new(n_threads),
            rope,
            n_ctx,
            attn: AttnNumerics::GgmlFlash { n_ctx, n_threads: n_threads.max(1) },
            seqs: HashMap::new(),
            s: Scratch::default(),
            remote: None,
            group: None,
            pending: Vec::new(),
            #[cfg(feature = "cuda")]
            gpu: None,
        }
    }

    /// Moves the shard to GPU `ordinal`: its matrices are copied to device memory (routed
    /// experts too, unless `experts` keeps them in host RAM) and every later step runs there
    /// (see [`crate::gpu`]). Known sequences start their device caches empty, so call this
    /// before the first step. A tensor-parallel rank stays on the CPU.
    #[cfg(feature = "cuda")]
    pub fn use_gpu(&mut self, ordinal: usize, experts: crate::gpu::ExpertPlacement) -> Result<()> {
        if self.group.is_some() {
            return Err(Error::Gpu("a tensor-parallel stage runs on the CPU path".into()));
        }
        if self.seqs.values().any(|c| c.n_past > 0) {
            return Err(Error::Gpu("sequences are in flight on the CPU path".into()));
        }
        let mut g = crate::gpu::GpuShard::load(&self.weights, ordinal, self.n_ctx, experts)?;
        for &seq in self.seqs.keys() {
            g.add_sequence(seq);
        }
        self.gpu = Some(g);
        Ok(())
    }

    /// The GPU the shard runs on, if any.
    pub fn gpu_name(&self) -> Option<&str> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return Some(g.device_name());
        }
        None
    }

    /// Joins this executor (holding its rank's slice, [`Weights::load_tp`]) to its
    /// tensor-parallel group. The leader (rank 0) is then driven as usual and drives the
    /// others, which run [`ShardExecutor::follow`].
    pub fn set_group(&mut self, group: Box<dyn Collective>) -> Result<()> {
        let t = self.weights.tp.as_ref().map_or((0, 1), |t| (t.rank, t.size));
        if (group.rank(), group.size()) != t {
            return Err(Error::InvalidRequest(format!(
                "rank {} of a group of {} for weights sliced as rank {} of {}",
                group.rank(),
                group.size(),
                t.0,
                t.1
            )));
        }
        if self.remote.is_some() {
            return Err(Error::InvalidRequest("a tensor-parallel stage runs its experts itself".into()));
        }
        self.group = Some(group);
        Ok(())
    }

    fn is_leader(&self) -> bool {
        self.group.as_ref().is_some_and(|g| g.rank() == 0 && g.size() > 1)
    }

    /// A non-leader rank: runs what the leader broadcasts, step by step, until the leader
    /// ends the group (`Ok`) or the group fails (`Err`).
    pub fn follow(&mut self) -> Result<()> {
        if self.group.as_ref().is_none_or(|g| g.rank() == 0) {
            return Err(Error::InvalidRequest("only a non-leader rank follows".into()));
        }
        let mut msg = Vec::new();
        loop {
            self.group.as_mut().expect("checked").broadcast(&mut msg)?;
            for op in tp::decode(&msg)? {
                match op {
                    Op::Add(seq) => self.add_sequence(seq),
                    Op::Release(seq) => {
                        self.release(seq);
                    }
                    Op::Truncate(seq, n) => self.truncate(seq, n)?,
                    Op::Forward(chunks, input) => {
                        self.check_chunks(&chunks)?;
                        self.compute(&chunks, input.as_input())?;
                    }
                    Op::Stop => return Ok(()),
                }
            }
        }
    }

    /// Runs this shard's routed experts on an expert host instead of here; the router stays
    /// here. The shard's expert tensors are then never read (so never paged in).
    pub fn set_remote_experts(&mut self, remote: Box<dyn RemoteExperts>) {
        self.remote = Some(remote);
    }

    /// Chooses how attention rounds (see [`AttnNumerics`]).
    pub fn set_attention_numerics(&mut self, attn: AttnNumerics) {
        self.attn = attn;
    }

    pub fn weights(&self) -> &Arc<Weights> {
        &self.weights
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn n_threads(&self) -> usize {
        self.pool.n_threads()
    }

    /// Lets the compute threads sleep until the next step instead of spinning (see
    /// [`ThreadPool::park`]); for stages that share a host's cores.
    pub fn park_threads(&self) {
        self.pool.park();
    }

    /// Starts an empty sequence. Starting a known sequence resets it.
    pub fn add_sequence(&mut self, seq: u64) {
        if self.is_leader() {
            tp::encode(&Op::Add(seq), &mut self.pending);
        }
        let n = self.weights.layers.len();
        self.seqs.insert(seq, SeqCache { n_past: 0, k: vec![Vec::new(); n], v: vec![Vec::new(); n] });
        #[cfg(feature = "cuda")]
        if let Some(g) = &mut self.gpu {
            g.add_sequence(seq);
        }
    }

    /// Drops a sequence and its KV cache. Returns whether it existed.
    pub fn release(&mut self, seq: u64) -> bool {
        if self.is_leader() {
            tp::encode(&Op::Release(seq), &mut self.pending);
        }
        #[cfg(feature = "cuda")]
        if let Some(g) = &mut self.gpu {
            g.release(seq);
        }
        self.seqs.remove(&seq).is_some()
    }

    /// Positions already in a sequence's cache.
    pub fn seq_len(&self, seq: u64) -> Option<usize> {
        self.seqs.get(&seq).map(|c| c.n_past)
    }

    /// Forgets positions `n..` of a sequence (to re-run or roll back).
    pub fn truncate(&mut self, seq: u64, n: usize) -> Result<()> {
        let kv = self.weights.local_dims().1 * self.weights.config.head_dim;
        if !self.seqs.contains_key(&seq) {
            return Err(Error::UnknownSequence(seq));
        }
        if self.is_leader() {
            tp::encode(&Op::Truncate(seq, n), &mut self.pending);
        }
        let c = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq))?;
        if n < c.n_past {
            c.n_past = n;
            for l in c.k.iter_mut().chain(c.v.iter_mut()) {
                l.truncate(n * kv);
            }
        }
        Ok(())
    }

    /// Tokens routed to each expert since the executor started, summed over its layers
    /// (empty for a dense model): how evenly the router spreads the work.
    pub fn expert_tokens(&self) -> &[u64] {
        &self.s.expert_tokens
    }

    /// Bytes of KV cache held by all sequences.
    pub fn kv_bytes(&self) -> usize {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return g.kv_bytes(self.weights.config.n_head_kv * self.weights.config.head_dim);
        }
        self.seqs.values().flat_map(|c| c.k.iter().chain(c.v.iter())).map(|l| l.len() * 2).sum()
    }

    /// Runs one step. See the module docs for the shapes.
    pub fn forward(&mut self, chunks: &[SeqChunk], input: StageInput<'_>) -> Result<StageOutput> {
        self.check_chunks(chunks)?;
        if self.is_leader() {
            // The other ranks get the step (and the bookkeeping since the last one) first.
            let mut msg = std::mem::take(&mut self.pending);
            tp::encode_forward(chunks, input, &mut msg);
            self.group.as_mut().expect("leader").broadcast(&mut msg)?;
        }
        self.compute(chunks, input)
    }

    /// [`Self::forward`] on this rank alone, chunks checked (a leader has broadcast the step
    /// already).
    fn compute(&mut self, chunks: &[SeqChunk], input: StageInput<'_>) -> Result<StageOutput> {
        let w = Arc::clone(&self.weights);
        #[cfg(feature = "cuda")]
        if let Some(g) = &mut self.gpu {
            let n_past: Vec<usize> = chunks.iter().map(|ch| self.seqs[&ch.seq].n_past).collect();
            let out = g.forward(&w, &self.rope, chunks, &n_past, input, &self.pool, self.remote.as_mut(), &mut self.s.expert_tokens)?;
            for ch in chunks {
                self.seqs.get_mut(&ch.seq).expect("checked above").n_past += ch.n_tokens;
            }
            return Ok(out);
        }
        let c = &w.config;
        let (n_head, n_head_kv, ff, experts) = w.local_dims();
        let exact = w.tp.as_ref().filter(|t| t.mode == TpMode::Exact);
        let (e, qd, kvd) = (c.n_embd, n_head * c.head_dim, n_head_kv * c.head_dim);
        let n: usize = chunks.iter().map(|ch| ch.n_tokens).sum();

        let s = &mut self.s;
        stage_input(&w, input, n, grow(&mut s.x, n * e))?;

        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let neox = c.traits.rope == RopeKind::Neox;
        for (li, lw) in w.layers.iter().enumerate() {
            // Attention block.
            // x: (n, e) -> xn: (n, e)
            let xn = grow(&mut s.xn, n * e);
            for t in 0..n {
                rms_norm(&s.x[t * e..(t + 1) * e], &lw.attn_norm, c.rms_eps, &mut xn[t * e..(t + 1) * e]);
            }
            // xn: (n, e) · wq: (qd, e) -> q: (n, qd); k, v: (n, kvd)
            let q = grow(&mut s.q, n * qd);
            mm(&self.pool, &w, &lw.wq, &s.xn[..n * e], n, q, &mut s.quant);
            let k = grow(&mut s.k, n * kvd);
            mm(&self.pool, &w, &lw.wk, &s.xn[..n * e], n, k, &mut s.quant);
            let v = grow(&mut s.v, n * kvd);
            mm(&self.pool, &w, &lw.wv, &s.xn[..n * e], n, v, &mut s.quant);
            if let (Some(bq), Some(bk), Some(bv)) = (&lw.bq, &lw.bk, &lw.bv) {
                add_bias_rows(&mut s.q[..n * qd], bq);
                add_bias_rows(&mut s.k[..n * kvd], bk);
                add_bias_rows(&mut s.v[..n * kvd], bv);
            }
            // QK-norm (qwen3): every head of Q and K RMS-normalized on its own, then scaled.
            if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
                let hd = c.head_dim;
                let head = grow(&mut s.head, hd);
                for (rows, norm) in [(&mut s.q[..n * qd], qn), (&mut s.k[..n * kvd], kn)] {
                    for h in rows.chunks_exact_mut(hd) {
                        head.copy_from_slice(h);
                        rms_norm(head, norm, c.rms_eps, h);
                    }
                }
            }
            let att = grow(&mut s.att, n * qd);
            let mut t0 = 0;
            for ch in chunks {
                let cache = self.seqs.get_mut(&ch.seq).expect("checked above");
                let nt = ch.n_tokens;
                for j in 0..nt {
                    let t = t0 + j;
                    let pos = cache.n_past + j;
                    self.rope.rope(&mut s.q[t * qd..(t + 1) * qd], n_head, c.head_dim, pos, neox);
                    self.rope.rope(&mut s.k[t * kvd..(t + 1) * kvd], n_head_kv, c.head_dim, pos, neox);
                }
                for (cache_l, src) in [(&mut cache.k[li], &s.k), (&mut cache.v[li], &s.v)] {
                    let old = cache_l.len();
                    cache_l.resize(old + nt * kvd, f16::ZERO);
                    f32_to_f16_row(&src[t0 * kvd..(t0 + nt) * kvd], &mut cache_l[old..]);
                }
                let shape = AttnShape {
                    n_tok: nt,
                    n_past: cache.n_past,
                    n_head,
                    n_kv_head: n_head_kv,
                    head_dim: c.head_dim,
                    scale,
                };
                let (q_rows, out_rows) = (t0 * qd..(t0 + nt) * qd, t0 * qd..(t0 + nt) * qd);
                t0 += nt;
                if n_head == 0 {
                    continue; // a rank of a group with fewer KV heads than ranks
                }
                attention_with(
                    self.attn,
                    &self.pool,
                    &s.q[q_rows],
                    &cache.k[li],
                    &cache.v[li],
                    &shape,
                    &mut att[out_rows],
                );
            }
            // att: (n, qd) · wo: (e, qd) -> tmp: (n, e); x += tmp
            let q0 = exact.map_or(0, |t| t.heads(c).start * c.head_dim);
            let group = group_of(&mut self.group);
            block_out(&self.pool, &w, &lw.wo, &s.att[..n * qd], n, q0, c.q_dim(), exact, group, &mut s.tmp, &mut s.gather, &mut s.part, &mut s.quant)?;
            add_inplace(&mut s.x[..n * e], &s.tmp[..n * e]);

            // Feed-forward block: x += down(silu(gate(xn)) * up(xn)).
            let xn = grow(&mut s.xn, n * e);
            for t in 0..n {
                rms_norm(&s.x[t * e..(t + 1) * e], &lw.ffn_norm, c.rms_eps, &mut xn[t * e..(t + 1) * e]);
            }
            match &lw.moe {
                None => {
                    let gate = grow(&mut s.gate, n * ff);
                    mm(&self.pool, &w, &lw.w_gate, &s.xn[..n * e], n, gate, &mut s.quant);
                    let up = grow(&mut s.up, n * ff);
                    mm(&self.pool, &w, &lw.w_up, &s.xn[..n * e], n, up, &mut s.quant);
                    swiglu_inplace(&mut s.gate[..n * ff], &s.up[..n * ff]);
                    let f0 = exact.map_or(0, |t| t.ff.start);
                    let group = group_of(&mut self.group);
                    block_out(&self.pool, &w, &lw.w_down, &s.gate[..n * ff], n, f0, c.n_ff, exact, group, &mut s.tmp, &mut s.gather, &mut s.part, &mut s.quant)?;
                }
                Some(moe) => {
                    let layer = w.spec.layers.start + li;
                    let group = group_of(&mut self.group).map(|g| (g, exact.is_some()));
                    moe_ffn(&self.pool, &w, layer, lw, moe, n, s, self.remote.as_mut(), experts.clone(), group)?;
                }
            }
            add_inplace(&mut s.x[..n * e], &s.tmp[..n * e]);
        }
        for ch in chunks {
            self.seqs.get_mut(&ch.seq).expect("checked above").n_past += ch.n_tokens;
        }

        let (Some(norm), Some(out)) = (&w.output_norm, &w.output) else {
            return Ok(StageOutput::Hidden(s.x[..n * e].to_vec()));
        };
        // Last token of each chunk: (n_chunks, e) -> logits (n_chunks, n_vocab).
        let nc = chunks.len();
        let xn = grow(&mut s.xn, nc * e);
        let mut t_last = 0;
        for (i, ch) in chunks.iter().enumerate() {
            t_last += ch.n_tokens;
            let t = t_last - 1;
            rms_norm(&s.x[t * e..(t + 1) * e], norm, c.rms_eps, &mut xn[i * e..(i + 1) * e]);
        }
        let mut logits = vec![0f32; nc * out.rows];
        mm(&self.pool, &w, out, &s.xn[..nc * e], nc, &mut logits, &mut s.quant);
        Ok(StageOutput::Logits(logits))
    }

    fn check_chunks(&self, chunks: &[SeqChunk]) -> Result<()> {
        if chunks.is_empty() {
            return Err(Error::InvalidRequest("empty batch".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for ch in chunks {
            let cache = self.seqs.get(&ch.seq).ok_or(Error::UnknownSequence(ch.seq))?;
            if ch.n_tokens == 0 {
                return Err(Error::InvalidRequest(format!("sequence {} has an empty chunk", ch.seq)));
            }
            if !seen.insert(ch.seq) {
                return Err(Error::InvalidRequest(format!("sequence {} appears twice", ch.seq)));
            }
            let want = cache.n_past + ch.n_tokens;
            if want > self.n_ctx {
                return Err(Error::ContextFull { seq: ch.seq, want, limit: self.n_ctx });
            }
        }
        Ok(())
    }
}

/// Fills `x` (`(n, n_embd)`) with a step's input: the embedding rows of the token ids, or
/// the previous stage's hidden states, each checked against the shard and the chunks' `n`.
pub(crate) fn stage_input(w: &Weights, input: StageInput<'_>, n: usize, x: &mut [f32]) -> Result<()> {
    let e = w.config.n_embd;
    match input {
        StageInput::Tokens(ids) => {
            let embed = w.embed.as_ref().ok_or_else(|| {
                Error::InvalidRequest("this shard has no embedding: send hidden states".into())
            })?;
            if ids.len() != n {
                return Err(Error::InvalidRequest(format!(
                    "{} token ids for chunks totalling {n} tokens",
                    ids.len()
                )));
            }
            let m = w.qmatrix(embed);
            for (t, &id) in ids.iter().enumerate() {
                if id as usize >= embed.rows {
                    return Err(Error::InvalidRequest(format!(
                        "token id {id} is outside the vocabulary of {}",
                        embed.rows
                    )));
                }
                dequantize_row(embed.ty, m.row(id as usize), &mut x[t * e..(t + 1) * e])?;
            }
        }
        StageInput::Hidden(h) => {
            if w.embed.is_some() && w.spec.layers.start == 0 {
                return Err(Error::InvalidRequest("this shard embeds: send token ids".into()));
            }
            if h.len() != n * e {
                return Err(Error::InvalidRequest(format!(
                    "hidden states of {} floats, expected {n} tokens × {e}",
                    h.len()
                )));
            }
            x.copy_from_slice(h);
        }
    }
    Ok(())
}

/// Where a shard's routed experts run when they are not local: another process (an expert
/// host) that holds them. Called once per MoE layer per step with the whole batch: `xn` is
/// `(n, n_embd)`, `chosen` has `n_used` (expert, weight) pairs per token in rank order, and
/// `out` (`(n, n_embd)`) must get what [`run_experts`] would compute.
pub trait RemoteExperts: Send {
    fn run(&mut self, layer: usize, xn: &[f32], n: usize, chosen: &[(usize, f32)], out: &mut [f32]) -> Result<()>;
}

/// Routed experts (llama.cpp's `build_moe_ffn` with softmax gating and `norm_w`): for each
/// of the `n` tokens of `s.xn`, a softmax over the router's logits, the `n_used` most likely
/// experts (ties: the lower index first) with their probabilities renormalized to sum to 1;
/// then [`run_experts`] here, or the remote expert host, puts the output in `s.tmp`.
#[allow(clippy::too_many_arguments)]
fn moe_ffn(
    pool: &ThreadPool,
    w: &Weights,
    layer: usize,
    lw: &LayerWeights,
    moe: &MoeWeights,
    n: usize,
    s: &mut Scratch,
    remote: Option<&mut Box<dyn RemoteExperts>>,
    owned: Range<usize>,
    group: Option<(&mut dyn Collective, bool)>,
) -> Result<()> {
    let (ne, k) = (moe.n_expert, moe.n_used);
    let e = w.config.n_embd;
    let logits = grow(&mut s.router, n * ne);
    mm(pool, w, &moe.router, &s.xn[..n * e], n, logits, &mut s.quant);
    route(logits, ne, k, &mut s.chosen, &mut s.expert_tokens);
    let tmp = grow(&mut s.tmp, n * e);
    match remote {
        Some(r) => r.run(layer, &s.xn[..n * e], n, &s.chosen, tmp),
        None => {
            expert_outputs(pool, w, lw, moe, &s.xn[..n * e], n, &s.chosen, owned, &mut s.experts);
            let ys = &mut s.experts.expert_out[..n * k * e];
            match group {
                // Exact: each (token, slot) output comes from one rank (the others hold
                // zeros), so the sum gathers them bit for bit and every rank combines them in
                // rank order as one executor would.
                Some((g, true)) => {
                    g.all_reduce(ys)?;
                    combine(&s.chosen, k, e, n, ys, tmp);
                }
                Some((g, false)) => {
                    combine(&s.chosen, k, e, n, ys, tmp);
                    g.all_reduce(tmp)?;
                }
                None => combine(&s.chosen, k, e, n, ys, tmp),
            }
            Ok(())
        }
    }
}

/// The router's choice for each token of `logits` (`(n, ne)`, overwritten by their softmax):
/// the `k` most likely experts (ties: the lower index first, as ggml's argsort) with their
/// probabilities renormalized to sum to 1, appended to `chosen` (cleared first) in rank order;
/// `expert_tokens` counts them.
pub(crate) fn route(logits: &mut [f32], ne: usize, k: usize, chosen: &mut Vec<(usize, f32)>, expert_tokens: &mut Vec<u64>) {
    chosen.clear();
    let mut order: Vec<usize> = Vec::with_capacity(ne);
    for row in logits.chunks_exact_mut(ne) {
        softmax_row(row);
        order.clear();
        order.extend(0..ne);
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let top = &order[..k];
        let mut sum = 0f32;
        for &x in top {
            sum += row[x];
        }
        chosen.extend(top.iter().map(|&x| (x, row[x] / sum)));
    }
    if expert_tokens.len() < ne {
        expert_tokens.resize(ne, 0);
    }
    for &(x, _) in chosen.iter() {
        expert_tokens[x] += 1;
    }
}

/// Buffers of [`run_experts`], reused across calls.
#[derive(Debug, Default)]
pub struct ExpertScratch {
    /// Indices into `chosen`, grouped by expert.
    by_expert: Vec<usize>,
    gathered: Vec<f32>,
    expert_out: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    quant: Vec<u8>,
}

/// Runs layer `lw`'s routed experts for `n` tokens `xn` (`(n, n_embd)`) routed by `chosen`
/// (`n_used` (expert, weight) pairs per token, in rank order): each expert runs its SwiGLU
/// once for all the tokens routed to it (grouped across the batch, so an expert's weights are
/// read once per step and unchosen experts not at all), and each token's output row in `out`
/// is `w_0·y_0 + w_1·y_1 + ...` in rank order. The same code runs in a stage and on an
/// expert host, so where experts live changes no bit.
#[allow(clippy::too_many_arguments)]
pub fn run_experts(
    pool: &ThreadPool,
    w: &Weights,
    lw: &LayerWeights,
    moe: &MoeWeights,
    xn: &[f32],
    n: usize,
    chosen: &[(usize, f32)],
    out: &mut [f32],
    s: &mut ExpertScratch,
) {
    expert_outputs(pool, w, lw, moe, xn, n, chosen, 0..moe.n_expert, s);
    let (k, e) = (moe.n_used, w.config.n_embd);
    combine(chosen, k, e, n, &s.expert_out[..n * k * e], out);
}

/// Each `(token, slot)` pair's expert output, unweighted, in `s.expert_out` (`(n * n_used,
/// n_embd)`), computed for the experts in `owned` (grouped by expert); the other pairs' rows
/// are zero.
#[allow(clippy::too_many_arguments)]
fn expert_outputs(
    pool: &ThreadPool,
    w: &Weights,
    lw: &LayerWeights,
    moe: &MoeWeights,
    xn: &[f32],
    n: usize,
    chosen: &[(usize, f32)],
    owned: Range<usize>,
    s: &mut ExpertScratch,
) {
    let (ne, k) = (moe.n_expert, moe.n_used);
    let e = w.config.n_embd;
    let ff = lw.w_gate.rows / ne;
    let ys = grow(&mut s.expert_out, n * k * e);
    if owned.len() < ne {
        ys.fill(0.0);
    }
    // The (token, slot) pairs grouped by expert, once for the whole layer.
    s.by_expert.clear();
    s.by_expert.extend((0..chosen.len()).filter(|&i| owned.contains(&chosen[i].0)));
    s.by_expert.sort_by_key(|&i| chosen[i].0);
    for routed in s.by_expert.chunk_by(|&a, &b| chosen[a].0 == chosen[b].0) {
        let (x, m) = (chosen[routed[0]].0, routed.len());
        let xs = grow(&mut s.gathered, m * e);
        for (r, &i) in routed.iter().enumerate() {
            let t = i / k;
            xs[r * e..(r + 1) * e].copy_from_slice(&xn[t * e..(t + 1) * e]);
        }
        let gate = grow(&mut s.gate, m * ff);
        mm(pool, w, &lw.w_gate.expert(x, ne), &s.gathered[..m * e], m, gate, &mut s.quant);
        let up = grow(&mut s.up, m * ff);
        mm(pool, w, &lw.w_up.expert(x, ne), &s.gathered[..m * e], m, up, &mut s.quant);
        swiglu_inplace(&mut s.gate[..m * ff], &s.up[..m * ff]);
        let y = grow(&mut s.gathered, m * e);
        mm(pool, w, &lw.w_down.expert(x, ne), &s.gate[..m * ff], m, y, &mut s.quant);
        for (r, &i) in routed.iter().enumerate() {
            ys[i * e..(i + 1) * e].copy_from_slice(&y[r * e..(r + 1) * e]);
        }
    }
}

/// Each token's output row `w_0·y_0 + w_1·y_1 + ...`, in rank order.
fn combine(chosen: &[(usize, f32)], k: usize, e: usize, n: usize, ys: &[f32], out: &mut [f32]) {
    for t in 0..n {
        let dst = &mut out[t * e..(t + 1) * e];
        for slot in 0..k {
            let i = t * k + slot;
            let (wt, y) = (chosen[i].1, &ys[i * e..(i + 1) * e]);
            if slot == 0 {
                dst.iter_mut().zip(y).for_each(|(d, &v)| *d = v * wt);
            } else {
                dst.iter_mut().zip(y).for_each(|(d, &v)| *d += v * wt);
            }
        }
    }
}

/// Exact tensor parallelism: this rank's columns `local` (`(n, local_width)`, starting at
/// column `c0`) placed in zeros of width `full` and summed over the group: every rank ends
/// with the whole `(n, full)` matrix in `gather`, bit for bit.
fn gather_cols(local: &[f32], n: usize, c0: usize, full: usize, gather: &mut Vec<f32>, g: &mut dyn Collective) -> Result<()> {
    let width = local.len() / n.max(1);
    let buf = grow(gather, n * full);
    buf.fill(0.0);
    for t in 0..n {
        buf[t * full + c0..t * full + c0 + width].copy_from_slice(&local[t * width..(t + 1) * width]);
    }
    g.all_reduce(buf)
}

/// The group as the helpers below take it.
fn group_of(g: &mut Option<Box<dyn Collective>>) -> Option<&mut dyn Collective> {
    match g {
        Some(g) => Some(g.as_mut()),
        None => None,
    }
}

/// A block's output projection into `out` (`(n, n_embd)`): `m · x`, where `x` is this rank's
/// columns of the block's activation (`(n, local_width)`, from column `c0` of `full`).
/// Alone, the product; in a group, summed over the ranks ([`TpMode::Sum`]: `m` holds the
/// matching columns), or ([`TpMode::Exact`]) `x` gathered whole first, this rank's rows of
/// `m` applied to it, and the rows gathered.
#[allow(clippy::too_many_arguments)]
fn block_out(
    pool: &ThreadPool,
    w: &Weights,
    m: &Matrix,
    x: &[f32],
    n: usize,
    c0: usize,
    full: usize,
    exact: Option<&TpSlice>,
    group: Option<&mut dyn Collective>,
    out: &mut Vec<f32>,
    gather: &mut Vec<f32>,
    part: &mut Vec<f32>,
    quant: &mut Vec<u8>,
) -> Result<()> {
    let e = w.config.n_embd;
    match (exact, group) {
        (Some(t), Some(g)) => {
            gather_cols(x, n, c0, full, gather, g)?;
            let r = t.rows.len();
            mm(pool, w, m, &gather[..n * full], n, grow(part, n * r), quant);
            gather_cols(&part[..n * r], n, t.rows.start, e, out, g)
        }
        (_, group) => {
            let y = grow(out, n * e);
            mm(pool, w, m, x, n, y, quant);
            group.map_or(Ok(()), |g| g.all_reduce(y))
        }
    }
}

/// Softmax of one row in place, as ggml's `soft_max` computes it: the max subtracted, the
/// exponentials summed in f64, each scaled by the reciprocal of the sum.
fn softmax_row(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    row.iter_mut().for_each(|v| *v *= inv);
}

fn mm(pool: &ThreadPool, w: &Weights, m: &Matrix, x: &[f32], n: usize, out: &mut [f32], q: &mut Vec<u8>) {
    if m.cols == 0 || m.rows == 0 {
        // A tensor-parallel rank with no share of this product.
        out.fill(0.0);
        return;
    }
    matmul(pool, &w.qmatrix(m), x, n, out, q);
}

impl Drop for ShardExecutor {
    fn drop(&mut self) {
        if self.is_leader() {
            let mut msg = std::mem::take(&mut self.pending);
            tp::encode(&Op::Stop, &mut msg);
            let _ = self.group.as_mut().expect("leader").broadcast(&mut msg);
        }
    }
}
