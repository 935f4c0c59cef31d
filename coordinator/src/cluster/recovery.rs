//! Recovery: a new pipeline after a worker is lost, or with a worker that (re)joined.
//!
//! The [`super::scheduler`] notices a lost stage (its stream breaks, or no answer comes),
//! pauses every sequence and hands the old [`Pipeline`] to [`Recovery::rebuild`], which:
//!
//! 1. gathers the candidates: the old stages' workers, then every worker the registry lists
//!    (joined with `--join`, or found in etcd) that is not among them;
//! 2. keeps those that answer `Health` within [`HEALTH_WAIT`] (a dead worker refuses the
//!    connection at once; a cut-off one says nothing and times out);
//! 3. reuses each known worker's measurements and calibrates only newcomers;
//! 4. plans the model over them with the same workload and optimizer as before; if it no
//!    longer fits, says so (registry state, `/health`) and waits for a worker to join, up
//!    to [`Recovery::wait`];
//! 5. loads every stage's new shard (`LoadShard` replaces what the worker held, KV
//!    included) and publishes the new plan (registry, etcd).
//!
//! The scheduler then rebuilds each sequence's KV by replaying its token history on the new
//! pipeline (see `scheduler.rs`) and carries on; clients only see a pause.

use std::time::Duration;

use shoal_proto::v1;

use super::pipeline::{self, LoadOptions, Pipeline, Planning, Worker};
use super::registry::{Registry, StageInfo};
use super::{Error, Result};

/// What a rebuild gives: the new pipeline and the workers it had to leave out.
pub type Rebuilt = (Pipeline, Vec<String>);

/// How long a candidate has to answer `Health`.
pub const HEALTH_WAIT: Duration = Duration::from_secs(2);

/// Where the plan is published in etcd after a rebuild.
#[derive(Clone, Debug)]
pub struct EtcdPlan {
    pub urls: String,
    pub prefix: String,
    pub model_file: String,
}

/// What the scheduler needs to build a pipeline again.
#[derive(Clone, Debug)]
pub struct Recovery {
    /// Workers that joined (or were found in etcd): replacements and returning workers.
    pub registry: Option<Registry>,
    /// Workers named at start (`--worker ADDR`): one that was lost is taken back when it
    /// answers again.
    pub seeds: Vec<Worker>,
    pub opts: LoadOptions,
    /// Per-stage KV budget in bytes (`--kv-budget-mib`); `None`: the room each plan leaves.
    pub kv_budget: Option<u64>,
    pub etcd: Option<EtcdPlan>,
    /// Longest wait for enough workers to hold the model again; then the paused requests fail.
    pub wait: Duration,
}

impl Recovery {
    /// Per-stage KV budgets for `p`, by the same rule `shoal serve` starts with.
    pub fn kv_budgets(&self, p: &Pipeline) -> Vec<u64> {
        (0..p.stages.len()).map(|i| self.kv_budget.unwrap_or_else(|| p.kv_room(i))).collect()
    }

    /// The workers that may serve besides the stages: the seeds, then the registry's.
    pub fn candidates(&self) -> Vec<Worker> {
        let mut out = self.seeds.clone();
        if let Some(reg) = &self.registry {
            for w in reg.live() {
                if !out.iter().any(|c| c.addr == w.addr) {
                    out.push(w);
                }
            }
        }
        out
    }

    /// A pipeline over the workers that are alive now. `say` is told what it is doing
    /// (for `/health`, the registry's state and the log).
    ///
    /// A worker that fails its calibration or its `LoadShard` is left out and the plan made
    /// again at once without it; the addresses left out so are returned beside the pipeline
    /// (the scheduler does not take them in again for a while).
    pub async fn rebuild(&self, old: &Pipeline, say: &(dyn Fn(String) + Send + Sync)) -> Result<Rebuilt> {
        let deadline = tokio::time::Instant::now() + self.wait;
        let mut joins = self.registry.as_ref().map(|r| r.joins());
        let mut excluded: Vec<String> = Vec::new();
        loop {
            if let Some(j) = joins.as_mut() {
                j.borrow_and_update();
            }
            match self.try_rebuild(old, say, &excluded).await {
                Ok(p) => return Ok((p, excluded)),
                Err(Error::Load { addr, msg } | Error::Connect { addr, msg }) if !excluded.contains(&addr) => {
                    tracing::warn!(%addr, "leaving the worker out: {msg}");
                    excluded.push(addr);
                }
                Err(e) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Error::Stage(format!("no pipeline could be formed again within {:?}: {e}", self.wait)));
                    }
                    say(format!("recovering: {e}; waiting for a worker to join"));
                    // Look again when a worker joins, or every 2 s (one may come back).
                    let nap = tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + Duration::from_secs(2)));
                    match joins.as_mut() {
                        Some(j) => {
                            tokio::select! {
                                _ = j.changed() => {}
                                _ = nap => {}
                            }
                        }
                        None => nap.await,
                    }
                }
            }
        }
    }

    async fn try_rebuild(&self, old: &Pipeline, say: &(dyn Fn(String) + Send + Sync), excluded: &[String]) -> Result<Pipeline> {
        // Candidates: the old stages (in pipeline order), then registry workers.
        let mut cands: Vec<(Worker, usize)> =
            old.stages.iter().zip(&old.threads).map(|((w, _), &t)| (w.clone(), t)).collect();
        for w in self.candidates() {
            if !cands.iter().any(|(c, _)| c.addr == w.addr) {
                cands.push((w, self.opts.n_threads));
            }
        }
        cands.retain(|(w, _)| !excluded.contains(&w.addr));
        let checks: Vec<_> = cands
            .iter()
            .map(|(w, _)| {
                let mut c = w.client();
                tokio::spawn(async move { matches!(tokio::time::timeout(HEALTH_WAIT, c.health(v1::HealthRequest {})).await, Ok(Ok(_))) })
            })
            .collect();
        let mut alive = Vec::with_capacity(checks.len());
        for h in checks {
            alive.push(h.await.unwrap_or(false));
        }
        let lost: Vec<&str> = cands.iter().zip(&alive).filter(|(_, a)| !**a).map(|((w, _), _)| w.addr.as_str()).collect();
        if !lost.is_empty() {
            tracing::warn!(?lost, "workers that do not answer are left out");
        }
        let cands: Vec<(Worker, usize)> = cands.into_iter().zip(alive).filter(|(_, a)| *a).map(|(c, _)| c).collect();
        if cands.is_empty() {
            return Err(Error::Plan("no worker answers".into()));
        }
        // Known workers keep their measurements; newcomers are calibrated (one at a time:
        // workers on one host would disturb each other's measurements).
        let mut live = Vec::with_capacity(cands.len());
        for (w, t) in &cands {
            match old.planning.live.iter().find(|l| l.name == w.addr) {
                Some(l) => live.push(l.clone()),
                None => {
                    say(format!("recovering: calibrating {}", w.addr));
                    // A newcomer that cannot be measured is left out (by the caller).
                    let l = pipeline::live_worker(w, *t, &old.planning.model)
                        .await
                        .map_err(|e| Error::Load { addr: w.addr.clone(), msg: e.to_string() })?;
                    live.push(l);
                }
            }
        }
        let planning = Planning { live, ..old.planning.clone() };
        let names: Vec<&str> = cands.iter().map(|(w, _)| w.addr.as_str()).collect();
        say(format!("recovering: loading the model on {}", names.join(", ")));
        let (workers, threads): (Vec<Worker>, Vec<usize>) = cands.into_iter().unzip();
        let p = Pipeline::load_on(workers, threads, planning, old.n_ctx, old.identity.clone(), &self.opts).await?;
        if let Some(reg) = &self.registry {
            reg.set_pipeline(&p);
        }
        if let Some(e) = &self.etcd {
            match super::etcd::publish_plan(&e.urls, &e.prefix, &e.model_file, &p.identity, &StageInfo::of(&p)).await {
                Ok(version) => tracing::info!(version, "new plan published in etcd"),
                Err(err) => tracing::warn!("publishing the new plan in etcd: {err}"),
            }
        }
        Ok(p)
    }
}
