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
//! dropped receiver is noticed only while its group is idle). A failure of the stream
//! fails every active sequence with the stage's error (recovery is a later step) and the
//! next request opens a fresh stream.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use shoal_model::engine::{GenerateRequest, Generation, PREFILL_CHUNK, TokenStream};
use shoal_model::sampling::SamplingParams;
use shoal_model::tokenizer::Tokenizer;
use shoal_proto::v1;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use super::pipeline::{Pipeline, STEP_TIMEOUT, Sampled, stage_err};
use super::{Error, Result};

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
}

enum Msg {
    Submit(Submission, oneshot::Sender<Result<TokenRx>>),
    Stats(oneshot::Sender<SchedulerStats>),
}

/// A handle on a running scheduler; cheap to clone. The scheduler stops when every handle
/// is dropped and no sequence is active.
#[derive(Clone, Debug)]
pub struct Scheduler {
    tx: mpsc::Sender<Msg>,
    n_ctx: usize,
    stages: usize,
    /// Per stage: KV bytes of one token, and the budget (0: unlimited).
    kv_per_token: std::sync::Arc<[u64]>,
    kv_budget: std::sync::Arc<[u64]>,
}

impl Scheduler {
    /// Starts the scheduler task for `pipeline` on the current tokio runtime.
    pub fn start(pipeline: Pipeline, cfg: SchedulerConfig) -> Scheduler {
        let (tx, rx) = mpsc::channel(1024);
        let n_ctx = pipeline.n_ctx;
        let stages = pipeline.stages.len();
        let in_flight = if cfg.in_flight == 0 { stages.max(1) } else { cfg.in_flight };
        let kv_per_token: Vec<u64> = (0..stages).map(|i| pipeline.kv_bytes_per_token(i)).collect();
        let kv_budget: Vec<u64> = (0..stages).map(|i| cfg.kv_budget.get(i).copied().unwrap_or(0)).collect();
        let background_seqs = if cfg.background_seqs == 0 { (cfg.max_seqs / 2).max(1) } else { cfg.background_seqs };
        let core = Core {
            pipeline,
            kv_per_token: kv_per_token.clone(),
            kv_reserved: vec![0; stages],
            cfg: SchedulerConfig { in_flight, kv_budget: kv_budget.clone(), background_seqs, ..cfg },
            groups: vec![Group::default(); in_flight],
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            waiting_background: VecDeque::new(),
            next_seq: 1,
            next_step: 0,
            stream: None,
            stats: SchedulerStats::default(),
        };
        tokio::spawn(core.run(rx));
        Scheduler { tx, n_ctx, stages, kv_per_token: kv_per_token.into(), kv_budget: kv_budget.into() }
    }

    /// KV bytes a sequence reserves on each stage: its worst case of `tokens` positions.
    pub fn kv_need(&self, tokens: usize) -> Vec<u64> {
        kv_need(&self.kv_per_token, self.n_ctx, tokens)
    }

    /// Per stage KV budget (0: unlimited).
    pub fn kv_budget(&self) -> &[u64] {
        &self.kv_budget
    }

    /// Context length of every sequence.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn stages(&self) -> usize {
        self.stages
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
        for (i, (&n, &b)) in need.iter().zip(self.kv_budget.iter()).enumerate() {
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
}

impl Core {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut open = true;
        loop {
            if let Err(e) = self.fill().await {
                self.fail_all(e).await;
            }
            if !open && self.seqs.is_empty() && self.waiting.is_empty() && self.waiting_background.is_empty() {
                break;
            }
            let pending = self.stream.as_ref().is_some_and(|s| !s.pending.is_empty());
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
                            ..self.stats.clone()
                        });
                    }
                    None => open = false,
                },
                r = next_result(self.stream.as_mut()), if pending => {
                    if let Err(e) = self.answered(r).await {
                        self.fail_all(e).await;
                    }
                }
            }
        }
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
        for &id in &self.groups[g].members {
            let Some(s) = self.seqs.get_mut(&id) else { continue };
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
            if !s.started {
                s.started = true;
                starts.push(v1::SeqStart {
                    seq: id,
                    sampling: Some(shoal_worker::service::params_to_wire(&s.params, s.logprobs, s.top_logprobs)),
                    history: s.prompt.clone(),
                });
            }
            if s.sent < s.prompt.len() {
                s.sent += tokens.len();
            } else {
                s.next = None;
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
            s.sampled += 1;
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

/// The next answer, from the last stage's `Results` stream or the first stage's stream
/// (which also carries every stage's errors), bounded by [`STEP_TIMEOUT`].
async fn next_result(st: Option<&mut Stream>) -> Result<v1::ForwardResult> {
    let Some(st) = st else { return std::future::pending().await };
    let first = st.first.clone();
    let from_first = |m: std::result::Result<Option<v1::ForwardResult>, tonic::Status>| match m {
        Err(s) => Err(stage_err(&first, s)),
        Ok(None) => Err(Error::Stage("the first stage closed the stream".into())),
        Ok(Some(r)) => Ok(r),
    };
    let Some((last, direct)) = st.direct.as_mut() else {
        return match tokio::time::timeout(STEP_TIMEOUT, st.results.message()).await {
            Err(_) => Err(Error::Timeout(STEP_TIMEOUT)),
            Ok(m) => from_first(m),
        };
    };
    let r = tokio::time::timeout(STEP_TIMEOUT, async {
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
