//! The step scheduler: continuous batching over a pipeline, with micro-batches in flight.
//!
//! One task owns the [`Pipeline`] and a single `Forward` stream into its first stage.
//! Requests arrive as [`Submission`]s; each becomes a sequence with an id of its own. Active
//! sequences are spread over `in_flight` micro-batch *groups* (by default one per stage).
//! Each group has at most one frame in the pipeline at a time: the frame batches every
//! member's next input (a prompt chunk while prefilling, else the token sampled last), and
//! when its sampled tokens come back the group's next frame is sent at once. With S stages
//! and S groups, stage 0 computes group B while stage 1 computes group A, and so on, so the
//! stages overlap instead of waiting for each other; one sequence alone gets one group and
//! the plain latency of the chain.
//!
//! Stages handle frames of one stream in order, so results come back in the order frames
//! were sent; the scheduler checks that. A new sequence joins the group with the fewest
//! members and starts with the group's next frame (its `SeqStart` carries the sampling
//! parameters). Prefill is chunked: a frame carries at most [`SchedulerConfig::prefill_tokens`]
//! prompt tokens, next to the decode tokens of the other members, so a long prompt does not
//! stall the others for long.
//!
//! Admission: each sequence reserves the KV of its worst case (prompt + `max_tokens`, at
//! most the context) on every stage, and waits in the queue until the reservations of the
//! running sequences leave room under each stage's KV budget; a request that could never fit
//! is refused, and so is one that finds the queue full ([`Error::Busy`]: the API's 429).
//! Interactive submissions are admitted before background ones (batch jobs), and background
//! sequences hold at most [`SchedulerConfig::background_seqs`] places.
//!
//! A sequence ends when it has sampled `max_tokens`, fills the context, or its receiver is
//! dropped (the caller stopped it: stop string, client gone). Its KV is then released on
//! every stage, which is safe because none of its frames is in flight at that point (a
//! dropped receiver is noticed only while its group is idle).
//!
//! Recovery (with a [`Recovery`]): when the stream fails (a stage died, a link broke, no
//! answer came), every sequence pauses where it is and [`Recovery::rebuild`] forms a new
//! pipeline from the workers still alive (and any that joined). Each sequence then replays
//! its token history, the chunks it sent so far in the same shapes (runs of one-token steps
//! merged where attention gives the same bits, [`ggml_flash_batchable`]), without sampling
//! except for a sample that was lost in flight, so its KV on the new stages is what it was;
//! its sampler restarts with the same history and random stream (`SeqStart.draws_done`).
//! Then generation goes on: callers see a pause, not an error. A worker that (re)joins
//! while the pipeline runs is taken in the same way at a safe point (no frame in flight).
//! Without a `Recovery`, or after [`MAX_RECOVERIES`] attempts without a token in between, a
//! failure fails every active sequence and the next request opens a fresh stream.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use shoal_kernels::attention::{MAX_BATCHED_REPLAY, ggml_flash_batchable};

use shoal_model::engine::{GenerateRequest, Generation, PREFILL_CHUNK, TokenStream};
use shoal_model::sampling::SamplingParams;
use shoal_model::tokenizer::Tokenizer;
use shoal_proto::v1;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use super::pipeline::{Pipeline, STEP_TIMEOUT, Sampled, stage_err};
use super::recovery::{Rebuilt, Recovery};
use super::{Error, Result};

/// Recoveries in a row without a token sampled in between before the scheduler gives up
/// and fails the active sequences.
pub const MAX_RECOVERIES: u32 = 3;

/// How long a worker a rebuild had to leave out (it failed its calibration or load) is not
/// taken in again, so a broken newcomer does not pause everyone every time it is seen.
const SHUN_FOR: Duration = Duration::from_secs(600);

/// How the scheduler batches and admits.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Micro-batches in flight at once; 0: one per stage.
    pub in_flight: usize,
    /// Most prompt tokens in one frame, over all prefilling members of a group.
    pub prefill_tokens: usize,
    /// Most sequences active at once; later submissions wait for a free place.
    pub max_seqs: usize,
    /// KV bytes each stage may hold (in pipeline order); a missing entry or 0: unlimited.
    pub kv_budget: Vec<u64>,
    /// Most submissions waiting for admission; one more is refused with [`Error::Busy`].
    pub max_waiting: usize,
    /// Most background sequences active at once (0: `max_seqs / 2`, at least 1).
    pub background_seqs: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            in_flight: 0,
            prefill_tokens: PREFILL_CHUNK,
            max_seqs: 256,
            kv_budget: Vec::new(),
            max_waiting: 1024,
            background_seqs: 0,
        }
    }
}

/// Who waits for a submission: a client now, or a batch job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Priority {
    #[default]
    Interactive,
    Background,
}

/// One request for the scheduler.
#[derive(Clone, Debug)]
pub struct Submission {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Return each sampled token's log-probability.
    pub logprobs: bool,
    /// With `logprobs`: also this many of the most likely tokens (at most 20).
    pub top_logprobs: usize,
    /// Most tokens to sample (the context length also ends a sequence).
    pub max_tokens: usize,
    /// Teacher forcing: feed these tokens back instead of the sampled ones (token `i` is
    /// the input after the `i`-th sample). Tests use it to compare every position.
    pub forced: Option<Vec<u32>>,
    pub priority: Priority,
}

/// What a sequence's receiver gets: one `Ok` per sampled token, in order, then the channel
/// closes; or an `Err` and then the channel closes.
pub type TokenRx = mpsc::UnboundedReceiver<Result<Sampled>>;

/// Counters of the scheduler's own view.
#[derive(Clone, Debug, Default)]
pub struct SchedulerStats {
    pub steps: u64,
    pub tokens_sampled: u64,
    pub active: usize,
    pub active_background: usize,
    /// Submissions waiting for admission.
    pub waiting: usize,
    /// Sum over answered frames of the time from send to answer.
    pub step_ns: u64,
    /// Per stage: KV bytes reserved by the active sequences, and the budget (0: unlimited).
    pub kv_reserved: Vec<u64>,
    pub kv_budget: Vec<u64>,
    /// What a recovery in progress is doing; `None` while the pipeline runs.
    pub recovering: Option<String>,
    /// Pipelines formed again (a worker lost, or one taken in).
    pub recoveries: u64,
    /// The last pause: from the failure (or the safe point) to the next sampled token.
    pub last_pause_ms: u64,
    /// Stages of the pipeline now.
    pub stages: usize,
}

enum Msg {
    Submit(Submission, oneshot::Sender<Result<TokenRx>>),
    Stats(oneshot::Sender<SchedulerStats>),
    /// A healthy worker that is not a stage wants in.
    Newcomer(String),
}

/// Per stage: KV bytes of one token, and the budget (0: unlimited). Replaced when a
/// recovery changes the stages.
#[derive(Debug)]
struct KvShape {
    per_token: Vec<u64>,
    budget: Vec<u64>,
}

/// A handle on a running scheduler; cheap to clone. The scheduler stops when every handle
/// is dropped and no sequence is active.
#[derive(Clone, Debug)]
pub struct Scheduler {
    tx: mpsc::Sender<Msg>,
    n_ctx: usize,
    kv: Arc<RwLock<KvShape>>,
}

impl Scheduler {
    /// Starts the scheduler task for `pipeline` on the current tokio runtime; a failure
    /// fails the active sequences.
    pub fn start(pipeline: Pipeline, cfg: SchedulerConfig) -> Scheduler {
        Scheduler::start_with(pipeline, cfg, None)
    }

    /// Like [`Scheduler::start`]; with `recovery`, a lost worker pauses the sequences
    /// instead, the pipeline is formed again without it, and they go on (module docs).
    pub fn start_with(pipeline: Pipeline, cfg: SchedulerConfig, recovery: Option<Recovery>) -> Scheduler {
        let (tx, rx) = mpsc::channel(1024);
        let n_ctx = pipeline.n_ctx;
        let stages = pipeline.stages.len();
        let in_flight = if cfg.in_flight == 0 { stages.max(1) } else { cfg.in_flight };
        let kv_per_token: Vec<u64> = (0..stages).map(|i| pipeline.kv_bytes_per_token(i)).collect();
        let kv_budget: Vec<u64> = (0..stages).map(|i| cfg.kv_budget.get(i).copied().unwrap_or(0)).collect();
        let background_seqs = if cfg.background_seqs == 0 { (cfg.max_seqs / 2).max(1) } else { cfg.background_seqs };
        let kv = Arc::new(RwLock::new(KvShape { per_token: kv_per_token.clone(), budget: kv_budget.clone() }));
        let stage_addrs = Arc::new(Mutex::new(pipeline.stages.iter().map(|(w, _)| w.addr.clone()).collect::<Vec<_>>()));
        let recovery = recovery.map(Arc::new);
        if let Some(rec) = &recovery
            && (rec.registry.is_some() || !rec.seeds.is_empty())
        {
            tokio::spawn(watch_newcomers(Arc::clone(rec), Arc::clone(&stage_addrs), tx.downgrade()));
        }
        let core = Core {
            pipeline,
            kv_per_token,
            kv_reserved: vec![0; stages],
            cfg: SchedulerConfig { in_flight, kv_budget, background_seqs, ..cfg },
            groups: vec![Group::default(); in_flight],
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            waiting_background: VecDeque::new(),
            // Random, so a coordinator taking over a running cluster never reuses the
            // sequence ids of the one before (workers free those when its streams end).
            next_seq: random_route() >> 8,
            next_step: 0,
            stream: None,
            stats: SchedulerStats::default(),
            recovery,
            rebuild: None,
            shunned: HashMap::new(),
            recovering: Arc::new(Mutex::new(None)),
            draining: None,
            no_progress: 0,
            paused_at: None,
            kv: Arc::clone(&kv),
            stage_addrs,
        };
        tokio::spawn(core.run(rx));
        Scheduler { tx, n_ctx, kv }
    }

    fn kv_shape(&self) -> std::sync::RwLockReadGuard<'_, KvShape> {
        self.kv.read().unwrap_or_else(|e| e.into_inner())
    }

    /// KV bytes a sequence reserves on each stage: its worst case of `tokens` positions.
    pub fn kv_need(&self, tokens: usize) -> Vec<u64> {
        kv_need(&self.kv_shape().per_token, self.n_ctx, tokens)
    }

    /// Per stage KV budget (0: unlimited).
    pub fn kv_budget(&self) -> Vec<u64> {
        self.kv_shape().budget.clone()
    }

    /// Context length of every sequence.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Stages of the pipeline now.
    pub fn stages(&self) -> usize {
        self.kv_shape().per_token.len()
    }

    /// Queues a sequence; its tokens arrive on the returned receiver.
    pub async fn submit(&self, s: Submission) -> Result<TokenRx> {
        s.params.validate().map_err(|m| Error::Model(shoal_model::Error::InvalidRequest(m)))?;
        if s.prompt.is_empty() {
            return Err(shoal_model::Error::InvalidRequest("empty prompt".into()).into());
        }
        if s.max_tokens == 0 {
            // The first sample comes with the prompt's last step; a caller that wants none
            // has nothing to run.
            return Err(shoal_model::Error::InvalidRequest("max_tokens is 0: nothing to sample".into()).into());
        }
        if s.prompt.len() >= self.n_ctx {
            return Err(shoal_model::Error::InvalidRequest(format!(
                "prompt of {} tokens does not fit the context of {}",
                s.prompt.len(),
                self.n_ctx
            ))
            .into());
        }
        let need = self.kv_need(s.prompt.len() + s.max_tokens);
        for (i, (&n, &b)) in need.iter().zip(self.kv_budget().iter()).enumerate() {
            if b > 0 && n > b {
                return Err(shoal_model::Error::InvalidRequest(format!(
                    "a prompt of {} tokens with max_tokens {} needs {:.1} MB of KV on stage {i}, more than its budget of {:.1} MB; ask for fewer tokens",
                    s.prompt.len(),
                    s.max_tokens,
                    n as f64 / 1e6,
                    b as f64 / 1e6
                ))
                .into());
            }
        }
        let (tx, rx) = oneshot::channel();
        self.tx.send(Msg::Submit(s, tx)).await.map_err(|_| Error::Stage("the scheduler has stopped".into()))?;
        rx.await.map_err(|_| Error::Stage("the scheduler has stopped".into()))?
    }

    pub async fn stats(&self) -> Result<SchedulerStats> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Msg::Stats(tx)).await.map_err(|_| Error::Stage("the scheduler has stopped".into()))?;
        rx.await.map_err(|_| Error::Stage("the scheduler has stopped".into()))
    }

    /// Runs a prompt and up to `max` samples, returning each sampled token (the first from
    /// the prompt's last position). `keep_going` sees each token and may stop early.
    pub async fn sample_loop(
        &self,
        req: &GenerateRequest,
        logprobs: bool,
        mut keep_going: impl FnMut(&Sampled, usize) -> bool,
    ) -> Result<Vec<Sampled>> {
        let sub = Submission {
            prompt: req.prompt_tokens.clone(),
            params: req.params.clone(),
            logprobs,
            top_logprobs: 0,
            max_tokens: req.max_tokens.max(1),
            forced: None,
            priority: Priority::Interactive,
        };
        let mut rx = self.submit(sub).await?;
        let mut out = Vec::new();
        while let Some(s) = rx.recv().await {
            let s = s?;
            let go = keep_going(&s, out.len() + 1);
            out.push(s);
            if !go {
                break;
            }
        }
        Ok(out)
    }

    /// Generates a completion like [`shoal_model::engine::Engine::generate`], token for
    /// token: the same stop rules, the same streamed text.
    pub async fn generate(&self, tok: &Tokenizer, req: &GenerateRequest, mut on_text: impl FnMut(&str)) -> Result<Generation> {
        let mut stream = TokenStream::new(tok, req);
        if req.max_tokens > 0 {
            self.sample_loop(req, false, |s, _| stream.push(s.token, &mut on_text)).await?;
        }
        Ok(stream.finish(&mut on_text))
    }
}

#[derive(Clone, Debug, Default)]
struct Group {
    members: Vec<u64>,
    busy: bool,
}

struct Seq {
    prompt: Vec<u32>,
    /// Prompt tokens sent so far.
    sent: usize,
    /// The input of the next decode step (the last sample, or the forced token).
    next: Option<u32>,
    sampled: usize,
    max_tokens: usize,
    params: SamplingParams,
    logprobs: bool,
    top_logprobs: usize,
    forced: Option<Vec<u32>>,
    started: bool,
    group: usize,
    /// KV bytes reserved per stage.
    reserved: Vec<u64>,
    background: bool,
    out: mpsc::UnboundedSender<Result<Sampled>>,
    /// Every input token sent so far (prompt chunks and decode inputs), in order.
    fed: Vec<u32>,
    /// The chunks those tokens went in: (tokens, whether the chunk sampled).
    chunk_log: Vec<(u32, bool)>,
    /// The tokens sampled so far (delivered to `out`).
    samples: Vec<u32>,
    /// After a recovery: chunks of `fed` still to send again, (start, tokens, sample).
    replay: VecDeque<(usize, usize, bool)>,
}

/// A frame sent and not answered yet.
struct InFlight {
    step: u64,
    group: usize,
    /// (seq, whether it samples) per chunk.
    chunks: Vec<(u64, bool)>,
    sent_at: tokio::time::Instant,
}

struct Stream {
    first: String,
    tx: mpsc::Sender<v1::ForwardFrame>,
    /// The first stage's answers: results relayed up the chain, and every stage's errors.
    results: tonic::Streaming<v1::ForwardResult>,
    /// With several stages that can: the last stage's `Results` stream for `route`, which
    /// brings the sampled tokens straight back (two hops fewer per step than the relay).
    direct: Option<(String, tonic::Streaming<v1::ForwardResult>)>,
    route: u64,
    pending: VecDeque<InFlight>,
}

type Waiting = VecDeque<(Submission, mpsc::UnboundedSender<Result<Sampled>>)>;

struct Core {
    pipeline: Pipeline,
    cfg: SchedulerConfig,
    kv_per_token: Vec<u64>,
    kv_reserved: Vec<u64>,
    groups: Vec<Group>,
    seqs: HashMap<u64, Seq>,
    waiting: Waiting,
    waiting_background: Waiting,
    next_seq: u64,
    next_step: u64,
    stream: Option<Stream>,
    stats: SchedulerStats,
    recovery: Option<Arc<Recovery>>,
    /// A rebuild in progress: the new pipeline, or why there is none.
    rebuild: Option<oneshot::Receiver<Result<Rebuilt>>>,
    /// Workers a rebuild had to leave out, and when: not taken in again for [`SHUN_FOR`].
    shunned: HashMap<String, tokio::time::Instant>,
    /// What the rebuild is doing (`SchedulerStats::recovering`).
    recovering: Arc<Mutex<Option<String>>>,
    /// A worker to take in once no frame is in flight.
    draining: Option<String>,
    /// Recoveries since the last sampled token.
    no_progress: u32,
    /// When the sequences paused; cleared by the next sampled token.
    paused_at: Option<tokio::time::Instant>,
    /// The handles' view of the stages' KV (replaced with the pipeline).
    kv: Arc<RwLock<KvShape>>,
    /// The stages' addresses, for the newcomer watch.
    stage_addrs: Arc<Mutex<Vec<String>>>,
}

impl Core {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut open = true;
        loop {
            if self.rebuild.is_none() {
                let pending = self.stream.as_ref().is_some_and(|s| !s.pending.is_empty());
                if let Some(addr) = self.draining.take_if(|_| !pending) {
                    // A safe point: nothing in flight. Take the newcomer in.
                    self.pause();
                    self.start_rebuild(format!("worker {addr} joined"));
                } else if self.draining.is_none()
                    && let Err(e) = self.fill().await
                {
                    self.failed(e).await;
                }
            }
            if !open && self.seqs.is_empty() && self.waiting.is_empty() && self.waiting_background.is_empty() {
                break;
            }
            let pending = self.stream.as_ref().is_some_and(|s| !s.pending.is_empty());
            let rebuilding = self.rebuild.is_some();
            tokio::select! {
                m = rx.recv(), if open => match m {
                    Some(Msg::Submit(s, reply)) => {
                        let queued = self.waiting.len() + self.waiting_background.len();
                        if queued >= self.cfg.max_waiting {
                            let msg = format!("{queued} requests are already waiting for the pipeline; retry shortly");
                            let _ = reply.send(Err(Error::Busy(msg)));
                        } else {
                            let (tx, trx) = mpsc::unbounded_channel();
                            match s.priority {
                                Priority::Interactive => self.waiting.push_back((s, tx)),
                                Priority::Background => self.waiting_background.push_back((s, tx)),
                            }
                            let _ = reply.send(Ok(trx));
                        }
                    }
                    Some(Msg::Stats(reply)) => {
                        let _ = reply.send(SchedulerStats {
                            active: self.seqs.len(),
                            active_background: self.seqs.values().filter(|s| s.background).count(),
                            waiting: self.waiting.len() + self.waiting_background.len(),
                            kv_reserved: self.kv_reserved.clone(),
                            kv_budget: self.cfg.kv_budget.clone(),
                            recovering: self.recovering.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                            stages: self.pipeline.stages.len(),
                            ..self.stats.clone()
                        });
                    }
                    Some(Msg::Newcomer(addr)) => {
                        let known = self.pipeline.stages.iter().any(|(w, _)| w.addr == addr);
                        let shunned = self.shunned.get(&addr).is_some_and(|t| t.elapsed() < SHUN_FOR);
                        if !known && !shunned && !rebuilding && self.draining.is_none() {
                            tracing::info!(%addr, "a worker joined: taking it in at the next safe point");
                            self.draining = Some(addr);
                        }
                    }
                    None => open = false,
                },
                r = next_result(self.stream.as_mut()), if pending && !rebuilding => {
                    if let Err(e) = self.answered(r).await {
                        self.failed(e).await;
                    }
                }
                r = rebuilt(self.rebuild.as_mut()), if rebuilding => {
                    self.rebuild = None;
                    self.resume(r).await;
                }
            }
        }
    }

    /// A failed step: recover if that may help, else fail every active sequence.
    async fn failed(&mut self, e: Error) {
        let lost_stage = matches!(e, Error::Stage(_) | Error::Timeout(_) | Error::Connect { .. });
        if self.recovery.is_none() || !lost_stage || self.no_progress >= MAX_RECOVERIES {
            return self.fail_all(e).await;
        }
        tracing::warn!("pipeline step failed: {e}; pausing the sequences to form the pipeline again");
        self.pause();
        self.start_rebuild(e.to_string());
    }

    /// Pauses every sequence: drops the stream (frames in flight are lost) and sets each
    /// started sequence to replay what it sent on the next pipeline.
    fn pause(&mut self) {
        // The rebuild looks at every candidate: a newcomer waiting for a safe point is in it.
        self.draining = None;
        self.stream = None;
        for g in &mut self.groups {
            g.busy = false;
        }
        let n_ctx = self.pipeline.n_ctx;
        for s in self.seqs.values_mut() {
            if !s.started {
                continue;
            }
            s.started = false;
            // Each sampling chunk yields one sample; only the last can be missing.
            let undelivered = s.chunk_log.iter().filter(|c| c.1).count() > s.samples.len();
            s.replay = replay_plan(&s.chunk_log, undelivered, n_ctx);
        }
        self.paused_at.get_or_insert_with(tokio::time::Instant::now);
    }

    fn start_rebuild(&mut self, why: String) {
        let Some(rec) = self.recovery.clone() else { return };
        self.no_progress += 1;
        self.stats.recoveries += 1;
        let old = self.pipeline.clone();
        let (status, registry) = (Arc::clone(&self.recovering), rec.registry.clone());
        let say = move |m: String| {
            tracing::info!("{m}");
            if let Some(reg) = &registry {
                reg.set_state(&m);
            }
            *status.lock().unwrap_or_else(|e| e.into_inner()) = Some(m);
        };
        say(format!("recovering: {why}"));
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let _ = tx.send(rec.rebuild(&old, &say).await);
        });
        self.rebuild = Some(rx);
    }

    /// Takes the rebuilt pipeline (sequences replay from the next frame on), or fails the
    /// paused sequences with why there is none.
    async fn resume(&mut self, r: Result<Rebuilt>) {
        *self.recovering.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let rec = self.recovery.clone();
        let set_state = |m: &str| {
            if let Some(reg) = rec.as_ref().and_then(|r| r.registry.as_ref()) {
                reg.set_state(m);
            }
        };
        let p = match r {
            Ok((p, left_out)) => {
                let now = tokio::time::Instant::now();
                for a in left_out {
                    self.shunned.insert(a, now);
                }
                p
            }
            Err(e) => {
                set_state("serving (the last recovery failed)");
                self.paused_at = None;
                return self.fail_all(e).await;
            }
        };
        let stages = p.stages.len();
        let per_token: Vec<u64> = (0..stages).map(|i| p.kv_bytes_per_token(i)).collect();
        let budget = rec.as_ref().map_or_else(|| vec![0; stages], |r| r.kv_budgets(&p));
        self.kv_reserved = vec![0; stages];
        for s in self.seqs.values_mut() {
            s.reserved = kv_need(&per_token, p.n_ctx, s.prompt.len() + s.max_tokens);
            for (r, &b) in self.kv_reserved.iter_mut().zip(&s.reserved) {
                *r += b;
            }
        }
        tracing::info!(
            "pipeline formed again: {}",
            p.stages.iter().map(|(w, sp)| format!("{} {:?}", w.addr, sp.layers)).collect::<Vec<_>>().join(", ")
        );
        *self.stage_addrs.lock().unwrap_or_else(|e| e.into_inner()) = p.stages.iter().map(|(w, _)| w.addr.clone()).collect();
        *self.kv.write().unwrap_or_else(|e| e.into_inner()) = KvShape { per_token: per_token.clone(), budget: budget.clone() };
        self.kv_per_token = per_token;
        self.cfg.kv_budget = budget;
        self.pipeline = p;
        set_state("serving");
    }

    /// The next waiting submission to admit, if its KV fits: interactive ones first, then
    /// background ones while they hold fewer than their share of places. The queue is served
    /// in order: one that does not fit yet holds back those behind it.
    fn admit_next(&mut self) -> Option<(Submission, mpsc::UnboundedSender<Result<Sampled>>)> {
        // Callers that went away while waiting leave the queue first.
        while self.waiting.front().is_some_and(|(_, o)| o.is_closed()) {
            self.waiting.pop_front();
        }
        while self.waiting_background.front().is_some_and(|(_, o)| o.is_closed()) {
            self.waiting_background.pop_front();
        }
        let queue = if !self.waiting.is_empty() {
            &mut self.waiting
        } else if !self.waiting_background.is_empty()
            && self.seqs.values().filter(|s| s.background).count() < self.cfg.background_seqs
        {
            &mut self.waiting_background
        } else {
            return None;
        };
        let (s, _) = queue.front()?;
        let need = kv_need(&self.kv_per_token, self.pipeline.n_ctx, s.prompt.len() + s.max_tokens);
        let fits = need
            .iter()
            .zip(&self.kv_reserved)
            .zip(&self.cfg.kv_budget)
            .all(|((&n, &held), &budget)| budget == 0 || held + n <= budget);
        if !fits {
            return None;
        }
        queue.pop_front()
    }

    /// Admits waiting sequences and sends a frame for every idle group that has work.
    async fn fill(&mut self) -> Result<()> {
        while self.seqs.len() < self.cfg.max_seqs {
            let Some((s, out)) = self.admit_next() else { break };
            let reserved = kv_need(&self.kv_per_token, self.pipeline.n_ctx, s.prompt.len() + s.max_tokens);
            for (r, &b) in self.kv_reserved.iter_mut().zip(&reserved) {
                *r += b;
            }
            let id = self.next_seq;
            self.next_seq += 1;
            let group = (0..self.groups.len()).min_by_key(|&g| (self.groups[g].members.len(), self.groups[g].busy)).unwrap_or(0);
            self.groups[group].members.push(id);
            self.seqs.insert(
                id,
                Seq {
                    prompt: s.prompt,
                    sent: 0,
                    next: None,
                    sampled: 0,
                    max_tokens: s.max_tokens,
                    params: s.params,
                    logprobs: s.logprobs,
                    top_logprobs: s.top_logprobs,
                    forced: s.forced,
                    started: false,
                    group,
                    reserved,
                    background: s.priority == Priority::Background,
                    out,
                    fed: Vec::new(),
                    chunk_log: Vec::new(),
                    samples: Vec::new(),
                    replay: VecDeque::new(),
                },
            );
        }
        // Sequences whose caller went away end here, while none of their frames is in flight.
        let mut gone = Vec::new();
        for g in self.groups.iter().filter(|g| !g.busy) {
            gone.extend(g.members.iter().copied().filter(|id| self.seqs.get(id).is_none_or(|s| s.out.is_closed())));
        }
        if !gone.is_empty() {
            self.finish(&gone).await;
        }
        for g in 0..self.groups.len() {
            if !self.groups[g].busy {
                self.send_group(g).await?;
            }
        }
        Ok(())
    }

    async fn send_group(&mut self, g: usize) -> Result<()> {
        let mut chunks = Vec::new();
        let mut starts = Vec::new();
        let mut ids = Vec::new();
        let mut flags = Vec::new();
        let mut budget = self.cfg.prefill_tokens.max(1);
        let full = budget;
        for &id in &self.groups[g].members {
            let Some(s) = self.seqs.get_mut(&id) else { continue };
            let (tokens, sample): (Vec<u32>, bool) = if let Some(&(start, n, sample)) = s.replay.front() {
                // Replaying after a recovery: the same chunks again, from `fed`.
                // A chunk keeps its shape: it waits for a frame with room, unless it is the
                // frame's first prompt work (it never fits better).
                if n > budget && budget < full {
                    continue;
                }
                budget = budget.saturating_sub(n);
                s.replay.pop_front();
                (s.fed[start..start + n].to_vec(), sample)
            } else {
                let tokens: Vec<u32> = if s.sent < s.prompt.len() {
                    if budget == 0 {
                        continue;
                    }
                    let n = (s.prompt.len() - s.sent).min(budget);
                    budget -= n;
                    s.prompt[s.sent..s.sent + n].to_vec()
                } else if let Some(t) = s.next {
                    vec![t]
                } else {
                    continue;
                };
                let sample = s.sent + tokens.len() >= s.prompt.len();
                if s.sent < s.prompt.len() {
                    s.sent += tokens.len();
                } else {
                    s.next = None;
                }
                s.fed.extend_from_slice(&tokens);
                s.chunk_log.push((tokens.len() as u32, sample));
                (tokens, sample)
            };
            if !s.started {
                s.started = true;
                // After a recovery the sampler starts again where it was: the prompt and the
                // samples so far count for the penalties, and its random stream skips the
                // draws already made (one per sample above temperature 0).
                let mut history = s.prompt.clone();
                history.extend_from_slice(&s.samples);
                let draws_done = if s.params.temperature > 0.0 { s.samples.len() as u64 } else { 0 };
                starts.push(v1::SeqStart {
                    seq: id,
                    sampling: Some(shoal_worker::service::params_to_wire(&s.params, s.logprobs, s.top_logprobs)),
                    history,
                    draws_done,
                });
            }
            chunks.push(v1::Chunk { seq: id, n_tokens: tokens.len() as u32, sample });
            flags.push((id, sample));
            ids.extend(tokens);
        }
        if chunks.is_empty() {
            return Ok(());
        }
        if self.stream.is_none() {
            self.stream = Some(self.open().await?);
        }
        let step = self.next_step;
        self.next_step += 1;
        let Some(st) = self.stream.as_mut() else { return Ok(()) };
        let frame = v1::ForwardFrame {
            step,
            chunks,
            starts,
            input: Some(v1::forward_frame::Input::Tokens(v1::TokenIds { ids })),
            route: st.route,
        };
        if st.tx.send(frame).await.is_err() {
            // The stream is gone; its error (if any) is the better message.
            return match tokio::time::timeout(Duration::from_secs(5), st.results.message()).await {
                Ok(Err(s)) => Err(stage_err(&st.first, s)),
                _ => Err(Error::Stage("the stream to the first stage closed".into())),
            };
        }
        st.pending.push_back(InFlight { step, group: g, chunks: flags, sent_at: tokio::time::Instant::now() });
        self.groups[g].busy = true;
        Ok(())
    }

    async fn open(&mut self) -> Result<Stream> {
        let (tx, rx) = mpsc::channel::<v1::ForwardFrame>(self.groups.len() + 4);
        let (first, mut client) = {
            let w = &self.pipeline.stages[0].0;
            (w.addr.clone(), w.client())
        };
        // The direct path first, so it is there before the first result.
        let mut direct = None;
        let mut route = 0;
        let stages = &self.pipeline.stages;
        if let Some((last, _)) = stages.last().filter(|_| stages.len() > 1)
            && last.hello.capabilities.iter().any(|c| c == shoal_proto::CAP_RESULTS_ROUTE)
        {
            route = random_route();
            let r = last.client().results(v1::ResultsRequest { route }).await;
            match r {
                Ok(s) => direct = Some((last.addr.clone(), s.into_inner())),
                Err(e) => {
                    tracing::warn!("the last stage {} refused a Results stream ({}); results take the relay", last.addr, e.message());
                    route = 0;
                }
            }
        }
        let results = client.forward(ReceiverStream::new(rx)).await.map_err(|s| stage_err(&first, s))?.into_inner();
        Ok(Stream { first, tx, results, direct, route, pending: VecDeque::new() })
    }

    async fn answered(&mut self, r: Result<v1::ForwardResult>) -> Result<()> {
        let r = r?;
        let Some(st) = self.stream.as_mut() else { return Ok(()) };
        let Some(f) = st.pending.pop_front() else {
            return Err(Error::Stage(format!("an answer for step {} that was not asked", r.step)));
        };
        if r.step != f.step {
            return Err(Error::Stage(format!("answer for step {} while waiting for {}", r.step, f.step)));
        }
        self.stats.steps += 1;
        self.stats.step_ns += f.sent_at.elapsed().as_nanos() as u64;
        self.groups[f.group].busy = false;
        let mut done = Vec::new();
        let mut tokens = r.tokens.iter();
        for (id, sample) in f.chunks {
            if !sample {
                continue;
            }
            let t = tokens
                .next()
                .filter(|t| t.seq == id)
                .ok_or_else(|| Error::Stage(format!("the last stage sampled no token for sequence {id}")))?;
            let Some(s) = self.seqs.get_mut(&id) else { continue };
            self.stats.tokens_sampled += 1;
            self.no_progress = 0;
            if let Some(t0) = self.paused_at.take() {
                self.stats.last_pause_ms = t0.elapsed().as_millis() as u64;
                tracing::info!(pause_ms = self.stats.last_pause_ms, "generation resumed");
            }
            s.sampled += 1;
            s.samples.push(t.token);
            let top = t.top.iter().map(|x| (x.token, x.logprob)).collect();
            let delivered = s.out.send(Ok(Sampled { token: t.token, logprob: t.logprob, top })).is_ok();
            let next = match &s.forced {
                Some(f) => f.get(s.sampled - 1).copied(),
                None => Some(t.token),
            };
            let full = s.prompt.len() + s.sampled >= self.pipeline.n_ctx;
            if !delivered || s.sampled >= s.max_tokens || full || next.is_none() {
                done.push(id);
            } else {
                s.next = next;
            }
        }
        if !done.is_empty() {
            self.finish(&done).await;
        }
        Ok(())
    }

    /// Ends sequences (their senders drop, closing the receivers) and releases their KV.
    async fn finish(&mut self, ids: &[u64]) {
        for id in ids {
            if let Some(s) = self.seqs.remove(id) {
                self.groups[s.group].members.retain(|m| m != id);
                for (r, &b) in self.kv_reserved.iter_mut().zip(&s.reserved) {
                    *r = r.saturating_sub(b);
                }
            }
        }
        self.pipeline.release_in_background(ids.to_vec());
    }

    /// Fails every active sequence with `e` and drops the stream.
    async fn fail_all(&mut self, e: Error) {
        tracing::warn!("pipeline step failed: {e}");
        self.paused_at = None;
        // The next request starts afresh: a failure on it may recover again.
        self.no_progress = 0;
        let msg = match e {
            Error::Stage(m) => m,
            e => e.to_string(),
        };
        let ids: Vec<u64> = self.seqs.keys().copied().collect();
        for s in self.seqs.values() {
            let _ = s.out.send(Err(Error::Stage(msg.clone())));
        }
        self.stream = None;
        for g in &mut self.groups {
            g.busy = false;
        }
        self.finish(&ids).await;
    }
}

/// The replay of a sequence's chunks `log` (tokens, sampled) after a recovery, as
/// (start, tokens, sample) over its fed tokens. Chunks keep their shapes, so every position
/// is computed by the same kernels as the first time and the rebuilt KV is bit for bit the
/// lost one; runs of one-token steps whose attention a chunk computes identically
/// ([`ggml_flash_batchable`] for a context of `n_ctx`) go as one chunk of at most
/// [`MAX_BATCHED_REPLAY`]. Nothing samples except the last chunk when `undelivered` (its
/// sample was lost in flight).
fn replay_plan(log: &[(u32, bool)], undelivered: bool, n_ctx: usize) -> VecDeque<(usize, usize, bool)> {
    let mut out: VecDeque<(usize, usize, bool)> = VecDeque::new();
    // Whether the back of `out` is a run of merged one-token steps that may grow.
    let mut open_run = false;
    let mut pos = 0;
    for (i, &(n, sampled)) in log.iter().enumerate() {
        let n = n as usize;
        let sample = sampled && undelivered && i + 1 == log.len();
        let mergeable = n == 1 && ggml_flash_batchable(n_ctx, pos + 1);
        match out.back_mut() {
            Some(run) if mergeable && open_run && run.1 < MAX_BATCHED_REPLAY => {
                run.1 += 1;
                run.2 = sample;
            }
            _ => {
                out.push_back((pos, n, sample));
                open_run = mergeable;
            }
        }
        pos += n;
    }
    out
}

/// Tells the scheduler about candidate workers (registered, or named at start) that are
/// not stages and answer `Health`, once each while they stay candidates and out of the
/// pipeline; ends with the scheduler.
async fn watch_newcomers(rec: Arc<Recovery>, stages: Arc<Mutex<Vec<String>>>, tx: mpsc::WeakSender<Msg>) {
    let mut joins = rec.registry.as_ref().map(|r| r.joins());
    // When each was told; told again after a while if it is still out (a rebuild found it
    // gone again, say).
    let mut told: HashMap<String, tokio::time::Instant> = HashMap::new();
    loop {
        let listed: Vec<_> = rec.candidates();
        let current = stages.lock().unwrap_or_else(|e| e.into_inner()).clone();
        // A worker that left the registry, or became a stage, may be told about again.
        told.retain(|a, at| listed.iter().any(|w| &w.addr == a) && !current.contains(a) && at.elapsed() < Duration::from_secs(30));
        let fresh: Vec<_> = listed.iter().filter(|w| !current.contains(&w.addr) && !told.contains_key(&w.addr)).cloned().collect();
        for w in fresh {
            let mut c = w.client();
            let ok = matches!(
                tokio::time::timeout(super::recovery::HEALTH_WAIT, c.health(v1::HealthRequest {})).await,
                Ok(Ok(_))
            );
            if ok {
                let Some(tx) = tx.upgrade() else { return };
                told.insert(w.addr.clone(), tokio::time::Instant::now());
                if tx.send(Msg::Newcomer(w.addr.clone())).await.is_err() {
                    return;
                }
            }
        }
        if tx.upgrade().is_none() {
            return;
        }
        // Look again on every join, heartbeat or departure, and every 2 s.
        match joins.as_mut() {
            Some(j) => {
                let _ = tokio::time::timeout(Duration::from_secs(2), j.changed()).await;
            }
            None => tokio::time::sleep(Duration::from_secs(2)).await,
        }
    }
}

/// The rebuild's outcome, once it is there.
async fn rebuilt(r: Option<&mut oneshot::Receiver<Result<Rebuilt>>>) -> Result<Rebuilt> {
    match r {
        None => std::future::pending().await,
        Some(r) => r.await.unwrap_or_else(|_| Err(Error::Stage("the recovery task ended without an answer".into()))),
    }
}

/// The next answer, from the last stage's `Results` stream or the first stage's stream
/// (which also carries every stage's errors), bounded by [`STEP_TIMEOUT`].
async fn next_result(st: Option<&mut Stream>) -> Result<v1::ForwardResult> {
    let Some(st) = st else { return std::future::pending().await };
    // From when the oldest frame in flight was sent, not from this call: the loop calls
    // again after every message (a /health poll), which must not restart the clock.
    let deadline = st.pending.front().map_or_else(tokio::time::Instant::now, |f| f.sent_at) + STEP_TIMEOUT;
    let first = st.first.clone();
    let from_first = |m: std::result::Result<Option<v1::ForwardResult>, tonic::Status>| match m {
        Err(s) => Err(stage_err(&first, s)),
        Ok(None) => Err(Error::Stage("the first stage closed the stream".into())),
        Ok(Some(r)) => Ok(r),
    };
    let Some((last, direct)) = st.direct.as_mut() else {
        return match tokio::time::timeout_at(deadline, st.results.message()).await {
            Err(_) => Err(Error::Timeout(STEP_TIMEOUT)),
            Ok(m) => from_first(m),
        };
    };
    let r = tokio::time::timeout_at(deadline, async {
        tokio::select! {
            m = st.results.message() => from_first(m),
            m = direct.message() => match m {
                Ok(Some(r)) => Ok(r),
                // The last stage's stream broke: the chain reports why (it names the stage)
                // within the keepalive timeout; else say it here.
                other => {
                    let why = match other {
                        Err(s) => s.message().to_string(),
                        _ => "it closed the Results stream".into(),
                    };
                    match tokio::time::timeout(Duration::from_secs(4), st.results.message()).await {
                        Ok(Err(s)) => Err(stage_err(&first, s)),
                        _ => Err(Error::Stage(format!("next stage {last} failed: {why}"))),
                    }
                }
            },
        }
    })
    .await;
    r.unwrap_or(Err(Error::Timeout(STEP_TIMEOUT)))
}

/// KV bytes per stage of `tokens` positions (at most the context), from each stage's bytes
/// per token: what a sequence of prompt + `max_tokens` reserves.
fn kv_need(per_token: &[u64], n_ctx: usize, tokens: usize) -> Vec<u64> {
    per_token.iter().map(|&b| b * tokens.min(n_ctx) as u64).collect()
}

/// A route id for a `Results` stream: random, non-zero.
fn random_route() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish() | 1
}

#[cfg(test)]
mod tests {
    use super::replay_plan;

    #[test]
    fn a_replay_keeps_chunk_shapes_and_merges_one_token_steps_only_where_exact() {
        // A prompt in chunks of 100 and 20 (the second sampled), then 150 decode steps.
        let mut log = vec![(100, false), (20, true)];
        log.extend(std::iter::repeat_n((1, true), 150));
        let plan: Vec<_> = replay_plan(&log, false, 4096).into_iter().collect();
        // Prompt chunks as they were, no sampling anywhere.
        assert_eq!(plan[..2], [(0, 100, false), (100, 20, false)]);
        // Steps at positions 120..=255 (257 cells and more split a single token's KV) go
        // in runs of at most 63; the rest one at a time.
        let merged: Vec<_> = plan[2..].iter().take_while(|c| c.1 > 1).copied().collect();
        assert_eq!(merged, [(120, 63, false), (183, 63, false), (246, 10, false)]);
        let singles = &plan[2 + merged.len()..];
        assert_eq!(singles.len(), 270 - 256);
        assert!(singles.iter().enumerate().all(|(i, &c)| c == (256 + i, 1, false)), "{singles:?}");
        // Every fed token is replayed once, in order.
        let mut at = 0;
        for &(start, n, _) in &plan {
            assert_eq!(start, at);
            at += n;
        }
        assert_eq!(at, 270);
        // A sample lost in flight is taken again by the last chunk, merged or not.
        let plan = replay_plan(&log, true, 4096);
        assert_eq!(plan.back(), Some(&(269, 1, true)));
        assert_eq!(plan.iter().filter(|c| c.2).count(), 1);
        let short = [(5, true), (1, true), (1, true)];
        assert_eq!(replay_plan(&short, true, 4096).into_iter().collect::<Vec<_>>(), [(0, 5, false), (5, 2, true)]);
        // Only a sampling chunk can have lost its sample.
        assert!(replay_plan(&[(8, false)], true, 4096).iter().all(|c| !c.2));
    }
}
